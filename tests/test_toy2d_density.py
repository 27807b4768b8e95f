"""The toy sets' closed-form densities (:func:`genlab.data.toy2d.toy2d_log_prob`): each integrates to 1
on a grid, eight_gaussians equals the Gaussian-mixture oracle after standardisation, the draws' mean
log-density agrees with the grid's entropy, and sets without a closed form say so."""

from __future__ import annotations

import math

import pytest
import torch

from genlab.data import Toy2D
from genlab.data.toy2d import toy2d, toy2d_log_prob
from genlab.testing.gaussian_mixture import GaussianMixture


def _grid(lim: float = 4.0, n: int = 800) -> tuple[torch.Tensor, float]:
    h = 2 * lim / n
    u = -lim + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    return torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2), h


@pytest.mark.parametrize("name, tol", [("eight_gaussians", 1e-6), ("rings", 1e-6), ("checkerboard", 5e-3)])
def test_density_integrates_to_one_and_matches_the_draws(name: str, tol: float) -> None:
    grid, h = _grid()
    log_p = toy2d_log_prob(name, grid)
    p = log_p.exp()
    assert abs(float(p.sum() * h * h) - 1) < tol  # checkerboard: its cell edges cut grid cells
    entropy = float(-(p * log_p.nan_to_num(neginf=0.0)).sum() * h * h)
    x = toy2d(name, 20000, torch.Generator().manual_seed(0)).double()
    assert float(-toy2d_log_prob(name, x).mean()) == pytest.approx(entropy, abs=0.03)


def test_eight_gaussians_is_the_standardised_mixture() -> None:
    s = math.sqrt(2.0**2 / 2 + 0.15**2)  # the set's exact per-coordinate std
    mix = GaussianMixture.ring(k=8, radius=2.0 / s, std=0.15 / s)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(toy2d_log_prob("eight_gaussians", x), mix.log_prob(x))
    data = Toy2D("eight_gaussians", n=10)
    assert data.has_density and torch.equal(data.log_prob(x), toy2d_log_prob("eight_gaussians", x))


def test_sets_without_a_closed_form() -> None:
    assert not Toy2D("moons", n=10).has_density
    with pytest.raises(ValueError, match="no closed-form density for 'moons'; sets with one: eight_gaussians"):
        toy2d_log_prob("moons", torch.zeros(1, 2))
