"""Single-step DPM-Solver++ (2S, 3S) with its stages on the time grid, as diffusers'
DPMSolverSinglestepScheduler (Lu et al. 2022b, "DPM-Solver++", Alg. 1; the third-order step is
DPM-Solver-3 of Lu et al. 2022a, Alg. 2, in data-prediction form).

A k-stage step from t_i to t_{i+k} spends one model evaluation per grid interval: stage 1 keeps x_i
and takes a first-order step to t_{i+1}; stage 2 evaluates x0 there and takes the 2S update from x_i
to t_{i+2} (D1 from x0 at t_i and t_{i+1}, midpoint weight); stage 3 evaluates x0 at t_{i+2} and
takes the update from x_i to t_{i+3} with the line through x0 at t_i and t_{i+2} integrated exactly.
After every interval x is a sample at that grid time. On the default grid, uniform in lambda, the
stages sit at r = 1/2 (2S) and r = 1/3, 2/3 (3S) of the step: the papers' choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from ...core.bounds import PositiveInt
from ...core.registry import register
from ..grids import GridSpec
from ..levels import Level
from .base import SamplerState, StepContext
from .dpm_solver import dpm_solver_pp_update
from .multistep import MultistepSampler


@dataclass
class SingleStepState(SamplerState):
    """:class:`SamplerState` of a single-step solver: ``history`` holds the (level, x0) of the stages
    of the current step, ``start`` the x it started from, ``stages`` the stage of every interval."""

    start: Tensor | None = None
    stages: list[int] = field(default_factory=list)


def stage_schedule(steps: int, order: int, lower_order_final: bool = True) -> list[int]:
    """The stage (1..order) of each of ``steps`` grid intervals: steps of ``order`` stages, and a
    shorter last step with the remainder. ``lower_order_final`` splits a full last step into
    order - 1 stages and a first-order one (diffusers' ``get_order_list``; the sampler also makes an
    interval into sigma = 0 first order). E.g. 3S, 9 steps: [1, 2, 3, 1, 2, 3, 1, 2, 1]."""
    full, rest = divmod(steps, order)
    sizes = [order] * full + ([rest] if rest else [])
    if lower_order_final and not rest and order > 1 and full:
        sizes[-1:] = [order - 1, 1]
    return [stage for size in sizes for stage in range(1, size + 1)]


@register("sampler", "dpm_solver_single")
class DPMSolverSingle(MultistepSampler):
    """Single-step DPM-Solver++ of order 2 (2S) or 3 (3S), one model evaluation per grid interval
    (``steps`` intervals = ``steps`` evaluations); order 1 is DDIM. The interval into sigma = 0 is
    first order, as in :class:`DPMSolverPP`."""

    default_grid = "log_snr"

    def __init__(self, steps: PositiveInt = 20, grid: GridSpec | None = None, order: Literal[1, 2, 3] = 2,
                 lower_order_final: bool = True) -> None:
        super().__init__(steps, grid, order, lower_order_final)  # multistep: a stage reads earlier stages

    def init_state(self, steps: int) -> SingleStepState:
        return SingleStepState(steps=steps, stages=stage_schedule(steps, self.order, self.lower_order_final))

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        state = ctx.state
        if not isinstance(state, SingleStepState):
            raise TypeError(f"{type(self).__name__} needs the state from its init_state(), got {type(state).__name__}")
        x0 = ctx.x0(x, level)
        stage = 1 if level_next.touches_data else state.stages[state.step]
        if stage == 1:
            state.start, state.history = x, [(level, x0)]
        else:
            state.history.append((level, x0))
        points = state.history if stage < 3 else state.history[::2]  # 3S: x0 at the start and at stage 3
        return dpm_solver_pp_update(state.start, points, level_next, solver_type="midpoint" if stage < 3 else "heun")
