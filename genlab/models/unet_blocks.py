"""Blocks of the UNet (``genlab.models.unet``): residual blocks, attention, resampling, levels.

``ResBlock`` and ``AttentionBlock`` are ADM's (Dhariwal & Nichol 2021, building on Ho et al. 2020,
App. B); ``SpatialTransformer`` is the cross-attention block of LDM / Stable Diffusion (Rombach et
al. 2022, Sec. 3.3). Every block is called as ``block(h, emb, context)`` so that a level runs (and
gradient-checkpoints) them alike. Norms compute in float32 (float64 stays float64) so that bf16/fp16
autocast is safe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from genlab.models.attention import Backend, MultiHeadAttention
from genlab.models.layers import modulate


def _at_least_float32(x: Tensor) -> torch.dtype:
    """The dtype a norm computes in: float32 for half types, the input's own for float32 and float64."""
    return torch.promote_types(x.dtype, torch.float32)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm in at least float32 whatever the input dtype (ADM's ``GroupNorm32``): ``[B, C, ...] -> same``."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = _at_least_float32(x)
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm over the last dimension, in at least float32: ``[..., C] -> same``."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = _at_least_float32(x)
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def tokens_to_map(h: Tensor, like: Tensor) -> Tensor:
    """``[B, H W, C] -> [B, C, H, W]`` in the memory format of ``like`` (a bare rearrange would give a
    channels-last view, silently changing the layout, and so the conv kernels, of what follows)."""
    h = rearrange(h, "b (h w) c -> b c h w", h=like.shape[2])
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return h.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class ResBlock(nn.Module):
    """ADM residual block: ``skip(x) + conv_2(dropout(SiLU(N(conv_1(SiLU(GN(x))), emb))))``.

    ``N`` adds the projected embedding before GroupNorm ("default", DDPM), or with ``scale_shift``
    is AdaGN ``GN(h) (1 + scale) + shift`` (ADM Sec. 3). ``resample`` "down"/"up" average-pools /
    nearest-upsamples both paths after the first norm (ADM's ``resblock_updown``). ``skip`` is a
    1x1 conv when channels change. ``x: [B, C_in, H, W], emb: [B, D] -> [B, C_out, H', W']``.
    ``emb_dim=None`` builds the block without an embedding (no ``emb_proj``; ``emb`` is ignored): the
    ResNet block of an autoencoder (diffusers' ``ResnetBlock2D`` with ``temb_channels=None``).
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int | None, groups: int, eps: float, dropout: float = 0.0,
                 scale_shift: bool = False, resample: Literal["down", "up"] | None = None) -> None:
        super().__init__()
        self.scale_shift, self.resample = scale_shift, resample
        self.norm_1 = GroupNorm32(groups, c_in, eps)
        self.conv_1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb_proj = None if emb_dim is None else nn.Linear(emb_dim, 2 * c_out if scale_shift else c_out)
        self.norm_2 = GroupNorm32(groups, c_out, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv_2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return F.interpolate(x, scale_factor=2.0, mode="nearest") if self.resample == "up" else x

    def forward(self, x: Tensor, emb: Tensor | None, context: Tensor | None = None) -> Tensor:
        h = self._resample(F.silu(self.norm_1(x)))
        x = self._resample(x)
        h = self.conv_1(h)
        if self.emb_proj is None:
            h = self.norm_2(h)
        elif self.scale_shift:
            e = rearrange(self.emb_proj(F.silu(emb)), "b c -> b c 1 1")
            scale, shift = e.chunk(2, dim=1)
            h = modulate(self.norm_2(h), shift, scale)
        else:
            h = self.norm_2(h + rearrange(self.emb_proj(F.silu(emb)), "b c -> b c 1 1"))
        h = self.conv_2(self.dropout(F.silu(h)))
        return (x if self.skip is None else self.skip(x)) + h


class Downsample(nn.Module):
    """Strided 3x3 conv: ``[B, C, H, W] -> [B, C, H/2, W/2]`` (DDPM/ADM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: ``[B, C, H, W] -> [B, C, 2H, 2W]`` (DDPM/ADM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttentionBlock(nn.Module):
    """ADM self-attention over pixels, ``x + Attn(GN(x))``: ``[B, C, H, W] -> same``. ``norm=False``
    drops the GroupNorm (only to reproduce diffusers' UNet2DModel mid block with scale-shift)."""

    def __init__(self, channels: int, heads: int, groups: int, eps: float, norm: bool = True) -> None:
        super().__init__()
        self.norm = GroupNorm32(groups, channels, eps) if norm else None
        self.attn = MultiHeadAttention(channels, heads, qkv_bias=True)

    def forward(self, x: Tensor, emb: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        h = rearrange(x if self.norm is None else self.norm(x), "b c h w -> b (h w) c")
        return x + tokens_to_map(self.attn(h), x)


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): ``proj_out(a * GELU(g))`` with ``[a, g] = proj_in(x)``,
    ``[..., dim] -> [..., dim]``, hidden width ``mult * dim``."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj_in, self.proj_out = nn.Linear(dim, 2 * mult * dim), nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block of LDM: self-attention, cross-attention to ``context``,
    GEGLU feed-forward, each residual: ``x: [B, N, C], context: [B, M, D] -> [B, N, C]``.

    ``fuser`` is an adapter's injection point: None (no parameters, no change), or a module ``[B, N, C]
    -> [B, N, C]`` applied to the tokens after self-attention (GLIGEN's gated self-attention; diffusers'
    ``BasicTransformerBlock.fuser``)."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm_1, self.attn_1 = LayerNorm32(dim), MultiHeadAttention(dim, heads)
        self.norm_2, self.attn_2 = LayerNorm32(dim), MultiHeadAttention(dim, heads, context_dim)
        self.norm_3, self.ff = LayerNorm32(dim), FeedForward(dim)
        self.fuser: nn.Module | None = None

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn_1(self.norm_1(x))
        x = x if self.fuser is None else self.fuser(x)
        x = x + self.attn_2(self.norm_2(x), context)
        return x + self.ff(self.norm_3(x))


class SpatialTransformer(nn.Module):
    """LDM / Stable Diffusion spatial transformer (Rombach et al. 2022): ``x + proj_out(blocks(
    proj_in(GN(x))))`` over the ``H W`` tokens. ``proj_in``/``proj_out`` are 1x1 convs (SD 1.x) or,
    with ``linear``, Linear layers on tokens (SD 2.x). ``x: [B, C, H, W], context: [B, M, D] -> same``."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, depth: int = 1,
                 linear: bool = False) -> None:
        super().__init__()
        self.linear = linear
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        make = (lambda: nn.Linear(channels, channels)) if linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = make()
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = make()

    def forward(self, x: Tensor, emb: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        h = self.norm(x)
        h = rearrange(h if self.linear else self.proj_in(h), "b c h w -> b (h w) c")
        h = self.proj_in(h) if self.linear else h
        for block in self.blocks:
            h = block(h, context)
        h = self.proj_out(h) if self.linear else h
        h = tokens_to_map(h, x)
        return x + (h if self.linear else self.proj_out(h))


def run(block: nn.Module, h: Tensor, emb: Tensor, context: Tensor | None, ckpt: bool) -> Tensor:
    """``block(h, emb, context)``, through ``torch.utils.checkpoint`` (non-reentrant) if ``ckpt``."""
    return checkpoint(block, h, emb, context, use_reentrant=False) if ckpt else block(h, emb, context)


class DownLevel(nn.Module):
    """One resolution on the way down: ``(ResBlock [-> attention]) x n`` then an optional downsampler.
    ``forward`` returns ``h`` and the skip features saved (each block's output, then the downsampled one)."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module] | None, downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns) if attns else None
        self.downsample = downsample

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, ckpt: bool,
                intra: Mapping[int, Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """``intra`` maps the index ``j`` of a feature this level saves to a tensor added to ``h`` there,
        before it is saved and passed on (the UNet's ``intra.{k}`` injection points)."""
        intra = intra or {}
        skips: list[Tensor] = []
        for j, block in enumerate(self.blocks):
            h = run(block, h, emb, context, ckpt)
            h = run(self.attns[j], h, emb, context, ckpt) if self.attns is not None else h
            skips.append(h + intra[j] if j in intra else h)
            h = skips[-1]
        if self.downsample is not None:
            h = run(self.downsample, h, emb, context, ckpt)
            j = len(self.blocks)
            skips.append(h + intra[j] if j in intra else h)
            h = skips[-1]
        return h, skips


class UpLevel(nn.Module):
    """One resolution on the way up: ``(concat skip -> ResBlock [-> attention]) x (n + 1)`` then an
    optional upsampler. Pops its skips from the end of ``skips``."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module] | None, upsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns) if attns else None
        self.upsample = upsample

    def forward(self, h: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor | None, ckpt: bool) -> Tensor:
        for j, block in enumerate(self.blocks):
            h = run(block, torch.cat([h, skips.pop()], dim=1), emb, context, ckpt)
            h = run(self.attns[j], h, emb, context, ckpt) if self.attns is not None else h
        return run(self.upsample, h, emb, context, ckpt) if self.upsample is not None else h


class MidBlock(nn.Module):
    """Middle of the UNet: ``ResBlock -> attention (optional) -> ResBlock`` at the lowest resolution."""

    def __init__(self, res_1: nn.Module, attn: nn.Module | None, res_2: nn.Module) -> None:
        super().__init__()
        self.res_1, self.attn, self.res_2 = res_1, attn, res_2

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, ckpt: bool) -> Tensor:
        h = run(self.res_1, h, emb, context, ckpt)
        h = run(self.attn, h, emb, context, ckpt) if self.attn is not None else h
        return run(self.res_2, h, emb, context, ckpt)


def set_backend(module: nn.Module, backend: Backend) -> None:
    """Make every ``MultiHeadAttention`` inside ``module`` use ``backend``."""
    for m in module.modules():
        if isinstance(m, MultiHeadAttention):
            m.backend = backend
