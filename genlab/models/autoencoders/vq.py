"""The vector-quantized autoencoder (van den Oord et al. 2017; VQGAN, Esser et al. 2021; LDM's VQ-regularised
first stage, Rombach et al. 2022, Sec. 3), in diffusers' ``VQModel`` layout:
``encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder``.

The latent is the quantizer's output (``embed_dim`` channels, before ``post_quant_conv``); any registered
quantizer works (``vq``, ``fsq``, ``lfq``, ``residual``, ``grouped``), and its weighted losses (commitment,
codebook, entropy) are the autoencoder's. Encoding is deterministic: ``generator`` and ``sample`` are unused.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from genlab.core.bounds import PositiveInt
from genlab.core.registry import build, lookup, register
from genlab.models.autoencoders.base import Encoded
from genlab.models.autoencoders.networks import ConvAutoencoder, Decoder, Encoder
from genlab.models.quantizers.base import Quantizer

QuantizerSpec = Mapping[str, Any] | str | nn.Module  # a quantizer's config (its dim is filled in), or one built
DEFAULT_QUANTIZER = {"type": "vq", "codebook_size": 256}


def build_quantizer(spec: QuantizerSpec, dim: int, owner: str) -> Quantizer:
    """The quantizer of ``spec`` on ``dim`` channels: a built :class:`Quantizer` as it is, or a name or a
    ``{type: ..., **kwargs}`` config built through the registry with ``dim`` filled in (a config that sets
    ``dim`` must set this one). ValueError naming the argument if it does not fit."""
    if not isinstance(spec, Quantizer):
        if isinstance(spec, nn.Module):
            raise TypeError(f"{owner}: quantizer must be a genlab Quantizer or its config, got {type(spec).__name__}")
        cfg = {"type": spec} if isinstance(spec, str) else dict(spec)
        params = inspect.signature(lookup("quantizer", cfg.get("type", ""), path="model.quantizer.type")).parameters
        extra = {"dim": dim} if "dim" in params and "dim" not in cfg else {}
        spec = build("quantizer", cfg, path="model.quantizer", **extra)
    if spec.dim != dim or spec.channel_last:
        raise ValueError(f"{owner}: the quantizer must take channel-first latents of dim = embed_dim = {dim}, got "
                         f"dim = {spec.dim}{', channel_last=True' if spec.channel_last else ''}")
    return spec


@register("model", "autoencoder_vq")
class VQAutoencoder(ConvAutoencoder):
    """VQ autoencoder (VQGAN / LDM): images ``x: [B, in_channels, H, W]`` in [-1, 1] -> latents
    ``[B, embed_dim, H / f, W / f]`` quantized by any registered quantizer, and back.

    f = 2^(len(block_out_channels) - 1); ``stats["indices"]``: ``[B, H / f, W / f, *quantizer.index_shape]``.

    Args:
        in_channels, out_channels, block_out_channels, layers_per_block, norm_groups, mid_attention,
            gradient_checkpointing: as :class:`~genlab.models.autoencoders.kl.AutoencoderKL`.
        latent_channels: the encoder's output channels (and the decoder's input after ``post_quant_conv``).
        embed_dim: the channels the quantizer sees (default ``latent_channels``; diffusers' ``vq_embed_dim``).
        quantizer: a quantizer config (``{type: vq, codebook_size: 256, ...}``; ``dim`` is ``embed_dim``) or a
            built :class:`~genlab.models.quantizers.Quantizer`; default ``{type: vq, codebook_size: 256}``.
    """

    def __init__(self, in_channels: PositiveInt = 3, out_channels: PositiveInt | None = None,
                 latent_channels: PositiveInt = 3, embed_dim: PositiveInt | None = None,
                 quantizer: QuantizerSpec | None = None,
                 block_out_channels: Sequence[PositiveInt] = (128, 256, 512), layers_per_block: PositiveInt = 2,
                 norm_groups: PositiveInt = 32, mid_attention: bool = True,
                 gradient_checkpointing: bool = False) -> None:
        c, e = latent_channels, embed_dim or latent_channels
        sizes = (block_out_channels, layers_per_block, norm_groups, mid_attention, gradient_checkpointing)
        q = build_quantizer(DEFAULT_QUANTIZER if quantizer is None else quantizer, e, type(self).__name__)
        super().__init__(Encoder(in_channels, c, *sizes), Decoder(c, out_channels or in_channels, *sizes),
                         nn.Conv2d(c, e, 1), nn.Conv2d(e, c, 1), e)
        self.quantizer = q

    def encode(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Encoded:
        quantized, indices, losses = self.quantizer(self.features(x))
        return Encoded(quantized, losses, {"indices": indices})

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Images from code indices ``[B, h, w, *index_shape]`` (a prior over codes samples these)."""
        return self.decode(self.quantizer.codes(indices))
