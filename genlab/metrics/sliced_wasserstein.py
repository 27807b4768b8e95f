"""Sliced Wasserstein distance (Bonneel, Rabin, Peyre and Pfister 2015, Eq. 4; Rabin et al. 2011).

``SW_p(x, y) = ( E_theta[ W_p^p(theta . x, theta . y) ] )^(1/p)`` with theta uniform on the unit
sphere, estimated with ``n_projections`` random directions. Each 1D distance compares quantile
functions, ``W_p^p = int_0^1 |F^{-1}(u) - G^{-1}(u)|^p du``, computed exactly for empirical
measures with N != M points on the common grid of their quantile levels ``{i/N} U {j/M}``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genlab.core.errors import ShapeError


def random_directions(
    n: int, dim: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """``n`` directions uniform on the unit sphere in ``dim`` dimensions: ``[n, dim]`` (on the generator's device)."""
    device = generator.device if generator is not None else None
    theta = torch.randn(n, dim, generator=generator, dtype=dtype, device=device)
    return theta / theta.norm(dim=1, keepdim=True)


def wasserstein_1d_pow(u: Tensor, v: Tensor, p: int = 2) -> Tensor:
    """``W_p^p`` between the empirical measures of the columns: ``u: [N, P], v: [M, P] -> [P]``.

    Both quantile functions are step functions; on each interval of the merged grid of levels
    ``{i/N} U {j/M}`` both are constant, so the integral is an exact weighted sum. Levels are kept
    as integers in units of ``1/(N M)``, so the bookkeeping has no rounding; L <= N + M intervals.
    """
    n, m = u.shape[0], v.shape[0]
    u, v = u.sort(dim=0).values, v.sort(dim=0).values
    ends = torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]).unique().to(u.device)  # [L]
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    width = (ends - starts).to(u.dtype) / (n * m)
    gap = (u[starts // m] - v[starts // n]).abs()  # [L, P]
    return torch.einsum("l,lp->p", width, gap**p)


def sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    n_projections: int = 256,
    generator: torch.Generator | None = None,
    p: int = 2,
) -> Tensor:
    """Sliced p-Wasserstein distance between point sets ``x: [N, D]`` and ``y: [M, D]``: scalar.

    Differentiable in ``x`` and ``y``. With D = 1 every direction is +-1, so the result is the
    exact 1D ``W_p`` (e.g. ``scipy.stats.wasserstein_distance`` for p = 1).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        got = f"{list(x.shape)} and {list(y.shape)}"
        raise ShapeError(f"sliced_wasserstein: expected x: [N, D] and y: [M, D], got {got}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ShapeError(f"sliced_wasserstein: need at least one point in each set, got {x.shape[0]} and {y.shape[0]}")
    if p < 1 or n_projections < 1:
        raise ValueError(f"need p >= 1 and n_projections >= 1, got p={p}, n_projections={n_projections}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    theta = random_directions(n_projections, x.shape[1], generator, dtype).to(x.device)  # [P, D]
    x, y = x.to(dtype), y.to(dtype)
    return wasserstein_1d_pow(x @ theta.T, y @ theta.T, p).mean() ** (1 / p)
