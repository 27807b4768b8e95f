"""DDIM (Song et al. 2021) and DDPM ancestral sampling (Ho et al. 2020), in alpha/sigma form."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from ...core.registry import register
from ..grids import GridSpec
from ..processes import Level
from .base import DenoiserLike, Sampler, SamplerState, bc


def posterior_std(level: Level, level_next: Level) -> Tensor:
    """Std of q(x_s | x_t, x0) for s = level_next < t = level (Kingma et al. 2021, Eq. 33):
    sigma_s sqrt(1 - exp(lambda_t - lambda_s)), with exp(..) = (alpha_t sigma_s / (alpha_s sigma_t))^2."""
    ratio = level.alpha * level_next.sigma / (level_next.alpha * level.sigma)
    return level_next.sigma * torch.sqrt((1 - ratio**2).clamp_min(0))


def nonneg_sqrt(v: Tensor | float) -> Tensor | float:
    """sqrt(max(v, 0)) of a float or a tensor."""
    return math.sqrt(max(v, 0.0)) if isinstance(v, float) else v.clamp_min(0).sqrt()


def transition_std(level: Level, level_next: Level) -> Tensor | float:
    """Std of the forward transition x_t | x_s (s = level_next, t = level) in the alpha/sigma picture:
    sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) (Kingma et al. 2021, VDM, q(z_t | z_s); sqrt(beta_t)
    for consecutive DDPM steps); floats on a grid shared by the batch."""
    (a_t, s_t), (a_s, s_s) = level.coef("alpha", "sigma"), level_next.coef("alpha", "sigma")
    return nonneg_sqrt(s_t**2 - (a_t / a_s * s_s) ** 2)


@register("sampler", "ddim")
class DDIM(Sampler):
    """x_s = alpha_s x0 + sqrt(sigma_s^2 - s^2) eps + s z, s = eta * posterior std (DDIM, Eq. 12).

    eta = 0 is the deterministic DDIM (first-order probability-flow ODE solver); eta = 1 is DDPM.
    """

    def __init__(self, steps: int = 50, grid: GridSpec | None = None, eta: float = 0.0) -> None:
        super().__init__(steps, grid)
        self.eta = eta

    def noise_std(self, level: Level, level_next: Level) -> Tensor:
        """Std of the fresh noise added in the step (DDPM overrides it)."""
        return self.eta * posterior_std(level, level_next)

    def step(self, denoiser: DenoiserLike, x: Tensor, level: Level, level_next: Level, state: SamplerState,
             generator: torch.Generator | None = None, cond: dict[str, Any] | None = None) -> Tensor:
        if self.eta == 0:
            return self.denoise_combine(denoiser, x, level, state, cond, *level_next.coef("alpha", "sigma"))
        x0, eps = self.denoise(denoiser, x, level, state, cond)
        mean_std = self.eta * posterior_std(level, level_next)
        c_eps = torch.sqrt((level_next.sigma**2 - mean_std**2).clamp_min(0))
        x_next = bc(level_next.alpha, x) * x0 + bc(c_eps, x) * eps
        std = self.noise_std(level, level_next)
        if bool((level_next.sigma > 0).any()):
            x_next = x_next + bc(std, x) * self.noise(x, generator)
        return x_next


@register("sampler", "ddpm")
class DDPM(DDIM):
    """Ancestral sampling from q(x_s | x_t, x0_hat) (Ho et al. 2020, Alg. 2).

    ``variance="small"``: the posterior variance (beta tilde); ``"large"``: sigma_t|s^2 = sigma_t^2 -
    (alpha_t / alpha_s)^2 sigma_s^2 (beta_t for consecutive DDPM steps). No noise at the last step.
    """

    def __init__(self, steps: int = 1000, grid: GridSpec | None = None,
                 variance: Literal["small", "large"] = "small") -> None:
        super().__init__(steps, grid, eta=1.0)
        self.variance = variance

    def noise_std(self, level: Level, level_next: Level) -> Tensor:
        if self.variance == "small":
            return posterior_std(level, level_next)
        large = torch.as_tensor(transition_std(level, level_next), dtype=level.sigma.dtype, device=level.sigma.device)
        return torch.where(level_next.sigma > 0, large, torch.zeros_like(large))
