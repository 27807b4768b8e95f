"""Frechet distance between Gaussians fitted to two feature sets (FID: Heusel et al. 2017, Eq. 6).

``d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, the squared 2-Wasserstein distance
between N(mu_a, S_a) and N(mu_b, S_b) (Dowson and Landau 1982). ``S_a S_b`` is similar to the
symmetric PSD matrix ``M = S_a^(1/2) S_b S_a^(1/2)``, so ``Tr (S_a S_b)^(1/2) = sum_i sqrt(lambda_i(M))``,
computed with two symmetric eigen-decompositions in float64; tiny negative eigenvalues from rounding
are clamped to zero. (pytorch-fid instead calls ``scipy.linalg.sqrtm`` on the non-symmetric product.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from genlab.core.errors import ShapeError

F64 = torch.float64


def _f64(x: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(x).detach().to(device="cpu", dtype=F64)


def _psd_sqrt(s: Tensor) -> Tensor:
    """``S^(1/2)`` of a symmetric PSD ``s: [F, F]``, eigenvalues clamped at zero."""
    lam, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * lam.clamp(min=0).sqrt()) @ v.T


def gaussian_frechet(mu1: Tensor, s1: Tensor, mu2: Tensor, s2: Tensor) -> float:
    """Frechet distance ``d^2`` between N(mu1, s1) and N(mu2, s2): means ``[F]``, covariances ``[F, F]``.

    Computed in float64 (tensors or arrays accepted) and clamped at zero against rounding.
    """
    mu1, s1, mu2, s2 = map(_f64, (mu1, s1, mu2, s2))
    f = mu1.shape[0] if mu1.ndim == 1 else -1
    if any(m.shape != (f,) for m in (mu1, mu2)) or any(s.shape != (f, f) for s in (s1, s2)):
        shapes = ", ".join(str(list(t.shape)) for t in (mu1, s1, mu2, s2))
        raise ShapeError(f"gaussian_frechet: expected mu: [F], s: [F, F] for both Gaussians, got {shapes}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean
    return max(d2.item(), 0.0)


def mean_cov(x: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    """Mean ``[F]`` and unbiased covariance ``[F, F]`` of ``x: [N, F]``, in float64."""
    x = _f64(x)
    return x.mean(0), torch.cov(x.T, correction=1).reshape(x.shape[1], x.shape[1])


def frechet_distance(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to features ``a: [N, F]`` and ``b: [M, F]`` (FID's d^2).

    Means and unbiased covariances (as in pytorch-fid) are estimated in float64; N, M >= 2. The
    estimate is biased upwards for finite N (Chong and Forsyth 2020): compare values at equal N only.
    """
    a, b = _f64(a), _f64(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ShapeError(f"frechet_distance: expected a: [N, F] and b: [M, F], got {list(a.shape)} and {list(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ShapeError(f"frechet_distance: need at least 2 rows in each set, got {a.shape[0]} and {b.shape[0]}")
    return gaussian_frechet(*mean_cov(a), *mean_cov(b))
