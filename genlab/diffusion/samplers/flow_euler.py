"""Euler on the flow-matching ODE dx/dt = u(x, t) in the process's own time."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...core.registry import register
from ..predictions import from_x0_eps
from ..processes import Level
from .base import DenoiserLike, Sampler, SamplerState, bc


@register("sampler", "flow_euler")
class FlowEuler(Sampler):
    """x_next = x + (t_next - t) u with u = alpha' x0 + sigma' eps (Lipman et al. 2023, Sec. 4;
    Liu et al. 2023). On rectified flow it is exactly DDIM (eta = 0); elsewhere it is Euler in t."""

    def step(self, denoiser: DenoiserLike, x: Tensor, level: Level, level_next: Level, state: SamplerState,
             generator: torch.Generator | None = None, cond: dict[str, Any] | None = None) -> Tensor:
        x0, eps = self.denoise(denoiser, x, level, state, cond)
        return x + bc(level_next.t - level.t, x) * from_x0_eps("velocity", x0, eps, level)
