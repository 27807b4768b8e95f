"""Residual vector quantization (Zeghidour et al. 2021, SoundStream, Algorithm 1).

Stage ``i`` quantizes what the earlier stages left: ``r_0 = h``, ``q_i = Q_i(r_i)``, ``r_{i+1} = r_i - q_i``,
and the output is ``sum_i q_i``. The stages see ``r_i = h - sum_{j<i} sg(q_j)``, so each stage's
commitment loss reaches the encoder and each codebook learns (EMA, gradient) from its own residuals.
The output's gradient is straight-through as a whole, ``h + sg(sum_i q_i - h)``: the identity for the
encoder whatever the number of stages. Losses are summed over stages, key by key.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from genlab.core.bounds import PositiveInt
from genlab.core.registry import register
from genlab.models.quantizers.base import Quantizer, add_losses, replicate
from genlab.models.quantizers.estimators import straight_through


@register("quantizer", "residual")
class ResidualQuantizer(Quantizer):
    """Residual quantizer over ``quantizer`` (one, copied ``num_quantizers`` times with fresh parameters, or a
    list of stages; stages of any kind, without projections of their own). ``dim`` (default: the stages'
    dim) adds linear projections to and from it. ``z: [B, dim, ...]`` -> quantized of the same shape,
    indices ``[B, ..., Q]`` (stage last), losses summed over stages."""

    def __init__(self, quantizer: Quantizer | list[Quantizer], num_quantizers: PositiveInt | None = None,
                 dim: PositiveInt | None = None, channel_last: bool = False) -> None:
        stages = replicate(quantizer, num_quantizers, "ResidualQuantizer")
        if len({q.dim for q in stages}) != 1:
            raise ValueError(f"ResidualQuantizer: the stages must share one dim, got {[q.dim for q in stages]}")
        super().__init__(dim or stages[0].dim, stages[0].dim, channel_last)
        self.stages = nn.ModuleList(stages)

    @property
    def index_shape(self) -> tuple[int, ...]:
        return (len(self.stages), *self.stages[0].index_shape)

    def vectors(self, h: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        residual, total, indices, losses = h, torch.zeros_like(h), [], {}
        for stage in self.stages:
            q, idx, stage_losses = stage.vectors(residual)
            q = q.detach()
            residual, total = residual - q, total + q
            indices.append(idx)
            add_losses(losses, stage_losses)
        if torch.is_grad_enabled() and h.requires_grad:
            total = straight_through(h, total)
        return total, torch.stack(indices, dim=2), losses

    def lookup(self, indices: Tensor) -> Tensor:
        return sum(stage.lookup(indices[:, :, i]) for i, stage in enumerate(self.stages))
