"""Conditional probability paths of flow matching, in genlab's time convention.

**Convention.** t = 0 is the data, t = 1 the source, as in ``genlab.diffusion``'s processes (sampling
integrates from t = 1 down to t = 0). Names follow torchcfm and :mod:`.couplings`: ``x0`` [B, ...] is
the source (noise), ``x1`` [B, ...] the data (``genlab.diffusion`` calls the data x0; here it is x1).
Every path is linear in (x1, x0, eps), eps ~ N(0, I) [B, ...]:

    x_t = a(t) x1 + b(t) x0 + s(t) eps,        a(0) = 1, b(0) = 0;  a(1) = 0, b(1) = 1,
    u_t = d x_t / dt = a'(t) x1 + b'(t) x0 + s'(t) eps,

the conditional velocity in genlab's time: a network trained on it is integrated from t = 1 to 0.
torchcfm (and the papers) run time the other way, tau = 0 at the source and tau = 1 at the data, so

    tau = 1 - t,    x_t (genlab) = x_tau (torchcfm),    u_t (genlab) = -u_tau (torchcfm),

and the score of p_t(x | x0, x1) = N(a x1 + b x0, s^2 I) is -eps / s(t) in both. With sigma = 0,
``cond_ot`` is :class:`genlab.diffusion.RectifiedFlow` (alpha = 1 - t on the data, sigma = t on the
noise, velocity = noise - data).

Registered in namespace ``path``: ``cond_ot``, ``variance_preserving``, ``schrodinger_bridge``.
Coefficients are computed from t in float64 (float32 on devices without float64) and cast to the
samples' dtype, so float32 data stays float32; every tensor stays on the inputs' device.
"""

from __future__ import annotations

import math
from typing import Annotated, NamedTuple

import torch
from torch import Tensor

from ..core.bounds import NonNegativeFloat, PositiveFloat, Range
from ..core.errors import ShapeError
from ..core.registry import register, register_namespace
from ..diffusion.levels import Scalar, broadcast, combine, level_dtype
from .base import ShowsFields


class PathCoefficients(NamedTuple):
    """a, b, s of x_t = a x1 + b x0 + s eps and their t-derivatives: each a tensor shaped like t ([B] or
    []) or, where it does not depend on t, a float (no tensor operation per step for a constant)."""

    data: Scalar
    source: Scalar
    noise: Scalar
    d_data: Scalar
    d_source: Scalar
    d_noise: Scalar


class PathPoint(NamedTuple):
    """x_t [B, ...], the target velocity u_t = d x_t / dt [B, ...] and the noise eps [B, ...] used."""

    x_t: Tensor
    velocity: Tensor
    eps: Tensor


class Path(ShowsFields):
    """Base class: subclasses define :meth:`coefficients` (a, b, s and their derivatives at t)."""

    def coefficients(self, t: Tensor) -> PathCoefficients:
        raise NotImplementedError

    def _coefficients(self, t: Tensor) -> PathCoefficients:
        return self.coefficients(t.to(level_dtype(t.device)))

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor, eps: Tensor | None = None,
               generator: torch.Generator | None = None) -> PathPoint:
        """x_t and u_t for source x0 [B, ...], data x1 [B, ...] (one shape), times t [B] (or []) and noise
        eps [B, ...] (None: drawn from ``generator`` on x1's device, in x1's dtype)."""
        who = type(self).__name__
        if x0.shape != x1.shape:
            raise ShapeError(f"{who}: x0 (source) and x1 (data) must have one shape, got {list(x0.shape)} and "
                             f"{list(x1.shape)}")
        if not (t.ndim == 0 or (t.ndim == 1 and x1.ndim >= 1 and len(t) == x1.shape[0])):
            raise ShapeError(f"{who}: t must have shape [{x1.shape[0] if x1.ndim else 'B'}] (one time per row) or [], "
                             f"got {list(t.shape)}")
        if eps is None:
            eps = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        elif eps.shape != x1.shape:
            raise ShapeError(f"{who}: eps must have the shape of x1, {list(x1.shape)}, got {list(eps.shape)}")
        c = self._coefficients(t)
        x_t = _linear((c.data, x1), (c.source, x0), (c.noise, eps))
        u_t = _linear((c.d_data, x1), (c.d_source, x0), (c.d_noise, eps))
        return PathPoint(x_t, u_t, eps)

    def mean_std(self, x0: Tensor, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The mean mu_t = a x1 + b x0 [B, ...] and std s(t) (shaped like t, float64) of p_t(x | x0, x1)."""
        c = self._coefficients(t)
        return _linear((c.data, x1), (c.source, x0)), as_tensor_like(c.noise, t)

    def score(self, t: Tensor, eps: Tensor) -> Tensor:
        """The score target grad_x log p_t(x_t | x0, x1) = -(x_t - mu_t) / s^2 = -eps / s(t) [B, ...] for the
        eps of :meth:`sample` (defined where s(t) > 0)."""
        s = as_tensor_like(self._coefficients(t).noise, t)
        return -eps / broadcast(s, eps).to(dtype=eps.dtype, device=eps.device)


def as_tensor_like(value: Scalar, t: Tensor) -> Tensor:
    """A path coefficient as a tensor shaped like t: itself, or a constant filled in the levels' dtype
    on t's device."""
    if torch.is_tensor(value):
        return value
    return torch.full(t.shape, value, dtype=level_dtype(t.device), device=t.device)


def _linear(*terms: tuple[Scalar, Tensor]) -> Tensor:
    """:func:`~genlab.diffusion.levels.combine` of the terms whose weight is not the constant 0.0 (a path's
    noise terms at sigma = 0, u_t's noise term on a constant-std path): one multiply-add fewer each."""
    kept = [(w, v) for w, v in terms if torch.is_tensor(w) or w != 0.0]
    return combine(*kept) if kept else torch.zeros_like(terms[0][1])


register_namespace("path", Path, "conditional probability paths of flow matching")


@register("path", "cond_ot")
class CondOT(Path):
    """The straight path of (OT-)CFM / rectified flow with a constant std (Tong et al. 2023, Eqs. 14-15;
    Lipman et al. 2023; Liu et al. 2023; torchcfm's ``ConditionalFlowMatcher(sigma)``), in genlab time:

        x_t = (1 - t) x1 + t x0 + sigma eps,    u_t = x0 - x1.

    Args:
        sigma: the path's constant std (>= 0; 0: the deterministic interpolation of rectified flow).
    """

    def __init__(self, sigma: NonNegativeFloat = 0.0) -> None:
        self.sigma = sigma

    def coefficients(self, t: Tensor) -> PathCoefficients:
        return PathCoefficients(1 - t, t, float(self.sigma), -1.0, 1.0, 0.0)


@register("path", "variance_preserving")
class VariancePreserving(Path):
    """The trigonometric (variance-preserving) interpolant (Albergo & Vanden-Eijnden 2023, Eq. 5; Albergo
    et al. 2023, "Stochastic interpolants"; torchcfm's ``VariancePreservingConditionalFlowMatcher``), in
    genlab time (torchcfm's cos(pi tau / 2) x0 + sin(pi tau / 2) x1 at tau = 1 - t):

        x_t = cos(pi t / 2) x1 + sin(pi t / 2) x0 + sigma eps,
        u_t = pi / 2 (cos(pi t / 2) x0 - sin(pi t / 2) x1).

    Args:
        sigma: the constant std (>= 0; torchcfm's default 0).
    """

    def __init__(self, sigma: NonNegativeFloat = 0.0) -> None:
        self.sigma = sigma

    def coefficients(self, t: Tensor) -> PathCoefficients:
        c, s = torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)
        return PathCoefficients(c, s, float(self.sigma), -math.pi / 2 * s, math.pi / 2 * c, 0.0)


