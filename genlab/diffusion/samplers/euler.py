"""Euler and Heun samplers with stochastic churn (Karras et al. 2022, Algorithm 2), and ancestral Euler.

They integrate dx^/dsigma = eps in the scaled variables x^ = x / alpha, sigma = sigma / alpha, so
they run on every process: an Euler step is x_next = alpha_next x0 + sigma_next eps.
"""

from __future__ import annotations

import math

from typing import Annotated

from torch import Tensor

from ...core.bounds import NonNegativeFloat, PositiveInt, Range
from ...core.registry import register
from ..grids import GridSpec
from ..levels import Level, Scalar, combine, minimum, sqrt, where
from .base import Sampler, SamplerState, StepContext
from .ddim import posterior_std

CHURN_CAP = math.sqrt(2) - 1  # the largest gamma of Algorithm 2: sigma_hat at most sqrt(2) sigma
MaybeInfinite = Annotated[float, Range(ge=0, finite=False)]  # s_tmax: inf (the default) churns at every sigma


@register("sampler", "euler")
class Euler(Sampler):
    """First-order steps of Karras et al.'s Algorithm 2; without churn this is DDIM (eta = 0).

    Churn: for S_tmin <= sigma <= S_tmax, raise sigma to sigma (1 + gamma), gamma =
    min(S_churn / N, sqrt(2) - 1), by adding noise of std sqrt(sigma_hat^2 - sigma^2) S_noise.
    Ranges: s_churn >= 0, 0 <= s_tmin <= s_tmax (s_tmax may be inf), s_noise >= 0 (0: churn without noise).
    """

    default_grid = "karras"

    def __init__(self, steps: PositiveInt = 20, grid: GridSpec | None = None, s_churn: NonNegativeFloat = 0.0,
                 s_tmin: NonNegativeFloat = 0.0, s_tmax: MaybeInfinite = float("inf"),
                 s_noise: NonNegativeFloat = 1.0) -> None:
        super().__init__(steps, grid)
        if not s_tmin <= s_tmax:
            raise ValueError(f"{type(self).__name__}: s_tmin ({s_tmin:g}) must be <= s_tmax ({s_tmax:g}), the "
                             "sigma window where churn applies")
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise

    @property
    def stochastic(self) -> bool:
        return self.s_churn > 0

    def churn_gamma(self, state: SamplerState) -> float:
        """gamma of Algorithm 2 for a sampling of ``state.steps`` steps: min(S_churn / N, sqrt(2) - 1)."""
        return min(self.s_churn / state.steps, CHURN_CAP)

    def churn(self, ctx: StepContext, x: Tensor, level: Level) -> tuple[Tensor, Level]:
        """Lines 4-6 of Algorithm 2: move x from sigma up to sigma_hat; returns (x_hat, level_hat)."""
        gamma = self.churn_gamma(ctx.state)
        window = ("churn", self.s_tmin, self.s_tmax)
        if gamma <= 0 or not level.facts(window, lambda lv: (lv.sigma_edm >= self.s_tmin)
                                         & (lv.sigma_edm <= self.s_tmax))[0]:
            return x, level
        sigma = level.sigma_edm
        gamma_t = gamma * ((sigma >= self.s_tmin) & (sigma <= self.s_tmax)).to(sigma.dtype)
        process = ctx.process
        level_hat = process.level(process.t_of_sigma_edm(sigma * (1 + gamma_t)).clamp(max=process.t_max))
        (s_hat, a_hat), (s, a) = level_hat.coef("sigma_edm", "alpha"), level.coef("sigma_edm", "alpha")
        extra = sqrt(s_hat**2 - s**2) * self.s_noise
        return combine((a_hat / a, x), (a_hat * extra, ctx.noise(x))), level_hat

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        x, level = self.churn(ctx, x, level)
        return ctx.combine(x, level, *level_next.coef("alpha", "sigma"))


@register("sampler", "heun")
class Heun(Euler):
    """Heun's second-order method (Algorithm 2, lines 9-11): the trapezoid rule on dx^/dsigma = eps,
    Euler for the last step into sigma = 0 (and from an infinite sigma, where it is undefined)."""

    nfe_per_step = 2

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        x, level = self.churn(ctx, x, level)
        x0, eps = ctx.denoise(x, level)
        a_s, s_s = level_next.coef("alpha", "sigma")
        euler = combine((a_s, x0), (s_s, eps))
        finite = level.facts("alpha>0", lambda lv: lv.alpha > 0)  # sigma / alpha is finite
        if level_next.at_data or not finite[0]:
            return euler
        _, eps_next = ctx.denoiser(euler, level_next, **ctx.cond)
        (s_edm, a_t), (s_edm_next,) = level.coef("sigma_edm", "alpha"), level_next.coef("sigma_edm")
        half = a_s * (s_edm_next - s_edm) / 2
        heun = combine((a_s / a_t, x), (half, eps), (half, eps_next))
        if level_next.touches_data or not finite[1]:
            return where((level_next.sigma > 0) & (level.alpha > 0), heun, euler)
        return heun


def ancestral_sigmas(level: Level, level_next: Level, eta: float = 1.0) -> tuple[Scalar, Scalar]:
    """(sigma_down, sigma_up) of an ancestral step from ``level`` to ``level_next`` (floats or [B]).

    k-diffusion's ``get_ancestral_step`` in Karras' sigma s = sigma / alpha is s_up = min(s_next,
    eta s_next sqrt(1 - s_next^2 / s^2)), s_down = sqrt(s_next^2 - s_up^2). Here both are multiplied
    by alpha_next, the process units of x_next = alpha_next x0 + sigma_down eps + sigma_up z; then
    s_next sqrt(1 - s_next^2 / s^2) alpha_next is the DDPM posterior std (Kingma et al. 2021, Eq. 33),
    so eta = 1 is DDPM's step and eta = 0 the Euler (DDIM) step.
    """
    (s_s,) = level_next.coef("sigma")
    sigma_up = minimum(s_s, eta * posterior_std(level, level_next))
    return sqrt(s_s**2 - sigma_up**2), sigma_up


@register("sampler", "euler_ancestral")
class EulerAncestral(Sampler):
    """Ancestral Euler (k-diffusion's ``sample_euler_ancestral``; diffusers' EulerAncestralDiscreteScheduler
    is eta = s_noise = 1): an Euler step of dx^/dsigma = eps down to sigma_down, then fresh noise of std
    sigma_up (times S_noise) back up to sigma_next; see :func:`ancestral_sigmas`. eta >= 0 (0: Euler,
    1: full ancestral noise; above 1 sigma_up is capped at sigma_next, as in k-diffusion), s_noise >= 0.
    """

    default_grid = "karras"

    def __init__(self, steps: PositiveInt = 20, grid: GridSpec | None = None, eta: NonNegativeFloat = 1.0,
                 s_noise: NonNegativeFloat = 1.0) -> None:
        super().__init__(steps, grid)
        self.eta, self.s_noise = eta, s_noise

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        sigma_down, sigma_up = ancestral_sigmas(level, level_next, self.eta)
        x_next = ctx.combine(x, level, level_next.coef("alpha")[0], sigma_down)
        if not self.stochastic or level_next.at_data:
            return x_next
        return combine((1.0, x_next), (self.s_noise * sigma_up, ctx.noise(x)))
