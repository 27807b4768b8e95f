"""DEIS: diffusion exponential integrator sampling with the log-rho polynomial (Zhang & Chen 2023, Sec. 4;
diffusers' DEISMultistepScheduler, ``solver_type="logrho"``), written on the shared multistep helpers."""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

from ...core.bounds import PositiveInt
from ...core.registry import register
from ..grids import GridSpec
from ..levels import Level, Scalar, combine
from .base import StepContext
from .multistep import MultistepSampler, lam_step, phis


@register("sampler", "deis")
class DEIS(MultistepSampler):
    """Multistep DEIS of order 1-3 on eps. In x^ = x / alpha and rho = sigma / alpha = e^-lambda the ODE
    is dx^/drho = eps; DEIS puts the polynomial in v = lambda - lambda_t through the last ``order`` eps
    (nodes v_k <= 0) and integrates it exactly in rho:

        x_s = alpha_s (x_t / alpha_t + sum_k c_k eps_k),  c_k = int L_k(v) drho = -rho_s sum_j a_kj j! h^(j+1) phi_(j+1)(h)

    (h = lambda_s - lambda_t, L_k = sum_j a_kj v^j the Lagrange basis, phi_j of :func:`phis`). Order 1
    is DDIM. ``history`` holds (level, eps), newest last; the order ramps up and is lowered at the end
    as in DPM-Solver++ (``lower_order_final``).
    """

    default_grid = "log_snr"

    def __init__(self, steps: PositiveInt = 20, grid: GridSpec | None = None, order: Literal[1, 2, 3] = 2,
                 lower_order_final: bool = True) -> None:
        super().__init__(steps, grid, order, lower_order_final)

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        _, eps = ctx.denoise(x, level)
        self.remember(ctx.state, level, eps)
        points = ctx.state.history[::-1][:self.order_of(ctx.state, level_next)]  # newest first
        (a_t, rho_t), (a_s, rho_s) = level.coef("alpha", "sigma_edm"), level_next.coef("alpha", "sigma_edm")
        lam, h = lam_step(level, level_next)
        nodes = [lv.coef("lam")[0] - lam for lv, _ in points]  # v_k, 0 first
        if len(nodes) == 1:
            weights = [rho_s - rho_t]
        else:
            integrals = [-rho_s * math.factorial(j) * h ** (j + 1) * p for j, p in enumerate(phis(h, len(nodes)))]
            weights = [sum(a * i for a, i in zip(lagrange(nodes, k), integrals)) for k in range(len(nodes))]
        return combine((a_s / a_t, x), *((a_s * w, e) for w, (_, e) in zip(weights, points)))


def lagrange(nodes: list[Scalar], k: int) -> list[Scalar]:
    """Coefficients [a_0, a_1, ...] of the Lagrange basis polynomial L_k(v) = prod_(j != k) (v - v_j) /
    (v_k - v_j) on ``nodes`` (floats or [B] tensors)."""
    poly: list[Scalar] = [1.0]
    for j, v_j in enumerate(nodes):
        if j != k:
            d = nodes[k] - v_j
            poly = [((poly[i - 1] if i else 0.0) - v_j * (poly[i] if i < len(poly) else 0.0)) / d
                    for i in range(len(poly) + 1)]
    return poly
