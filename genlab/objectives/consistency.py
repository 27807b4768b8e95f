"""Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2): a consistency
function f_theta learns to map any point of the teacher's probability-flow ODE trajectory to its end.

On a discretisation sigma_min = s_1 < ... < s_N = sigma_max (Karras et al.'s, rho = 7; in the
process's time), a batch draws n ~ U{1..N-1}, noises x0 to x at t_(n+1), lets the teacher take one
step of an ODE solver (any genlab sampler: Heun as in the paper, DPM-Solver++, UniPC, ...) down to
t_n, and minimises d(f_theta(x, t_(n+1)), f_theta^-(x^_n, t_n)), where f_theta^- is a target network,
an exponential moving average of f_theta with constant decay mu (no gradient through it). f is
:class:`~genlab.diffusion.ConsistencyDenoiser`'s consistency function: the identity at sigma_min by
construction. Distances: squared L2, L1, and the pseudo-Huber sqrt(|a - b|^2 + c^2) - c of improved
consistency training (Song & Dhariwal 2023, Sec. 3.3; c = 0.00054 sqrt(d) by default). Samples are
drawn with the config's sampler (``consistency``: Algorithm 1, 1 to a few steps).

:class:`ConsistencyObjective` holds what distillation shares with consistency training
(:mod:`genlab.objectives.consistency_training`): f, the distance, the discretisation and sampling.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

from ..core.bounds import NonNegativeFloat, PositiveFloat, PositiveInt, Range
from ..core.registry import build, register
from ..diffusion.consistency import ConsistencyDenoiser, ConsistencyOnDenoiser
from ..diffusion.denoiser import Denoiser
from ..diffusion.levels import combine
from ..diffusion.samplers.base import Sampler
from .base import Batch, BuildContext, Objective, Reference, conditions
from .teachers import Teacher, load_teacher

Distance = Literal["l2", "l1", "pseudo_huber"]


def consistency_distance(a: Tensor, b: Tensor, kind: Distance, c: float | None = None) -> Tensor:
    """d(a, b) per sample [B] for a, b [B, ...]: squared L2 (mean over dimensions), L1 (mean of
    |a - b|), or pseudo-Huber sqrt(|a - b|^2 + c^2) - c (|.| the Euclidean norm; c default 0.00054 sqrt(d))."""
    diff = (a - b).flatten(1)
    if kind == "l2":
        return diff.square().mean(1)
    if kind == "l1":
        return diff.abs().mean(1)
    c = 0.00054 * math.sqrt(diff.shape[1]) if c is None else c
    return torch.sqrt(diff.square().sum(1) + c**2) - c


class ConsistencyObjective(Objective):
    """What the consistency objectives share (distillation here, training in
    :mod:`~genlab.objectives.consistency_training`): the trained model as the consistency function f
    (:class:`ConsistencyDenoiser` with ``sigma_data`` and the boundary ``sigma_min``), the distance d,
    Karras et al.'s discretisation between the boundary and the process's t_max, and sampling with the
    config's sampler (``consistency``: Algorithm 1).

    Args:
        distance: ``l2``, ``l1`` or ``pseudo_huber`` (with ``huber_c``; default 0.00054 sqrt(d)).
        sigma_data, sigma_min: of the consistency parameterisation (default sigma_min: the process's
            level at t_min).
        rho: Karras et al.'s rho of the discretisation.
    """

    def __init__(self, distance: Distance = "l2", huber_c: NonNegativeFloat | None = None,
                 sigma_data: PositiveFloat = 0.5, sigma_min: PositiveFloat | None = None,
                 rho: PositiveFloat = 7.0) -> None:
        self.distance, self.huber_c, self.sigma_data, self.sigma_min = distance, huber_c, sigma_data, sigma_min
        self.rho = rho
        self.diffusion: Teacher | None = None  # a diffusion run whose parameterisation f takes (set in build)
        self._levels: dict[int, tuple[Tensor, Tensor]] = {}

    def build(self, context: BuildContext) -> None:
        super().build(context)
        # f is the identity at this Karras sigma (on either parameterisation: the same boundary)
        self.boundary = ConsistencyDenoiser(context.model, context.process, self.sigma_data, self.sigma_min).sigma_min

    def denoiser(self, model: nn.Module, process: Any = None) -> ConsistencyDenoiser:
        """``model`` as the consistency function f: Song et al.'s (:class:`ConsistencyDenoiser`), or, when
        :attr:`diffusion` names a run, f = c_skip x^ + (1 - c_skip) x0 with x0 the estimate of the network
        in that run's parameterisation (:class:`ConsistencyOnDenoiser`)."""
        process = self.context.process if process is None else process
        if self.diffusion is not None:
            return ConsistencyOnDenoiser(self.diffusion.parameterisation(model, process), self.sigma_data,
                                         self.sigma_min)
        return ConsistencyDenoiser(model, process, self.sigma_data, self.sigma_min)

    def levels(self, n: int) -> tuple[Tensor, Tensor]:
        """(times, sigmas) [n], float64 on the CPU, noisiest first: Karras et al.'s n sigmas (Eq. 5, rho) from
        the process's sigma / alpha at t_max down to the boundary sigma_min, and the process's times at
        them (Song et al. 2023's t_N > ... > t_1 = epsilon on EDM). Computed once per n."""
        if n not in self._levels:
            grid = build("grid", {"type": "karras", "rho": self.rho, "sigma_min": self.boundary, "final": "min"})
            times = grid(self.context.process, n - 1).to(torch.float64)
            self._levels[n] = times, self.context.process.level(times).sigma_edm
        return self._levels[n]

    def distance_of(self, a: Tensor, b: Tensor) -> Tensor:
        """d(a, b) [B] with this objective's distance (:func:`consistency_distance`)."""
        return consistency_distance(a, b, self.distance, self.huber_c)

    def sample(self, modules: dict[str, nn.Module], n: int, generator: torch.Generator,
               cond: dict[str, Tensor] | None = None, steps: int | None = None) -> Tensor:
        """``n`` samples with the config's sampler (``consistency`` for Algorithm 1; in ``steps`` steps) from f."""
        denoiser = self.guided(self.denoiser(modules["model"]))
        return self.context.sampler.sample(denoiser, shape=(n, *self.context.data_shape),
                                           steps=steps, generator=generator, progress=False, cond=cond)


