"""Lookup-free quantization (Yu et al. 2024, MAGVIT-v2, Sec. 3.1).

Each of ``d`` channels is quantized to its sign, ``q_i = sign(z_i)`` (Eq. 3, with ``sign(0) = -1``), with a
straight-through gradient; the code's index is ``sum_i 1[z_i > 0] 2^(d - 1 - i)`` (first channel most
significant), out of ``2^d``. The entropy penalty (Eq. 5) is ``E[H(p(c | z))] - gamma H(E[p(c | z)])``, with
``p(c | z) = softmax_c(-tau |z - c|^2) = softmax_c(2 tau z . c)`` over all ``2^d`` codes (``tau`` the inverse
temperature): confident assignments, and all codes used over the batch. Losses: ``entropy`` (times
``entropy_weight``) and ``commitment = commitment_weight |z - sg(q)|^2``. Under data parallelism the batch
distribution ``E[p]`` is averaged over ranks. For many bits, quantize groups of channels (``grouped``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import reduce
from torch import Tensor

from genlab.core.bounds import NonNegativeFloat, PositiveFloat, PositiveInt
from genlab.core.registry import register
from genlab.models.quantizers.base import Quantizer
from genlab.models.quantizers.distributed import world_size

MAX_ENTROPY_BITS = 16  # the entropy term holds [B N, 2^bits] probabilities


def entropy(p: Tensor, eps: float = 1e-5) -> Tensor:
    """``-sum_c p_c log max(p_c, eps)`` over the last dimension (the floor keeps the gradient finite)."""
    return -(p * p.clamp(min=eps).log()).sum(-1)


@register("quantizer", "lfq")
class LFQ(Quantizer):
    """Lookup-free quantizer of ``bits`` channels (default ``dim``; otherwise linear projections ``dim <-> bits``):
    ``z: [B, dim, ...]`` -> quantized in {-1, 1}^bits (projected out), indices ``[B, ...]`` in ``[0, 2^bits)``."""

    def __init__(self, dim: PositiveInt, bits: PositiveInt | None = None, entropy_weight: NonNegativeFloat = 0.1,
                 diversity_gamma: NonNegativeFloat = 1.0, inv_temperature: PositiveFloat = 100.0,
                 commitment_weight: NonNegativeFloat = 0.25, sync: bool = True, channel_last: bool = False) -> None:
        bits = bits or dim
        if bits > MAX_ENTROPY_BITS and entropy_weight > 0:
            raise ValueError(f"LFQ: the entropy loss of {bits} bits sums over 2^{bits} codes per vector; use bits <= "
                             f"{MAX_ENTROPY_BITS}, entropy_weight=0, or a grouped quantizer of several LFQs")
        super().__init__(dim, bits, channel_last)
        self.bits, self.codebook_size = bits, 2 ** bits
        self.entropy_weight, self.diversity_gamma = entropy_weight, diversity_gamma
        self.inv_temperature = inv_temperature
        self.commitment_weight, self.sync = commitment_weight, sync
        self.register_buffer("_powers", 2 ** torch.arange(bits - 1, -1, -1), persistent=False)

    def quantize(self, h: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        q = torch.where(h > 0, 1.0, -1.0).to(h.dtype)
        indices = ((h > 0).long() * self._powers).sum(-1)
        losses = {"commitment": self.commitment_weight * F.mse_loss(h, q.detach())}
        if self.entropy_weight > 0:
            losses["entropy"] = self.entropy_weight * self._entropy_loss(h.reshape(-1, self.bits).float())
        return q, indices, losses

    def _entropy_loss(self, x: Tensor) -> Tensor:
        codes = self.lookup(torch.arange(self.codebook_size, device=x.device))  # [2^bits, bits]
        p = (2 * self.inv_temperature * x @ codes.T).softmax(dim=-1)  # p(c | z): [B N, 2^bits]
        mean_p = reduce(p, "m c -> c", "mean")
        ranks = world_size(self.sync)
        if ranks > 1:  # the autograd-aware sum, so each rank's gradient sees the others' probabilities
            from torch.distributed.nn.functional import all_reduce

            mean_p = all_reduce(mean_p) / ranks
        return entropy(p).mean() - self.diversity_gamma * entropy(mean_p)

    def lookup(self, indices: Tensor) -> Tensor:
        bits = (indices.unsqueeze(-1) & self._powers) != 0
        return bits.float() * 2 - 1
