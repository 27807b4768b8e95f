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

``genlab.adapters.controlled.ControlledModel`` joins them into one model, ``(x, t, class_labels, context,
control, control_scale) -> out``, which every Denoiser, sampler and guidance wrapper runs unchanged (they
pass ``cond`` to the model); model ``controlled_unet`` builds one from a config.

The layout and names follow diffusers' ``ControlNetModel`` (``genlab.interop`` converts both ways);
diffusers' ``guess_mode`` and ``global_pool_conditions`` are not reproduced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.core.bounds import PositiveInt
from genlab.core.errors import ShapeError
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

    @property
    def control_factor(self) -> int:
        """f: the control image is ``f`` times the UNet's input size."""
        return self.cond_embed.factor

    def mismatch(self, unet: nn.Module) -> str | None:
        """Where this ControlNet does not fit ``unet`` (a field, its value and the UNet's), or None."""
        if not isinstance(unet, UNet):
            return f"backbone {type(unet).__name__}, a ControlNet steers a UNet"
        ours, theirs = _architecture(self), _architecture(unet)
        k = next((k for k in ours if ours[k] != theirs[k]), None)
        return None if k is None else f"{k} {ours[k]}, the UNet's {theirs[k]}"

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
    """Several ControlNets on one backbone (``ControlNet`` s on a UNet, ``DiTControlNet`` s on a DiT): ``(x, t,
    conds: one per ControlNet, class_labels, context, conditioning_scales: one per ControlNet or one for
    all, interval) -> residuals``, the sum of theirs (diffusers' ``MultiControlNetModel``)."""

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


def _architecture(net: UNetEncoder) -> dict[str, Any]:
    """What a ControlNet and its UNet must share: the shapes of the way down and of its conditions."""
    keys = ("in_channels", "channels", "num_res_blocks", "num_classes", "cross_attention_dim", "time_embed_dim")
    return {"widths": list(net.widths), **{k: net.config[k] for k in keys}}
