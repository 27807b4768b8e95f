"""T2I-Adapter (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability
for Text-to-Image Diffusion Models") for genlab's UNet.

A small convolutional network, independent of the UNet's input and time, maps a conditioning image
(sketch, depth, pose, ...) to one feature map per level of the UNet's way down: pixel
unshuffle by ``downscale_factor`` (the image to the latent's resolution), then per level a block of
residual convs, each block after the first halving the resolution. In the paper's notation::

    F_c = F_AD(C),        F_enc^i <- F_enc^i + F_c^i   (i = 1 ... levels)

The features are added *inside* the way down, so that they reach the skip saved there and every
later feature: genlab's ``intra.{k}`` injection points (``UNet`` docstring). They are computed once
per condition, not per denoising step::

    adapter = T2IAdapter(in_channels=3, channels=(320, 640, 1280, 1280), downscale_factor=8)
    residuals = adapter(cond, unet, conditioning_scale=1.0)     # or adapter.features(cond) once
    out = unet(x, t, context=context, residuals=residuals)

Where each feature goes (``unet_points``) is where diffusers' ``UNet2DConditionModel`` adds its
``down_intrablock_additional_residuals`` (for SD 1.x also the original code's places): at a level with
(cross-)attention, after the level's last ResBlock + transformer, before its downsampler; at a level
without attention, after the level's last layer (its downsampler, if it has one: SDXL's first level);
one more feature than levels goes to ``mid`` (the middle block's output; T2I-Adapter-XL). diffusers
skips that last one silently when its shape differs; genlab raises a ``ShapeError``.

The paper's adapter has no zero-initialised layer, so it is not the identity at initialisation;
``conditioning_scale=0`` (or a weight 0) gives exactly the UNet without adapter. Layout and names
follow diffusers' ``T2IAdapter`` (``genlab.interop`` converts both ways) with its three variants:
``full_adapter`` (the paper's), ``light_adapter`` (the paper's ``AdapterLight``: 1x1 convs to a
quarter of the width around 3x3 residual blocks, one block more than ``channels``) and
``full_adapter_xl`` (SDXL: only the third block downsamples).

DiT: ``genlab.adapters.dit_t2i_adapter.DiTT2IAdapter``. This adapter's pyramid is matched to the UNet's
resolutions (features at 1/8 ... 1/64 of the image meet the encoder's features of the same scale); a
DiT's tokens have one resolution at every block, so its adapter is the single-scale form of this one
(the same stem and residual blocks, no downsampling) with a zero-initialised projection per
``block.{i}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from genlab.core.bounds import PositiveInt, checked
from genlab.core.errors import ShapeError
from genlab.models.unet import UNetEncoder

AdapterType = Literal["full_adapter", "full_adapter_xl", "light_adapter"]
ADAPTER_TYPES: tuple[str, ...] = ("full_adapter", "full_adapter_xl", "light_adapter")


class AdapterResnetBlock(nn.Module):
    """``x + block2(ReLU(block1(x)))``, ``block1`` a 3x3 conv, ``block2`` a 1x1 conv (full adapter) or
    3x3 (light adapter): ``[B, C, H, W] -> same``."""

    def __init__(self, channels: int, kernel_2: int) -> None:
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.block2 = nn.Conv2d(channels, channels, kernel_2, padding=kernel_2 // 2)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block2(F.relu(self.block1(x)))


class AdapterBlock(nn.Module):
    """One level of the adapter: ``[B, c_in, H, W] -> [B, c_out, H', W']`` (``H' = ceil(H / 2)`` with
    ``down``, a 2x2 average pool). Full: a 1x1 ``in_conv`` if the width changes, then ``num_res_blocks``
    residual blocks at ``c_out``. Light: 1x1 ``in_conv`` to ``c_out // 4``, residual blocks there, 1x1
    ``out_conv`` to ``c_out``."""

    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, down: bool, light: bool) -> None:
        super().__init__()
        self.down = down
        width = c_out // 4 if light else c_out
        self.in_conv = nn.Conv2d(c_in, width, 1) if light or c_in != c_out else None
        self.resnets = nn.Sequential(*(AdapterResnetBlock(width, 3 if light else 1) for _ in range(num_res_blocks)))
        self.out_conv = nn.Conv2d(width, c_out, 1) if light else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(x, 2, ceil_mode=True) if self.down else x
        x = self.resnets(x if self.in_conv is None else self.in_conv(x))
        return x if self.out_conv is None else self.out_conv(x)


@checked
class T2IAdapter(nn.Module):
    """T2I-Adapter: ``features(cond: [B, in_channels, H, W]) -> [F_1, ..., F_n]``, ``F_i: [B,
    channels[i], H / (f 2^d_i), W / (f 2^d_i)]`` with ``f = downscale_factor`` and ``d_i`` the number of
    downsampling blocks up to ``i``; ``forward(cond, unet, conditioning_scale)`` gives them as the UNet's
    ``residuals`` (``unet_points``), multiplied by ``conditioning_scale``. ``H`` and ``W`` must be divisible
    by ``f``.

    =================  =====================================  ================================
    adapter_type       blocks                                 features at (x 1/f)
    =================  =====================================  ================================
    full_adapter       conv_in, len(channels) blocks          1, 1/2, 1/4, ... (one per level)
    light_adapter      len(channels) + 1 blocks, no conv_in   1, 1/2, ..., the last two halved
    full_adapter_xl    conv_in, len(channels) blocks          1, 1, 1/2, 1/2 (SDXL's levels, mid)
    =================  =====================================  ================================

    For a latent UNet, ``f`` is the autoencoder's factor times the latent's (8: an image for SD's
    latents); ``f = 1`` takes a condition at the UNet's own resolution. ``channels`` must be the widths
    of the UNet's levels (diffusers' defaults: SD 1.x, ``(320, 640, 1280, 1280)``).

    Ranges: in_channels, num_res_blocks, downscale_factor and every width >= 1 (>= 4 for light_adapter,
    which works at a quarter of it); channels non-empty; full_adapter_xl keeps the width after its third
    block (diffusers' layout has no conv there).
    """

    def __init__(self, in_channels: PositiveInt = 3, channels: tuple[PositiveInt, ...] = (320, 640, 1280, 1280),
                 num_res_blocks: PositiveInt = 2, downscale_factor: PositiveInt = 8,
                 adapter_type: AdapterType = "full_adapter") -> None:
        super().__init__()
        channels = tuple(channels)
        if adapter_type == "full_adapter_xl" and any(c != channels[2] for c in channels[3:]):
            raise ValueError(f"T2IAdapter: full_adapter_xl keeps the width after its third block, got channels="
                             f"{list(channels)}; give channels[3:] equal to channels[2]")
        self.in_channels, self.channels, self.num_res_blocks = in_channels, channels, num_res_blocks
        self.downscale_factor, self.adapter_type = downscale_factor, adapter_type
        self.conv_in, self.body = adapter_layers(in_channels * downscale_factor**2, channels, num_res_blocks,
                                                 adapter_type, "T2IAdapter")

    @property
    def total_downscale_factor(self) -> int:
        """The resolution of the condition over that of the last feature."""
        return self.downscale_factor * 2 ** sum(block.down for block in self.body)

    def features(self, cond: Tensor) -> list[Tensor]:
        """The adapter's features ``[F_1, ..., F_n]`` for ``cond: [B, in_channels, H, W]`` (see the class
        docstring; diffusers' ``T2IAdapter.forward``)."""
        f = self.downscale_factor
        if cond.ndim != 4 or cond.shape[1] != self.in_channels or cond.shape[2] % f or cond.shape[3] % f:
            raise ShapeError(f"T2IAdapter: expected cond: [B, {self.in_channels}, H, W] with H and W divisible by "
                             f"downscale_factor={f}, got {list(cond.shape)}")
        return adapter_features(cond, f, self.conv_in, self.body)

    def forward(self, cond: Tensor, unet: UNetEncoder, conditioning_scale: float = 1.0) -> dict[str, Tensor]:
        """``residuals`` for ``unet``: ``conditioning_scale`` times the features, at ``unet_points(unet)``."""
        return adapter_residuals(self.features(cond), unet, conditioning_scale)


class MultiT2IAdapter(nn.Module):
    """Several T2I-Adapters on one UNet: ``(conds: one per adapter, unet, weights: one per adapter or one
    for all) -> residuals`` of ``sum_j weights[j] F^(j)`` (diffusers' ``MultiAdapter``, whose default
    weights are ``1 / n``; genlab's are 1, as ``MultiControlNet``'s). Their features must have equal shapes."""

    def __init__(self, adapters: Sequence[T2IAdapter]) -> None:
        super().__init__()
        if not adapters:
            raise ValueError("MultiT2IAdapter: expected at least one T2IAdapter, got none")
        factors = {(a.downscale_factor, a.total_downscale_factor, len(a.body)) for a in adapters}
        if len(factors) > 1:
            raise ValueError("MultiT2IAdapter: the adapters must downscale alike (downscale_factor, "
                             f"total_downscale_factor, number of features), got {sorted(factors)}")
        self.adapters = nn.ModuleList(adapters)

    def features(self, conds: Sequence[Tensor], weights: float | Sequence[float] = 1.0) -> list[Tensor]:
        """``sum_j weights[j] F^(j)`` per level."""
        weights = per_adapter(len(self.adapters), conds, weights, type(self).__name__)
        total: list[Tensor] = []
        for adapter, cond, w in zip(self.adapters, conds, weights):
            feats = [w * f for f in adapter.features(cond)]
            total = feats if not total else [a + b for a, b in zip(total, feats)]
        return total

    def forward(self, conds: Sequence[Tensor], unet: UNetEncoder, weights: float | Sequence[float] = 1.0,
                conditioning_scale: float = 1.0) -> dict[str, Tensor]:
        """``residuals`` for ``unet``: ``conditioning_scale`` times ``features(conds, weights)``."""
        return adapter_residuals(self.features(conds, weights), unet, conditioning_scale)


def per_adapter(n: int, conds: Sequence[Tensor], weights: float | Sequence[float], who: str) -> list[float]:
    """One weight per adapter of ``n`` (a number is every adapter's), ValueError unless there are ``n``
    conditions and weights."""
    weights = [weights] * n if isinstance(weights, (int, float)) else list(weights)
    if len(conds) != n or len(weights) != n:
        raise ValueError(f"{who}: expected one cond and one weight per adapter ({n}), got {len(conds)} conds and "
                         f"{len(weights)} weights")
    return weights


def unet_points(unet: UNetEncoder) -> list[str]:
    """Where T2I-Adapter features go in ``unet``: per level, ``intra.{k}`` of the level's last block if
    the level has attention, else of its last layer (the downsampler's, if any); then ``mid``. See the
    module docstring (diffusers' ``down_intrablock_additional_residuals``)."""
    if not isinstance(unet, UNetEncoder):
        raise TypeError(f"T2IAdapter: expected a genlab UNet, got {type(unet).__name__} (for a DiT, use "
                        "genlab.adapters.dit_t2i_adapter.DiTT2IAdapter)")
    points, k = [], 1  # skip 0 is conv_in's output
    for level in unet.down:
        saved = len(level.blocks) + (level.downsample is not None)
        last = len(level.blocks) if level.attns is not None else saved
        points.append(f"intra.{k + last - 1}")
        k += saved
    return points + ["mid"]


def adapter_residuals(features: Sequence[Tensor], unet: UNetEncoder, conditioning_scale: float = 1.0
                      ) -> dict[str, Tensor]:
    """``{unet_points(unet)[i]: conditioning_scale * features[i]}``; at most one feature per level plus one."""
    points = unet_points(unet)
    if len(features) > len(points):
        raise ValueError(f"T2IAdapter: {len(features)} features for a UNet with {len(points) - 1} levels; expected at "
                         f"most {len(points)} (one per level, then the middle block)")
    return {name: f * conditioning_scale for name, f in zip(points, features)}


def adapter_layers(unshuffled: int, channels: tuple[int, ...], num_res_blocks: int, adapter_type: str, owner: str,
                   single_scale: bool = False) -> tuple[nn.Conv2d | None, nn.ModuleList]:
    """``conv_in`` (None for light_adapter) and ``body`` (one ``AdapterBlock`` per feature) of a T2I-Adapter
    whose pixel-unshuffled input has ``unshuffled`` channels; layouts in ``T2IAdapter``'s docstring. With
    ``single_scale`` no block downsamples and light_adapter has no extra block (``DiTT2IAdapter``: every
    feature at the DiT's token grid). ValueError, naming ``owner``, for an unknown type or too small widths."""
    types = ("full_adapter", "light_adapter") if single_scale else ADAPTER_TYPES
    if adapter_type not in types:
        raise ValueError(f"{owner}: unknown adapter_type {adapter_type!r}; expected one of {', '.join(types)}")
    light = adapter_type == "light_adapter"
    if not channels or any(c < (4 if light else 1) for c in channels):
        raise ValueError(f"{owner}: channels must be a non-empty list of widths >= {4 if light else 1}"
                         f"{' (light_adapter works at width // 4)' if light else ''}, got {list(channels)}")
    conv_in = None if light else nn.Conv2d(unshuffled, channels[0], 3, padding=1)
    if light:  # (c_in, c_out, down) per block
        plan = [(unshuffled, channels[0], False), *((a, b, not single_scale) for a, b in zip(channels, channels[1:]))]
        plan += [] if single_scale else [(channels[-1], channels[-1], True)]
    elif adapter_type == "full_adapter_xl":
        plan = [(channels[max(i - 1, 0)], c, i == 2) for i, c in enumerate(channels)]
    else:
        plan = [(channels[max(i - 1, 0)], c, i > 0 and not single_scale) for i, c in enumerate(channels)]
    return conv_in, nn.ModuleList(AdapterBlock(a, b, num_res_blocks, down, light) for a, b, down in plan)


def adapter_features(cond: Tensor, factor: int, conv_in: nn.Module | None, body: Sequence[nn.Module]) -> list[Tensor]:
    """Every block's output for ``cond: [B, C, H, W]``: pixel unshuffle by ``factor``, ``conv_in``, ``body``."""
    h = F.pixel_unshuffle(cond, factor)
    h = h if conv_in is None else conv_in(h)
    out = []
    for block in body:
        h = block(h)
        out.append(h)
    return out
