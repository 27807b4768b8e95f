"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models") for genlab's UNet.

A ControlNet is a trainable copy of the UNet's way down (``UNetEncoder``: the time/label embedding,
``conv_in``, the levels down and the middle block) whose input is ``x`` plus an embedding of the
conditioning image (a small strided conv net down to the UNet's input resolution, Sec. 3.2). A 1x1
conv that starts at zero (the paper's "zero convolution", Sec. 3.1) maps each of its skip features
and its middle output to the residual of the UNet's injection point of the same name (``down.{k}``,
``mid``), scaled by ``conditioning_scale``. At initialisation the residuals are zero, so the
controlled UNet computes exactly what it computed before, while the zero convs still receive
gradients. Several ControlNets add their residuals (``MultiControlNet``)::

    controlnet = ControlNet.from_unet(unet)                   # the paper's initialisation
    residuals = controlnet(x, t, cond, class_labels, context, conditioning_scale=1.0)
    out = unet(x, t, class_labels, context, residuals=residuals)

``ControlledUNet`` joins them into one model, ``(x, t, class_labels, context, control, control_scale) ->
out``, which every Denoiser, sampler and guidance wrapper runs unchanged (they pass ``cond`` to the model);
``controlled_unet`` builds one from a config (model ``controlled_unet``).

The layout and names follow diffusers' ``ControlNetModel`` (``genlab.interop`` converts both ways);
diffusers' ``guess_mode`` and ``global_pool_conditions`` are not reproduced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.core.bounds import PositiveInt
from genlab.core.errors import ShapeError
from genlab.core.registry import build, register
from genlab.models.unet import UNet, UNetEncoder


class ConditioningEmbedding(nn.Module):
    """The conditioning image to the UNet's ``conv_in`` width: ``cond: [B, C_cond, f H, f W] -> [B,
    channels, H, W]`` with ``f = 2^(len(widths) - 1)``. A 3x3 conv to ``widths[0]``, then per step a
    3x3 conv and a stride-2 3x3 conv to the next width, each followed by SiLU, and a zero-initialised
    3x3 conv out (diffusers' ``ControlNetConditioningEmbedding``; the paper's Sec. 3.2 has 4x4 kernels)."""

    def __init__(self, conditioning_channels: int, channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.factor = 2 ** (len(widths) - 1)
        self.conv_in = nn.Conv2d(conditioning_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            self.blocks += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.Conv2d(c_in, c_out, 3, padding=1, stride=2)]
        self.conv_out = nn.Conv2d(widths[-1], channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, cond: Tensor) -> Tensor:
        h = F.silu(self.conv_in(cond))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNet(UNetEncoder):
    """ControlNet for a genlab ``UNet`` of ``unet_config`` (the UNet's arguments, or its resolved
    ``config``; checked as the UNet checks them): ``(x: [B, C, H, W], t, cond: [B, conditioning_channels,
    f H, f W], class_labels, context, conditioning_scale, interval) -> residuals`` for the UNet's
    ``residuals`` argument, ``{"down.{k}": ..., "mid": ...}`` with the shapes of
    ``injection_points(x.shape)``. ``f = 2^(len(embedding_channels) - 1)``: 8 with the default
    ``(16, 32, 96, 256)`` (an image for a latent UNet); ``(c,)`` for a condition at the UNet's own
    resolution. Use ``from_unet`` to start from a UNet's weights (the paper's initialisation); a
    ControlNet built directly has freshly initialised encoder weights (and zero output convs).

    Ranges: conditioning_channels and every embedding width >= 1, embedding_channels non-empty.
    """

    def __init__(self, unet_config: Mapping[str, Any], conditioning_channels: PositiveInt = 3,
                 embedding_channels: tuple[PositiveInt, ...] = (16, 32, 96, 256)) -> None:
        super().__init__()
        if not embedding_channels or any(c < 1 for c in embedding_channels):
            raise ValueError(f"ControlNet: embedding_channels must be a non-empty list of widths >= 1, "
                             f"got {list(embedding_channels)}")
        if conditioning_channels < 1:
            raise ValueError(f"ControlNet: conditioning_channels must be >= 1, got {conditioning_channels}")
        with torch.device("meta"):  # the UNet resolves and checks its arguments; nothing is allocated
            template = UNet(**unet_config)
        self.config = dict(template.config)
        self.conditioning_channels, self.embedding_channels = conditioning_channels, tuple(embedding_channels)
        _, down, mid, skips = self._build_encoder(template.widths)
        self.down, self.mid = down, mid
        self.cond_embed = ConditioningEmbedding(conditioning_channels, self.channels, self.embedding_channels)
        self.zero_convs = nn.ModuleList(nn.Conv2d(w, w, 1) for w in skips)
        self.mid_conv = nn.Conv2d(self.widths[-1], self.widths[-1], 1)
        for conv in [*self.zero_convs, self.mid_conv]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.set_attention_backend(self.config["attention_backend"])
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_unet(cls, unet: UNet, conditioning_channels: PositiveInt = 3,
                  embedding_channels: tuple[PositiveInt, ...] = (16, 32, 96, 256)) -> ControlNet:
        """A ControlNet for ``unet`` whose way down is a copy of the UNet's (on its device and dtype)."""
        param = next(unet.parameters())
        net = cls(unet.config, conditioning_channels, embedding_channels).to(device=param.device, dtype=param.dtype)
        source = unet.state_dict()
        own = ("cond_embed.", "zero_convs.", "mid_conv.")  # the rest has the UNet's names
        net.load_state_dict({k: source[k] if not k.startswith(own) else v for k, v in net.state_dict().items()})
        return net.train(unet.training)

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor, class_labels: Tensor | None = None,
                context: Tensor | None = None, conditioning_scale: float = 1.0,
                interval: Tensor | float | None = None) -> dict[str, Tensor]:
        """See the class docstring; ``t``, ``class_labels``, ``context`` and ``interval`` as the UNet's."""
        self.injection_points(x.shape)  # checks x
        f = self.cond_embed.factor
        expected = [x.shape[0], self.conditioning_channels, f * x.shape[2], f * x.shape[3]]
        if list(cond.shape) != expected:
            raise ShapeError(f"ControlNet: expected cond: [B, C_cond, {f} H, {f} W] = {expected} for x of shape "
                             f"{list(x.shape)}, got {list(cond.shape)}")
        _, h, skips = self.encode(x, t, class_labels, context, interval, hint=self.cond_embed(cond))
        residuals = {f"down.{k}": conv(s) * conditioning_scale
                     for k, (conv, s) in enumerate(zip(self.zero_convs, skips))}
        residuals["mid"] = self.mid_conv(h) * conditioning_scale
        return residuals


class MultiControlNet(nn.Module):
    """Several ControlNets on one UNet: ``(x, t, conds: one per ControlNet, class_labels, context,
    conditioning_scales: one per ControlNet or one for all, interval) -> residuals``, the sum of theirs
    (diffusers' ``MultiControlNetModel``)."""

    def __init__(self, controlnets: Sequence[ControlNet]) -> None:
        super().__init__()
        if not controlnets:
            raise ValueError("MultiControlNet: expected at least one ControlNet, got none")
        self.nets = nn.ModuleList(controlnets)

    def forward(self, x: Tensor, t: Tensor | float, conds: Sequence[Tensor], class_labels: Tensor | None = None,
                context: Tensor | None = None, conditioning_scales: float | Sequence[float] = 1.0,
                interval: Tensor | float | None = None) -> dict[str, Tensor]:
        scales = [conditioning_scales] * len(self.nets) if isinstance(conditioning_scales, (int, float)) \
            else list(conditioning_scales)
        if len(conds) != len(self.nets) or len(scales) != len(self.nets):
            raise ValueError(f"MultiControlNet: expected one cond and one conditioning scale per ControlNet "
                             f"({len(self.nets)}), got {len(conds)} conds and {len(scales)} scales")
        total: dict[str, Tensor] = {}
        for net, cond, scale in zip(self.nets, conds, scales):
            for name, r in net(x, t, cond, class_labels, context, scale, interval).items():
                total[name] = total[name] + r if name in total else r
        return total


def _unwrapped(module: nn.Module) -> nn.Module:
    """``module`` without a distributed (``.module``) or torch.compile (``._orig_mod``) wrapper."""
    module = getattr(module, "module", module)
    return getattr(module, "_orig_mod", module)


def _architecture(net: UNetEncoder) -> dict[str, Any]:
    """What a ControlNet and its UNet must share: the shapes of the way down and of its conditions."""
    keys = ("in_channels", "channels", "num_res_blocks", "num_classes", "cross_attention_dim", "time_embed_dim")
    return {"widths": list(net.widths), **{k: net.config[k] for k in keys}}


class ControlledUNet(nn.Module):
    """A UNet steered by ControlNets, as one model: ``(x: [B, C, H, W], t, class_labels, context, control,
    control_scale, interval, residuals) -> [B, out_channels, H, W]``,

        out = UNet(x, t; residuals = sum_i s_i ControlNet_i(x, t, c_i))

    (Zhang et al. 2023, Eq. 2 and Sec. 3.2: the locked model's skip and middle features plus the zero
    convolutions' outputs of each trainable copy). Samplers, Denoisers and guidance wrappers pass their
    ``cond`` to the model, so they all run it unchanged with ``cond = {"class_labels": ..., "control": ...}``.

    - ``control``: the conditioning images c_i, either one tensor ``[B, C_1 + ... + C_n, f H, f W]`` (the
      ControlNets' images stacked on channels, in their order: a per-sample tensor like any other
      condition, which guidance batches as it batches labels; needs one resolution factor f for all), or a
      sequence of one ``[B, C_i, f_i H, f_i W]`` per ControlNet. None: the UNet alone, no ControlNet runs.
    - ``control_scale``: s_i, one number for all or one per ControlNet (default: ``conditioning_scale``).
    - ``residuals``: other adapters' residuals at the UNet's injection points, added to the ControlNets'.

    The modules are held as given (a distributed or compiled wrapper of one too, which the forward
    goes through): freezing the UNet is the training objective's declaration (objective
    ``controlnet`` keeps it frozen). With ControlNets fresh from ``ControlNet.from_unet`` (zero
    convolutions), the output equals the UNet's exactly. TypeError for a backbone that is not a UNet or
    a ControlNet that is not one; ValueError for a ControlNet built for another UNet or a scale count
    that is not 1 or the number of ControlNets.
    """

    def __init__(self, unet: UNet, controlnets: ControlNet | MultiControlNet | Sequence[ControlNet],
                 conditioning_scale: float | Sequence[float] = 1.0) -> None:
        super().__init__()
        if isinstance(controlnets, MultiControlNet):
            controlnets = list(controlnets.nets)
        nets = [controlnets] if isinstance(controlnets, nn.Module) else list(controlnets)  # one, maybe wrapped
        if not isinstance(_unwrapped(unet), UNet):
            raise TypeError(f"ControlledUNet: the backbone must be a genlab UNet, got {type(unet).__name__}")
        self._inner = [_unwrapped(net) for net in nets]  # attributes of each ControlNet, not registered twice
        for i, net in enumerate(self._inner):
            if not isinstance(net, ControlNet):
                raise TypeError(f"ControlledUNet: controlnets[{i}] must be a ControlNet, got {type(net).__name__}")
            ours, theirs = _architecture(net), _architecture(_unwrapped(unet))
            differs = [k for k in ours if ours[k] != theirs[k]]
            if differs:
                k = differs[0]
                raise ValueError(f"ControlledUNet: controlnets[{i}] was built for another UNet ({k} {ours[k]}, the "
                                 f"backbone's {theirs[k]}); build it with ControlNet.from_unet(backbone)")
        self.unet, self.controlnet = unet, MultiControlNet(nets)
        self.conditioning_scale = self._scales(conditioning_scale)

    @property
    def num_classes(self) -> int | None:
        """The backbone's classes (None: unconditional)."""
        return _unwrapped(self.unet).num_classes

    def _scales(self, scale: float | Sequence[float]) -> list[float]:
        n = len(self.controlnet.nets)
        scales = [float(scale)] * n if isinstance(scale, (int, float)) else [float(s) for s in scale]
        if len(scales) != n:
            raise ValueError(f"ControlledUNet: expected one control scale or one per ControlNet ({n}), "
                             f"got {len(scales)}")
        return scales

    def split_control(self, control: Tensor | Sequence[Tensor]) -> list[Tensor]:
        """``control`` as one conditioning image per ControlNet (see the class docstring)."""
        nets = self._inner
        if not isinstance(control, Tensor):
            return list(control)  # one per ControlNet; MultiControlNet checks the count, each its shape
        sizes = [net.conditioning_channels for net in nets]
        if control.ndim != 4 or control.shape[1] != sum(sizes):
            raise ShapeError(f"ControlledUNet: expected control: [B, {' + '.join(map(str, sizes))}, H', W'] (the "
                             f"ControlNets' conditioning channels stacked), got {list(control.shape)}")
        if len({net.cond_embed.factor for net in nets}) > 1:
            raise ShapeError("ControlledUNet: these ControlNets take their images at different resolutions; give "
                             "control as a list of one tensor per ControlNet")
        return list(control.split(sizes, dim=1))

    def forward(self, x: Tensor, t: Tensor | float, class_labels: Tensor | None = None,
                context: Tensor | None = None, control: Tensor | Sequence[Tensor] | None = None,
                control_scale: float | Sequence[float] | None = None, interval: Tensor | float | None = None,
                residuals: dict[str, Tensor] | None = None) -> Tensor:
        """See the class docstring; ``t``, ``class_labels``, ``context``, ``interval`` as the UNet's."""
        residuals = dict(residuals or {})
        if control is not None:
            scales = self.conditioning_scale if control_scale is None else self._scales(control_scale)
            added = self.controlnet(x, t, self.split_control(control), class_labels, context, scales, interval)
            for name, r in added.items():
                residuals[name] = residuals[name] + r if name in residuals else r
        return self.unet(x, t, class_labels, context, residuals=residuals, interval=interval)


@dataclass
class ControlNetSpec:
    """One ControlNet of a ``controlled_unet`` config: its ``ControlNet`` arguments besides the UNet."""

    conditioning_channels: PositiveInt = 3
    embedding_channels: tuple[PositiveInt, ...] = (16, 32, 96, 256)


@register("model", "controlled_unet")
def controlled_unet(unet: Mapping[str, Any], controlnets: Sequence[ControlNetSpec] = (ControlNetSpec(),),
                    conditioning_scale: float | Sequence[float] = 1.0,
                    in_channels: PositiveInt | None = None) -> ControlledUNet:
    """A UNet of arguments ``unet`` (model ``unet``'s keys, checked as a ``unet`` section is) with one
    ControlNet per entry of ``controlnets`` copied from it (``ControlNet.from_unet``: zero convolutions,
    so it starts as the UNet), as a :class:`ControlledUNet`. ``in_channels``: the data's, unless ``unet``
    sets it. To train ControlNets on a trained UNet that stays frozen, use objective ``controlnet``."""
    channels = {} if in_channels is None or "in_channels" in unet else {"in_channels": in_channels}
    backbone = build("model", {**unet, "type": "unet"}, path="model.unet", **channels)
    nets = [ControlNet.from_unet(backbone, spec.conditioning_channels, spec.embedding_channels) for spec in controlnets]
    return ControlledUNet(backbone, nets, conditioning_scale)
