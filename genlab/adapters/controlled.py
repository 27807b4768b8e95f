"""A backbone and its ControlNets as one model (Zhang et al. 2023): a UNet with ``ControlNet`` s, or a DiT
with ``DiTControlNet`` s, behind the backbone's own call ``(x, t, class_labels, context, ...)`` plus the
control, so that every Denoiser, sampler and guidance wrapper (which pass ``cond`` to the model) runs it
unchanged. Model ``controlled_unet`` builds one from a config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from genlab.core.bounds import PositiveInt
from genlab.core.errors import ShapeError
from genlab.core.registry import build, register
from genlab.models.dit import DiT
from genlab.models.unet import UNet

from .controlnet import ControlNet, MultiControlNet
from .dit_controlnet import DiTControlNet

_CONTROLNET = {UNet: ControlNet, DiT: DiTControlNet}  # the ControlNet class of each backbone


def _unwrapped(module: nn.Module) -> nn.Module:
    """``module`` without a distributed (``.module``) or torch.compile (``._orig_mod``) wrapper."""
    module = getattr(module, "module", module)
    return getattr(module, "_orig_mod", module)


class ControlledModel(nn.Module):
    """A backbone steered by ControlNets, as one model: ``(x: [B, C, H, W], t, class_labels, context, control,
    control_scale, interval, residuals) -> the backbone's output``,

        out = backbone(x, t; residuals = sum_i s_i ControlNet_i(x, t, c_i))

    (Zhang et al. 2023, Eq. 2 and Sec. 3.2: the locked model's features plus the zero-initialised outputs
    of each trainable copy; a UNet's at ``down.{k}`` and ``mid``, a DiT's at ``block.{i}``). Samplers,
    Denoisers and guidance wrappers pass their ``cond`` to the model, so they all run it unchanged with
    ``cond = {"class_labels": ..., "control": ...}``.

    - ``control``: the conditioning images c_i, either one tensor ``[B, C_1 + ... + C_n, f H, f W]`` (the
      ControlNets' images stacked on channels, in their order: a per-sample tensor like any other
      condition, which guidance batches as it batches labels; needs one resolution factor f for all), or a
      sequence of one ``[B, C_i, f_i H, f_i W]`` per ControlNet. None: the backbone alone, no ControlNet runs.
    - ``control_scale``: s_i, one number for all or one per ControlNet (default: ``conditioning_scale``).
    - ``residuals``: other adapters' residuals at the backbone's injection points, added to the ControlNets'.

    ``controlnets``: one, a sequence or a ``MultiControlNet``. The modules are held as given (a distributed
    or compiled wrapper of one too, which the forward goes through): freezing the backbone is the training
    objective's declaration (objective ``controlnet`` keeps it frozen). With fresh ControlNets
    (``ControlNet.from_unet``, ``DiTControlNet.from_dit``: zero projections) the output equals the
    backbone's exactly. TypeError for a backbone that is not a UNet or a DiT or a ControlNet of the other
    kind; ValueError for a ControlNet built for another architecture or a scale count that is not 1 or the
    number of ControlNets.
    """

    def __init__(self, backbone: UNet | DiT, controlnets: nn.Module | Sequence[nn.Module],
                 conditioning_scale: float | Sequence[float] = 1.0) -> None:
        super().__init__()
        if isinstance(controlnets, MultiControlNet):
            controlnets = list(controlnets.nets)
        nets = [controlnets] if isinstance(controlnets, nn.Module) else list(controlnets)  # one, maybe wrapped
        inner = _unwrapped(backbone)
        kind = next((c for b, c in _CONTROLNET.items() if isinstance(inner, b)), None)
        if kind is None:
            raise TypeError(f"ControlledModel: the backbone must be a genlab UNet or DiT, got {type(inner).__name__}")
        self._inner = [_unwrapped(net) for net in nets]  # attributes of each ControlNet, not registered twice
        for i, net in enumerate(self._inner):
            if not isinstance(net, kind):
                raise TypeError(f"ControlledModel: controlnets[{i}] must be a {kind.__name__} (the backbone is a "
                                f"{type(inner).__name__}), got {type(net).__name__}")
            problem = net.mismatch(inner)
            if problem:
                raise ValueError(f"ControlledModel: controlnets[{i}] was built for another {type(inner).__name__} "
                                 f"({problem}); copy it from this backbone ({kind.__name__}.from_"
                                 f"{type(inner).__name__.lower()})")
        self.backbone, self.controlnet = backbone, MultiControlNet(nets)
        self.conditioning_scale = self._scales(conditioning_scale)

    @property
    def num_classes(self) -> int | None:
        """The backbone's classes (None: unconditional)."""
        return _unwrapped(self.backbone).num_classes

    def _scales(self, scale: float | Sequence[float]) -> list[float]:
        n = len(self._inner)
        scales = [float(scale)] * n if isinstance(scale, (int, float)) else [float(s) for s in scale]
        if len(scales) != n:
            raise ValueError(f"ControlledModel: expected one control scale or one per ControlNet ({n}), "
                             f"got {len(scales)}")
        return scales

    def split_control(self, control: Tensor | Sequence[Tensor]) -> list[Tensor]:
        """``control`` as one conditioning image per ControlNet (see the class docstring)."""
        if not isinstance(control, Tensor):
            return list(control)  # one per ControlNet; MultiControlNet checks the count, each its shape
        sizes = [net.conditioning_channels for net in self._inner]
        if control.ndim != 4 or control.shape[1] != sum(sizes):
            raise ShapeError(f"ControlledModel: expected control: [B, {' + '.join(map(str, sizes))}, H', W'] (the "
                             f"ControlNets' conditioning channels stacked), got {list(control.shape)}")
        if len({net.control_factor for net in self._inner}) > 1:
            raise ShapeError("ControlledModel: these ControlNets take their images at different resolutions; give "
                             "control as a list of one tensor per ControlNet")
        return list(control.split(sizes, dim=1))

    def forward(self, x: Tensor, t: Tensor | float, class_labels: Tensor | None = None,
                context: Tensor | None = None, control: Tensor | Sequence[Tensor] | None = None,
                control_scale: float | Sequence[float] | None = None, interval: Tensor | float | None = None,
                residuals: dict[str, Tensor] | None = None) -> Tensor:
        """See the class docstring; ``t``, ``class_labels``, ``context``, ``interval`` as the backbone's."""
        residuals = dict(residuals or {})
        if control is not None:
            scales = self.conditioning_scale if control_scale is None else self._scales(control_scale)
            added = self.controlnet(x, t, self.split_control(control), class_labels, context, scales, interval)
            for name, r in added.items():
                residuals[name] = residuals[name] + r if name in residuals else r
        return self.backbone(x, t, class_labels, context, residuals=residuals, interval=interval)


