"""RealNVP's multi-scale architecture (Dinh et al. 2017, Sec. 3.6): squeezing and factoring out.

``Squeeze`` turns each 2x2 block of every channel into 4 channels, [B, C, H, W] -> [B, 4C, H/2, W/2]
(log|det| = 0, a permutation). ``FactorOut`` keeps the first half of the channels as they are (they
are latent variables from this scale on: z_i = h_i's first half) and runs its inner chain
on the second half only; the output is both halves concatenated, so the latent has x's shape.

Glow's learned prior on the split-off half (Kingma and Dhariwal 2018, Sec. 3 and openai/glow's
``split2d``): z_1 ~ N(mu(h_2), diag sigma(h_2)^2) with (mu, log sigma) from a zero-initialised
convolution of the kept half h_2 (so it starts as N(0, I)). Written as a bijection onto a standard normal
latent, eps_1 = (z_1 - mu(h_2)) / sigma(h_2) with log|det| = -sum log sigma(h_2), and the rest of the flow
unchanged: the flow's base N(0, T^2 I) at temperature T then gives z_1 = mu + T sigma eps, Glow's
reduced-temperature sampling of every level.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from genlab.core.bounds import PositiveInt
from genlab.core.errors import ShapeError
from genlab.core.registry import register
from genlab.models.flows.base import FlowChain, FlowTransform, sum_except_batch, zero_logdet
from genlab.models.flows.nets import zeroed


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


@register("flow_transform", "unsqueeze")
class Unsqueeze(Squeeze):
    """Squeeze's inverse, ``[B, 4C, H, W] -> [B, C, 2H, 2W]``: ends a multi-scale chain so that the latent
    has the data's shape (the flow's base is over items of ``shape``); log|det| = 0."""

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return super().inverse(x, cond)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return super().forward(z, cond)


@register("flow_transform", "factor_out")
class FactorOut(FlowTransform):
    """Multi-scale factoring out (RealNVP Sec. 3.6): ``x [B, C, ...]`` -> ``[x_1, f(x_2)]`` with x_1 the
    first floor(C / 2) channels (or features), left as latents, and f = ``transforms`` (a chain on
    the other ceil(C / 2) channels); log|det| is f's. ``prior="learned"`` (Glow): x_1 leaves as
    eps_1 = (x_1 - mu(x_2)) exp(-log sigma(x_2)), (mu, log sigma) from a zero-initialised 3x3 convolution
    of the kept x_2 (images [B, C, H, W] only), and log|det| gains -sum log sigma; it needs ``channels``, C.
    Range: channels >= 2."""

    def __init__(self, transforms: list[FlowTransform], prior: Literal["standard", "learned"] = "standard",
                 channels: PositiveInt | None = None) -> None:
        super().__init__()
        self.inner = FlowChain(transforms)
        self.prior_net: nn.Module | None = None
        if prior == "learned":
            if channels is None or channels < 2:
                raise ValueError(f"FactorOut: prior='learned' needs channels, the number C >= 2 of channels (or "
                                 f"features) of its input, got {channels}")
            k = channels // 2
            self.prior_net = zeroed(nn.Conv2d(channels - k, 2 * k, 3, padding=1))
        self.channels = channels

    def _prior(self, x2: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(mu, log sigma) of x_1 [B, k, ...] given the kept x_2: Glow's learned prior."""
        if x2.ndim != 4 or x2.shape[1] + k != self.channels:
            raise ShapeError(f"FactorOut: the learned prior expects images [B, {self.channels}, H, W], got "
                             f"{[x2.shape[0], x2.shape[1] + k, *x2.shape[2:]]}")
        h = self.prior_net(x2)
        return h[:, :k], h[:, k:]

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        k = x.shape[1] // 2
        z, logdet = self.inner(x[:, k:], cond)
        x1 = x[:, :k]
        if self.prior_net is not None:
            mu, log_sigma = self._prior(x[:, k:], k)
            x1, logdet = (x1 - mu) * (-log_sigma).exp(), logdet - sum_except_batch(log_sigma)
        return torch.cat([x1, z], 1), logdet

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        k = z.shape[1] // 2
        x, logdet = self.inner.inverse(z[:, k:], cond)
        z1 = z[:, :k]
        if self.prior_net is not None:
            mu, log_sigma = self._prior(x, k)
            z1, logdet = z1 * log_sigma.exp() + mu, logdet + sum_except_batch(log_sigma)
        return torch.cat([z1, x], 1), logdet
