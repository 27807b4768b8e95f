"""The autoencoder interface shared by the KL and the VQ autoencoders, their training objective and
latent diffusion.

An autoencoder maps images ``x [B, C, H, W]`` (in [-1, 1]) to latents ``z [B, c, H/f, W/f]`` and back:

- :meth:`Autoencoder.encode` ``(x, generator, sample) -> Encoded``: the latent (a draw from the diagonal
  Gaussian posterior q(z | x) of a KL autoencoder, Kingma and Welling 2014, or the quantized latent of a
  VQ autoencoder, van den Oord et al. 2017), its weighted regularisation ``losses`` (``kl``; the
  quantizer's ``commitment`` / ``codebook`` / ``entropy``) and ``stats`` (``mean`` / ``logvar``, ``indices``);
- :meth:`Autoencoder.decode` ``(z) -> x_hat [B, C, H, W]``;
- :meth:`Autoencoder.forward` ``(x, generator) -> (x_hat, Encoded)``: one reconstruction pass, what the
  autoencoder objective trains;
- :meth:`Autoencoder.last_layer`: the decoder's output weight, for VQGAN's adaptive discriminator weight
  (Esser et al. 2021, Eq. 7);
- :meth:`Autoencoder.to_latent` / :meth:`Autoencoder.from_latent`: the latent a diffusion model sees,
  ``scaling_factor * (z - shift_factor)`` (Rombach et al. 2022, Sec. 4.3.2 and Appendix G: the factor
  makes the latents of the data unit variance), and back.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class Encoded(NamedTuple):
    """What :meth:`Autoencoder.encode` returns: ``latent`` [B, c, h, w], the weighted regularisation
    ``losses`` (scalars; the autoencoder's contribution to its training loss is their sum) and ``stats``
    (tensors for logs and metrics: ``mean`` / ``logvar`` of a KL posterior, ``indices`` of a VQ)."""

    latent: Tensor
    losses: dict[str, Tensor]
    stats: dict[str, Tensor]


class Autoencoder(nn.Module):
    """Base class (see the module docstring). Subclasses set ``latent_channels`` and ``downsample`` (f)
    and implement :meth:`encode`, :meth:`decode` and :meth:`last_layer`. ``scaling_factor`` and
    ``shift_factor`` are buffers (saved with the weights; :meth:`fit_scaling` sets them from data)."""

    latent_channels: int
    downsample: int

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scaling_factor", torch.ones(()))
        self.register_buffer("shift_factor", torch.zeros(()))

    def encode(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Encoded:
        """``x [B, C, H, W] -> Encoded``; ``sample=False`` takes the posterior's mode (KL); draws from
        ``generator``."""
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        """``z [B, c, h, w] -> x_hat [B, C, h f, w f]``."""
        raise NotImplementedError

    def last_layer(self) -> nn.Parameter:
        """The weight of the decoder's last layer (the adaptive GAN weight's gradient ratio is taken there)."""
        raise NotImplementedError

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Encoded]:
        """One reconstruction: ``(decode(encode(x).latent), encode(x))``."""
        encoded = self.encode(x, generator)
        return self.decode(encoded.latent), encoded

    def to_latent(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """The latent a diffusion model is trained on: ``scaling_factor * (encode(x).latent - shift_factor)``."""
        return (self.encode(x, generator, sample).latent - self.shift_factor) * self.scaling_factor

    def from_latent(self, z: Tensor) -> Tensor:
        """Images from the latents of :meth:`to_latent`: ``decode(z / scaling_factor + shift_factor)``."""
        return self.decode(z / self.scaling_factor + self.shift_factor)

    @torch.no_grad()
    def fit_scaling(self, x: Tensor, generator: torch.Generator | None = None, shift: bool = False) -> None:
        """Set ``scaling_factor`` to 1 / std of the latents of ``x`` (Rombach et al. 2022, Appendix G) and,
        with ``shift``, ``shift_factor`` to their mean (as SD3's and FLUX's autoencoders)."""
        z = self.encode(x, generator).latent.double()
        mean = z.mean() if shift else z.new_zeros(())
        self.shift_factor.copy_(mean)
        self.scaling_factor.copy_(1.0 / (z - mean).square().mean().sqrt().clamp_min(1e-12))
