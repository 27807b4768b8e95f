"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes", Alg. 1).

The main backward process is Heun's probability-flow ODE solver (Karras et al. 2022, Alg. 1). On
reaching a restart interval's sigma_min it restarts K times: fresh noise takes x forward to
sigma_max, x^ + sqrt(sigma_max^2 - sigma_min^2) z in the scaled x^ = x / alpha (Alg. 1, line 5; the
forward process's own transition, so it works on every process), and Heun solves the ODE back to
sigma_min in N_restart steps on a Karras rho grid (Alg. 1, line 6). The added noise contracts the
errors accumulated so far (the paper's analysis of SDE vs ODE errors) at the price of the extra
evaluations counted by :meth:`Restart.nfe`. Sigmas are Karras' sigma = sigma / alpha throughout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ...core.config import show_value
from ...core.errors import ConfigError
from ...core.bounds import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, checked
from ...core.registry import construct, register
from ..grids import GridSpec, Karras
from ..levels import Level, combine, sqrt, where
from ..processes import Process
from .base import SamplerState, StepContext
from .euler import Heun, MaybeInfinite


@checked
@dataclass(frozen=True)
class RestartInterval:
    """[sigma_min, sigma_max] (0 < sigma_min < sigma_max) restarted ``repeats`` (K >= 0) times, each solved
    back in ``steps`` (>= 1) Heun steps."""

    sigma_min: PositiveFloat
    sigma_max: PositiveFloat
    steps: PositiveInt = 2
    repeats: NonNegativeInt = 1

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(f"restart interval: need 0 < sigma_min < sigma_max, got {self.sigma_min}, "
                              f"{self.sigma_max}")
        if self.steps != int(self.steps) or self.repeats != int(self.repeats):
            raise ConfigError(f"restart interval: steps and repeats must be integers, got steps={self.steps}, "
                              f"repeats={self.repeats}")
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "repeats", int(self.repeats))


# CIFAR-10 with EDM's VP model: the reference code's params_cifar10_vp.txt (the sweep behind the
# paper's CIFAR-10 results), first line: 18 main steps, {"0": [3, 2, 0.06, 0.30]}, NFE 43
PAPER_CIFAR10 = (RestartInterval(sigma_min=0.06, sigma_max=0.30, steps=2, repeats=2),)


def parse_restarts(restarts: Sequence[RestartInterval | Mapping[str, float]] | Mapping[str, Sequence[float]],
                   path: str = "restarts") -> tuple[RestartInterval, ...]:
    """Restart intervals from a list of RestartInterval (or mappings of its fields, built and checked by
    the registry as in a config), or from the reference code's dict {"i": [N_restart, K, t_min, t_max]},
    whose N_restart counts the points of the restart grid, i.e. N_restart - 1 Heun steps (its NFE is
    2 K (N_restart - 1))."""
    if isinstance(restarts, Mapping):
        out = []
        for key, value in restarts.items():
            if not isinstance(value, Sequence) or len(value) != 4:
                raise ConfigError(f"{path}.{key}: expected [N_restart, K, t_min, t_max], got {show_value(value)}")
            n_points, repeats, sigma_min, sigma_max = value
            if isinstance(n_points, (int, float)) and not n_points >= 2:
                raise ConfigError(f"{path}.{key}: N_restart must be >= 2 (the restart grid's points, so that its "
                                  f"steps >= 1), got {show_value(n_points)}")
            try:
                out.append(RestartInterval(sigma_min, sigma_max, n_points - 1, repeats))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{path}.{key}: [N_restart, K, t_min, t_max] = {show_value(value)}: {e}") from e
        return tuple(out)
    if isinstance(restarts, (str, bytes)) or not isinstance(restarts, Sequence):
        raise ConfigError(f"{path}: expected a list of {{sigma_min, sigma_max, steps, repeats}} or a dict "
                          f"{{i: [N_restart, K, t_min, t_max]}}, got {show_value(restarts)}")
    return tuple(item if isinstance(item, RestartInterval)
                 else construct(RestartInterval, item, path=f"{path}[{i}]", source="Restart")
                 for i, item in enumerate(restarts))


@dataclass
class RestartState(SamplerState):
    """Sampler state with the previous main-grid sigma (to snap sigma_min to the nearest grid point)."""

    previous: Tensor | None = None
    restarting: bool = False  # the state of a restart's backward solve


@register("sampler", "restart")
class Restart(Heun):
    """Heun on the main grid plus restart intervals (Alg. 1). An interval runs at the main grid point
    nearest its sigma_min (as the reference code snaps t_min), which must be an interior point below
    sigma_max; intervals sharing a point run in list order. Per-sample grids restart each sample at its
    own point. The reference code's churn inside restarts (``restart_gamma``) is ``restart_churn``, applied
    for s_tmin <= sigma <= s_tmax; s_noise also scales the restart noise, as there. Default: 18 steps and
    the paper's CIFAR-10 setting {"0": [3, 2, 0.06, 0.30]}.
    """

    def __init__(self, steps: PositiveInt = 18, grid: GridSpec | None = None,
                 restarts: list[RestartInterval] | dict[str, list[float]] | None = None,
                 rho: PositiveFloat = 7.0, restart_churn: NonNegativeFloat = 0.0, s_churn: NonNegativeFloat = 0.0,
                 s_tmin: NonNegativeFloat = 0.0, s_tmax: MaybeInfinite = float("inf"),
                 s_noise: NonNegativeFloat = 1.0) -> None:
        super().__init__(steps, grid, s_churn, s_tmin, s_tmax, s_noise)
        self.restarts = PAPER_CIFAR10 if restarts is None else parse_restarts(restarts)
        self.rho, self.restart_churn = rho, restart_churn

    def nfe(self, steps: int | None = None) -> int:
        """Model evaluations of one sampling with ``steps`` main steps (default ``self.steps``), counted
        as the paper does: 2 N - 1 for Heun on a grid ending at sigma = 0 (its last step is Euler; 2 N on
        a grid ending at sigma_min > 0), plus 2 * steps * repeats (2 K (N_restart - 1) in the paper's form)
        for every interval. It assumes every interval snaps to an interior point of the grid below its
        sigma_max (else it does not run and costs nothing)."""
        n = self.steps if steps is None else steps
        return 2 * n - 1 + sum(2 * r.steps * r.repeats for r in self.restarts)

    @property
    def stochastic(self) -> bool:
        return super().stochastic or any(r.repeats > 0 for r in self.restarts)

    @property
    def multistep(self) -> bool:
        return any(r.repeats > 0 for r in self.restarts)  # a step reads the previous grid point's sigma

    def init_state(self, steps: int) -> RestartState:
        return RestartState(steps=steps)

    def churn_gamma(self, state: SamplerState) -> float:
        return self.restart_churn if getattr(state, "restarting", False) else super().churn_gamma(state)

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        state = ctx.state
        previous = getattr(state, "previous", None)
        if previous is not None:  # level is an interior grid point: restart here if it is nearest
            for interval in self.restarts:
                x = self.restart(ctx, x, level, previous, level_next.sigma_edm, interval)
        state.previous = level.sigma_edm
        return super().step(ctx, x, level, level_next)

    def restart(self, ctx: StepContext, x: Tensor, level: Level, previous: Tensor, following: Tensor,
                interval: RestartInterval) -> Tensor:
        """Alg. 1, lines 3-7, for the samples whose main grid point nearest sigma_min is ``level`` (between
        the points of sigma ``previous`` and ``following``); x [B, ...] at ``level`` -> x at ``level``."""
        sigma, s = level.sigma_edm, interval.sigma_min
        gap = (sigma - s).abs()
        here = (gap < (previous - s).abs()) & (gap <= (following - s).abs())
        if interval.repeats == 0 or not bool(here.any()):
            return x
        process = ctx.process
        t_max = process.t_of_sigma_edm(interval.sigma_max).clamp(max=process.t_max)
        sigma_max = float(process.level(t_max).sigma_edm)  # beyond the process's range: its largest sigma
        here = here & (sigma < sigma_max)
        if not bool(here.any()):
            return x
        grid = process.level(self.restart_times(process, sigma_max, level, here, interval.steps))
        levels = (grid if grid.t.ndim == 1 else grid.to(device=x.device)).steps()
        inner = ctx.with_state(RestartState(steps=interval.steps, restarting=True))
        (s_top, a_top), (s_end, a_end) = levels[0].coef("sigma_edm", "alpha"), levels[-1].coef("sigma_edm", "alpha")
        jump = sqrt(s_top**2 - s_end**2) * self.s_noise
        x_new = x
        for _ in range(interval.repeats):
            x_new = combine((a_top / a_end, x_new), (a_top * jump, ctx.noise(x)))
            for j in range(interval.steps):
                x_new = super().step(inner, x_new, levels[j], levels[j + 1])
        return where(here, x_new, x)

    def restart_times(self, process: Process, sigma_max: float, level: Level, here: Tensor, steps: int) -> Tensor:
        """The restart's backward grid: Karras' rho spacing from sigma_max down to the sigma of ``level``,
        ending exactly at level.t; [steps + 1], or [steps + 1, B] for per-sample levels (samples that do
        not restart borrow the grid of one that does)."""
        t_end = level.t.double()
        if t_end.ndim:
            t_end = torch.where(here, t_end, t_end[here][0])
        ends = process.level(t_end).sigma_edm
        grids = {v: Karras(self.rho, sigma_min=v, sigma_max=sigma_max, final="min")(process, steps)
                 for v in ends.unique().tolist()}
        times = torch.stack([grids[v] for v in ends.tolist()], dim=1) if t_end.ndim else grids[ends.item()]
        times[-1] = t_end
        return times
