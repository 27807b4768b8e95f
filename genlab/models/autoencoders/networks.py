"""The encoder and decoder of Stable Diffusion's autoencoders (Rombach et al. 2022, Appendix G; the
VQGAN / LDM ``Encoder`` and ``Decoder`` of Esser et al. 2021), in diffusers' layout.

Encoder, ``x: [B, C_in, H, W] -> [B, C_out, H / f, W / f]`` with ``f = 2^(L - 1)`` for ``L`` levels:
``conv_in`` (3x3), then per level ``layers_per_block`` ResNet blocks (GroupNorm, SiLU, 3x3 conv, twice,
plus a 1x1 shortcut where the width changes; no time embedding) and, except at the last level, a
stride-2 3x3 conv after padding one row and column at the bottom and right (LDM's asymmetric padding);
a middle of ResNet block, single-head self-attention, ResNet block; GroupNorm, SiLU, ``conv_out``.
The decoder mirrors it: ``conv_in``, the middle, per level from the widest ``layers_per_block + 1``
ResNet blocks and, except at the last level, nearest x2 upsampling and a 3x3 conv; GroupNorm, SiLU,
``conv_out``. GroupNorms use eps 1e-6. The blocks are the UNet's (:mod:`genlab.models.unet_blocks`):
``ResBlock`` without embedding, ``AttentionBlock`` (the fused attention), ``MidBlock``, ``Upsample``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.core.errors import ShapeError
from genlab.models.autoencoders.base import Autoencoder
from genlab.models.unet_blocks import AttentionBlock, Downsample, GroupNorm32, MidBlock, ResBlock, Upsample, run

EPS = 1e-6  # the GroupNorms' eps in LDM's and diffusers' autoencoders


class PaddedDownsample(Downsample):
    """Stride-2 3x3 conv after zero-padding one row and column at the bottom and right (LDM's
    ``Downsample`` with ``with_conv``; diffusers' ``Downsample2D(padding=0)``): ``[B, C, H, W] -> [B, C,
    H/2, W/2]`` for even H, W."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor, emb: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution of an encoder or decoder: ResNet ``blocks``, then ``downsample`` or ``upsample``
    (at most one; None at the last level): ``[B, C_in, H, W] -> [B, C_out, H', W']``."""

    def __init__(self, blocks: list[ResBlock], downsample: nn.Module | None = None,
                 upsample: nn.Module | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample, self.upsample = downsample, upsample

    def forward(self, h: Tensor, ckpt: bool = False) -> Tensor:
        for block in self.blocks:
            h = run(block, h, None, None, ckpt)
        resample = self.downsample if self.upsample is None else self.upsample
        return h if resample is None else run(resample, h, None, None, ckpt)


def check_sizes(owner: str, block_out_channels: Sequence[int], norm_groups: int) -> tuple[int, ...]:
    """``block_out_channels`` as a tuple; ValueError naming the argument unless it is a non-empty list of
    ints >= 1, each divisible by ``norm_groups``."""
    widths = tuple(block_out_channels) if isinstance(block_out_channels, (list, tuple)) else ()
    if not widths or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in widths):
        raise ValueError(f"{owner}: block_out_channels must be a non-empty list of ints >= 1, "
                         f"got {block_out_channels!r}")
    if any(c % norm_groups for c in widths):
        raise ValueError(f"{owner}: every entry of block_out_channels must be divisible by norm_groups = "
                         f"{norm_groups}, got {list(widths)}; change norm_groups or the widths")
    return widths


def checkpointed(module: nn.Module) -> bool:
    """Whether ``module`` checkpoints its blocks now: ``gradient_checkpointing``, training, autograd on."""
    return module.gradient_checkpointing and module.training and torch.is_grad_enabled()


def _middle(width: int, norm_groups: int, attention: bool) -> MidBlock:
    def res() -> ResBlock:
        return ResBlock(width, width, None, norm_groups, EPS)

    return MidBlock(res(), AttentionBlock(width, 1, norm_groups, EPS) if attention else None, res())


class Encoder(nn.Module):
    """``x: [B, in_channels, H, W] -> [B, out_channels, H / f, W / f]``, ``f = 2^(len(block_out_channels) - 1)``
    (see the module docstring). ``mid_attention=False`` drops the middle's self-attention;
    ``gradient_checkpointing`` runs each block through gradient checkpointing when training with autograd."""

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: Sequence[int], layers_per_block: int,
                 norm_groups: int, mid_attention: bool = True, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        widths = check_sizes(type(self).__name__, block_out_channels, norm_groups)
        self.gradient_checkpointing = gradient_checkpointing
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        levels, c_in = [], widths[0]
        for i, c in enumerate(widths):
            blocks = [ResBlock(c_in if j == 0 else c, c, None, norm_groups, EPS) for j in range(layers_per_block)]
            levels.append(Level(blocks, downsample=PaddedDownsample(c) if i < len(widths) - 1 else None))
            c_in = c
        self.down = nn.ModuleList(levels)
        self.mid = _middle(widths[-1], norm_groups, mid_attention)
        self.norm_out = GroupNorm32(norm_groups, widths[-1], EPS)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h, ckpt = self.conv_in(x), checkpointed(self)
        for level in self.down:
            h = level(h, ckpt)
        h = self.mid(h, None, None, ckpt)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """``z: [B, in_channels, h, w] -> [B, out_channels, h f, w f]``: the mirror of :class:`Encoder` (see the
    module docstring), with ``layers_per_block + 1`` ResNet blocks per level."""

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: Sequence[int], layers_per_block: int,
                 norm_groups: int, mid_attention: bool = True, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        widths = check_sizes(type(self).__name__, block_out_channels, norm_groups)[::-1]
        self.gradient_checkpointing = gradient_checkpointing
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.mid = _middle(widths[0], norm_groups, mid_attention)
        levels, c_in = [], widths[0]
        for i, c in enumerate(widths):
            blocks = [ResBlock(c_in if j == 0 else c, c, None, norm_groups, EPS) for j in range(layers_per_block + 1)]
            levels.append(Level(blocks, upsample=Upsample(c) if i < len(widths) - 1 else None))
            c_in = c
        self.up = nn.ModuleList(levels)
        self.norm_out = GroupNorm32(norm_groups, widths[-1], EPS)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        ckpt = checkpointed(self)
        h = self.mid(self.conv_in(z), None, None, ckpt)
        for level in self.up:
            h = level(h, ckpt)
        return self.conv_out(F.silu(self.norm_out(h)))


class ConvAutoencoder(Autoencoder):
    """What the KL and VQ autoencoders share: ``encoder -> quant_conv`` (a 1x1 conv, or None) gives the
    bottleneck's features, ``post_quant_conv -> decoder`` decodes ``latent_channels``-channel latents;
    ``downsample`` f = 2^(levels - 1); ``last_layer`` is the decoder's ``conv_out`` weight."""

    def __init__(self, encoder: Encoder, decoder: Decoder, quant_conv: nn.Module | None,
                 post_quant_conv: nn.Module | None, latent_channels: int) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.quant_conv, self.post_quant_conv = quant_conv, post_quant_conv
        self.latent_channels, self.downsample = latent_channels, 2 ** (len(encoder.down) - 1)
        self.in_channels = encoder.conv_in.in_channels

    def features(self, x: Tensor) -> Tensor:
        """``x: [B, C, H, W]`` (H, W multiples of f) -> ``quant_conv(encoder(x))`` ``[B, c', H / f, W / f]``."""
        f, name = self.downsample, type(self).__name__
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ShapeError(f"{name}.encode: expected x: [B, {self.in_channels}, H, W] with H and W multiples of "
                             f"{f}, got {list(x.shape)}")
        h = self.encoder(x)
        return h if self.quant_conv is None else self.quant_conv(h)

    def decode(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ShapeError(f"{type(self).__name__}.decode: expected z: [B, {self.latent_channels}, h, w], "
                             f"got {list(z.shape)}")
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def last_layer(self) -> nn.Parameter:
        return self.decoder.conv_out.weight