@register("objective", "consistency_distillation")
class ConsistencyDistillation(ConsistencyObjective):
    """Consistency distillation from a teacher (see the module's docstring).

    Args:
        teacher: a run or checkpoint directory (its config and EMA weights), or a Denoiser from Python.
        solver: the teacher's one-step ODE solver (a sampler spec; default Heun).
        steps: N, the number of discretisation levels (>= 2; 18 in the paper for CIFAR-10).
        rho: Karras et al.'s rho of the discretisation.
        target_decay: mu of the target network f_theta^- (0.95 in the paper for CIFAR-10 CD).
        distance: ``l2``, ``l1`` or ``pseudo_huber`` (with ``huber_c``).
        sigma_data, sigma_min: of the consistency parameterisation (default sigma_min: the process's
            level at t_min).
        init_from_teacher: start the student's backbone from the teacher's weights (needs the teacher's
            architecture; the paper does so).
        parameterisation: of f: ``consistency``, Song et al.'s c_skip, c_out, c_in, c_noise
            (:class:`ConsistencyDenoiser`); ``teacher``, f = c_skip x^ + (1 - c_skip) x0 with x0 the
            estimate of the network in the teacher's parameterisation (:class:`ConsistencyOnDenoiser`),
            so that a student initialised from a teacher that is not EDM-preconditioned starts at the
            teacher's one-step estimate.
    """

    frozen = ("teacher",)

    def __init__(self, teacher: str | Denoiser, solver: Sampler | str | dict = "heun", steps: PositiveInt = 18,
                 rho: PositiveFloat = 7.0, target_decay: Annotated[float, Range(ge=0, lt=1)] = 0.95,
                 distance: Distance = "l2", huber_c: PositiveFloat | None = None, sigma_data: PositiveFloat = 0.5,
                 sigma_min: PositiveFloat | None = None, init_from_teacher: bool = True,
                 parameterisation: Literal["consistency", "teacher"] = "consistency") -> None:
        if steps < 2:
            raise ValueError(f"steps must be >= 2 (the discretisation has N levels), got {steps}")
        super().__init__(distance, huber_c, sigma_data, sigma_min, rho)
        self.teacher_source, self.steps, self.target_decay = teacher, steps, target_decay
        self.init_from_teacher, self.parameterisation = init_from_teacher, parameterisation
        self.solver: Sampler = build("sampler", solver, path="objective.solver")

    def build(self, context: BuildContext) -> None:
        super().build(context)
        self.teacher_ = load_teacher(context, self.teacher_source,
                                     student_from_teacher=self.init_from_teacher and not isinstance(
                                         self.teacher_source, Denoiser))
        if self.parameterisation == "teacher":
            self.diffusion = self.teacher_
        self.times = self.levels(self.steps)[0]  # [N], t_N (noisiest) first

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.context.model, "teacher": self.teacher_.module}

    def targets(self) -> dict[str, tuple[str, float]]:
        return {"target": ("model", self.target_decay)}

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> Tensor:
        x0, cond = batch["x"], conditions(batch)
        process, grid = self.context.process, self.times.to(x0.device)
        n = torch.randint(len(grid) - 1, (x0.shape[0],), generator=generator, device=x0.device)
        times = torch.stack([grid[n], grid[n + 1]])  # [2, B]: t_(n+1) -> t_n (noisy to less noisy)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        x = combine(*zip(process.level(times[0]).coef("alpha", "sigma"), (x0, eps)))
        x_next = self.teacher_.solve(modules["teacher"], self.solver, process, x, times, cond)
        with torch.no_grad():
            target = self.denoiser(modules["target"])(x_next, times[1], **cond)[0]
        f = self.denoiser(modules["model"])(x, times[0], **cond)[0]
        return self.distance_of(f, target).mean()

    def references(self) -> dict[str, Reference]:
        """The teacher, drawn as its run draws."""
        return self.teacher_.references()
