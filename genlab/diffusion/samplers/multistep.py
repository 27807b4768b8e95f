"""What multistep exponential integrators share: the order of each step and the phi functions.

DPM-Solver++ (Lu et al. 2022b), UniPC (Zhao et al. 2023) and DEIS (Zhang & Chen 2023) integrate the
data-prediction ODE exactly in lambda = log(alpha / sigma) (:attr:`~genlab.diffusion.Level.lam`)
against a polynomial through earlier x0 estimates. Their step needs h = lambda_next - lambda and
the functions phi_k (:func:`phis`), and their order ramps up from the first step and drops for the
last ones (:func:`step_order`). A new method of this family reads both from here.
"""

from __future__ import annotations

from typing import Literal

from ..levels import Level, Scalar, expm1
from .base import SamplerState

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
