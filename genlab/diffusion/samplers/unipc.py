"""UniPC: multistep predictor (UniP) and corrector (UniC) of order 1-3, data prediction (Zhao et al.
2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models", Sec. 3
and Algorithms 1-3; B(h) variants "bh1" and "bh2").

Both are exponential integrators of the data-prediction ODE in lambda = log(alpha / sigma). From x at
t with model output m0 = x0(x_t, t), h = lambda_s - lambda_t and earlier (or, for UniC, later)
outputs m_k at lambda_k, r_k = (lambda_k - lambda_t) / h, D_k = (m_k - m0) / r_k:

    x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^-h) m0 - alpha_s B(h) sum_k rho_k D_k

with B(h) = -h ("bh1") or e^-h - 1 ("bh2"; the paper's h and e^h - 1 at -h, its data-prediction
form), and rho solving the Vandermonde system
sum_k rho_k r_k^(i-1) = i! (-h) phi_(i+1)(-h) / B(h), i = 1..K (phi_1(z) = (e^z - 1) / z,
phi_(i+1)(z) = (phi_i(z) - 1/i!) / z). UniP-p uses the p - 1 earlier outputs as nodes; UniC-p
re-does the previous step with its p - 1 earlier outputs plus the output at the new point (r = 1),
which raises the order to p + 1 at no extra model evaluation. With one node (UniP-2, UniC-1),
rho = 1/2, as in the authors' code and diffusers.

A grid that starts where alpha = 0 (lambda = -inf: rectified flow's and the trigonometric process's
t = 1, where a flow-matching sampler starts) gives the limits as lambda_t or lambda_k -> -inf: a step
from there has h = inf and r_k = inf / inf -> 1 for a finite lambda_k (:func:`node_ratio`), and a node at
lambda_k = -inf is infinitely far, its weight rho_k / r_k -> 0: it is left out (the order drops by one,
as DPM-Solver++'s D_1 = 0 there). Without this, UniC's first correction and the next Vandermonde solve
were NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ...core.bounds import PositiveInt
from ...core.registry import register
from ..grids import FAST_GRID, GridSpec
from ..levels import Level, Scalar, combine, expm1
from .base import SamplerState, StepContext
from .multistep import MultistepSampler, lam_step, phis


def node_ratio(lam_k: Scalar, lam_t: Scalar, h: Scalar) -> Scalar:
    """r_k = (lambda_k - lambda_t) / h, h = lambda_s - lambda_t; for lambda_t = -inf and finite lambda_k,
    lambda_s its limit (lambda_k - lambda_t) / (lambda_s - lambda_t) -> 1 instead of inf / inf."""
    r = (lam_k - lam_t) / h
    if isinstance(r, float):
        return 1.0 if math.isnan(r) and lam_t == -math.inf else r
    return torch.where(r.isnan() & torch.isneginf(torch.as_tensor(lam_t)), torch.ones_like(r), r)


def _at_minus_infinity(lam: Scalar) -> bool:
    """Whether lambda is -inf (alpha = 0) for the whole batch."""
    return lam == -math.inf if isinstance(lam, float) else bool(torch.isneginf(lam).all())


@dataclass
class UniPCState(SamplerState):
    """:class:`SamplerState` plus what UniC needs: the corrected sample the last predictor started
    from and that predictor's order (``None`` before the first step or without the corrector)."""

    last: tuple[Tensor, int] | None = None


def solve(a: list[list[Scalar]], b: list[Scalar]) -> list[Scalar]:
    """x with a x = b for a small K x K system, elementwise over floats or [B] tensors. Gaussian
    elimination without pivoting: meant for Vandermonde matrices with distinct nodes, whose leading
    minors are nonzero."""
    n, a, b = len(b), [list(row) for row in a], list(b)
    for k in range(n):
        for i in range(k + 1, n):
            f = a[i][k] / a[k][k]
            a[i] = [a[i][j] - f * a[k][j] for j in range(n)]
            b[i] = b[i] - f * b[k]
    x: list[Scalar] = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (b[i] - sum(a[i][j] * x[j] for j in range(i + 1, n))) / a[i][i]
    return x


