"""Progressive distillation (Salimans & Ho 2022): a student learns in one step what its teacher does
in two, halving the number of sampling steps each round.

A round trains a student for ``student_steps`` = N steps on a time grid: the teacher's grid has 2N
steps t_0 > t_1 > ... > t_2N, the student's every other time. For a batch, a student step i ~ U{0..N-1}
is drawn, x0 is noised to z_t at t = t_2i, the teacher runs two steps of its solver (DDIM by
default) from t to t' = t_2i+1 to t'' = t_2i+2, and the student's x0 estimate at (z_t, t) regresses

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

(Salimans & Ho 2022, Algorithm 2): the x0 with which one DDIM step from z_t lands on z_t''. The loss weighs |x0_hat - x~|^2 by max(SNR(t), 1) ("truncated
SNR", Eq. 10). The student is initialised from the teacher's EMA weights and keeps the teacher's
parameterisation (prediction type, preconditioning); a round's student is the next round's teacher.
Use a teacher trained with v (or x0) prediction, as the paper does: an eps-predicting student turns
its errors into x0 errors multiplied by sigma / alpha, which is large at the first, widest step (in
our mixture test an eps student is 14x worse than the teacher, a v student 1.07x).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core.bounds import NonNegativeFloat, PositiveInt
from ..core.registry import build, register
from ..diffusion.denoiser import Denoiser
from ..diffusion.levels import combine
from ..diffusion.grids import GridSpec, TimeGrid
from ..diffusion.samplers.base import Sampler
from ..diffusion.samplers.ddim import DDIM
from .base import Batch, BuildContext, Objective, Reference, conditions
from .guidance_scale import SCALE, ScaleConditioned, check_student, described, draw_scales, sampling_scale
from .teachers import load_teacher

DistillWeighting = Literal["truncated_snr", "snr", "constant"]


def distillation_target(z_t: Tensor, z_next: Tensor, coef_t: tuple[Tensor, Tensor],
                        coef_next: tuple[Tensor, Tensor]) -> Tensor:
    """x~ such that one DDIM step from z_t [B, ...] at (alpha_t, sigma_t) lands on z_next at (alpha'',
    sigma'') (Salimans & Ho 2022, Algorithm 2); coefficients are [B] tensors. At the data (sigma'' = 0)
    it is z_next / alpha''."""
    (a_t, s_t), (a_n, s_n) = coef_t, coef_next
    ratio = s_n / s_t
    shape = (-1,) + (1,) * (z_t.ndim - 1)
    num = z_next - (ratio.reshape(shape) * z_t.double()).to(z_t.dtype)
    return num / (a_n - ratio * a_t).reshape(shape).to(z_t.dtype)


def distillation_weight(weighting: DistillWeighting, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The weight of a distillation's |x0_hat - x~|^2 at (alpha, sigma) [B]: ``truncated_snr`` max(SNR, 1)
    (Salimans & Ho 2022, Eq. 10), ``snr`` (the eps-MSE) or ``constant`` (1)."""
    snr = (alpha / sigma) ** 2
    if weighting == "truncated_snr":
        return snr.clamp(min=1.0)
    return snr if weighting == "snr" else torch.ones_like(snr)


