"""Reverse-SDE predictors and the predictor-corrector sampler (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", Sec. 4.2, App. E-G, Algorithms 1-5; code: score_sde sampling.py).

The forward SDE dx = f x dt + g dW of a process has the marginals x_t = alpha x0 + sigma eps
(``Level.sde`` gives (f, g^2)); its reverse is dx = [f x - g^2 score] dt + g dW_bar (Eq. 6) with
score = -eps / sigma from the Denoiser, so every predictor here runs on every process and
prediction type. A predictor step is x_s = a x_t + b eps + c z (s = the next, less noisy level).

"ancestral" is a registered alias of :class:`~genlab.diffusion.samplers.ddim.DDPM`: Song's
ancestral-sampling predictor (App. F) is DDPM's step, so PC configs say ``predictor: ancestral`` (or
``ddpm``) and reuse it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ...core.bounds import NonNegativeInt, PositiveFloat, PositiveInt
from ...core.registry import build, register
from ..grids import GridSpec
from ..levels import Level, Scalar, combine, sqrt, where
from .base import Sampler, SamplerState, StepContext
from .ddim import DDPM, transition_std

register("sampler", "ancestral")(DDPM)


class ReverseSDEPredictor(Sampler):
    """Base of the reverse-SDE predictors: subclasses give (a, b, c) of x_s = a x_t + b eps + c z.

    As Song's ``denoise=True``, the last step adds no noise (it returns the step's mean), and a step
    into sigma = 0 returns the denoiser's x0 (Tweedie's formula): it divides by no zero sigma.
    """

    stochastic = True

    def __init__(self, steps: PositiveInt = 1000, grid: GridSpec | None = None) -> None:
        super().__init__(steps, grid)

    def coefficients(self, level: Level, level_next: Level) -> tuple[Scalar, Scalar, Scalar]:
        raise NotImplementedError

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        x0, eps = ctx.denoise(x, level)
        if level_next.at_data:
            return x0
        a, b, c = self.coefficients(level, level_next)
        x_next = combine((a, x), (b, eps))
        if ctx.state.step < ctx.state.steps - 1:
            x_next = combine((1.0, x_next), (c, ctx.noise(x)))
        return where(level_next.sigma == 0, x0, x_next) if level_next.touches_data else x_next


@register("sampler", "euler_maruyama")
class EulerMaruyama(ReverseSDEPredictor):
    """Euler-Maruyama on the reverse SDE (Song et al. 2021, Eq. 6; score_sde's EulerMaruyamaPredictor):
    with dt = t_s - t_t < 0,  x_s = x_t + [f x_t - g^2 score] dt + g sqrt(-dt) z,  score = -eps / sigma_t.

    f = d log alpha / dt is infinite where alpha = 0 (rectified flow at t = 1): start below it.
    """

    def coefficients(self, level: Level, level_next: Level) -> tuple[Scalar, Scalar, Scalar]:
        f, g2 = level.values("sde", lambda lv: lv.sde)
        (t, sigma), (t_next,) = level.coef("t", "sigma"), level_next.coef("t")
        if not level.facts("finite_drift", lambda lv: torch.isfinite(lv.sde[0]))[1]:
            raise ValueError("euler_maruyama: the SDE drift f = d log alpha / dt is infinite at the first time "
                             "(alpha = 0, e.g. rectified_flow at t = 1); start lower, e.g. grid: {t_max: 0.995}")
        dt = t_next - t
        return 1 + f * dt, g2 * dt / sigma, sqrt(-g2 * dt)


@register("sampler", "reverse_diffusion")
class ReverseDiffusion(ReverseSDEPredictor):
    """Song et al.'s reverse diffusion predictor (Eq. 46-47, App. E): the forward SDE discretised
    exactly between the two levels, x_t = r x_s + G z with r = alpha_t / alpha_s and G = transition_std,
    i.e. x_t = x_s + F(x_s) + G z with F(x) = (r - 1) x, and reversed:
    x_s = x_t - F(x_t) + G^2 score + G z = (2 - r) x_t - (G^2 / sigma_t) eps + G z.
    On VE (r = 1) this is NCSN's / SMLD's ancestral step with the large variance.
    """

    def coefficients(self, level: Level, level_next: Level) -> tuple[Scalar, Scalar, Scalar]:
        (a_t, sigma), (a_s,) = level.coef("alpha", "sigma"), level_next.coef("alpha")
        g = transition_std(level, level_next)
        return 2 - a_t / a_s, -(g**2) / sigma, g


@register("sampler", "pc")
class PredictorCorrector(Sampler):
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1, 4, 5; score_sde's ``pc_sampler``): at each
    grid time t_i, ``n_corrector_steps`` annealed Langevin steps at t_i, then the predictor t_i -> t_{i+1}
    (corrector first, as score_sde's loop does, so no Langevin step runs at the final sigma = 0).

    Args:
        predictor: any sampler (name, config or object) whose ``step`` runs on this sampler's grid (its own
            steps and grid are unused): "reverse_diffusion" (default; Song's VE choice), "euler_maruyama"
            (Song's VP choice), "ancestral" (= "ddpm"), ...
        corrector: "langevin" (Song's LangevinCorrector) or "none" (predictor only).
        snr: the target signal-to-noise ratio r of the Langevin step; 0.16 as score_sde's CIFAR-10 configs
            (default for VE, VP and sub-VP there).
        n_corrector_steps: Langevin steps per grid time (score_sde's ``n_steps_each``, 1 there).

    Langevin step (Alg. 4/5): eps_ = 2 alpha_i (r ||z|| / ||score||)^2, x <- x + eps_ score + sqrt(2 eps_) z.
    As in score_sde, ||z|| and ||score|| are averaged over the batch before the ratio is taken: a step
    size set per sample by its own z and x is no valid Langevin step (in 2-D its chain drifts away from
    p_t, while batch means keep it). With
    ||score|| = ||eps|| / sigma this is eps_ = 2 alpha_i (r sigma mean||z|| / mean||eps||)^2 with each
    sample's own sigma, so per-sample times [N + 1, B] work too. alpha_i = (alpha_t / alpha_s)^2 of the
    two levels: score_sde's 1 - beta_i of the discrete VP / sub-VP step, and 1 for VE (and EDM).
    """

    default_grid = "uniform"

    def __init__(self, steps: PositiveInt = 1000, grid: GridSpec | None = None,
                 predictor: Sampler | str | dict = "reverse_diffusion",
                 corrector: Literal["langevin", "none"] = "langevin", snr: PositiveFloat = 0.16,
                 n_corrector_steps: NonNegativeInt = 1) -> None:
        super().__init__(steps, grid)
        if corrector not in ("langevin", "none"):
            raise ValueError(f"pc: unknown corrector {corrector!r}; expected 'langevin' or 'none'")
        self.predictor: Sampler = build("sampler", predictor, path="sampler.predictor")
        self.corrector, self.snr = corrector, snr
        self.n_corrector_steps = n_corrector_steps if corrector == "langevin" else 0
        self.nfe_per_step = self.predictor.nfe_per_step + self.n_corrector_steps

    @property
    def stochastic(self) -> bool:
        return self.n_corrector_steps > 0 or self.predictor.stochastic

    @property
    def multistep(self) -> bool:
        return self.predictor.multistep

    def init_state(self, steps: int) -> SamplerState:
        return self.predictor.init_state(steps)

    def correct(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        """``n_corrector_steps`` Langevin steps at ``level`` (Alg. 4/5); level_next sets alpha_i."""
        (a_t, sigma), (a_s,) = level.coef("alpha", "sigma"), level_next.coef("alpha")
        alpha_i = (a_t / a_s) ** 2
        for _ in range(self.n_corrector_steps):
            _, eps = ctx.denoise(x, level)
            z = ctx.noise(x)
            ratio = z.flatten(1).norm(dim=1).mean() / eps.flatten(1).norm(dim=1).mean()
            step_over_sigma = 2 * alpha_i * (self.snr * ratio) ** 2 * sigma  # eps_ / sigma: no division by sigma
            x = combine((1.0, x), (-step_over_sigma, eps), (sqrt(2 * step_over_sigma * sigma), z))
        return x

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        if self.n_corrector_steps:
            x = self.correct(ctx, x, level, level_next)
        return self.predictor.step(ctx, x, level, level_next)

    def __repr__(self) -> str:
        return (f"PredictorCorrector(steps={self.steps}, grid={type(self.grid).__name__}, predictor="
                f"{type(self.predictor).__name__}, corrector={self.corrector}, snr={self.snr}, "
                f"n_corrector_steps={self.n_corrector_steps})")
