"""Grouped (product) quantization: the ``d`` channels are split into ``G`` groups, each quantized by its own
quantizer (Jegou et al. 2011's product quantization; ``heads`` with separate codebooks in
vector-quantize-pytorch, ``num_codebooks`` in its FSQ and LFQ). The code space is the product of the
groups': ``prod_g K_g`` codes from ``G`` small codebooks. Losses are averaged over groups, key by key
(for equal groups, the commitment is then the mean over all channels, as without groups).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from genlab.core.bounds import PositiveInt
from genlab.core.registry import register
from genlab.models.quantizers.base import Quantizer, add_losses, replicate


@register("quantizer", "grouped")
class GroupedQuantizer(Quantizer):
    """Grouped quantizer over ``quantizer`` (one, copied ``groups`` times with fresh parameters, or a list, one
    per group, without projections of their own): group ``g`` holds the next ``quantizer_g.dim`` channels.
    ``dim`` (default: the sum of the groups' dims) adds linear projections. ``z: [B, dim, ...]`` -> quantized
    of the same shape, indices ``[B, ..., G]`` (group last), losses averaged over groups."""

    def __init__(self, quantizer: Quantizer | list[Quantizer], groups: PositiveInt | None = None,
                 dim: PositiveInt | None = None, channel_last: bool = False) -> None:
        parts = replicate(quantizer, groups, "GroupedQuantizer")
        inner = sum(q.dim for q in parts)
        super().__init__(dim or inner, inner, channel_last)
        self.groups = nn.ModuleList(parts)
        self.splits = [q.dim for q in parts]
        self.index_shape  # the groups' indices must stack: ValueError now rather than at the first call

    @property
    def index_shape(self) -> tuple[int, ...]:
        shapes = {q.index_shape for q in self.groups}
        if len(shapes) != 1:
            raise ValueError(f"GroupedQuantizer: the groups' indices differ in shape {sorted(shapes)}")
        return (len(self.groups), *shapes.pop())

    def vectors(self, h: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        outs, indices, losses = [], [], {}
        for group, part in zip(self.groups, h.split(self.splits, dim=-1)):
            q, idx, group_losses = group.vectors(part)
            outs.append(q)
            indices.append(idx)
            add_losses(losses, group_losses, 1 / len(self.groups))
        return torch.cat(outs, dim=-1), torch.stack(indices, dim=2), losses

    def lookup(self, indices: Tensor) -> Tensor:
        return torch.cat([group.lookup(indices[:, :, g]) for g, group in enumerate(self.groups)], dim=-1)
