"""Euler on the flow-matching ODE dx/dt = u(x, t) in the process's own time."""

from __future__ import annotations

from torch import Tensor

from ...core.registry import register
from ..levels import Level, combine
from .base import Sampler, StepContext


@register("sampler", "flow_euler")
class FlowEuler(Sampler):
    """x_next = x + (t_next - t) u with u = alpha' x0 + sigma' eps (Lipman et al. 2023, Sec. 4;
    Liu et al. 2023). On rectified flow it is exactly DDIM (eta = 0); elsewhere it is Euler in t."""

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        x0, eps = ctx.denoise(x, level)
        (t, d_alpha, d_sigma), (t_next,) = level.coef("t", "d_alpha", "d_sigma"), level_next.coef("t")
        dt = t_next - t
        return combine((1.0, x), (dt * d_alpha, x0), (dt * d_sigma, eps))
