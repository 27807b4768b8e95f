from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from genlab.core.errors import ShapeError
from genlab.testing import GaussianMixture

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def gm() -> GaussianMixture:
    return GaussianMixture.random(dim=3, k=4, generator=_gen(0))


def _noisy(gm: GaussianMixture, n: int, alpha: torch.Tensor, sigma: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = _gen(seed)
    x0 = gm.sample(n, generator=g, dtype=F64)
    return alpha[:, None] * x0 + sigma[:, None] * torch.randn(n, gm.dim, dtype=F64, generator=g)


COEFS = [(0.8, 0.6), (0.05, 1.0), (1.0, 0.02), (torch.linspace(0.1, 1.0, 16), torch.linspace(1.0, 0.1, 16))]


@pytest.mark.parametrize("alpha,sigma", COEFS)
def test_score_matches_autograd_of_log_prob_t(gm: GaussianMixture, alpha, sigma) -> None:
    a, s = torch.as_tensor(alpha, dtype=F64).expand(16), torch.as_tensor(sigma, dtype=F64).expand(16)
    x = _noisy(gm, 16, a, s).requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob_t(x, alpha, sigma).sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), alpha, sigma), grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("alpha,sigma", COEFS)
def test_x0_and_eps_reconstruct_x(gm: GaussianMixture, alpha, sigma) -> None:
    a, s = torch.as_tensor(alpha, dtype=F64).expand(16), torch.as_tensor(sigma, dtype=F64).expand(16)
    x = _noisy(gm, 16, a, s)
    x0, eps = gm.x0(x, alpha, sigma), gm.eps(x, alpha, sigma)
    torch.testing.assert_close(a[:, None] * x0 + s[:, None] * eps, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps, -s[:, None] * gm.score(x, alpha, sigma), rtol=1e-10, atol=1e-10)


def test_single_gaussian_closed_form() -> None:
    one = GaussianMixture.random(dim=3, k=1, generator=_gen(3))
    mu, cov = one.means[0], one.covs[0]
    alpha, sigma = 0.7, 0.5
    c = alpha**2 * cov + sigma**2 * torch.eye(3, dtype=F64)
    x = torch.randn(10, 3, dtype=F64, generator=_gen(4))
    c_inv_res = (x - alpha * mu) @ torch.linalg.inv(c)  # c is symmetric
    torch.testing.assert_close(one.score(x, alpha, sigma), -c_inv_res)
    torch.testing.assert_close(one.x0(x, alpha, sigma), mu + alpha * c_inv_res @ cov)
    torch.testing.assert_close(one.eps(x, alpha, sigma), sigma * c_inv_res)
    ref = stats.multivariate_normal(alpha * mu.numpy(), c.numpy()).logpdf(x.numpy())
    np.testing.assert_allclose(one.log_prob_t(x, alpha, sigma).numpy(), ref, rtol=1e-10)


def test_log_prob_matches_scipy(gm: GaussianMixture) -> None:
    x = gm.sample(50, generator=_gen(5), dtype=F64)
    dens = sum(
        w * stats.multivariate_normal(m, c).pdf(x.numpy())
        for w, m, c in zip(gm.weights.numpy(), gm.means.numpy(), gm.covs.numpy())
    )
    np.testing.assert_allclose(gm.log_prob(x).numpy(), np.log(dens), rtol=1e-10)


def test_x0_matches_numerical_integration_1d() -> None:
    gm = GaussianMixture([0.3, 0.5, 0.2], [[-2.0], [0.5], [3.0]], [[[0.3]], [[0.1]], [[1.0]]])
    alpha, sigma = 0.6, 0.8
    prior = lambda u: np.exp(gm.log_prob(torch.tensor([[u]], dtype=F64)).item())  # noqa: E731
    for xt in (-2.0, 0.0, 0.7, 2.5):
        joint = lambda u: prior(u) * stats.norm.pdf(xt, alpha * u, sigma)  # noqa: E731
        num = integrate.quad(lambda u: u * joint(u), -12, 12, points=[-2, 0.5, 3], epsabs=1e-13)[0]
        den = integrate.quad(joint, -12, 12, points=[-2, 0.5, 3], epsabs=1e-13)[0]
        got = gm.x0(torch.tensor([[xt]], dtype=F64), alpha, sigma).item()
        assert got == pytest.approx(num / den, rel=1e-7, abs=1e-9)
        assert np.exp(gm.log_prob_t(torch.tensor([[xt]], dtype=F64), alpha, sigma).item()) == pytest.approx(den)


