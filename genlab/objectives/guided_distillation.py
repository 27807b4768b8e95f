"""Guided distillation, stage one (Meng et al. 2023, "On Distillation of Guided Diffusion Models", Sec. 4.1).

Classifier-free guidance costs two network calls per step. Stage one trains a student x_eta(z_t, w) that
takes the guidance weight w as an input (a backbone built with ``guidance_embedding: true``: w is
Fourier-embedded like the time and added to the time embedding, zero-initialised) and matches the guided
teacher in ONE call, for every w in [w_min, w_max] at once (Eq. 7):

    L(eta) = E_{w ~ U[w_min, w_max], t ~ U[0, 1], x ~ p_data} [ omega(lambda_t) |x_eta(z_t, w) - x^w_theta(z_t)|^2 ],
    x^w_theta(z_t) = x_theta(z_t, c) + w (x_theta(z_t, c) - x_theta(z_t, null))      (paper's w, Eq. 6)

genlab's guidance scale is diffusers' (``guidance.scale`` s: out_u + s (out_c - out_u), s = 1 the conditional
model), so the paper's w is s - 1 and its range [0, 4] is s in [1, 5] (this objective's ``w_min``, ``w_max``
are in genlab's scale, the one ``genlab sample RUN guidance.scale=3`` sets). The target is the teacher's
guided x0 from one batched cond + uncond call (:meth:`genlab.adapters.guidance.CFG.guide` with a per-sample
scale), in the teacher's parameterisation: classifier-free guidance is affine in the network output, so the
guided x0 is the same whatever the teacher predicts (eps, v, x0). omega(lambda_t) is left "pre-specified" by
Eq. 7; the default is max(SNR, 1), the truncated-SNR weighting of progressive distillation (Salimans & Ho 2022,
Eq. 10), on which the paper builds (``weighting`` chooses another).

The student starts from the teacher's weights (its extra ``guidance_embed`` starts at zero, so it starts as
the teacher's conditional model at every w) and must not drop its class labels while training (class_dropout
0: its target is the guided prediction *for the label*). It samples with the experiment's sampler, one call per
step, w given as the condition ``guidance_scale``: the config's ``guidance: {scale: s}`` (or ``genlab sample
RUN guidance.scale=s``) sets w instead of running CFG; without a ``guidance`` section w = 1.

Stage two (Sec. 4.2) is progressive distillation of this student with w kept as a condition: objective
``progressive_distillation`` with this run as the teacher (its ``guidance_range`` is taken from it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..adapters.guidance import CFG
from ..core.bounds import NonNegativeFloat
from ..core.registry import build, register
from ..diffusion.denoiser import Denoiser
from ..diffusion.levels import Level, combine
from ..diffusion.time_distributions import TimeDistribution
from .base import Batch, BuildContext, Objective, Reference, conditions
from .distillation import DistillWeighting, distillation_weight
from .guidance_scale import SCALE, ScaleConditioned, check_student, described, draw_scales, sampling_scale
from .teachers import load_teacher


@register("objective", "guided_distillation")
class GuidedDistillation(Objective):
    """Stage one of guided distillation (see the module's docstring).

    Args:
        teacher: the classifier-free guided teacher: a run or checkpoint directory (its config and EMA weights,
            frozen; the student starts from them), or a class-conditional :class:`~genlab.diffusion.Denoiser`.
        w_min, w_max: the range of guidance scales w the student learns, in genlab's scale (1: conditional;
            the paper's [0, 4] is [1, 5]); 0 <= w_min <= w_max.
        t_distribution: how training times are drawn (uniform, as the paper's t ~ U[0, 1]).
        weighting: omega(lambda_t) of |x0_hat - x0^w|^2: ``truncated_snr`` max(SNR, 1), ``snr``, ``constant``.
        uncond: the teacher's unconditional branch (:class:`~genlab.adapters.guidance.CFG`'s ``uncond``;
            default the null class).
    """

    frozen = ("teacher",)
    guidance_as_input = True

    def __init__(self, teacher: str | Denoiser, w_min: NonNegativeFloat = 1.0, w_max: NonNegativeFloat = 5.0,
                 t_distribution: TimeDistribution | str | dict = "uniform",
                 weighting: DistillWeighting = "truncated_snr", uncond: dict[str, Any] | None = None) -> None:
        if w_min > w_max:
            raise ValueError(f"guided_distillation: w_min ({w_min}) must be <= w_max ({w_max})")
        self.teacher_source, self.guidance_range, self.weighting = teacher, (float(w_min), float(w_max)), weighting
        self.t_distribution = build("time_distribution", t_distribution, path="objective.t_distribution")
        self.cfg = CFG(uncond=uncond)

    def build(self, context: BuildContext) -> None:
        super().build(context)
        check_student(context.model, "guided_distillation")
        self.scale = sampling_scale(context.guidance)
        self.teacher_ = load_teacher(context, self.teacher_source, student_from_teacher=True)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.context.model, "teacher": self.teacher_.module}

    def denoiser(self, model: nn.Module, process: Any = None) -> Denoiser:
        """The student ``model`` as a Denoiser, in the teacher's parameterisation (w a condition of its calls)."""
        return self.teacher_.parameterisation(model, self.context.process if process is None else process)

    @torch.no_grad()
    def guided_target(self, teacher: nn.Module, z_t: Tensor, level: Level, cond: dict[str, Tensor],
                      w: Tensor) -> Tensor:
        """The guided teacher's x0 [B, ...] at (z_t [B, ...], level) for per-sample scales w [B]: out_u + w
        (out_c - out_u) on its network output, from one batched call, mapped to x0."""
        denoiser = self.teacher_.denoiser(teacher, self.context.process)
        raw = self.cfg.guide(denoiser.raw, z_t, level, cond, scale=w)
        return denoiser.to_x0_eps(raw, z_t, level)[0]

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> Tensor:
        """Eq. 7 on a batch: t, w and the noise drawn per example from ``generator``."""
        x0, cond, process = batch["x"], conditions(batch), self.context.process
        n = x0.shape[0]
        level = process.level(self.t_distribution.sample(process, n, generator, device=x0.device))
        w = draw_scales(self.guidance_range, n, generator, x0)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        z_t = combine(*zip(level.coef("alpha", "sigma"), (x0, eps)))
        target = self.guided_target(modules["teacher"], z_t, level, cond, w)
        x0_hat, _ = self.denoiser(modules["model"])(z_t, level, **cond, **{SCALE: w})
        err = (x0_hat - target).square().flatten(1).mean(1)
        return (err * distillation_weight(self.weighting, level.alpha, level.sigma).to(err.dtype)).mean()

    def sample(self, modules: dict[str, nn.Module], n: int, generator: torch.Generator,
               cond: dict[str, Tensor] | None = None, steps: int | None = None) -> Tensor:
        """``n`` samples with the experiment's sampler, one student call per step at w = the guidance scale."""
        denoiser = ScaleConditioned(self.denoiser(modules["model"]), self.scale)
        return self.context.sampler.sample(denoiser, shape=(n, *self.context.data_shape), steps=steps,
                                           generator=generator, progress=False, cond=cond)

    def sampling_method(self) -> str:
        return described(repr(self.context.sampler), self.scale)

    def references(self) -> dict[str, Reference]:
        """The teacher with classifier-free guidance at the student's w, with the same sampler and steps (two
        calls per step)."""
        if self.teacher_.objective is None:
            return {}
        process, sampler, shape = self.context.process, self.context.sampler, self.context.data_shape
        guidance = CFG(scale=self.scale, uncond=self.cfg.uncond)

        def sample(modules: dict[str, nn.Module], n: int, generator: torch.Generator,
                   cond: dict[str, Tensor] | None = None) -> Tensor:
            denoiser = guidance.wrap(self.teacher_.denoiser(modules["teacher"], process))
            return sampler.sample(denoiser, shape=(n, *shape), generator=generator, progress=False, cond=cond)

        return {"teacher": Reference(f"{sampler!r} with {guidance!r}", sampler.steps, sample)}
