"""DDIM (Song et al. 2021) and DDPM ancestral sampling (Ho et al. 2020), in alpha/sigma form."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ...core.bounds import PositiveInt, UnitInterval
from ...core.registry import register
from ..grids import GridSpec
from ..levels import Level, Scalar, combine, sqrt
from .base import Sampler, StepContext


def posterior_std(level: Level, level_next: Level) -> Scalar:
    """Std of q(x_s | x_t, x0) for s = level_next < t = level (Kingma et al. 2021, Eq. 33):
    sigma_s sqrt(1 - exp(lambda_t - lambda_s)^2), exp(..) = alpha_t sigma_s / (alpha_s sigma_t)."""
    (a_t, s_t), (a_s, s_s) = level.coef("alpha", "sigma"), level_next.coef("alpha", "sigma")
    return s_s * sqrt(1 - (a_t * s_s / (a_s * s_t)) ** 2)


def transition_std(level: Level, level_next: Level) -> Scalar:
    """Std of the forward transition x_t | x_s (s = level_next, t = level) in the alpha/sigma picture:
    sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) (Kingma et al. 2021, VDM, q(z_t | z_s); sqrt(beta_t)
    for consecutive DDPM steps)."""
    (a_t, s_t), (a_s, s_s) = level.coef("alpha", "sigma"), level_next.coef("alpha", "sigma")
    return sqrt(s_t**2 - (a_t / a_s * s_s) ** 2)


@register("sampler", "ddim")
class DDIM(Sampler):
    """x_s = alpha_s x0 + sqrt(sigma_s^2 - s^2) eps + s z, s = eta * posterior std (DDIM, Eq. 12).

    eta = 0 is the deterministic DDIM (first-order probability-flow ODE solver); eta = 1 is DDPM.
    eta is in [0, 1]: above 1 the noise std s can exceed sigma_s and sqrt(sigma_s^2 - s^2) is NaN
    (diffusers' DDIM allows it and returns NaN there).
    """

    def __init__(self, steps: PositiveInt = 50, grid: GridSpec | None = None, eta: UnitInterval = 0.0) -> None:
        super().__init__(steps, grid)
        self.eta = eta

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def noise_std(self, level: Level, level_next: Level) -> Scalar:
        """Std of the fresh noise added in the step (DDPM overrides it)."""
        return self.eta * posterior_std(level, level_next)

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        a_s, s_s = level_next.coef("alpha", "sigma")
        if not self.stochastic:
            return ctx.combine(x, level, a_s, s_s)
        mean_std = self.eta * posterior_std(level, level_next)
        x_next = ctx.combine(x, level, a_s, sqrt(s_s**2 - mean_std**2))
        if level_next.at_data:
            return x_next
        return combine((1.0, x_next), (self.noise_std(level, level_next), ctx.noise(x)))


@register("sampler", "ddpm")
class DDPM(DDIM):
    """Ancestral sampling from q(x_s | x_t, x0_hat) (Ho et al. 2020, Alg. 2).

    ``variance="small"``: the posterior variance (beta tilde); ``"large"``: sigma_t|s^2 = sigma_t^2 -
    (alpha_t / alpha_s)^2 sigma_s^2 (beta_t for consecutive DDPM steps). No noise at the last step.
    """

    def __init__(self, steps: PositiveInt = 1000, grid: GridSpec | None = None,
                 variance: Literal["small", "large"] = "small") -> None:
        super().__init__(steps, grid, eta=1.0)
        if variance not in ("small", "large"):
            raise ValueError(f"ddpm: variance must be 'small' or 'large', got {variance!r}")
        self.variance = variance

    def noise_std(self, level: Level, level_next: Level) -> Scalar:
        if self.variance == "small":
            return posterior_std(level, level_next)
        (s_s,) = level_next.coef("sigma")
        return transition_std(level, level_next) * (s_s > 0)  # no noise into the data