def test_x0_is_the_regression_of_x0_on_xt_monte_carlo() -> None:
    """E[x0|x_t] is the least-squares predictor: its residual is uncorrelated with functions of x_t
    and it beats perturbed predictors."""
    gm = GaussianMixture.ring(k=4, radius=1.5, std=0.3)
    g, n, alpha, sigma = _gen(6), 200_000, 0.7, 0.7
    x0 = gm.sample(n, generator=g, dtype=F64)
    xt = alpha * x0 + sigma * torch.randn(n, 2, dtype=F64, generator=g)
    pred = gm.x0(xt, alpha, sigma)
    resid = x0 - pred
    for feature in (torch.ones(n, 1, dtype=F64), xt, xt.tanh(), pred):
        corr = (resid[:, :, None] * feature[:, None, :]).mean(0)
        assert corr.abs().max() < 4 * resid.std() * feature.std(0).max() / n**0.5 + 1e-3
    mse = resid.square().sum(1).mean()
    for worse in (xt / alpha, 1.1 * pred, pred + 0.05):
        assert mse < (x0 - worse).square().sum(1).mean()


def test_finite_at_alpha_zero_and_sigma_zero(gm: GaussianMixture) -> None:
    x = gm.sample(8, generator=_gen(7), dtype=F64)
    for alpha, sigma in ((0.0, 1.0), (1.0, 0.0)):
        for out in (gm.x0(x, alpha, sigma), gm.eps(x, alpha, sigma), gm.score(x, alpha, sigma)):
            assert torch.isfinite(out).all()
        assert torch.isfinite(gm.log_prob_t(x, alpha, sigma)).all()
    torch.testing.assert_close(gm.x0(x, 0.0, 1.0), gm.mean().expand(8, -1))  # no information
    torch.testing.assert_close(gm.x0(x, 1.0, 0.0), x)  # no noise
    torch.testing.assert_close(gm.eps(x, 0.0, 1.0), x)


def test_sample_moments(gm: GaussianMixture) -> None:
    x = gm.sample(200_000, generator=_gen(8), dtype=F64)
    torch.testing.assert_close(x.mean(0), gm.mean(), atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), gm.covariance(), atol=0.05, rtol=0.02)
    assert gm.sample(5).dtype == torch.get_default_dtype()


def test_ring_and_dtypes() -> None:
    ring = GaussianMixture.ring(k=6, radius=2.0, std=0.1, dim=3)
    torch.testing.assert_close(ring.means.norm(dim=1), torch.full((6,), 2.0, dtype=F64))
    assert (ring.means[:, 2] == 0).all() and ring.k == 6 and ring.dim == 3
    x = torch.randn(4, 3)
    assert ring.score(x, 0.5, 0.5).dtype == torch.float32
    assert ring.log_prob_t(x, torch.full((4,), 0.5), 0.5).shape == (4,)


def test_validation_errors() -> None:
    with pytest.raises(ShapeError, match=r"covs: expected \[K, D, D\]=\[2, 3, 3\], got \[2, 3\]"):
        GaussianMixture(torch.ones(2), torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ShapeError, match=r"weights: expected \[K\]"):
        GaussianMixture(torch.ones(3), torch.zeros(2, 1), torch.ones(2, 1, 1))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.zeros(1, 2, 2))
    gm = GaussianMixture.ring()
    with pytest.raises(ShapeError, match=r"x: expected \[B, D\] with D=2, got \[4, 3\]"):
        gm.score(torch.zeros(4, 3), 1.0, 0.5)
    with pytest.raises(ShapeError, match="alpha/sigma"):
        gm.score(torch.zeros(4, 2), torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="singular"):
        gm.score(torch.zeros(4, 2), 0.0, 0.0)
