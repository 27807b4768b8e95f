"""The probability-flow ODE of any Denoiser, integrated with torchdiffeq; the "ode" sampler.

The PF-ODE (Song et al. 2021, Eq. 13) dx/dt = f x - g^2 / 2 score = f x + g^2 / (2 sigma) eps, with
(f, g^2) of ``Level.sde``, equals dx/dt = alpha' x0 + sigma' eps for x = alpha x0 + sigma eps. We
integrate it in the variables of the linear path that every process is a reparameterisation of
(Kingma & Gao 2023, App. C; Esser et al. 2024, Sec. 2):

    y = x / (alpha + sigma),   r = sigma / (alpha + sigma) in [0, 1],   dy/dr = eps - x0,

so y = (1 - r) x0 + r eps (rectified flow's x_t, with r its time). Unlike x in t (or Karras' x / alpha
in sigma / alpha, or anything in log sigma), the drift stays finite at both ends: at the data
(r = 0, where VP's sigma' = inf) and at alpha = 0 (r = 1: rectified flow's t = 1, zero-terminal-SNR
VP) for every prediction type that has an x0 there (v, velocity, x0). An Euler step in r is DDIM.

One solve covers one segment between two levels in normalised time tau in [0, 1] with
r(tau) = r_a + tau (r_b - r_a) (per sample when levels are [B]), so solver steps never leave the
segment; the level at an intermediate r comes from ``process.t_of_sigma_edm(r / (1 - r))``.

Solver: :func:`genlab.core.ode.solve_unit` (torchdiffeq: Chen et al. 2018) for adaptive (dopri5, ...)
and fixed-step (euler, midpoint, rk4, ...) Runge-Kutta methods: batched tensors on any device and
dtype, tuple states for the likelihood's augmented ODE, maintained; the continuous normalizing flow
shares it. scipy's solve_ivp would need a numpy round trip per evaluation and a flat float64 state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.bounds import PositiveFloat, PositiveInt
from ..core.ode import FIXED_STEP_NFE, Method, check_method, solve_unit
from ..core.registry import register
from .grids import GridSpec
from .levels import Level, Scalar, combine, where
from .processes import Process
from .samplers.base import DenoiserLike, Sampler, StepContext

__all__ = ["FIXED_STEP_NFE", "Method", "ODESampler", "ProbabilityFlow", "check_method", "path_scale", "path_time",
           "reaches_data", "solve_unit"]  # the solver's names stay importable from here


def path_time(level: Level) -> Tensor:
    """r = sigma / (alpha + sigma) [] or [B], float64: the time of the level on the linear path."""
    return level.sigma / (level.alpha + level.sigma)


def path_scale(level: Level) -> Scalar:
    """alpha + sigma (a float on a shared level): x = (alpha + sigma) y on the linear path."""
    return level.values("path_scale", lambda lv: lv.alpha + lv.sigma)


def reaches_data(process: Process) -> bool:
    """Whether sigma / alpha -> 0 as t -> 0+, so the ODE runs into the data. False for VE, whose
    sigma jumps from sigma_min to 0 at t = 0: no model query exists in between."""
    tiny = torch.tensor(1e-12 * process.t_max, dtype=torch.float64)
    return float(process.level(tiny).sigma_edm) < 1e-6


class ProbabilityFlow:
    """dy/dtau = (r_b - r_a) (eps - x0) on the segment from level ``start`` to level ``end``.

    Args:
        denoiser: answers (x0, eps) at (x, level); ``denoiser.process`` maps r back to t.
        start, end: the segment's levels ([] or [B] fields); tau = 0 and 1 use them exactly.
        cond: keyword arguments for the denoiser.
    Attributes: ``nfe`` (denoiser calls so far) and ``x0`` (the latest x0 estimate).
    """

    def __init__(self, denoiser: DenoiserLike, start: Level, end: Level, cond: dict[str, Any] | None = None) -> None:
        self.denoiser, self.start, self.end, self.cond = denoiser, start, end, cond or {}
        self.r0 = path_time(start)
        self.dr = path_time(end) - self.r0
        self.nfe, self.x0 = 0, None

    def level(self, tau: Tensor) -> Level:
        """The level at tau in [0, 1] (clamped: torchdiffeq's first-step guess may look beyond)."""
        tau = float(tau)
        if tau <= 0 or tau >= 1:
            return self.start if tau <= 0 else self.end
        r = self.r0 + tau * self.dr
        process = self.denoiser.process
        return process.level(process.t_of_sigma_edm(r / (1 - r)).clamp(0, process.t_max))

    def __call__(self, tau: Tensor, y: Tensor) -> Tensor:
        """dy/dtau at (tau, y): y [B, ...] -> [B, ...]."""
        level = self.level(tau)
        x0, eps = self.denoiser(combine((path_scale(level), y)), level, **self.cond)
        self.nfe, self.x0 = self.nfe + 1, x0
        return combine((self.dr, eps), (-self.dr, x0))


@dataclass
class ODESolution:
    """The end point x [B, ...] of :meth:`ODESampler.solve` and the number of denoiser calls."""

    x: Tensor
    nfe: int


class CountingDenoiser:
    """A denoiser wrapper that counts calls (batched model evaluations)."""

    def __init__(self, denoiser: DenoiserLike) -> None:
        self.denoiser, self.process, self.calls = denoiser, denoiser.process, 0

    def __call__(self, x: Tensor, t: Tensor | Level, **cond: Any) -> tuple[Tensor, Tensor]:
        self.calls += 1
        return self.denoiser(x, t, **cond)


@register("sampler", "ode")
class ODESampler(Sampler):
    """The probability-flow ODE (Song et al. 2021, Eq. 13) solved with torchdiffeq between grid times.

    Adaptive methods (dopri5: Dormand & Prince 1980, the default) use one step of the grid by
    default, [t_max, 0], and choose their own steps to ``rtol`` / ``atol``; more grid steps give
    intermediate results for callbacks. Fixed-step methods (euler = DDIM, midpoint, heun2,
    heun3, rk4) take one step of the method per grid step (``steps`` default 20).

    A step into t = 0 on a process that jumps there (VE) solves to t -> 0+ (sigma = sigma_min)
    and returns the denoiser's x0, as DDIM does. ``solve`` reports the number of model calls.
    """

    def __init__(self, steps: PositiveInt | None = None, grid: GridSpec | None = None,
                 method: Method = "dopri5", rtol: PositiveFloat = 1e-5, atol: PositiveFloat = 1e-5) -> None:
        check_method(method, rtol, atol)
        fixed = method in FIXED_STEP_NFE
        super().__init__(steps if steps is not None else (20 if fixed else 1), grid)
        self.method, self.rtol, self.atol = method, rtol, atol
        self.nfe_per_step = FIXED_STEP_NFE.get(method, 0)  # 0: adaptive, see solve()

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        process, end = ctx.process, level_next
        jump = level_next.touches_data and not reaches_data(process)
        if jump:  # VE: solve to t -> 0+, where sigma = sigma_min, then denoise
            tiny = torch.full_like(level_next.t, 1e-12 * process.t_max)
            end = process.level(torch.where(level_next.sigma == 0, tiny, level_next.t))
        flow = ProbabilityFlow(ctx.denoiser, level, end, ctx.cond)
        y = solve_unit(flow, combine((1 / path_scale(level), x)), self.method, self.rtol, self.atol)
        x = combine((path_scale(end), y))
        ctx.state.denoised = flow.x0
        if jump:
            x = where(level_next.sigma == 0, ctx.denoiser(x, end, **ctx.cond)[0], x)
        return x

    def solve(self, denoiser: DenoiserLike, x: Tensor | None = None, **kwargs: Any) -> ODESolution:
        """:meth:`sample` (same arguments) that also reports the number of denoiser calls."""
        counting = CountingDenoiser(denoiser)
        return ODESolution(self.sample(counting, x, **kwargs), counting.calls)

    def __repr__(self) -> str:
        return f"ODESampler(method={self.method}, steps={self.steps}, rtol={self.rtol:g}, atol={self.atol:g})"
