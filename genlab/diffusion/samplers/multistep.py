"""What multistep exponential integrators share: the order of each step and the phi functions.

DPM-Solver++ (Lu et al. 2022b), UniPC (Zhao et al. 2023) and DEIS (Zhang & Chen 2023) integrate the
data-prediction ODE exactly in lambda = log(alpha / sigma) (:attr:`~genlab.diffusion.Level.lam`)
against a polynomial through earlier x0 estimates. Their step needs h = lambda_next - lambda and
the functions phi_k (:func:`phis`), and their order ramps up from the first step and drops for the
last ones (:func:`step_order`). A new method of this family reads both from here.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ...core.bounds import PositiveInt
from ..grids import GridSpec
from ..levels import Level, Scalar, expm1
from .base import Sampler, SamplerState

#: how the last steps lower the order: "short_grids": on grids of fewer than 15 steps, the last step is
#: first order and the one before at most second (DPM-Solver's code; diffusers' DPM-Solver++ and DEIS
#: ``lower_order_final``); "remaining": at most the number of steps left (diffusers' UniPC); "none"
FinalOrder = Literal["short_grids", "remaining", "none"]
SHORT_GRID = 15  # "short_grids" applies below this many steps


def step_order(order: int, state: SamplerState, level_next: Level, final: FinalOrder = "short_grids") -> int:
    """The order of the step from ``state.step`` to ``level_next`` of a multistep method of order
    ``order`` whose ``state.history`` holds the points stored so far, this step's own included:
    at most that many (the warm start), 1 into sigma = 0 (lambda = inf there), and lowered at the
    end as ``final`` says."""
    if level_next.touches_data:
        return 1
    order = min(order, len(state.history))
    left = state.steps - state.step  # this step included
    if final == "remaining" or (final == "short_grids" and state.steps < SHORT_GRID):
        order = min(order, left)
    return max(order, 1)


def phis(z: Scalar, n: int) -> list[Scalar]:
    """[phi_1(z), ..., phi_n(z)] with phi_1(z) = (e^z - 1) / z and phi_(k+1)(z) = (phi_k(z) - 1 / k!) / z,
    so that int_0^h e^(-(h - u)) u^(k-1) / (k-1)! du = h^k phi_k(-h) (Hochbruck & Ostermann 2010,
    exponential integrators; Lu et al. 2022b, App. B). Floats or float64 tensors [B]; z != 0."""
    out, factorial = [expm1(z) / z], 1.0
    for k in range(1, n):
        out.append((out[-1] - 1 / factorial) / z)
        factorial *= k + 1
    return out


def lam_step(level: Level, level_next: Level) -> tuple[Scalar, Scalar]:
    """(lambda, h = lambda_next - lambda) of a step, as floats on a shared grid."""
    (lam,), (lam_next,) = level.coef("lam"), level_next.coef("lam")
    return lam, lam_next - lam


class MultistepSampler(Sampler):
    """Base of the multistep family (DPM-Solver++, UniPC, DEIS, and single-step DPM-Solver++ with its
    stages): an ``order`` of 1-3 and ``lower_order_final``, with the class's ``final_order`` rule.

    A subclass stores (level, value) pairs with :meth:`remember` and takes the points of a step as
    ``state.history[::-1][:self.order_of(state, level_next)]`` (newest first).
    """

    final_order: FinalOrder = "short_grids"

    def __init__(self, steps: PositiveInt = 20, grid: GridSpec | None = None, order: Literal[1, 2, 3] = 2,
                 lower_order_final: bool = True) -> None:
        super().__init__(steps, grid)
        if order not in (1, 2, 3):
            raise ValueError(f"{type(self).__name__}: order must be 1, 2 or 3, got {order!r}")
        self.order, self.lower_order_final = order, lower_order_final

    @property
    def multistep(self) -> bool:
        return self.order > 1

    def order_of(self, state: SamplerState, level_next: Level) -> int:
        """The order of this step (:func:`step_order` with ``final_order`` when ``lower_order_final``)."""
        return step_order(self.order, state, level_next, self.final_order if self.lower_order_final else "none")

    def remember(self, state: SamplerState, level: Level, value: Tensor) -> None:
        """Append (level, value) to ``state.history``, keeping the last ``order`` pairs."""
        state.history = [*state.history, (level, value)][-self.order:]