#: t_eps of the Schrödinger bridge: a number in (0, 1/2), the fraction of [0, 1] left out at each end
BridgeEnd = Annotated[float, Range(gt=0, lt=0.5)]


@register("path", "schrodinger_bridge")
class SchrodingerBridge(Path):
    """The Brownian-bridge path of Schrödinger-bridge CFM (Tong et al. 2023, Eqs. 20-21; SF2M, Tong et al.
    2024; torchcfm's ``SchrodingerBridgeConditionalFlowMatcher(sigma)``), symmetric in t <-> 1 - t:

        x_t = (1 - t) x1 + t x0 + sigma sqrt(t (1 - t)) eps,
        u_t = x0 - x1 + (1 - 2 t) / (2 t (1 - t)) (x_t - mu_t) = x0 - x1 + sigma (1 - 2t) / (2 sqrt(t (1 - t))) eps,

    (torchcfm's target at tau = 1 - t, negated; torchcfm adds 1e-8 to the denominator, genlab does not:
    t must lie in (0, 1)). Pair it with ``coupling: {type: sinkhorn, reg: 2 sigma^2}``.

    :meth:`score` is -eps / (sigma sqrt(t (1 - t))); :meth:`score_weight` is SF2M's lambda(t).

    **The ends.** u_t's noise term has variance sigma^2 (1 - 2t)^2 / (4 t (1 - t)) per coordinate, whose
    mean over t ~ U(0, 1) diverges (logarithmically, at both ends); over U[t_eps, 1 - t_eps] it is
    sigma^2 ((1/2) ln((1 - t_eps) / t_eps) - (1 - 2 t_eps)) / (1 - 2 t_eps): 2.46 sigma^2 for the default
    t_eps = 1e-3 (8.2 sigma^2 for torchcfm's effective 1e-8), and the target's largest std is
    sigma / (2 sqrt(t_eps)) = 15.8 sigma. So genlab trains on [t_eps, 1 - t_eps] (:meth:`clamp` is where a
    network trained on it is evaluated); t_eps = 1e-3 is also the default t_min of ``rectified_flow``, the
    process the bridge samples on.

    Args:
        sigma: the bridge's noise scale g (> 0).
        t_eps: the training times' distance to each end (0 < t_eps < 1/2).
    """

    def __init__(self, sigma: PositiveFloat = 1.0, t_eps: BridgeEnd = 1e-3) -> None:
        self.sigma, self.t_eps = sigma, t_eps

    def coefficients(self, t: Tensor) -> PathCoefficients:
        root = torch.sqrt(t * (1 - t))
        return PathCoefficients(1 - t, t, self.sigma * root, -1.0, 1.0, self.sigma * (1 - 2 * t) / (2 * root))

    def score_weight(self, t: Tensor) -> Tensor:
        """lambda(t) = 2 s(t) / sigma^2 (SF2M, Tong et al. 2024, Eq. 23; torchcfm's ``compute_lambda``, less its
        1e-8), shaped like t. torchcfm's SF2M loss |lambda(t) s_theta + eps|^2 trains s_theta towards
        -eps / lambda = (sigma^2 / 2) * :meth:`score`, the score term g^2 / 2 grad log p_t of the bridge's SDE drift."""
        return 2 * self._coefficients(t).noise / self.sigma**2

    def clamp(self, t: Tensor) -> Tensor:
        """t [any shape] clamped into [t_eps, 1 - t_eps], the training times."""
        return t.clamp(self.t_eps, 1 - self.t_eps)