@dataclass
class ControlNetSpec:
    """One ControlNet of a ``controlled_unet`` config: its ``ControlNet`` arguments besides the UNet."""

    conditioning_channels: PositiveInt = 3
    embedding_channels: tuple[PositiveInt, ...] = (16, 32, 96, 256)


@register("model", "controlled_unet")
def controlled_unet(unet: Mapping[str, Any], controlnets: Sequence[ControlNetSpec] = (ControlNetSpec(),),
                    conditioning_scale: float | Sequence[float] = 1.0,
                    in_channels: PositiveInt | None = None) -> ControlledModel:
    """A UNet of arguments ``unet`` (model ``unet``'s keys, checked as a ``unet`` section is) with one
    ControlNet per entry of ``controlnets`` copied from it (``ControlNet.from_unet``: zero convolutions,
    so it starts as the UNet), as a :class:`ControlledModel`. ``in_channels``: the data's, unless ``unet``
    sets it. To train ControlNets on a trained UNet that stays frozen, use objective ``controlnet``."""
    channels = {} if in_channels is None or "in_channels" in unet else {"in_channels": in_channels}
    backbone = build("model", {**unet, "type": "unet"}, path="model.unet", **channels)
    nets = [ControlNet.from_unet(backbone, spec.conditioning_channels, spec.embedding_channels) for spec in controlnets]
    return ControlledModel(backbone, nets, conditioning_scale)
