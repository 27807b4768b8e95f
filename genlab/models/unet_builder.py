"""How the UNet (``genlab.models.unet``) is assembled from its blocks (``unet_blocks.py``): the levels on
the way down, the middle, the levels on the way up.

Blocks are created in the order of the forward pass (down, middle, up; within a level each ResBlock
then its attention), so that a given seed gives the same initial weights whatever the builder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from genlab.models.unet_blocks import (
    AttentionBlock,
    Downsample,
    DownLevel,
    MidBlock,
    ResBlock,
    SpatialTransformer,
    Upsample,
    UpLevel,
)


@dataclass(frozen=True)
class UNetBuilder:
    """Makes the UNet's blocks with its model-wide settings (the names of ``UNet.config``)."""

    time_embed_dim: int
    norm_groups: int
    norm_eps: float
    dropout: float
    scale_shift_norm: bool
    resample: Literal["conv", "resblock"]
    num_heads: int
    head_dim: int | None
    cross_attention_dim: int | None
    transformer_depth: int
    linear_projection: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetBuilder:
        """The builder for a resolved ``UNet.config``."""
        return cls(**{name: config[name] for name in cls.__dataclass_fields__})

    def res(self, c_in: int, c_out: int, resample: Literal["down", "up"] | None = None) -> ResBlock:
        """A ResBlock ``[B, c_in, H, W] -> [B, c_out, H', W']`` taking the time embedding."""
        return ResBlock(c_in, c_out, self.time_embed_dim, self.norm_groups, self.norm_eps, self.dropout,
                        self.scale_shift_norm, resample)

    def attn(self, channels: int, norm: bool = True) -> nn.Module:
        """Self-attention over pixels (``AttentionBlock``), or an LDM ``SpatialTransformer`` with
        ``cross_attention_dim``: ``[B, channels, H, W] -> same``."""
        heads = channels // self.head_dim if self.head_dim else self.num_heads
        if self.cross_attention_dim is None:
            return AttentionBlock(channels, heads, self.norm_groups, self.norm_eps, norm)
        return SpatialTransformer(channels, heads, self.cross_attention_dim, self.norm_groups,
                                  self.transformer_depth, self.linear_projection)

    def downsample(self, channels: int) -> nn.Module:
        """Halve the resolution: a strided conv, or a ResBlock with average pooling."""
        return self.res(channels, channels, "down") if self.resample == "resblock" else Downsample(channels)

    def upsample(self, channels: int) -> nn.Module:
        """Double the resolution: nearest + conv, or a ResBlock with nearest upsampling."""
        return self.res(channels, channels, "up") if self.resample == "resblock" else Upsample(channels)

    def level(self, cur: int, c_out: int, count: int, attend: bool,
              skips: list[int] | None = None) -> tuple[list[nn.Module], list[nn.Module], int]:
        """``count`` ResBlocks from the running width ``cur`` to ``c_out``, each followed by attention if
        ``attend``; on the way up each also takes the last width popped from ``skips`` (concatenated).
        Returns the ResBlocks, the attentions and the new running width."""
        blocks, attns = [], []
        for _ in range(count):
            blocks.append(self.res(cur + (skips.pop() if skips is not None else 0), c_out))
            attns += [self.attn(c_out)] if attend else []
            cur = c_out
        return blocks, attns, cur

    def down_path(self, channels: int, widths: list[int], num_res_blocks: int,
                  attention_levels: tuple[int, ...]) -> tuple[nn.ModuleList, list[int], int]:
        """The levels on the way down from ``conv_in``'s ``channels``: level ``i`` of width ``widths[i]``.
        Returns them, the widths of the skip features they save (``conv_in``'s first) and the width at
        the bottom."""
        cur, skips, levels = channels, [channels], nn.ModuleList()
        for i, c_out in enumerate(widths):
            blocks, attns, cur = self.level(cur, c_out, num_res_blocks, i in attention_levels)
            down = self.downsample(c_out) if i < len(widths) - 1 else None
            skips += [c_out] * (num_res_blocks + (down is not None))
            levels.append(DownLevel(blocks, attns, down))
        return levels, skips, cur

    def mid(self, channels: int, attention: bool, attention_norm: bool) -> MidBlock:
        """ResBlock, attention (if ``attention``; GroupNorm before it if ``attention_norm``), ResBlock."""
        first = self.res(channels, channels)
        attn = self.attn(channels, attention_norm) if attention else None
        return MidBlock(first, attn, self.res(channels, channels))

    def up_path(self, cur: int, widths: list[int], num_res_blocks: int, attention_levels: tuple[int, ...],
                skips: list[int]) -> nn.ModuleList:
        """The levels on the way up from width ``cur``, the deepest first, each of ``num_res_blocks + 1``
        ResBlocks that take the skip features of ``skips`` from the end (the list is emptied)."""
        levels = nn.ModuleList()
        for i, c_out in reversed(list(enumerate(widths))):
            blocks, attns, cur = self.level(cur, c_out, num_res_blocks + 1, i in attention_levels, skips)
            levels.append(UpLevel(blocks, attns, self.upsample(c_out) if i > 0 else None))
        return levels
