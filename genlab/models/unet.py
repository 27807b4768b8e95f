"""ADM-style UNet backbone (Ho et al. 2020, "DDPM"; Dhariwal & Nichol 2021, "ADM"), optionally with
LDM / Stable Diffusion cross-attention transformers (Rombach et al. 2022). Blocks: ``unet_blocks.py``;
their assembly into levels: ``unet_builder.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.core.bounds import NonNegativeInt, PositiveFloat, PositiveInt, UnitInterval
from genlab.core.errors import ShapeError, did_you_mean
from genlab.core.registry import register
from genlab.models.attention import BACKENDS, Backend
from genlab.models.layers import (Dropout, FreqShift, LabelEmbedding, TimeEmbeddingKind, TimestepEmbedding,
                                  condition_embedding)
from genlab.models.unet_blocks import AttentionBlock, GroupNorm32, MidBlock, ResBlock, SpatialTransformer, set_backend
from genlab.models.unet_builder import UNetBuilder

Preset = Literal["tiny", "small", "base", "adm_cifar10", "adm_imagenet64"]

_DEFAULTS: dict[str, Any] = dict(channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(),
                                 num_heads=4, head_dim=None, dropout=0.0, scale_shift_norm=False, resample="conv")
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=()),
    "small": dict(channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1,)),
    "base": dict(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(1,), num_heads=1,
                 dropout=0.1),
    "adm_cifar10": dict(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=3, attention_levels=(1,),
                        num_heads=4, dropout=0.1),
    "adm_imagenet64": dict(channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_levels=(1, 2, 3),
                           head_dim=64, scale_shift_norm=True, resample="resblock", dropout=0.1),
}
_ZERO_INIT = {ResBlock: "conv_2", AttentionBlock: "attn.to_out", SpatialTransformer: "proj_out"}


def _architecture(preset: Preset | None, **given: Any) -> dict[str, Any]:
    """The architecture arguments: ``_DEFAULTS``, then the preset's, then those ``given`` that are not
    None (``num_heads`` given without ``head_dim`` clears the preset's ``head_dim``; ``channels_per_level``
    replaces ``channel_mult``, and ``channels`` is its first entry)."""
    given = {k: v for k, v in given.items() if v is not None}
    widths = given.pop("channels_per_level", None)
    if widths is not None and "channel_mult" in given:
        raise ValueError(f"UNet: give channel_mult ({list(given['channel_mult'])}) or channels_per_level "
                         f"({list(widths)}), not both: channels_per_level lists the level widths themselves")
    cfg = {**_DEFAULTS, **PRESETS.get(preset or "", {}), **given}
    if "num_heads" in given and "head_dim" not in given:
        cfg["head_dim"] = None
    cfg["attention_levels"] = tuple(cfg["attention_levels"])
    if widths is None:
        cfg["channel_mult"], cfg["channels_per_level"] = tuple(cfg["channel_mult"]), None
    else:
        widths = tuple(widths)
        if not widths:
            raise ValueError("UNet: channels_per_level must be non-empty (one width per resolution level), got []")
        if given.get("channels", widths[0]) != widths[0]:
            raise ValueError(f"UNet: channels={given['channels']} differs from channels_per_level[0]={widths[0]}; "
                             "with channels_per_level, omit channels (it is the first level's width)")
        cfg["channel_mult"], cfg["channels_per_level"], cfg["channels"] = None, widths, widths[0]
    return cfg


class UNetEncoder(nn.Module):
    """The way down of a ``UNet``, shared with the adapters that copy it (ControlNet): the time (+ label,
    + interval) embedding, ``conv_in``, the levels down and the middle block, built from a resolved
    ``UNet.config`` (its names and its checks), and the injection points their features give."""

    config: dict[str, Any]

    def _build_encoder(self, widths: list[int]) -> tuple[UNetBuilder, nn.ModuleList, MidBlock, list[int]]:
        """Set the attributes of ``self.config`` the way down reads and create, in this order (the initial
        weights of a seed), ``time_embed``, ``label_embed``, ``interval_embed``, ``conv_in``, the levels down
        of ``widths`` and the middle block. Returns the builder, the levels and the middle block (for the
        caller to register in its own order) and the widths of the skip features."""
        cfg = self.config
        c, time_embed_dim = cfg["channels"], cfg["time_embed_dim"]
        self.in_channels, self.num_classes = cfg["in_channels"], cfg["num_classes"]
        self.channels, self.widths = c, widths
        self.num_res_blocks, self.cross_attention_dim = cfg["num_res_blocks"], cfg["cross_attention_dim"]
        self.gradient_checkpointing, self.channels_last = cfg["gradient_checkpointing"], cfg["channels_last"]
        make = UNetBuilder.from_config(cfg)
        self.time_embed = TimestepEmbedding(time_embed_dim, c, freq_shift=cfg["time_freq_shift"],
                                            flip_sin_to_cos=cfg["time_flip_sin_to_cos"], kind=cfg["time_embedding"],
                                            fourier_scale=cfg["fourier_scale"])
        self.label_embed = (None if cfg["num_classes"] is None else
                            LabelEmbedding(cfg["num_classes"], time_embed_dim, cfg["class_dropout"]))
        self.interval_embed = self.time_embed.interval_twin() if cfg["interval_embedding"] else None
        self.takes_interval = cfg["interval_embedding"]  # a two-time network u(x, r, t)
        self.conv_in = nn.Conv2d(cfg["in_channels"], c, 3, padding=1)
        down, skips, cur = make.down_path(c, widths, cfg["num_res_blocks"], cfg["attention_levels"])
        return make, down, make.mid(cur, cfg["mid_attention"], cfg["mid_attention_norm"]), skips

    def set_attention_backend(self, backend: Backend) -> None:
        """Use ``backend`` ("auto", "flash", "sdpa", "math") for every attention of the model."""
        if backend not in BACKENDS:
            raise ValueError(f"{type(self).__name__}: unknown attention backend {backend!r}; expected one of "
                             f"{', '.join(BACKENDS)}")
        self.attention_backend = backend
        set_backend(self, backend)

    def encode(self, x: Tensor, t: Tensor | float, class_labels: Tensor | None = None, context: Tensor | None = None,
               interval: Tensor | float | None = None, hint: Tensor | None = None,
               intra: Mapping[int, Tensor] | None = None,
               guidance_scale: Tensor | float | None = None) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The way down for ``x: [B, C, H, W]`` (other arguments as ``UNet.forward``): the embedding ``emb:
        [B, time_embed_dim]``, the middle block's output ``[B, widths[-1], H / 2^L, W / 2^L]`` and the skip
        features (``down.{k}`` of ``injection_points``). ``hint: [B, channels, H, W]`` is added to
        ``conv_in``'s output (a ControlNet's conditioning); ``intra[k]`` is added to the way down's
        feature where skip ``k`` is saved, before it is saved and passed on (``intra.{k}``); ``guidance_scale``:
        the guidance weight w of a ``guidance_embedding`` model."""
        self.injection_points(x.shape)
        emb = condition_embedding(self.time_embed, self.label_embed, x, t, class_labels, type(self).__name__,
                                  self.interval_embed, interval, getattr(self, "guidance_embed", None), guidance_scale)
        self._check_context(context, x)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)
        h = h if hint is None else h + hint
        intra = intra or {}
        h = h + intra[0] if 0 in intra else h
        skips = [h]
        for level in self.down:
            first = len(skips)  # the global index of the level's first skip
            h, saved = level(h, emb, context, ckpt, {k - first: r for k, r in intra.items() if k >= first})
            skips += saved
        return emb, self.mid(h, emb, context, ckpt), skips

    def injection_points(self, x_shape: tuple[int, ...] | torch.Size, intra: bool = False) -> dict[str, torch.Size]:
        """Names and shapes of the feature maps ``residuals`` may add to, for an input of ``x_shape``:
        ``down.{k}`` and ``mid``, and with ``intra`` also ``intra.{k}`` (the shapes of ``down.{k}``)."""
        factor = 2 ** (len(self.widths) - 1)
        if len(x_shape) != 4 or x_shape[1] != self.in_channels or x_shape[2] % factor or x_shape[3] % factor:
            raise ShapeError(f"{type(self).__name__}: expected x: [B, C, H, W] = [B, {self.in_channels}, H, W] with "
                             f"H and W divisible by {factor}, got {list(x_shape)}")
        b, _, hh, ww = x_shape
        shapes = [(self.channels, hh, ww)]
        last = len(self.widths) - 1
        for i, w in enumerate(self.widths):
            shapes += [(w, hh >> i, ww >> i)] * self.num_res_blocks
            shapes += [(w, hh >> (i + 1), ww >> (i + 1))] if i < last else []
        points = {f"down.{k}": torch.Size((b, *s)) for k, s in enumerate(shapes)}
        points["mid"] = torch.Size((b, self.widths[-1], hh >> last, ww >> last))
        if intra:
            points.update({f"intra.{k}": points[f"down.{k}"] for k in range(len(shapes))})
        return points

    def _check_context(self, context: Tensor | None, x: Tensor) -> None:
        name = type(self).__name__
        if self.cross_attention_dim is None:
            if context is not None:
                raise ValueError(f"{name}: context given, but the model was built with cross_attention_dim=None")
            return
        if context is None:
            raise ValueError(f"{name}: this model cross-attends (cross_attention_dim set) and needs context: [B, L, D]")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != self.cross_attention_dim:
            raise ShapeError(f"{name}: expected context: [B, L, D] = [{x.shape[0]}, L, {self.cross_attention_dim}], "
                             f"got {list(context.shape)}")


