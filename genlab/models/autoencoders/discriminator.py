"""The PatchGAN discriminator of pix2pix (Isola et al. 2017, Sec. 3.2.2) as taming-transformers' VQGAN
(Esser et al. 2021) and latent diffusion's autoencoders train it: ``NLayerDiscriminator``.

``x [B, C, H, W] -> logits [B, 1, H', W']``, one real/fake logit per overlapping patch: a stride-2 4x4
convolution, ``n_layers - 1`` further stride-2 4x4 convolutions (channels ``ndf * min(2^n, 8)``), one
stride-1 4x4 convolution and a stride-1 4x4 convolution to one channel; LeakyReLU(0.2) between, a
normalisation after every convolution but the first and the last (BatchNorm as in taming's default;
ActNorm, taming's ``use_actnorm``, here Glow's actnorm with its data-dependent initialisation; or
GroupNorm). Weights are drawn as ``weights_init`` does: convolutions N(0, 0.02), BatchNorm scales
N(1, 0.02) and shifts 0. With n layers the receptive field is 70x70 for n = 3 (pix2pix's default);
each spatial size H shrinks as H -> H / 2^n - 2, so small images need fewer layers
(:meth:`NLayerDiscriminator.output_size`: 16x16 digits take n_layers <= 2, 32x32 n_layers <= 3).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from genlab.core.bounds import PositiveInt
from genlab.core.registry import register, register_namespace
from genlab.models.flows.normalization import ActNorm


class _ActNorm2d(nn.Module):
    """Glow's actnorm as a plain layer (the flow step's log-determinant dropped)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ActNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)[0]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "actnorm":
        return _ActNorm2d(channels)
    return nn.GroupNorm(min(32, channels), channels)


class Discriminator(nn.Module):
    """Base class of the ``discriminator`` namespace: ``forward(x [B, C, H, W]) -> logits``."""


register_namespace("discriminator", Discriminator, "GAN discriminators of the autoencoder objective")


@register("discriminator", "patchgan")
class NLayerDiscriminator(Discriminator):
    """PatchGAN discriminator (see the module docstring). ``in_channels`` is the images' (the objective sets
    it from the data); ``ndf``: channels of the first layer; ``norm``: ``batch`` (taming's default),
    ``actnorm`` (taming's ``use_actnorm``) or ``group`` (GroupNorm, min(32, C) groups; batch-size free)."""

    def __init__(self, in_channels: PositiveInt = 3, ndf: PositiveInt = 64, n_layers: PositiveInt = 3,
                 norm: Literal["batch", "actnorm", "group"] = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "actnorm", "group"):
            raise ValueError(f"NLayerDiscriminator: norm must be 'batch', 'actnorm' or 'group', got {norm!r}")
        self.n_layers = n_layers
        bias = norm != "batch"  # BatchNorm's shift makes a bias redundant (pix2pix's use_bias)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=bias), _norm(norm, ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def output_size(self, size: int) -> int:
        """The logits' spatial size for an input of spatial size ``size`` (<= 0: the input is too small)."""
        for _ in range(self.n_layers):
            size = (size + 2 - 4) // 2 + 1
        return size - 2  # the two stride-1 4x4 convolutions with padding 1

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W] -> logits [B, 1, H', W']`` (H' = :meth:`output_size` (H))."""
        return self.main(x)


@torch.no_grad()
def weights_init(module: nn.Module) -> None:
    """pix2pix's / taming's initialisation: convolution weights N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
