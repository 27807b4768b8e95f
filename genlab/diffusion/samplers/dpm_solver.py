"""Multistep DPM-Solver++ of order 1, 2 and 3 (Lu et al. 2022b, "DPM-Solver++", Sec. 4 and Alg. 2),
deterministic or stochastic (SDE-DPM-Solver++: diffusers' "sde-dpmsolver++", k-diffusion's
DPM-Solver++(2M) SDE and (3M) SDE).

Exponential integrators in lambda = log(alpha / sigma). From x_t to lambda_s, h = lambda_s - lambda_t,
the exact solution of the data-prediction ODE (eta = 0) or of the reverse SDE (eta = 1; values in
between interpolate, as k-diffusion's eta) is, with k = 1 + eta (variation of constants; Lu et al.
2022b, Eq. 5 for eta = 0),

    x_s = (sigma_s / sigma_t) e^(-eta h) x_t + alpha_s int_0^h k e^(-k (h - u)) x0(lambda_t + u) du
          + sigma_s sqrt(1 - e^(-2 eta h)) z,

i.e. the ODE's integral in the variable k lambda plus Gaussian noise, so one set of weights serves
both. With x0 held constant this is DDIM (eta = 0) and DDPM's posterior step (eta = 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor

from ...core.bounds import NonNegativeFloat, PositiveInt
from ...core.registry import register
from ..grids import GridSpec
from ..levels import Level, combine, expm1
from .base import StepContext
from .multistep import MultistepSampler, lam_step, phis

SolverType = Literal["midpoint", "heun"]
ThirdOrder = Literal["taylor", "reference"]


def dpm_solver_pp_update(x: Tensor, points: Sequence[tuple[Level, Tensor]], level_next: Level, *,
                         solver_type: SolverType = "midpoint", third_order: ThirdOrder = "taylor",
                         eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """x at ``level_next`` from x [B, ...] at the level of ``points[0]``, given x0 estimates ``points``
    [(level, x0 [B, ...])] at 1-3 distinct levels, the first at x's own level. The others may lie
    behind (multistep) or ahead (single-step stages): D1 and D2 are the divided differences of the
    x0 estimates in lambda, scaled by h and h^2, whatever side they are on.

    Weights of the x0 integral (with k h for h, e = 1 - e^(-k h), phi_k = phi_k(-k h) of
    :func:`~genlab.diffusion.samplers.multistep.phis`): one point, e m0 (DPM-Solver++(1), Lu et al.
    2022b, Eq. 6); two points, e m0 + w1 D1 with w1 = e / 2 (``"midpoint"``, Eq. 8) or 1 - phi_1
    (``"heun"``: the linear interpolant integrated exactly); three points, D1 and D2 of the quadratic
    through them, w1 = 1 - phi_1 and w2 = 1 - 2 phi_2 (``"taylor"``, exact for the quadratic) or half
    of it, 1/2 - phi_2 (``"reference"``: the DPM-Solver code and diffusers, which makes 3M globally
    second order). All weights are times alpha_s.

    ``noise`` (standard normal like x) is required when eta > 0 and sigma_s > 0.
    """
    if not 1 <= len(points) <= 3:
        raise ValueError(f"DPM-Solver++ updates use 1, 2 or 3 x0 estimates, got {len(points)}")
    lam, h = lam_step(points[0][0], level_next)
    lams = [lam, *(lv.coef("lam")[0] for lv, _ in points[1:])]
    (a_s, s_s), (s_t,) = level_next.coef("alpha", "sigma"), points[0][0].coef("sigma")
    kh = (1 + eta) * h
    e = -expm1(-kh)  # 1 - e^(-k h)
    weights = [e]  # on x0 at points[0], points[1], ..., before the factor alpha_s
    if len(points) > 1:
        phi_1, phi_2 = phis(-kh, 2)  # phi_1 = e / (k h), phi_2 = (k h - e) / (k h)^2
        w1 = 0.5 * e if solver_type == "midpoint" and len(points) == 2 else 1 - phi_1
        r0 = (lam - lams[1]) / h
        if len(points) == 2:
            weights = [e + w1 / r0, -w1 / r0]  # D1 = (m0 - m1) / r0
        else:
            r1 = (lams[1] - lams[2]) / h
            w2 = 1 - 2 * phi_2 if third_order == "taylor" else 0.5 - phi_2
            # D1 = (1 + q) D1_0 - q D1_1, D2 = (D1_0 - D1_1) / (r0 + r1), D1_k = (m_k - m_{k+1}) / r_k
            q, inv = r0 / (r0 + r1), 1 / (r0 + r1)
            u, v = w1 * (1 + q) + w2 * inv, -w1 * q - w2 * inv  # weights of D1_0 and D1_1
            weights = [e + u / r0, -u / r0 + v / r1, -v / r1]
    c_x = s_s / s_t if eta == 0 else s_s / s_t * (expm1(-eta * h) + 1)  # sigma_s / sigma_t e^(-eta h)
    terms = [(c_x, x), *((a_s * w, m) for w, (_, m) in zip(weights, points))]
    if noise is not None:
        terms.append((s_s * (-expm1(-2 * eta * h)) ** 0.5, noise))
    return combine(*terms)


@register("sampler", "dpm_solver_pp")
class DPMSolverPP(MultistepSampler):
    """DPM-Solver++ (2M by default, 3M with order=3). The first steps ramp up the order; the last
    step into sigma = 0 is first order; ``lower_order_final`` also lowers the final two steps when
    there are fewer than 15 (as in the paper's code and diffusers).

    ``eta`` > 0 gives SDE-DPM-Solver++ (Lu's 2M SDE, diffusers PR #3344; k-diffusion's eta), with
    fresh noise from the generator each step. eta = 1, orders 1-2: diffusers' ``sde-dpmsolver++``
    step for step (same seed, same noise). ``solver_type`` is the two-point formula (the option of
    that name in diffusers and k-diffusion). k-diffusion's ``sample_dpmpp_3m_sde`` is order=3,
    solver_type="heun", third_order="reference", lower_order_final=False. diffusers' third-order
    SDE update is not reproduced: its D2 weight has -1/2 where the derivation has +1/2, which makes
    its local error O(h^2).

    Third order: with D1 ~ h x0' and D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0'' / 2, the Taylor
    expansion of the exact solution weights D2 by 1 - 2 phi_2(-h). The reference code
    (LuChengTHU/dpm-solver, diffusers) uses half of that, 1/2 - phi_2(-h), which makes 3M
    globally second order; ``third_order="reference"`` reproduces it step for step.
    """

    default_grid = "log_snr"

    def __init__(self, steps: PositiveInt = 20, grid: GridSpec | None = None, order: Literal[1, 2, 3] = 2,
                 lower_order_final: bool = True, third_order: ThirdOrder = "taylor", eta: NonNegativeFloat = 0.0,
                 solver_type: SolverType = "midpoint") -> None:
        super().__init__(steps, grid, order, lower_order_final)
        self.third_order, self.eta, self.solver_type = third_order, eta, solver_type

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        self.remember(ctx.state, level, ctx.x0(x, level))
        points = ctx.state.history[::-1][:self.order_of(ctx.state, level_next)]  # newest first
        noisy = self.stochastic and not level_next.at_data
        return dpm_solver_pp_update(x, points, level_next, solver_type=self.solver_type,
                                    third_order=self.third_order, eta=self.eta,
                                    noise=ctx.noise(x) if noisy else None)


@register("sampler", "dpm_solver_pp_sde")
class DPMSolverPPSDE(DPMSolverPP):
    """SDE-DPM-Solver++ (2M by default, 3M with order=3): :class:`DPMSolverPP` with eta = 1."""

    def __init__(self, steps: PositiveInt = 20, grid: GridSpec | None = None, order: Literal[1, 2, 3] = 2,
                 lower_order_final: bool = True, third_order: ThirdOrder = "taylor", eta: NonNegativeFloat = 1.0,
                 solver_type: SolverType = "midpoint") -> None:
        super().__init__(steps, grid, order, lower_order_final, third_order, eta, solver_type)
