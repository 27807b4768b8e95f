"""Euler and Heun samplers with stochastic churn (Karras et al. 2022, Algorithm 2), and ancestral Euler.

They integrate dx^/dsigma = eps in the scaled variables x^ = x / alpha, sigma = sigma / alpha, so
they run on every process: an Euler step is x_next = alpha_next x0 + sigma_next eps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ...core.registry import register
from ..grids import GridSpec
from ..processes import Level
from .base import DenoiserLike, Sampler, SamplerState, bc
from .ddim import posterior_std


@register("sampler", "euler")
class Euler(Sampler):
    """First-order steps of Karras et al.'s Algorithm 2; without churn this is DDIM (eta = 0).

    Churn: for S_tmin <= sigma <= S_tmax, raise sigma to sigma (1 + gamma), gamma =
    min(S_churn / N, sqrt(2) - 1), by adding noise of std sqrt(sigma_hat^2 - sigma^2) S_noise.
    """

    default_grid = "karras"

    def __init__(self, steps: int = 20, grid: GridSpec | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> None:
        super().__init__(steps, grid)
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise

    def churn_gamma(self, state: SamplerState) -> float:
        """gamma of Algorithm 2 for a sampling of ``state.steps`` steps: min(S_churn / N, sqrt(2) - 1)."""
        return min(self.s_churn / state.steps, math.sqrt(2) - 1)

    def churn(self, denoiser: DenoiserLike, x: Tensor, level: Level, state: SamplerState,
              generator: torch.Generator | None) -> tuple[Tensor, Level]:
        """Lines 4-6 of Algorithm 2: move x from sigma up to sigma_hat; returns (x_hat, level_hat)."""
        gamma = self.churn_gamma(state)
        if gamma <= 0:
            return x, level
        sigma = level.sigma_edm
        gamma = gamma * ((sigma >= self.s_tmin) & (sigma <= self.s_tmax)).double()  # float64, not torch's default
        if not bool((gamma > 0).any()):
            return x, level
        process = denoiser.process
        t_hat = process.t_of_sigma_edm(sigma.double() * (1 + gamma.double())).clamp(max=process.t_max)
        level_hat = process.level(t_hat).to(dtype=x.dtype, device=x.device)
        extra = torch.sqrt((level_hat.sigma_edm**2 - sigma**2).clamp_min(0)) * self.s_noise
        x_hat = x / bc(level.alpha, x) + bc(extra, x) * self.noise(x, generator)
        return bc(level_hat.alpha, x) * x_hat, level_hat

    def step(self, denoiser: DenoiserLike, x: Tensor, level: Level, level_next: Level, state: SamplerState,
             generator: torch.Generator | None = None, cond: dict[str, Any] | None = None) -> Tensor:
        x, level = self.churn(denoiser, x, level, state, generator)
        return self.denoise_combine(denoiser, x, level, state, cond, *level_next.coef("alpha", "sigma"))


@register("sampler", "heun")
class Heun(Euler):
    """Heun's second-order method (Algorithm 2, lines 9-11): the trapezoid rule on dx^/dsigma = eps,
    Euler for the last step into sigma = 0 (and from an infinite sigma, where it is undefined)."""

    nfe_per_step = 2

    def step(self, denoiser: DenoiserLike, x: Tensor, level: Level, level_next: Level, state: SamplerState,
             generator: torch.Generator | None = None, cond: dict[str, Any] | None = None) -> Tensor:
        x, level = self.churn(denoiser, x, level, state, generator)
        x0, eps = self.denoise(denoiser, x, level, state, cond)
        euler = bc(level_next.alpha, x) * x0 + bc(level_next.sigma, x) * eps
        second = (level_next.sigma > 0) & torch.isfinite(level.sigma_edm)
        if not bool(second.any()):
            return euler
        _, eps_next = denoiser(euler, level_next, **(cond or {}))
        step = bc(level_next.sigma_edm - level.sigma_edm, x) * (eps + eps_next) / 2
        heun = bc(level_next.alpha, x) * (x / bc(level.alpha, x) + step)
        return torch.where(bc(second, x), heun, euler)


def ancestral_sigmas(level: Level, level_next: Level, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(sigma_down, sigma_up) of an ancestral step from ``level`` to ``level_next`` ([] or [B]).

    k-diffusion's ``get_ancestral_step`` in Karras' sigma s = sigma / alpha is s_up = min(s_next,
    eta s_next sqrt(1 - s_next^2 / s^2)), s_down = sqrt(s_next^2 - s_up^2). Here both are multiplied
    by alpha_next, the process units of x_next = alpha_next x0 + sigma_down eps + sigma_up z; then
    s_next sqrt(1 - s_next^2 / s^2) alpha_next is the DDPM posterior std (Kingma et al. 2021, Eq. 33),
    so eta = 1 is DDPM's step and eta = 0 the Euler (DDIM) step.
    """
    sigma_up = torch.minimum(level_next.sigma, eta * posterior_std(level, level_next))
    return torch.sqrt((level_next.sigma**2 - sigma_up**2).clamp_min(0)), sigma_up


@register("sampler", "euler_ancestral")
class EulerAncestral(Sampler):
    """Ancestral Euler (k-diffusion's ``sample_euler_ancestral``; diffusers' EulerAncestralDiscreteScheduler
    is eta = s_noise = 1): an Euler step of dx^/dsigma = eps down to sigma_down, then fresh noise of std
    sigma_up (times S_noise) back up to sigma_next; see :func:`ancestral_sigmas`.
    """

    default_grid = "karras"

    def __init__(self, steps: int = 20, grid: GridSpec | None = None, eta: float = 1.0,
                 s_noise: float = 1.0) -> None:
        super().__init__(steps, grid)
        if eta < 0:
            raise ValueError(f"euler_ancestral: eta must be >= 0 (0: Euler, 1: full ancestral noise), got {eta}")
        self.eta, self.s_noise = eta, s_noise

    def step(self, denoiser: DenoiserLike, x: Tensor, level: Level, level_next: Level, state: SamplerState,
             generator: torch.Generator | None = None, cond: dict[str, Any] | None = None) -> Tensor:
        sigma_down, sigma_up = ancestral_sigmas(level, level_next, self.eta)
        x_next = self.denoise_combine(denoiser, x, level, state, cond, level_next.alpha, sigma_down)
        if self.eta > 0 and bool((sigma_up > 0).any()):
            x_next = x_next + bc(self.s_noise * sigma_up, x) * self.noise(x, generator)
        return x_next
