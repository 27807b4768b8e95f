"""RealNVP's multi-scale architecture (Dinh et al. 2017, Sec. 3.6): squeezing and factoring out.

``Squeeze`` turns each 2x2 block of every channel into 4 channels, [B, C, H, W] -> [B, 4C, H/2, W/2]
(log|det| = 0, a permutation). ``FactorOut`` keeps the first half of the channels as they are (they
are latent variables from this scale on: z_i = h_i's first half) and runs its inner chain
on the second half only; the output is both halves concatenated, so the latent has x's shape.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from genlab.core.errors import ShapeError
from genlab.core.registry import register
from genlab.models.flows.base import FlowChain, FlowTransform, zero_logdet


@register("flow_transform", "squeeze")
class Squeeze(FlowTransform):
    """``[B, C, H, W] -> [B, 4C, H/2, W/2]`` (H, W even), channel order (c, 2x2 offset); log|det| = 0."""

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if x.ndim != 4 or x.shape[2] % 2 or x.shape[3] % 2:
            raise ShapeError(f"Squeeze: expected x: [B, C, H, W] with H and W even, got {list(x.shape)}")
        return rearrange(x, "b c (h i) (w j) -> b (c i j) h w", i=2, j=2), zero_logdet(x)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if z.ndim != 4 or z.shape[1] % 4:
            raise ShapeError(f"Squeeze: expected z: [B, 4C, H, W], got {list(z.shape)}")
        return rearrange(z, "b (c i j) h w -> b c (h i) (w j)", i=2, j=2), zero_logdet(z)


@register("flow_transform", "factor_out")
class FactorOut(FlowTransform):
    """Multi-scale factoring out (RealNVP Sec. 3.6): ``x [B, C, ...]`` -> ``[x_1, f(x_2)]`` with x_1 the
    first floor(C / 2) channels (or features), left as latents, and f = ``transforms`` (a chain on
    the other ceil(C / 2) channels); log|det| is f's."""

    def __init__(self, transforms: list[FlowTransform]) -> None:
        super().__init__()
        self.inner = FlowChain(transforms)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        k = x.shape[1] // 2
        z, logdet = self.inner(x[:, k:], cond)
        return torch.cat([x[:, :k], z], 1), logdet

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        k = z.shape[1] // 2
        x, logdet = self.inner.inverse(z[:, k:], cond)
        return torch.cat([z[:, :k], x], 1), logdet
