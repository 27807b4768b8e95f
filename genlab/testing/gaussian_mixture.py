"""An exact Gaussian-mixture oracle for diffusion tests.

Data ``x0 ~ sum_k w_k N(mu_k, Sigma_k)`` is noised as ``x_t = alpha * x0 + sigma * eps`` with
``eps ~ N(0, I)`` (EDM, Karras et al. 2022, Sec. 2). Then ``x_t`` is again a mixture,
``sum_k w_k N(alpha mu_k, C_k)`` with ``C_k = alpha^2 Sigma_k + sigma^2 I``, and the posterior of
``x0`` given ``x_t`` within component k is Gaussian with mean
``mu_k + alpha Sigma_k C_k^{-1} (x_t - alpha mu_k)`` (Bishop, PRML, Eq. 2.116). Everything a
denoiser should learn (score, ``E[x0 | x_t]``, ``E[eps | x_t]``) is therefore available in closed form.

All computation is float64; outputs take the dtype of the input ``x``.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from genlab.core.errors import ShapeError

Coef = Tensor | float


class GaussianMixture:
    """A mixture of K full-covariance Gaussians in D dimensions.

    ``r_k = p(k | x_t)`` below are the posterior responsibilities, a softmax over
    ``log w_k + log N(x_t; alpha mu_k, C_k)``.

    Args:
        weights: ``[K]`` non-negative mixture weights (normalised to sum to one).
        means: ``[K, D]`` component means ``mu_k``.
        covs: ``[K, D, D]`` symmetric positive-definite covariances ``Sigma_k``.
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor) -> None:
        weights, means, covs = (torch.as_tensor(v, dtype=torch.float64) for v in (weights, means, covs))
        if means.ndim != 2:
            raise ShapeError(f"means: expected [K, D], got {list(means.shape)}")
        k, d = means.shape
        if weights.shape != (k,):
            raise ShapeError(f"weights: expected [K]=[{k}] to match means, got {list(weights.shape)}")
        if covs.shape != (k, d, d):
            raise ShapeError(f"covs: expected [K, D, D]=[{k}, {d}, {d}], got {list(covs.shape)}")
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights.tolist()}")
        if not torch.allclose(covs, covs.mT):
            raise ValueError("covs must be symmetric")
        chol, info = torch.linalg.cholesky_ex(covs)
        if (info != 0).any():
            raise ValueError(f"covs must be positive definite; components {info.nonzero().flatten().tolist()} are not")
        self.weights, self.means, self.covs, self._chol = weights / weights.sum(), means, covs, chol

    @property
    def k(self) -> int:
        """Number of components K."""
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        """Data dimension D."""
        return self.means.shape[1]

    # ----- constructors ---------------------------------------------------------------------
    @classmethod
    def ring(cls, k: int = 8, radius: float = 2.0, std: float = 0.15, dim: int = 2) -> GaussianMixture:
        """K equal-weight isotropic components with means on a circle in the first two coordinates."""
        if dim < 2:
            raise ValueError(f"ring needs dim >= 2, got {dim}")
        angle = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
        means = torch.zeros(k, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * angle.cos(), radius * angle.sin()
        covs = (std**2) * torch.eye(dim, dtype=torch.float64).expand(k, dim, dim)
        return cls(torch.ones(k), means, covs)

    @classmethod
    def random(
        cls, dim: int, k: int, generator: torch.Generator | None = None, scale: float = 1.0
    ) -> GaussianMixture:
        """Random mixture: means ``~ N(0, (2 scale)^2 I)``, covariances ``Q diag(lam) Q^T`` with a
        random rotation Q and eigenvalues ``lam in [0.05, 0.5] * scale^2``, weights in [0.5, 1.5]
        before normalisation (so no component is negligible)."""
        opts = dict(dtype=torch.float64, generator=generator)
        means = 2 * scale * torch.randn(k, dim, **opts)
        q, _ = torch.linalg.qr(torch.randn(k, dim, dim, **opts))
        lam = scale**2 * (0.05 + 0.45 * torch.rand(k, dim, **opts))
        covs = q @ torch.diag_embed(lam) @ q.mT
        weights = 0.5 + torch.rand(k, **opts)
        return cls(weights, means, (covs + covs.mT) / 2)

    # ----- the data distribution ------------------------------------------------------------
    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """Draw ``x0``: ``[n, D]`` in ``dtype`` (default: torch's default dtype)."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[idx] + torch.einsum("nij,nj->ni", self._chol[idx], z)
        return x.to(dtype or torch.get_default_dtype())

    def mean(self) -> Tensor:
        """``E[x0]``: ``[D]`` float64."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """``Cov[x0] = sum_k w_k (Sigma_k + mu_k mu_k^T) - m m^T``: ``[D, D]`` float64."""
        outer = torch.einsum("ki,kj->kij", self.means, self.means)
        second = torch.einsum("k,kij->ij", self.weights, self.covs + outer)
        m = self.mean()
        return second - torch.outer(m, m)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x0)``: ``x: [B, D] -> [B]``."""
        return self.log_prob_t(x, 1.0, 0.0)

    # ----- the noisy distribution p_t(x_t) --------------------------------------------------
    def log_prob_t(self, x: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
        """``log p_t(x)`` of ``x_t``, a mixture of ``N(alpha mu_k, C_k)``: ``x: [B, D] -> [B]``."""
        log_joint, _, _ = self._components(x, alpha, sigma)
        return torch.logsumexp(log_joint, dim=-1).to(x.dtype)

    def score(self, x: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
        """``grad_x log p_t(x) = -sum_k r_k C_k^{-1} (x - alpha mu_k)``: ``x: [B, D] -> [B, D]``."""
        log_joint, c_inv_res, _ = self._components(x, alpha, sigma)
        return -self._average(log_joint, c_inv_res).to(x.dtype)

    def x0(self, x: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
        """``E[x0 | x_t = x] = sum_k r_k (mu_k + alpha Sigma_k C_k^{-1} (x - alpha mu_k))``:
        ``x: [B, D] -> [B, D]``. Finite at ``alpha = 0`` and, for full-rank Sigma_k, at ``sigma = 0``."""
        return self.x0_eps(x, alpha, sigma)[0]

    def x0_eps(self, x: Tensor, alpha: Coef, sigma: Coef) -> tuple[Tensor, Tensor]:
        """``(x0(x), eps(x))`` from one pass over the components (what a denoiser returns)."""
        log_joint, c_inv_res, a = self._components(x, alpha, sigma)
        post = self.means.to(x.device) + a * torch.einsum("kij,bkj->bki", self.covs.to(x.device), c_inv_res)
        s = rearrange(self._coef(sigma, x), "b -> b 1")
        return self._average(log_joint, post).to(x.dtype), (s * self._average(log_joint, c_inv_res)).to(x.dtype)

    def eps(self, x: Tensor, alpha: Coef, sigma: Coef) -> Tensor:
        """``E[eps | x_t = x] = sum_k r_k sigma C_k^{-1} (x - alpha mu_k) = -sigma * score``:
        ``x: [B, D] -> [B, D]``. Satisfies ``x = alpha * x0(x) + sigma * eps(x)`` exactly."""
        return self.x0_eps(x, alpha, sigma)[1]

    # ----- shared linear algebra ------------------------------------------------------------
    def _coef(self, v: Coef, x: Tensor) -> Tensor:
        """A scalar or ``[B]`` coefficient as a float64 ``[B or 1]`` tensor."""
        v = torch.as_tensor(v, dtype=torch.float64, device=x.device)
        if v.ndim > 1 or (v.ndim == 1 and v.shape[0] not in (1, x.shape[0])):
            raise ShapeError(f"alpha/sigma: expected a scalar or [B]=[{x.shape[0]}], got {list(v.shape)}")
        return v.reshape(-1)

    def _components(self, x: Tensor, alpha: Coef, sigma: Coef) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component quantities at ``x_t = x``.

        Returns ``log(w_k N(x; alpha mu_k, C_k))``: ``[B, K]``, ``C_k^{-1} (x - alpha mu_k)``:
        ``[B, K, D]`` and ``alpha``: ``[B or 1, 1, 1]``.
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ShapeError(f"x: expected [B, D] with D={self.dim}, got {list(x.shape)}")
        x64 = x.to(torch.float64)
        a = rearrange(self._coef(alpha, x), "b -> b 1 1")
        s = rearrange(self._coef(sigma, x), "b -> b 1 1 1")
        eye = torch.eye(self.dim, dtype=torch.float64, device=x.device)
        cov = a[..., None] ** 2 * self.covs.to(x.device) + s**2 * eye
        chol, info = torch.linalg.cholesky_ex(cov)  # [B or 1, K, D, D]
        if (info != 0).any():
            raise ValueError("C_k = alpha^2 Sigma_k + sigma^2 I is singular (alpha = sigma = 0?)")
        res = rearrange(x64, "b d -> b 1 d") - a * self.means.to(x.device)  # [B, K, D]
        chol_inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)  # L^{-1}, D x D
        white = torch.einsum("bkij,bkj->bki", chol_inv, res)  # L^{-1} r
        c_inv_res = torch.einsum("bkji,bkj->bki", chol_inv, white)  # L^{-T} L^{-1} r = C^{-1} r
        log_det = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # [B or 1, K]
        log_normal = -0.5 * (self.dim * math.log(2 * math.pi) + log_det + white.square().sum(-1))
        return self.weights.to(x.device).log() + log_normal, c_inv_res, a

    @staticmethod
    def _average(log_joint: Tensor, per_component: Tensor) -> Tensor:
        """Average ``[B, K, D]`` over components with responsibilities ``softmax_k(log_joint)``."""
        return torch.einsum("bk,bkd->bd", log_joint.softmax(dim=-1), per_component)

    def __repr__(self) -> str:
        return f"GaussianMixture(k={self.k}, dim={self.dim})"
