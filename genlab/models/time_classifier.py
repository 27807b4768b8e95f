"""A time-conditioned image classifier: logits of p(y | x_t, t) for classifier guidance.

Dhariwal & Nichol 2021 ("Diffusion models beat GANs", Sec. 4.1) guide with a classifier trained on noised
images: the downsampling half of their UNet, then a pooled linear head. This is that design at small
scale, built from the UNet's own blocks: ADM residual blocks with scale-shift time conditioning (AdaGN), a
down-sampling residual block between levels, GroupNorm-SiLU, global average pooling and a linear head.
Like every backbone it knows nothing of processes: it receives the model time.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from genlab.core.bounds import PositiveInt
from genlab.core.errors import ShapeError
from genlab.core.registry import register
from genlab.models.layers import TimestepEmbedding, batch_times
from genlab.models.unet_blocks import GroupNorm32, ResBlock


@register("model", "time_classifier")
class TimeClassifier(nn.Module):
    """``(x: [B, C, H, W], t: [B] or scalar) -> logits [B, num_classes]`` (Dhariwal & Nichol 2021, Sec. 4.1).

    Args:
        in_channels: image channels C.
        num_classes: classes K (>= 2).
        channels: channels of the first level; level i has ``channels * channel_mult[i]``.
        channel_mult: one entry per level; H and W halve between levels.
        num_res_blocks: residual blocks per level.
        norm_groups: GroupNorm groups (dividing every level's channels).
    """

    def __init__(self, in_channels: PositiveInt = 3, num_classes: PositiveInt = 10, channels: PositiveInt = 32,
                 channel_mult: tuple[PositiveInt, ...] = (1, 2), num_res_blocks: PositiveInt = 1,
                 norm_groups: PositiveInt = 8) -> None:
        super().__init__()
        ch = [channels * m for m in channel_mult]
        if num_classes < 2:
            raise ValueError(f"TimeClassifier: num_classes must be >= 2, got {num_classes}")
        if not ch or any(c % norm_groups for c in ch):
            raise ValueError(f"TimeClassifier: norm_groups ({norm_groups}) must divide every level's channels {ch}")
        self.in_channels, self.num_classes, self.levels = in_channels, num_classes, len(ch)
        emb = 4 * channels
        self.time_embed = TimestepEmbedding(emb, channels)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        blocks, c_in = [], channels
        for i, c in enumerate(ch):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c_in, c, emb, norm_groups, 1e-5, scale_shift=True))
                c_in = c
            if i < len(ch) - 1:
                blocks.append(ResBlock(c, c, emb, norm_groups, 1e-5, scale_shift=True, resample="down"))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = GroupNorm32(norm_groups, c_in, 1e-5)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Logits [B, num_classes] of x [B, C, H, W] at model time t ([B] or a scalar)."""
        factor = 2 ** (self.levels - 1)
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ShapeError(f"TimeClassifier: expected x: [B, {self.in_channels}, H, W] with H and W divisible by "
                             f"{factor}, got {list(x.shape)}")
        emb = self.time_embed(batch_times(t, x, "TimeClassifier"))
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3)))