@register("model", "unet")
class UNet(UNetEncoder):
    """UNet ``(x: [B, C, H, W], t: [B] or scalar, class_labels, context, residuals) -> [B, out_channels, H, W]``.

    ``H`` and ``W`` must be divisible by ``2^(L - 1)`` for ``L`` levels. Level ``i`` has
    ``channels * channel_mult[i]`` (or ``channels_per_level[i]``) channels at resolution ``H / 2^i``:
    ``num_res_blocks`` ResBlocks (GroupNorm, SiLU, conv; the time (+ class) embedding added, or AdaGN
    with ``scale_shift_norm``) each followed by attention if ``i in attention_levels``, then a
    downsampler (strided conv, or a ResBlock with average pooling if ``resample="resblock"``). The middle is ResBlock, attention,
    ResBlock; the way up mirrors it with ``num_res_blocks + 1`` ResBlocks per level, each taking one
    skip feature (concatenated), then nearest-x2 + conv (or a ResBlock). Attention is self-attention
    with ``num_heads`` heads, or ``channels // head_dim`` if ``head_dim`` is set; with
    ``cross_attention_dim`` every attention is an LDM SpatialTransformer (self-attention,
    cross-attention to ``context: [B, L, cross_attention_dim]``, GEGLU) of ``transformer_depth``
    blocks. ``t`` is the model time in any range (e.g. the DDPM step index), embedded with
    sinusoids of ``channels`` frequencies and a 2-layer MLP to ``time_embed_dim`` (default
    ``4 * channels``); ``time_embedding="fourier"`` replaces the sinusoids by ``channels`` random
    Fourier features of scale ``fourier_scale`` (score_sde's NCSN++; for times of order 1, such as
    ``edm``'s log(sigma) / 4). With ``num_classes``, labels ``0..num_classes-1`` are classes and
    ``-1`` (or ``None``) is the null class; ``class_dropout`` nulls labels while training (Ho &
    Salimans 2022). ``guidance_embedding=True`` makes a guidance-distilled student (Meng et al. 2023,
    Sec. 4.1): ``guidance_scale`` w is embedded as the time is (zero-initialised output layer: a student
    loaded from its teacher starts equal to it) and added to the time embedding.
    The output conv and the last layer of every residual branch start at zero (ADM) unless
    ``zero_init=False``.

    ``channels_per_level`` gives the level widths directly instead of ``channels * channel_mult``
    (e.g. ``(32, 48, 64)``, as diffusers' ``block_out_channels``, which need not be multiples of the
    first); ``channels`` (``conv_in``'s width and the number of time frequencies) is then its first
    entry. Give ``channel_mult`` or ``channels_per_level``, not both.

    Presets fill defaults; explicit arguments win (giving ``num_heads`` alone clears a preset's
    ``head_dim``; ``channels_per_level`` replaces a preset's ``channels`` and ``channel_mult``).
    Attention levels are indices into the levels; resolutions are for the input size named.

    ==============  ========  ============  ======  ================  ============================
    preset          channels  channel_mult  blocks  attention         other
    ==============  ========  ============  ======  ================  ============================
    tiny            32        (1, 2)        1       none (mid only)   4 heads
    small (default) 64        (1, 2, 2)     2       (1,)              4 heads
    base            128       (1, 2, 2, 2)  2       (1,): 16 of 32    1 head, dropout 0.1 (DDPM)
    adm_cifar10     128       (1, 2, 2, 2)  3       (1,): 16 of 32    4 heads, dropout 0.1
    adm_imagenet64  192       (1, 2, 3, 4)  3       (1, 2, 3): 32/16  head_dim 64, scale-shift,
                                                    /8 of 64          resblock up/down, dropout 0.1
    ==============  ========  ============  ======  ================  ============================

    Injection points for adapters (ControlNet, T2I-Adapter): ``residuals`` maps names to tensors
    added to features (the same as diffusers' ``down_block_additional_residuals`` and
    ``mid_block_additional_residual``). ``"down.{k}"`` is the k-th skip feature saved on the way
    down: ``down.0`` is ``conv_in``'s output ``[B, channels, H, W]``; then per level ``i`` (width
    ``ch_i``: ``channels * channel_mult[i]`` or ``channels_per_level[i]``) one per ResBlock
    (+attention) ``[B, ch_i, H/2^i, W/2^i]`` and, except at the last level, the downsampled
    one ``[B, ch_i, H/2^(i+1), W/2^(i+1)]``. ``"mid"`` is the middle block's output. ``down.{k}``
    changes only the skip, not the feature passed further down; ``"intra.{k}"`` (same shapes) adds to the way
    down's feature where skip ``k`` is saved, before it is saved: it reaches skip ``k`` and everything
    after it (the T2I-Adapter's points, diffusers' ``down_intrablock_additional_residuals``).
    ``injection_points(x.shape)`` lists ``down.{k}`` and ``mid``; ``injection_points(x.shape, intra=True)``
    all of them.

    Conversion options (set by ``genlab.interop.unet_weights``): ``time_flip_sin_to_cos`` and
    ``time_freq_shift`` of the sinusoids, ``norm_eps``, ``mid_attention`` (attention in the middle
    block), ``mid_attention_norm`` (GroupNorm before the middle self-attention), ``linear_projection``.

    Ranges: channels, widths, blocks, heads, depths, classes >= 1; channel_mult or channels_per_level a
    non-empty list of ints >= 1; attention_levels indices into it; dropout in [0, 1), class_dropout in [0, 1];
    time_freq_shift in [0, 1]; fourier_scale, norm_eps > 0. ``channels`` and every level width must be
    divisible by norm_groups, and every attention width by num_heads (or head_dim); ``fourier`` needs an even
    ``channels``.
    """

    def __init__(
        self,
        in_channels: PositiveInt = 3,
        out_channels: PositiveInt | None = None,
        preset: Preset | None = None,
        channels: PositiveInt | None = None,
        channel_mult: tuple[PositiveInt, ...] | None = None,
        channels_per_level: tuple[PositiveInt, ...] | None = None,
        num_res_blocks: PositiveInt | None = None,
        attention_levels: tuple[NonNegativeInt, ...] | None = None,
        num_heads: PositiveInt | None = None,
        head_dim: PositiveInt | None = None,
        dropout: Dropout | None = None,
        scale_shift_norm: bool | None = None,
        resample: Literal["conv", "resblock"] | None = None,
        num_classes: PositiveInt | None = None,
        class_dropout: UnitInterval = 0.0,
        cross_attention_dim: PositiveInt | None = None,
        transformer_depth: PositiveInt = 1,
        linear_projection: bool = False,
        time_embed_dim: PositiveInt | None = None,
        time_flip_sin_to_cos: bool = True,
        time_freq_shift: FreqShift = 0.0,
        time_embedding: TimeEmbeddingKind = "sinusoidal",
        fourier_scale: PositiveFloat = 16.0,
        norm_groups: PositiveInt = 32,
        norm_eps: PositiveFloat = 1e-5,
        mid_attention: bool = True,
        mid_attention_norm: bool = True,
        zero_init: bool = True,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        attention_backend: Backend = "auto",
        interval_embedding: bool = False,
        guidance_embedding: bool = False,
    ) -> None:
        super().__init__()
        cfg = _architecture(preset, channels=channels, channel_mult=channel_mult,
                            channels_per_level=channels_per_level, num_res_blocks=num_res_blocks,
                            attention_levels=attention_levels, num_heads=num_heads, head_dim=head_dim,
                            dropout=dropout, scale_shift_norm=scale_shift_norm, resample=resample)
        c, n, levels = cfg["channels"], cfg["num_res_blocks"], cfg["attention_levels"]
        ch = list(cfg["channels_per_level"] or (c * m for m in cfg["channel_mult"]))  # level widths
        out_channels = in_channels if out_channels is None else out_channels
        time_embed_dim = time_embed_dim or 4 * c
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, out_channels=out_channels, **cfg, num_classes=num_classes,
            class_dropout=class_dropout, cross_attention_dim=cross_attention_dim, transformer_depth=transformer_depth,
            linear_projection=linear_projection, time_embed_dim=time_embed_dim,
            time_flip_sin_to_cos=time_flip_sin_to_cos, time_freq_shift=time_freq_shift,
            time_embedding=time_embedding, fourier_scale=fourier_scale, norm_groups=norm_groups,
            norm_eps=norm_eps, mid_attention=mid_attention, mid_attention_norm=mid_attention_norm,
            gradient_checkpointing=gradient_checkpointing, channels_last=channels_last,
            attention_backend=attention_backend, interval_embedding=interval_embedding,
            guidance_embedding=guidance_embedding)
        source = "channels_per_level" if cfg["channels_per_level"] else "channels * channel_mult"
        self._validate(c, ch, levels, cfg["num_heads"], cfg["head_dim"], norm_groups, source)
        if time_embedding == "fourier" and c % 2:
            raise ValueError(f"UNet: channels ({c}) must be even with time_embedding='fourier' (the time features "
                             "are cos and sin pairs)")
        self.out_channels, self.channel_mult = out_channels, cfg["channel_mult"]
        make, down, mid, skips = self._build_encoder(ch)
        # built down, mid, up (initial weights); registered down, up, mid (state_dict and optimizer order)
        self.down, self.up, self.mid = down, make.up_path(ch[-1], ch, n, levels, skips), mid
        self.norm_out = GroupNorm32(norm_groups, ch[0], norm_eps)  # the way up ends at level 0's width
        self.conv_out = nn.Conv2d(ch[0], out_channels, 3, padding=1)
        if zero_init:
            self._zero_init()
        # last: the other weights of a seed are those of the model without it; zero output: it starts at no change
        self.guidance_embed = self.time_embed.interval_twin() if guidance_embedding else None
        self.set_attention_backend(attention_backend)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _zero_init(self) -> None:
        """Zero the output conv and the last layer of every residual branch (ADM): blocks start as the identity."""
        last = [m.get_submodule(_ZERO_INIT[type(m)]) for m in self.modules() if type(m) in _ZERO_INIT]
        for layer in [self.conv_out, *last]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @staticmethod
    def _validate(channels: int, ch: list[int], levels: tuple[int, ...], num_heads: int, head_dim: int | None,
                  groups: int, source: str) -> None:
        """ValueError naming the fields unless ``channels`` (``conv_in``'s width) and the level widths ``ch``
        [levels] (given by ``source``, the option named in errors) fit the other arguments."""
        if not ch:
            raise ValueError("UNet: channel_mult must be non-empty (one entry per resolution level), got []")
        if any(co <= 0 for co in ch):
            raise ValueError(f"UNet: channels and channel_mult must be positive, got widths {ch}")
        bad = [lv for lv in levels if not 0 <= lv < len(ch)]
        if bad:
            raise ValueError(f"UNet: attention_levels {bad} out of range for {len(ch)} levels "
                             f"(indices into channel_mult: 0 to {len(ch) - 1})")
        if any(co % groups for co in ch):
            raise ValueError(f"UNet: every level width {ch} ({source}) must be divisible by norm_groups={groups}; "
                             "choose norm_groups dividing all of them")
        if channels % groups:
            raise ValueError(f"UNet: channels={channels} (conv_in's width) must be divisible by norm_groups={groups}")
        for co in sorted({*(ch[lv] for lv in levels), ch[-1]}):
            div = head_dim or num_heads
            if co % div:
                what = f"head_dim={head_dim}" if head_dim else f"num_heads={num_heads}"
                raise ValueError(f"UNet: attention width {co} is not divisible by {what}")

    def forward(self, x: Tensor, t: Tensor | float, class_labels: Tensor | None = None,
                context: Tensor | None = None, residuals: dict[str, Tensor] | None = None,
                interval: Tensor | float | None = None, guidance_scale: Tensor | float | None = None) -> Tensor:
        """``x: [B, C, H, W]``, ``t: [B]`` or scalar, ``class_labels: [B]`` long (-1 = null) or None,
        ``context: [B, L, cross_attention_dim]``, ``residuals``: see the class docstring, ``interval``: [B]
        or scalar (``interval_embedding`` models), ``guidance_scale``: [B] or scalar (``guidance_embedding``
        models) -> ``[B, out_channels, H, W]``."""
        residuals = self._check_residuals(residuals or {}, self.injection_points(x.shape, intra=True))
        intra = {int(name[len("intra."):]): r for name, r in residuals.items() if name.startswith("intra.")}
        emb, h, skips = self.encode(x, t, class_labels, context, interval, intra=intra, guidance_scale=guidance_scale)  # emb: [B, time_embed_dim]
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        skips = [s + residuals[f"down.{k}"] if f"down.{k}" in residuals else s for k, s in enumerate(skips)]
        h = h + residuals["mid"] if "mid" in residuals else h
        for level in self.up:
            h = level(h, skips, emb, context, ckpt)
        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def _check_residuals(residuals: dict[str, Tensor], points: dict[str, torch.Size]) -> dict[str, Tensor]:
        for name, r in residuals.items():
            if name not in points:
                raise KeyError(f"UNet: unknown injection point {name!r}{did_you_mean(name, points)} "
                               f"(valid: {', '.join(points)})")
            if r.shape != points[name]:
                raise ShapeError(f"UNet: residual {name!r}: expected {list(points[name])}, got {list(r.shape)}")
        return residuals