@register("sampler", "unipc")
class UniPC(MultistepSampler):
    """UniPC-p: UniP-p predictor steps, each followed by UniC-p on the next step's model output.

    Args:
        steps, grid: as :class:`Sampler`; default grid :data:`~genlab.diffusion.grids.FAST_GRID`
            (uniform in log(SNR + 0.03) down to Karras sigma 0.045, then the data; the end moves
            down beyond 20 steps). diffusers' UniPC uses its spacings; plain uniform log-SNR is
            ``grid="log_snr"``.
        order: p, the order of UniP; default 2, as diffusers' ``solver_order``. With the corrector the
            method is of order p + 1. The first steps ramp up the order (multistep warm start).
        variant: B(h) = -h ("bh1") or e^-h - 1 ("bh2", diffusers' default).
        corrector: apply UniC (diffusers' ``disable_corrector`` lists steps where it is off).
        lower_order_final: the order of step i is at most N - i (the last step is first order), as
            in diffusers. A step into sigma = 0 (lambda = inf) is always first order: it returns x0
            (diffusers' bh1 gives NaN there: alpha_s B(h) * 0 with B(h) = -inf). With bh1 a step out of
            alpha = 0 (lambda = -inf, rectified flow's t = 1) is first order too, since B(h) = -h has no
            finite limit there (bh2's e^-h - 1 -> -1 has, and keeps its nodes).
    """

    default_grid = FAST_GRID
    final_order = "remaining"

    def __init__(self, steps: PositiveInt = 20, grid: GridSpec | None = None, order: Literal[1, 2, 3] = 2,
                 variant: Literal["bh1", "bh2"] = "bh2", corrector: bool = True,
                 lower_order_final: bool = True) -> None:
        super().__init__(steps, grid, order, lower_order_final)
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
        self.variant, self.corrector = variant, corrector

    @property
    def multistep(self) -> bool:
        return self.order > 1 or self.corrector

    def init_state(self, steps: int) -> UniPCState:
        return UniPCState(steps=steps)

    def rho(self, r: list[Scalar], h: Scalar, b_h: Scalar) -> list[Scalar]:
        """Weights of D_k: solve sum_k rho_k r_k^(i-1) = i! hh phi_(i+1)(hh) / B(h), hh = -h, i = 1..K."""
        if len(r) == 1:
            return [0.5]
        hh, factorial, b = -h, 1, []
        for i, phi in enumerate(phis(hh, len(r) + 1)[1:], start=1):
            factorial *= i
            b.append(factorial * hh * phi / b_h)
        return solve([[r_k ** i for r_k in r] for i in range(len(r))], b)

    def update(self, x: Tensor, level: Level, m0: Tensor, level_next: Level,
               nodes: list[tuple[Level, Tensor]]) -> Tensor:
        """x at level_next from x at level (see the module docstring); ``nodes`` are the (level, x0)
        pairs of the D_k terms: earlier ones for UniP, earlier ones and (level_next, x0) for UniC."""
        lam_t, h = lam_step(level, level_next)
        (a_s, s_s), (s_t,) = level_next.coef("alpha", "sigma"), level.coef("sigma")
        phi = expm1(-h)
        weights = [-a_s * phi]  # on m0, then on each m_k
        nodes = [(lv, m) for lv, m in nodes if not _at_minus_infinity(lv.coef("lam")[0])]
        if self.variant == "bh1" and _at_minus_infinity(lam_t):  # B(h) = -h has no limit as h -> inf:
            nodes = []  # a bh1 step out of alpha = 0 is first order (diffusers' gives NaN)
        if nodes:
            r = [node_ratio(lv.coef("lam")[0], lam_t, h) for lv, _ in nodes]
            b_h = -h if self.variant == "bh1" else phi
            c = [-a_s * b_h * rho_k / r_k for rho_k, r_k in zip(self.rho(r, h, b_h), r)]
            weights = [weights[0] - sum(c), *c]
        return combine((s_s / s_t, x), *zip(weights, [m0, *(m for _, m in nodes)]))

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        """x: the previous step's output (the predictor's, uncorrected). Evaluates x0 there, corrects
        x with UniC (using that evaluation), then returns the UniP prediction at level_next, itself
        uncorrected (as diffusers' ``step()`` returns); so the final sample is the last predictor's."""
        state = ctx.state
        if not isinstance(state, UniPCState):
            raise TypeError(f"UniPC needs a UniPCState (from UniPC.init_state), got {type(state).__name__}")
        x0 = ctx.x0(x, level)
        if self.corrector and state.last is not None:
            x_prev, p = state.last
            x = self.update(x_prev, *state.history[-1], level, [*state.history[-p:-1], (level, x0)])
        self.remember(state, level, x0)
        order = self.order_of(state, level_next)
        state.last = (x, order) if self.corrector else None
        return self.update(x, level, x0, level_next, state.history[-order:-1])
