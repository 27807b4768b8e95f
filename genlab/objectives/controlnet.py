"""Training a ControlNet (Zhang, Rao & Agrawala 2023) on a trained UNet or DiT that stays frozen.

The base run's UNet (or DiT) is loaded from its run directory (its config validated, its EMA weights read
through safetensors, its process checked against the config's) into the config's ``model:`` (which
must be the base's architecture: inherit the base's config), and kept frozen. A ControlNet is copied
from it (``ControlNet.from_unet``: the UNet's way down, a conditioning embedding, zero convolutions;
``DiTControlNet.from_dit``: the DiT's first blocks, zero linears) and is the one trained module, with
the base run's own denoising loss (its prediction type, time distribution and weighting) of the
controlled model

    L = E_{x0, t, eps, c} w(t) |F_theta(x_t, t, y, c) - target|^2,
    F_theta(x, t, y, c) = UNet(x, t, y; residuals = ControlNet_theta(x, t, c, y))   (the paper's Eq. 5),

where c is each item's control image (the data set's ``control``, e.g. digits' ``control: stroke``).
Samples are drawn with the config's sampler from the controlled model (``ControlledModel``) with the
control the evaluation asks for; the evaluation also draws the base model alone (reference ``base``,
the same labels, noise and sampler), so a metric of the control (the stroke IoU) shows the gain.

The checkpoint's ``model`` / ``ema`` weights are the ControlNet's alone; the base is read again from its
run whenever the run is loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..adapters.controlled import ControlledModel
from ..adapters.controlnet import ControlNet
from ..adapters.dit_controlnet import DiTControlNet
from ..core.bounds import PositiveInt
from ..core.registry import register
from ..diffusion.denoiser import Denoiser
from ..models.dit import DiT
from ..models.unet import UNet
from .base import Batch, BuildContext, Objective, Reference, conditions
from .denoising import DenoisingObjective
from .teachers import load_teacher


@register("objective", "controlnet")
class ControlNetTraining(Objective):
    """Train a ControlNet on a frozen trained UNet or DiT (see the module's docstring).

    Args:
        base: the base run or checkpoint directory: a UNet or DiT trained with a denoising or flow-matching
            objective (``denoising``, ``flow_matching``) on the config's process.
        embedding_channels: a UNet's ControlNet: the widths of the conditioning embedding; the control
            image is ``2^(len - 1)`` times the UNet's input size (``[16]``: the same size, as digits' strokes).
        num_blocks: a DiT's ControlNet (``DiTControlNet``): how many of its first blocks are copied; the
            control image is at the DiT's input size.
        conditioning_scale: the scale of the ControlNet's residuals when sampling (1: as trained).

    The data set must give a control image per item (``control: [N, C, f H, f W]``); its channels are
    the ControlNet's conditioning channels.
    """

    takes_control = True

    frozen = ("base",)

    def __init__(self, base: str, embedding_channels: tuple[PositiveInt, ...] = (16,), num_blocks: PositiveInt = 1,
                 conditioning_scale: float = 1.0) -> None:
        self.base_source, self.embedding_channels = base, tuple(embedding_channels)
        self.num_blocks, self.conditioning_scale = num_blocks, conditioning_scale

    def build(self, context: BuildContext) -> None:
        super().build(context)
        if not isinstance(context.model, (UNet, DiT)):
            raise ValueError(f"controlnet: the model must be a UNet or a DiT (a ControlNet copies part of it), got "
                             f"{type(context.model).__name__}; inherit the base run's model section")
        self.base = load_teacher(context, self.base_source, student_from_teacher=True, role="base")
        if not isinstance(self.base.objective, DenoisingObjective):
            raise ValueError(f"controlnet: the base {self.base_source} was trained with objective "
                             f"{type(self.base.objective).__name__}; a ControlNet trains with the base's denoising "
                             "loss: name a run of objective denoising or flow_matching")
        control = getattr(context.data, "control", None)
        if not isinstance(control, Tensor):
            raise ValueError(f"controlnet: data set {type(context.data).__name__} gives no control image per item; "
                             "choose its control (digits: data.control: stroke)")
        if control.ndim != 4:
            raise ValueError(f"controlnet: the data's control images must be [N, C, H, W], got {list(control.shape)}")
        context.model.eval().requires_grad_(False)
        if isinstance(context.model, UNet):
            net = ControlNet.from_unet(context.model, control.shape[1], self.embedding_channels)
            how = f"embedding_channels {list(self.embedding_channels)} (one width per factor of 2: [16] for 1x)"
        else:
            net = DiTControlNet.from_dit(context.model, self.num_blocks, control.shape[1])
            how = "a DiT's ControlNet"
        size = [net.control_factor * s for s in context.data_shape[1:]]
        if list(control.shape[2:]) != size:
            raise ValueError(f"controlnet: {how} takes control images of {net.control_factor}x the data's size, "
                             f"{size}; the data's are {list(control.shape[2:])}")
        self.controlnet = net.train()

    def modules(self) -> dict[str, nn.Module]:
        """``model``: the ControlNet (trained, with an EMA copy); ``base``: the UNet or DiT (frozen)."""
        return {"model": self.controlnet, "base": self.context.model}

    def controlled(self, modules: dict[str, nn.Module]) -> ControlledModel:
        """The base model with the ControlNet of ``modules`` (as the Trainer holds them), one model; a
        ``model`` that is one already (this run loaded whole, ``load_pretrained``) as it is."""
        if isinstance(modules["model"], ControlledModel):
            return modules["model"]
        return ControlledModel(modules["base"], modules["model"], self.conditioning_scale)

    def denoiser(self, model: Any, process: Any = None) -> Denoiser:
        """``model`` as a Denoiser in the base run's parameterisation (its prediction type)."""
        return self.base.parameterisation(model, self.context.process if process is None else process)

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> Tensor:
        """The base run's denoising loss of the controlled model on the batch and its control images."""
        if "control" not in batch:
            raise ValueError("controlnet: the batch holds no control images (the data set's control)")
        model = self.denoiser(self.controlled(modules))
        return self.base.objective(model, batch["x"], generator=generator, **conditions(batch))

    def sample(self, modules: dict[str, nn.Module], n: int, generator: torch.Generator,
               cond: dict[str, Tensor] | None = None, steps: int | None = None) -> Tensor:
        """``n`` samples of the controlled model with the config's sampler; ``cond`` holds the control
        (``control: [n, C, f H, f W]``; without one, the base model alone)."""
        return self.context.sampler.sample(self.guided(self.denoiser(self.controlled(modules))),
                                           shape=(n, *self.context.data_shape), steps=steps, generator=generator,
                                           progress=False, cond=cond)

    def references(self) -> dict[str, Reference]:
        """``base``: the base model without control, drawn as this run draws (same labels, noise and sampler)."""

        def sample(modules: dict[str, nn.Module], n: int, generator: torch.Generator,
                   cond: dict[str, Tensor] | None = None) -> Tensor:
            plain = None if cond is None else {k: v for k, v in cond.items() if k != "control"}
            return self.sample(modules, n, generator, plain)

        return {"base": Reference(repr(self.context.sampler), self.sampling_steps(), sample)}
