"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3 and Appendix G; Stable
Diffusion's VAE), in diffusers' ``AutoencoderKL`` layout.

The encoder gives the mean and log-variance of a diagonal Gaussian posterior q(z | x) = N(mu, diag(exp(logvar)))
(Kingma and Welling 2014), logvar clamped to [-30, 20] as LDM's ``DiagonalGaussianDistribution``; the latent
is a draw mu + exp(logvar / 2) eps (the reparameterisation trick) or, with ``sample=False``, the mode mu.
The regulariser is the KL divergence to the prior N(0, I) (Kingma and Welling 2014, Appendix B),

    KL(q || N(0, I)) = 1/2 sum_{c, h, w} (mu^2 + exp(logvar) - 1 - logvar),

summed over the latent's dimensions and averaged over the batch, times ``kl_weight`` (LDM: 1e-6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from genlab.core.bounds import NonNegativeFloat, PositiveInt
from genlab.core.registry import register
from genlab.models.autoencoders.base import Encoded
from genlab.models.autoencoders.networks import ConvAutoencoder, Decoder, Encoder

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clamp of the posterior's log-variance


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, diag(exp(logvar))) || N(0, I)) per sample: ``[B, ...] -> [B]`` (summed over all but the batch)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


@register("model", "autoencoder_kl")
class AutoencoderKL(ConvAutoencoder):
    """Stable Diffusion's KL autoencoder: images ``x: [B, in_channels, H, W]`` in [-1, 1] -> a diagonal
    Gaussian posterior over latents ``[B, latent_channels, H / f, W / f]`` and back.

    f = 2^(len(block_out_channels) - 1); see the module docstring for the posterior and the KL term.

    Args:
        in_channels: image channels (from the data in a config); ``out_channels``: the decoder's (default
            ``in_channels``).
        latent_channels: c of the latent (Stable Diffusion: 4).
        block_out_channels: the width of each level (Stable Diffusion: 128, 256, 512, 512: f = 8).
        layers_per_block: ResNet blocks per encoder level (the decoder has one more).
        norm_groups: GroupNorm groups; every width must be divisible by it.
        mid_attention: self-attention in the middle blocks.
        quant_conv, post_quant_conv: the 1x1 convs around the bottleneck (Stable Diffusion has both).
        kl_weight: the weight of ``losses["kl"]``.
        gradient_checkpointing: gradient checkpointing of every block while training.
    """

    def __init__(self, in_channels: PositiveInt = 3, out_channels: PositiveInt | None = None,
                 latent_channels: PositiveInt = 4,
                 block_out_channels: Sequence[PositiveInt] = (128, 256, 512, 512), layers_per_block: PositiveInt = 2,
                 norm_groups: PositiveInt = 32, mid_attention: bool = True, quant_conv: bool = True,
                 post_quant_conv: bool = True, kl_weight: NonNegativeFloat = 1e-6,
                 gradient_checkpointing: bool = False) -> None:
        c = latent_channels
        sizes = (block_out_channels, layers_per_block, norm_groups, mid_attention, gradient_checkpointing)
        super().__init__(Encoder(in_channels, 2 * c, *sizes), Decoder(c, out_channels or in_channels, *sizes),
                         nn.Conv2d(2 * c, 2 * c, 1) if quant_conv else None,
                         nn.Conv2d(c, c, 1) if post_quant_conv else None, c)
        self.kl_weight = kl_weight

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's ``(mean, logvar)``, each ``[B, latent_channels, H / f, W / f]`` (logvar clamped)."""
        mean, logvar = self.features(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Encoded:
        mean, logvar = self.posterior(x)
        latent = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            latent = mean + torch.exp(0.5 * logvar) * eps
        kl = self.kl_weight * gaussian_kl(mean, logvar).mean()
        return Encoded(latent, {"kl": kl}, {"mean": mean, "logvar": logvar})
