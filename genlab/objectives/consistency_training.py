"""Consistency training: a consistency model f_theta learned from data alone, with no teacher's ODE
solver; its target is f at a less noisy point x_r = x0 + r z of the same noise z as x_t = x0 + t z
(Song et al. 2023, Theorem 2: the one-step Euler solution with x0 itself as the denoiser).

- ``consistency_training`` (CT; Song et al. 2023, "Consistency Models", Algorithm 3 and App. C): on
  Karras et al.'s discretisation with N(k) levels, growing with the training step k as
  N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1, n ~ U{1..N(k) - 1}, the target f_theta^-
  an EMA of f_theta with decay mu(k) = exp(s0 log mu0 / N(k)), and d = l2 (their LPIPS aside).
- ``improved_consistency_training`` (iCT; Song & Dhariwal 2023, "Improved techniques for training
  consistency models"): the target is f_theta itself under stop-gradient (theta^- = theta, Sec. 3.2),
  N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0) + 1)) (Sec. 3.4), the
  levels drawn from a discretised log-normal, p(sigma_i) proportional to erf((ln sigma_(i+1) - P_mean) /
  (sqrt(2) P_std)) - erf((ln sigma_i - P_mean) / (sqrt(2) P_std)) (Sec. 3.5), weighted by lambda(sigma_i)
  = 1 / (sigma_(i+1) - sigma_i) (Sec. 3.1), with the pseudo-Huber distance (c = 0.00054 sqrt(d), Sec. 3.3).
- ``easy_consistency_tuning`` (ECT; Geng et al. 2024, "Consistency models made easy", Sec. 3 and their
  code, locuslab/ect ``training/loss.py``): continuous time, usually started from a trained diffusion
  model (whose D is the consistency function of the limit r = 0; an EDM-preconditioned run, or any run
  with f on its parameterisation): t log-normal (P_mean, P_std), r =
  t (1 - n(t) / q^a) with n(t) = 1 + k sigmoid(-b t) and a = ceil(iteration / d) growing in ``stages``
  steps of d = K / stages iterations (q = 2, k = 8, b = 1, 8 stages: their CIFAR-10 run), clamped at the
  boundary, loss d(f(x_t, t), sg f(x_r, r)) / (t - r) with the pseudo-Huber distance (their
  adaptive weighting 1 / sqrt(|Delta|^2 + c^2) of the squared L2). The student is its own target.

Every process: t and r above are noise levels in Karras' sigma = sigma_t / alpha_t, the pair is
x = alpha(t) (x0 + sigma z) at the process's times of those levels (x_t = alpha x0 + sigma_t z), and f is
:class:`~genlab.diffusion.ConsistencyDenoiser`'s consistency function, the identity at its boundary
sigma_min (Song et al.'s epsilon). Where the target is the student itself (iCT, ECT), both calls of the
network see the same dropout masks, as in ECT's code: the target is the same function at another point.
The curricula read the step k and the run's length K from :meth:`Objective.at_step`, which the Trainer
calls before every step, so a resumed run repeats them exactly.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from ..core.bounds import NonNegativeFloat, PositiveFloat, PositiveInt, Range
from ..core.registry import register
from ..diffusion.levels import Level, combine
from ..diffusion.time_distributions import LogNormalSigma
from .base import Batch, BuildContext, conditions
from .consistency import ConsistencyObjective, Distance
from .teachers import load_teacher

Levels = Annotated[int, Range(ge=2)]  # a number of discretisation levels: at least one interval


# ----- the curricula (functions of the step k and the run's length K) ----------------------------------------
def ct_levels(k: int, total: int, s0: int, s1: int) -> int:
    """N(k) of consistency training (Song et al. 2023, App. C): ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2)
    - 1) + 1, from s0 levels at k = 0 to s1 + 1 at k = K."""
    return math.ceil(math.sqrt(k / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_target_decay(levels: int, s0: int, mu0: float) -> float:
    """mu(k) = exp(s0 log mu0 / N(k)) of consistency training (Song et al. 2023, App. C): mu0 at N = s0."""
    return math.exp(s0 * math.log(mu0) / levels) if mu0 > 0 else 0.0


def ict_period(total: int, s0: int, s1: int) -> int:
    """K' = floor(K / (log2 floor(s1 / s0) + 1)) of improved CT (Song & Dhariwal 2023, Sec. 3.4): the steps
    between doublings of N; at least 1 (a run shorter than its number of doublings doubles every step)."""
    return max(1, math.floor(total / (math.log2(s1 // s0) + 1)))


def ict_levels(k: int, total: int, s0: int, s1: int) -> int:
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 of improved CT (Song & Dhariwal 2023, Sec. 3.4)."""
    return min(s0 * 2 ** (k // ict_period(total, s0, s1)), s1) + 1


def lognormal_level_probabilities(sigmas: Tensor, p_mean: float, p_std: float) -> Tensor:
    """p [N - 1] over the intervals of ``sigmas`` [N] (noisiest first: interval j joins sigmas[j + 1] < sigmas[j]):
    improved CT's discretised log-normal (Song & Dhariwal 2023, Sec. 3.5), p(sigma_i) proportional to
    erf((ln sigma_(i+1) - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_i - P_mean) / (sqrt(2) P_std)): the
    probability that ln sigma ~ N(P_mean, P_std^2) falls in the interval, normalised."""
    cdf = torch.special.erf((torch.log(sigmas) - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[:-1] - cdf[1:]
    return mass / mass.sum()


def ect_stage(k: int, total: int, stages: int) -> int:
    """a = ceil(i / d) of ECT for the 1-based iteration i = k + 1 and d = K / stages: 1 in the first d
    iterations, ``stages`` in the last (locuslab/ect: stage + 1 with stage = tick // double)."""
    return -(-(k + 1) * stages // total)


def ect_r(t: Tensor, stage: int, q: float, k: float, b: float) -> Tensor:
    """r = t (1 - n(t) / q^a) with n(t) = 1 + k sigmoid(-b t) (Geng et al. 2024; locuslab/ect's
    ``t_to_r_sigmoid``), [same shape as t], before clamping at the boundary; r -> t as the stage a grows."""
    return t * (1 - (1 + k * torch.sigmoid(-b * t)) * q ** -float(stage))


def same_dropout(device: torch.device) -> AbstractContextManager[None]:
    """A context for the student's call: on leaving it, the global generators of ``device`` and of the CPU
    (what dropout draws from) are back where they were, so the target's call after it draws the same
    numbers: the same dropout masks (torch.random.fork_rng; ``meta`` has no generator to fork)."""
    if device.type in ("cpu", "meta"):
        return torch.random.fork_rng(devices=[], device_type=device.type)
    index = device.index if device.index is not None else torch.get_device_module(device.type).current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)


# ----- the objectives ------------------------------------------------------------------------------------------
class ConsistencyTrainingObjective(ConsistencyObjective):
    """What CT, iCT and ECT share: x = alpha (x0 + sigma z) at two levels with the same z, and the student's f
    at the noisier one against the target's f (no gradient) at the other. ``target`` names the module of
    f_theta^- (a target network, or ``"model"``: the student itself)."""

    target = "model"

    def compare(self, modules: dict[str, nn.Module], x0: Tensor, eps: Tensor, level: Level, level_target: Level,
                cond: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(f_theta(x_t, t), f_theta^-(x_r, r)) [B, ...] for x0, eps [B, ...] and per-sample levels t, r [B]."""
        x_t = combine(*zip(level.coef("alpha", "sigma"), (x0, eps)))
        x_r = combine(*zip(level_target.coef("alpha", "sigma"), (x0, eps)))
        with same_dropout(x0.device) if self.target == "model" else nullcontext():
            f = self.denoiser(modules["model"])(x_t, level, **cond)[0]
        with torch.no_grad():
            target = self.denoiser(modules[self.target])(x_r, level_target, **cond)[0]
        return f, target


class DiscreteConsistencyTraining(ConsistencyTrainingObjective):
    """CT on a discretisation: N(k) Karras levels (:meth:`~ConsistencyObjective.levels`), an interval j of it
    drawn per sample (:meth:`intervals`), the student at its noisier end, the target at the other, the
    distance weighted by :meth:`weights` (Song et al. 2023, Algorithm 3; Song & Dhariwal 2023, Eq. 8)."""

    def n_levels(self) -> int:
        """N(k) at the current step (:meth:`Objective.at_step`)."""
        raise NotImplementedError

    def intervals(self, sigmas: Tensor, n: int, generator: torch.Generator) -> Tensor:
        """n interval indices j [n] (long), interval j joining sigmas[j] > sigmas[j + 1]: uniform (CT)."""
        return torch.randint(len(sigmas) - 1, (n,), generator=generator, device=sigmas.device)

    def weights(self, sigmas: Tensor) -> Tensor | None:
        """lambda per interval [N - 1], or None for 1 (CT)."""
        return None

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> Tensor:
        x0, cond, process = batch["x"], conditions(batch), self.context.process
        times, sigmas = (v.to(x0.device) for v in self.levels(self.n_levels()))
        j = self.intervals(sigmas, x0.shape[0], generator)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        f, target = self.compare(modules, x0, eps, process.level(times[j]), process.level(times[j + 1]), cond)
        d = self.distance_of(f, target)
        weights = self.weights(sigmas)
        return (d if weights is None else d * weights[j].to(d.dtype)).mean()


@register("objective", "consistency_training")
class ConsistencyTraining(DiscreteConsistencyTraining):
    """Consistency training (Song et al. 2023, Algorithm 3, App. C; see the module's docstring): N(k) levels
    (:func:`ct_levels`), n ~ U{1..N(k) - 1}, a target network with decay mu(k) (:func:`ct_target_decay`).

    Args:
        s0, s1: N(k) runs from s0 levels at k = 0 to s1 + 1 at k = K (2 and 150 for CIFAR-10; s0 <= s1).
        mu0: the target's decay at N = s0 (0.9 for CIFAR-10), in [0, 1).
        distance, huber_c, sigma_data, sigma_min, rho: as in ``consistency_distillation``.
    """

    target = "target"

    def __init__(self, s0: Levels = 2, s1: PositiveInt = 150, mu0: Annotated[float, Range(ge=0, lt=1)] = 0.9,
                 distance: Distance = "l2", huber_c: PositiveFloat | None = None, sigma_data: PositiveFloat = 0.5,
                 sigma_min: PositiveFloat | None = None, rho: PositiveFloat = 7.0) -> None:
        if s0 > s1:
            raise ValueError(f"ConsistencyTraining: s0 ({s0}) must be <= s1 ({s1}): N(k) grows from s0 to s1 + 1")
        super().__init__(distance, huber_c, sigma_data, sigma_min, rho)
        self.s0, self.s1, self.mu0 = s0, s1, mu0

    def n_levels(self) -> int:
        return ct_levels(self.step, self.total_steps, self.s0, self.s1)

    def targets(self) -> dict[str, tuple[str, float]]:
        return {"target": ("model", ct_target_decay(self.n_levels(), self.s0, self.mu0))}


@register("objective", "improved_consistency_training")
class ImprovedConsistencyTraining(DiscreteConsistencyTraining):
    """Improved consistency training (Song & Dhariwal 2023; see the module's docstring): no target network,
    the exponential curriculum (:func:`ict_levels`), log-normal levels
    (:func:`lognormal_level_probabilities`), lambda = 1 / (sigma_(i+1) - sigma_i), pseudo-Huber.

    Args:
        s0, s1: N(k) runs from s0 + 1 levels at k = 0 to s1 + 1 (10 and 1280: 11 to 1281; s0 <= s1).
        p_mean, p_std: the log-normal over levels (-1.1, 2.0; p_std > 0).
        distance, huber_c: default pseudo-Huber with c = 0.00054 sqrt(d).
        sigma_data, sigma_min, rho: as in ``consistency_distillation`` (the paper: 0.5, 0.002, 7).
    """

    def __init__(self, s0: PositiveInt = 10, s1: PositiveInt = 1280, p_mean: float = -1.1, p_std: PositiveFloat = 2.0,
                 distance: Distance = "pseudo_huber", huber_c: PositiveFloat | None = None,
                 sigma_data: PositiveFloat = 0.5, sigma_min: PositiveFloat | None = None,
                 rho: PositiveFloat = 7.0) -> None:
        if s0 > s1:
            raise ValueError(f"ImprovedConsistencyTraining: s0 ({s0}) must be <= s1 ({s1}): N(k) doubles from "
                             f"s0 + 1 up to s1 + 1")
        super().__init__(distance, huber_c, sigma_data, sigma_min, rho)
        self.s0, self.s1, self.p_mean, self.p_std = s0, s1, p_mean, p_std

    def n_levels(self) -> int:
        return ict_levels(self.step, self.total_steps, self.s0, self.s1)

    def intervals(self, sigmas: Tensor, n: int, generator: torch.Generator) -> Tensor:
        p = lognormal_level_probabilities(sigmas, self.p_mean, self.p_std)
        return torch.multinomial(p, n, replacement=True, generator=generator)

    def weights(self, sigmas: Tensor) -> Tensor:
        return 1 / (sigmas[:-1] - sigmas[1:])


@register("objective", "easy_consistency_tuning")
class EasyConsistencyTuning(ConsistencyTrainingObjective):
    """Easy consistency tuning (Geng et al. 2024; see the module's docstring): t log-normal (the process's
    range), r = max(t (1 - n(t) / q^a), sigma_min) (:func:`ect_r`, :func:`ect_stage`), loss d(f(x_t, t), sg
    f(x_r, r)) / (t - r), the student its own target. Samples at the boundary (t = sigma_min, where f is
    the identity at both points) weigh 0.

    Args:
        pretrained: a diffusion run (or checkpoint) directory whose EMA weights start the student (the
            config's process and model). None: from scratch.
        parameterisation: of f: ``consistency``, Song et al.'s (:class:`~genlab.diffusion.ConsistencyDenoiser`;
            a pretrained run must then be EDM-preconditioned, ``objective.preconditioning: edm``, with this
            sigma_data: its D is f in the limit sigma_min -> 0, as in ECT's EDM start), or ``pretrained``:
            f = c_skip x^ + (1 - c_skip) x0 with x0 the network's estimate in the pretrained run's
            parameterisation (:class:`~genlab.diffusion.ConsistencyOnDenoiser`), so that any diffusion run
            starts the student at its x0 estimate.
        p_mean, p_std: the log-normal of t (-1.1, 2.0; p_std > 0).
        q: the decay factor of t - r per stage (> 1; 2).
        stages: the number of stages over the run (d = K / stages; 8).
        mapping_k, mapping_b: n(t) = 1 + k sigmoid(-b t) (8, 1; k = 0 is their ``const`` mapping).
        huber_c: c of the pseudo-Huber distance (> 0; default 0.00054 sqrt(d). ECT's code uses 0, the plain
            L2 norm, whose gradient is undefined where f equals its target, as at the boundary).
        sigma_data, sigma_min: of the consistency parameterisation (0.5; the process's level at t_min).
    """

    def __init__(self, pretrained: str | None = None,
                 parameterisation: Literal["consistency", "pretrained"] = "consistency", p_mean: float = -1.1,
                 p_std: PositiveFloat = 2.0,
                 q: Annotated[float, Range(gt=1)] = 2.0, stages: PositiveInt = 8, mapping_k: NonNegativeFloat = 8.0,
                 mapping_b: NonNegativeFloat = 1.0, huber_c: PositiveFloat | None = None,
                 sigma_data: PositiveFloat = 0.5, sigma_min: PositiveFloat | None = None) -> None:
        if parameterisation == "pretrained" and pretrained is None:
            raise ValueError("EasyConsistencyTuning: parameterisation 'pretrained' takes the pretrained run's; name "
                             "the run (pretrained: RUN) or use parameterisation 'consistency'")
        super().__init__("pseudo_huber", huber_c, sigma_data, sigma_min)
        self.pretrained, self.parameterisation = pretrained, parameterisation
        self.q, self.stages, self.mapping_k, self.mapping_b = q, stages, mapping_k, mapping_b
        self.t_distribution = LogNormalSigma(p_mean, p_std)

    def build(self, context: BuildContext) -> None:
        super().build(context)
        top = float(context.process.level(context.process.t_max).sigma_edm)
        if not math.isfinite(top):
            raise ValueError(f"easy_consistency_tuning: the noise level sigma / alpha of {context.process!r} is "
                             "infinite at t_max; use a process with a finite one (edm, ve, vp)")
        if self.pretrained is None:
            return
        run = load_teacher(context, self.pretrained, student_from_teacher=True)
        if self.parameterisation == "pretrained":
            self.diffusion = run
            return
        denoiser = run.denoiser(run.module, context.process)
        if denoiser.preconditioning not in ("edm", "consistency") or denoiser.sigma_data != self.sigma_data:
            raise ValueError(f"pretrained: {self.pretrained} trains {denoiser!r}; with parameterisation 'consistency' "
                             f"ECT starts from an EDM-preconditioned run (objective.preconditioning: edm) or a "
                             f"consistency model with sigma_data {self.sigma_data:g}; or set objective."
                             f"parameterisation: pretrained (f on the run's own parameterisation)")

    def stage(self) -> int:
        """a at the current step (:meth:`Objective.at_step`)."""
        return ect_stage(self.step, self.total_steps, self.stages)

    def r_of(self, t: Tensor) -> Tensor:
        """r [B] for noise levels t [B]: :func:`ect_r` at the current stage, clamped at the boundary."""
        r = ect_r(t, self.stage(), self.q, self.mapping_k, self.mapping_b)
        return r.clamp_min(self.boundary)

    def loss(self, modules: dict[str, nn.Module], batch: Batch, generator: torch.Generator,
             optimizer: str = "model") -> Tensor:
        x0, cond, process = batch["x"], conditions(batch), self.context.process
        level = process.level(self.t_distribution.sample(process, x0.shape[0], generator, device=x0.device))
        t = level.sigma_edm
        r = self.r_of(t)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        f, target = self.compare(modules, x0, eps, level, process.level(process.t_of_sigma_edm(r)), cond)
        gap = t - r
        weight = torch.where(gap > 0, 1 / gap.clamp_min(torch.finfo(gap.dtype).tiny), 0)
        return (self.distance_of(f, target) * weight.to(x0.dtype)).mean()
