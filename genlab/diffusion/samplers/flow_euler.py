"""Euler on the flow-matching ODE dx/dt = u(x, t) in the process's own time."""

from __future__ import annotations

import dataclasses

import torch
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


@register("sampler", "mean_flow")
class MeanFlowSampler(FlowEuler):
    """MeanFlow sampling (Geng et al. 2025, Algorithm 2 and its multi-step form): z_r = z_t - (t - r) u(z_t, r, t)
    on the grid, u the average velocity of a two-time network (``interval_embedding``), which is handed
    ``interval`` = t_in(t) - t_in(r) (the Denoiser's model times of the step's two levels). ``steps: 1`` with
    the grid from t = 1 to 0 is one-step generation. The step is :class:`FlowEuler`'s, whose velocity is
    then the average over the step: exact for a perfect u at any step count. On a denoiser whose network
    does not take an interval (no ``takes_interval``) it is :class:`FlowEuler` (r = t)."""

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        if not getattr(getattr(ctx.denoiser, "model", None), "takes_interval", False):
            return super().step(ctx, x, level, level_next)  # a one-time network: r = t, flow Euler
        model_time = getattr(ctx.denoiser, "model_time", ctx.process.model_time)  # a Denoiser's, else the process's
        (t,), (t_next,) = level.coef("t"), level_next.coef("t")
        interval = model_time(torch.as_tensor(t)) - model_time(torch.as_tensor(t_next))
        return super().step(dataclasses.replace(ctx, cond={**ctx.cond, "interval": interval}), x, level, level_next)
