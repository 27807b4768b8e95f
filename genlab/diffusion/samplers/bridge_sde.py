"""Euler-Maruyama on SF2M's SDE: the marginals of a probability-flow ODE, with a constant diffusion g."""

from __future__ import annotations

from types import MappingProxyType

from torch import Tensor

from ...core.bounds import NonNegativeFloat, PositiveInt
from ...core.registry import register
from ..grids import GridSpec
from ..levels import Level, combine, sqrt
from .base import Sampler, StepContext

#: linspace(t_max, 0, steps + 1): SF2M's uniform grid, ending at the data
TO_THE_DATA = MappingProxyType({"type": "uniform", "t_min": 0.0, "final": "min"})


@register("sampler", "bridge_sde")
class BridgeSDE(Sampler):
    """Euler-Maruyama on the SDE whose marginals are those of the denoiser's probability-flow ODE, with a
    constant diffusion g (SF2M, Tong et al. 2024, Sec. 3; torchcfm's SF2M example integrates it with
    ``torchsde.sdeint(..., solver="euler")``). In the papers' time tau = 1 - t (source at tau = 0),
    dx = [u_tau(x) + (g^2 / 2) grad log p(x)] dtau + g dW; in genlab's, a step from t down to t - h is

        x_next = x - h u(x, t) + h (g^2 / 2) grad log p_t(x) + g sqrt(h) z,    z ~ N(0, I) [B, ...],

    u = alpha' x0 + sigma' eps the ODE's velocity dx/dt (``flow_euler``'s; its sign flips with time, the
    score term's does not). By Fokker-Planck the g terms cancel in the marginals, so every g >= 0 samples
    p_t; g = 0 is Euler on the ODE. grad log p_t is the denoiser's own ``score`` where it has one (a
    :class:`~genlab.diffusion.denoiser.BridgeDenoiser`: SF2M's learned score, with g the bridge's sigma
    unless ``g`` is set), else -eps / sigma, the score of a Gaussian-noise process's marginals: then this
    is a reverse-time SDE of any diffusion model (Song et al. 2021, Eq. 6 with a constant g). Not for
    data-to-data flows without a score network, whose "eps" is the source point, not noise.

    Euler-Maruyama reads the drift at each step's start, so never at the data end t = 0, where a bridge's
    drift (x1 - x) / t pins the path to its end point. The last step adds no noise (score_sde's
    ``denoise=True``): for the exact field of a Brownian bridge it lands on the bridge's end point.

    Args:
        steps: number of steps (the grid has steps + 1 times); 100 as SF2M's example.
        grid: default linspace(t_max, 0, steps + 1).
        g: the diffusion coefficient (>= 0); None: the denoiser's ``g`` where it has its own score, else 1.
    """

    default_grid = TO_THE_DATA
    nfe_per_step = 1  # denoiser calls; a denoiser with its own score network adds one call of it

    def __init__(self, steps: PositiveInt = 100, grid: GridSpec | None = None,
                 g: NonNegativeFloat | None = None) -> None:
        super().__init__(steps, grid)
        self.g = g

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.g != 0

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        (t, alpha, sigma, d_alpha, d_sigma), (t_next,) = (level.coef("t", "alpha", "sigma", "d_alpha", "d_sigma"),
                                                          level_next.coef("t"))
        h = t - t_next
        score = getattr(type(ctx.denoiser), "score", None)  # on the class: a wrapper does not pass an inner one's
        g = self.g if self.g is not None else ctx.denoiser.g if score is not None else 1.0
        if score is None:  # x - h u + h (g^2 / 2) (-eps / sigma), x = alpha x0 + sigma eps: one combine
            x_next = ctx.combine(x, level, alpha - h * d_alpha, sigma - h * d_sigma - h * g**2 / 2 / sigma)
        else:
            x_next = ctx.combine(x, level, alpha - h * d_alpha, sigma - h * d_sigma)
            x_next = combine((1.0, x_next), (h * g**2 / 2, score(ctx.denoiser, x, level, **ctx.cond)))
        if g == 0 or ctx.state.step == ctx.state.steps - 1:
            return x_next
        return combine((1.0, x_next), (g * sqrt(h), ctx.noise(x)))
