"""Finite scalar quantization (Mentzer et al. 2023, Sec. 3 and Appendix A.1).

Each of the ``d = len(levels)`` channels is bounded to ``L_i`` values and rounded: with
``h_i = (L_i - 1)(1 + eps) / 2``, offset ``o_i = 1/2`` for even ``L_i`` (0 for odd) and shift
``s_i = atanh(o_i / h_i)``, ``f(z_i) = tanh(z_i + s_i) h_i - o_i`` and ``zhat_i = round(f(z_i)) / floor(L_i / 2)``,
the round with a straight-through gradient (the gradient of ``f`` reaches the encoder). The implicit
codebook has ``prod L_i`` codes; the index of a code is the mixed-radix number of its level indices
``(zhat_i + 1) floor(L_i / 2)`` with basis ``(1, L_0, L_0 L_1, ...)``. There is no auxiliary loss.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from einops import rearrange
from torch import Tensor

from genlab.core.bounds import PositiveInt, Range
from genlab.core.registry import register
from genlab.models.quantizers.base import Quantizer

Epsilon = Annotated[float, Range(ge=0, lt=1)]  # widens the bound slightly so that the end levels are reached


@register("quantizer", "fsq")
class FSQ(Quantizer):
    """Finite scalar quantizer with ``levels`` (each >= 3; Mentzer et al. suggest ``[8, 5, 5, 5]`` for 2^10
    codes): ``z: [B, dim, ...]`` (``dim`` defaults to ``len(levels)``; otherwise linear projections to and from
    ``len(levels)`` channels) -> quantized of the same shape, indices ``[B, ...]`` in ``[0, prod(levels))``."""

    def __init__(self, levels: list[int], dim: PositiveInt | None = None, eps: Epsilon = 1e-3,
                 channel_last: bool = False) -> None:
        if not levels or not all(isinstance(n, int) and n >= 3 for n in levels):
            raise ValueError(f"FSQ: levels must be a non-empty list of ints >= 3 (e.g. [8, 5, 5, 5]), got {levels!r}; "
                             "a level of 2 gives the asymmetric values {-1, 0} (use LFQ for binary codes)")
        super().__init__(dim or len(levels), len(levels), channel_last)
        self.levels, self.eps, self.codebook_size = list(levels), eps, math.prod(levels)
        self.register_buffer("_levels", torch.tensor(levels), persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.tensor([1, *levels[:-1]]), 0), persistent=False)

    def prepare(self, h: Tensor) -> Tensor:
        """The bound ``f(h) / floor(L / 2)``, in ``(-1, 1)``-ish units of the codes."""
        levels = self._levels.to(h.dtype)
        half_l = (levels - 1) * (1 + self.eps) / 2
        offset = (self._levels % 2 == 0).to(h.dtype) / 2
        return (torch.tanh(h + torch.atanh(offset / half_l)) * half_l - offset) / (self._levels // 2)

    def quantize(self, h: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        half_width = self._levels // 2
        q = torch.round(h * half_width) / half_width
        return q, self.indices_of(q), {}

    def indices_of(self, codes: Tensor) -> Tensor:
        """The inverse of :meth:`lookup`: codes ``[..., len(levels)]`` (in code space) -> indices ``[...]``."""
        half_width = self._levels // 2
        return ((torch.round(codes * half_width) + half_width).long() * self._basis).sum(-1)

    def lookup(self, indices: Tensor) -> Tensor:
        level_index = torch.div(rearrange(indices, "... -> ... 1"), self._basis, rounding_mode="floor") % self._levels
        half_width = self._levels // 2
        return ((level_index - half_width) / half_width).float()