@register("objective", "progressive_distillation")
class ProgressiveDistillation(Objective):
    """One round of progressive distillation (see the module's docstring).

    Args:
        teacher: the teacher: a run or checkpoint directory (its config and EMA weights), or a
            :class:`~genlab.diffusion.Denoiser` (from Python).
        student_steps: N, the student's number of steps (the teacher takes 2N on the same grid).
        grid: the time grid (default: the teacher's sampler's grid when the teacher is a run,
            else uniform time).
        solver: the teacher's sampler for its two steps (default DDIM, eta = 0).
        weighting: of |x0_hat - x~|^2: ``truncated_snr`` max(SNR, 1) (the paper's), ``snr``, ``constant``.
        guidance_range: [w_min, w_max] for a guidance-distilled teacher and student (stage two of Meng et al.
            2023, Sec. 4.2: w stays a condition, drawn w ~ U[w_min, w_max] per example, the same for teacher
            and student; sampling takes w from ``guidance: {scale: w}``). Default: the teacher run's range
            (a ``guided_distillation`` run or a round of one), else none.
    """

    frozen = ("teacher",)

    def __init__(self, teacher: str | Denoiser, student_steps: PositiveInt, grid: GridSpec | None = None,
                 solver: Sampler | str | dict = "ddim", weighting: DistillWeighting = "truncated_snr",
                 guidance_range: tuple[NonNegativeFloat, NonNegativeFloat] | None = None) -> None:
        self.teacher_source, self.student_steps, self.weighting = teacher, student_steps, weighting
        if guidance_range is not None and (len(guidance_range) != 2 or guidance_range[0] > guidance_range[1]):
            raise ValueError(f"progressive_distillation: guidance_range must be [w_min, w_max] with w_min <= w_max, "
                             f"got {list(guidance_range)}")
        self.guidance_range = None if guidance_range is None else tuple(map(float, guidance_range))
        self.grid: TimeGrid | None = None if grid is None else build("grid", grid, path="objective.grid")
        self.solver: Sampler = build("sampler", solver, path="objective.solver")

    def build(self, context: BuildContext) -> None:
        super().build(context)
        self.teacher_ = load_teacher(context, self.teacher_source, student_from_teacher=True)
        self.guidance_range = self.guidance_range or getattr(self.teacher_.objective, "guidance_range", None)
        if self.guidance_range is not None:
            check_student(context.model, "progressive_distillation")
            self.scale, self.guidance_as_input = sampling_scale(context.guidance), True
        self.grid = self.grid or self.teacher_.grid or build("grid", "uniform")
        self.times = self.grid(context.process, 2 * self.student_steps).to(torch.float64)  # [2N + 1], the teacher's

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.context.model, "teacher": self.teacher_.module}

    def denoiser(self, model: nn.Module, process: Any = None) -> Denoiser:
        """The student ``model`` as a Denoiser, in the teacher's parameterisation."""
        return self.teacher_.parameterisation(model, self.context.process if process is None else process)

    def weight(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        return distillation_weight(self.weighting, alpha, sigma)

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> Tensor:
        x0 = batch["x"]
        cond = conditions(batch)
        n, process = x0.shape[0], self.context.process
        i = torch.randint(self.student_steps, (n,), generator=generator, device=x0.device)
        grid = self.times.to(x0.device)
        times = torch.stack([grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]])  # [3, B]
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        level = process.level(times[0])
        z_t = combine(*zip(level.coef("alpha", "sigma"), (x0, eps)))
        if self.guidance_range is not None:  # one w per example, for teacher and student
            cond[SCALE] = draw_scales(self.guidance_range, n, generator, x0)
        z_next = self.teacher_.solve(modules["teacher"], self.solver, process, z_t, times, cond)
        end = process.level(times[2])
        target = distillation_target(z_t, z_next, (level.alpha, level.sigma), (end.alpha, end.sigma))
        x0_hat, _ = self.denoiser(modules["model"])(z_t, times[0], **cond)
        err = (x0_hat - target).square().flatten(1).mean(1)
        return (err * self.weight(level.alpha, level.sigma).to(err.dtype)).mean()

    def sample(self, modules: dict[str, nn.Module], n: int, generator: torch.Generator,
               cond: dict[str, Tensor] | None = None, steps: int | None = None) -> Tensor:
        """N DDIM steps of the student on its grid (every other time of the teacher's); ``steps`` other
        than N: DDIM in that many steps on the grid."""
        steps = self.student_steps if steps is None else steps
        times = self.times[::2] if steps == self.student_steps else self.grid(self.context.process, steps)
        student = self.denoiser(modules["model"])
        denoiser = self.guided(student) if self.guidance_range is None else ScaleConditioned(student, self.scale)
        return DDIM(steps).sample(denoiser, shape=(n, *self.context.data_shape),
                                  times=times, generator=generator, progress=False, cond=cond)

    def sampling_steps(self) -> int:
        return self.student_steps

    def sampling_method(self) -> str:
        method = super().sampling_method()
        return method if self.guidance_range is None else described(method, self.scale)

    def references(self) -> dict[str, Reference]:
        """The teacher, drawn as its run draws (a previous round's student: in its own steps)."""
        return self.teacher_.references()
