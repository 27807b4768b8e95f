"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1)."""

from __future__ import annotations

from numbers import Real
from types import MappingProxyType

from torch import Tensor

from ...core.bounds import NonNegativeFloat, PositiveInt
from ...core.registry import register
from ..grids import GridSpec
from ..levels import Level, Scalar, combine, sqrt
from .base import Sampler, StepContext


@register("sampler", "consistency")
class ConsistencySampler(Sampler):
    """Algorithm 1 of Song et al. 2023 in the process's own scale, one model evaluation per step.

    On a grid t_0 > t_1 > ... > t_N (N = steps; tau_n = t_n in the paper, t_0 = T):

        x0 = f(x_T, t_0)
        for n = 1 .. N - 1:
            z ~ N(0, I)
            x = alpha_n (x0 + sqrt(s_n^2 - sigma_min^2) z)      (s_n = sigma_n / alpha_n, Karras' sigma)
            x0 = f(x, t_n)
        return x0

    ``f`` is the denoiser's x0 (``ctx.x0``): a :class:`~genlab.diffusion.ConsistencyDenoiser`'s
    consistency function, or any Denoiser's x0 estimate. The re-noising puts x0 back on the marginal at
    t_n: x0 carries noise of std sigma_min already (f's output is the ODE's end at sigma_min), so it adds
    sqrt(s_n^2 - sigma_min^2) in the scaled variables x^ = x / alpha and multiplies by alpha_n, i.e.
    x = alpha_n x0 + sqrt(sigma_n^2 - alpha_n^2 sigma_min^2) z (with sigma_min = 0: alpha_n x0 + sigma_n z).

    The grid's last time t_N only ends it: the last step returns x0 = f(x, t_(N-1)) itself, in the data's
    scale, whatever t_N is. The default grid, Karras sigmas ending at the process's t_min (``final="min"``),
    spends no evaluation at the boundary (where f is the identity). A list of times [T, tau_1, ...,
    tau_(N-1), end] is ``grid={"type": "explicit", "times": [...]}`` or ``sample(times=...)``; per-sample
    times [N + 1, B] work as in every sampler. 1 step is the one-step sampler x0 = f(x_T, T).

    Args:
        steps: the number of evaluations N (>= 1).
        grid: the time grid (default Karras, ending at t_min).
        sigma_min: the noise level of x0 (a Karras sigma >= 0) that the re-noising tops up. None: the
            denoiser's own ``sigma_min`` where it has one (a ConsistencyDenoiser's boundary), else 0.
    """

    default_grid: GridSpec = MappingProxyType({"type": "karras", "final": "min"})
    stochastic = True  # re-noises between evaluations (a run of 1 step draws nothing)
    nfe_per_step = 1

    def __init__(self, steps: PositiveInt = 1, grid: GridSpec | None = None,
                 sigma_min: NonNegativeFloat | None = None) -> None:
        super().__init__(steps, grid)
        self.sigma_min = sigma_min

    def boundary(self, ctx: StepContext) -> float:
        """sigma_min of the re-noising: this sampler's, else the denoiser's ``sigma_min``, else 0."""
        if self.sigma_min is not None:
            return self.sigma_min
        own = getattr(ctx.denoiser, "sigma_min", None)
        return float(own) if isinstance(own, Real) and not isinstance(own, bool) else 0.0

    def renoise_coefficients(self, level: Level, sigma_min: float) -> tuple[Scalar, Scalar]:
        """(alpha_n, sqrt(sigma_n^2 - alpha_n^2 sigma_min^2)): x = alpha_n x0 + (this) z at ``level``
        (clamped at 0 for levels at or below sigma_min)."""
        alpha, sigma = level.coef("alpha", "sigma")
        return alpha, sqrt(sigma**2 - (alpha * sigma_min) ** 2)

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        x0 = ctx.x0(x, level)  # f(x, t_n)
        if ctx.state.step + 1 >= ctx.state.steps:
            return x0
        alpha, std = self.renoise_coefficients(level_next, self.boundary(ctx))
        return combine((alpha, x0), (std, ctx.noise(x)))
