"""Multistep DPM-Solver++ of order 1, 2 and 3 (Lu et al. 2022, "DPM-Solver++", Sec. 4 and Alg. 2).

Exponential integrators of the data-prediction ODE in lambda = log(alpha / sigma): with
h = lambda_s - lambda_t and phi = 1 - exp(-h),  x_s = (sigma_s / sigma_t) x_t + alpha_s phi D,
where D extrapolates the x0 history (2M: Eq. 8 "midpoint" form; 3M: as diffusers' third order).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ...core.registry import register
from ..grids import TimeGrid
from ..processes import Level
from ..predictions import combine, expm1
from .base import DenoiserLike, Sampler, SamplerState


@register("sampler", "dpm_solver_pp")
class DPMSolverPP(Sampler):
    """DPM-Solver++ (2M by default, 3M with order=3). The first steps ramp up the order; the last
    step into sigma = 0 is first order; ``lower_order_final`` also lowers the final two steps when
    there are fewer than 15 (as in the paper's code and diffusers).

    Third order: with D1 ~ h x0' and D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0'' / 2, the Taylor
    expansion of the exact solution weights D2 by 1 - 2 (h - phi) / h^2. The reference code
    (LuChengTHU/dpm-solver, diffusers) uses half of that, (phi_2 / h - 1/2), which makes 3M
    globally second order; ``third_order="reference"`` reproduces it step for step.
    """

    default_grid = "log_snr"

    def __init__(self, steps: int = 20, grid: TimeGrid | str | dict | None = None, order: Literal[1, 2, 3] = 2,
                 lower_order_final: bool = True, third_order: Literal["taylor", "reference"] = "taylor") -> None:
        super().__init__(steps, grid)
        if order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
        self.order, self.lower_order_final, self.third_order = order, lower_order_final, third_order

    def step_order(self, state: SamplerState, level_next: Level) -> int:
        order = min(self.order, len(state.history))
        few = self.lower_order_final and state.steps < 15
        if state.step == state.steps - 1 and (few or bool((level_next.sigma == 0).any())):
            return 1
        if state.step == state.steps - 2 and few:
            return min(order, 2)
        return order

    def step(self, denoiser: DenoiserLike, x: Tensor, level: Level, level_next: Level, state: SamplerState,
             generator: torch.Generator | None = None, cond: dict[str, Any] | None = None) -> Tensor:
        x0, _ = self.denoise(denoiser, x, level, state, cond)
        state.history = [*state.history[-(self.order - 1):], (level, x0)] if self.order > 1 else [(level, x0)]
        order = self.step_order(state, level_next)
        hist = state.history[::-1][:order]  # newest first
        lam = [0.5 * lv.coef("log_snr")[0] for lv, _ in hist] + [0.5 * level_next.coef("log_snr")[0]]
        (a_s, s_s), (s_t,) = level_next.coef("alpha", "sigma"), level.coef("sigma")
        h = lam[-1] - lam[0]
        phi = -a_s * expm1(lam[0] - lam[-1])  # alpha_s (1 - exp(-h))
        weights = [phi]  # on x0 of the current, previous, ... evaluation
        if order == 2:
            c = 0.5 * h / (lam[0] - lam[1])  # D = (1 + 1/(2 r0)) m0 - 1/(2 r0) m1 (Lu et al. 2022b, Eq. 8)
            weights = [phi * (1 + c), -phi * c]
        elif order == 3:
            r0, r1 = (lam[0] - lam[1]) / h, (lam[1] - lam[2]) / h
            e = phi / a_s
            w1 = a_s * (1 - e / h)
            w2 = a_s * (1 - 2 * (h - e) / h**2 if self.third_order == "taylor" else 0.5 - (h - e) / h**2)
            # D1 = (1 + q) D1_0 - q D1_1, D2 = (D1_0 - D1_1) / (r0 + r1), D1_k = (m_k - m_{k+1}) / r_k
            q, inv = r0 / (r0 + r1), 1 / (r0 + r1)
            u, v = w1 * (1 + q) + w2 * inv, -w1 * q - w2 * inv  # weights of D1_0 and D1_1
            weights = [phi + u / r0, -u / r0 + v / r1, -v / r1]
        return combine((s_s / s_t, x), *zip(weights, (m for _, m in hist)))
