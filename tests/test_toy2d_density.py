"""The exact densities of the toy sets that have one (eight_gaussians, checkerboard, rings): each integrates
to 1 on a grid, and the mean log-density of a large draw (a Monte Carlo estimate of -entropy) agrees with
the grid's integral of p log p, so the density is the one the sampler draws from."""

from __future__ import annotations

import pytest
import torch

from genlab.data.toy2d import Toy2D, toy2d, toy2d_log_prob

F64 = torch.float64


@pytest.mark.parametrize("name", ["eight_gaussians", "checkerboard", "rings"])
def test_density_integrates_to_one_and_matches_the_draws(name):
    side = torch.linspace(-4, 4, 401, dtype=F64)
    tol = 2e-2 if name == "checkerboard" else 1e-4  # a jump along the cells' edges: a quadrature error O(h)
    h = float(side[1] - side[0])
    grid = torch.cartesian_prod(side, side)
    log_p = toy2d_log_prob(name, grid)
    p = log_p.exp()
    assert abs(float(p.sum()) * h * h - 1) < tol
    neg_entropy = float((p * torch.where(p > 0, log_p, 0)).sum()) * h * h
    x = toy2d(name, 100_000, torch.Generator().manual_seed(0)).double()
    lp = toy2d_log_prob(name, x)
    assert torch.isfinite(lp).all()
    assert abs(float(lp.mean()) - neg_entropy) < 4 * float(lp.std()) / 100_000**0.5 + tol


def test_sets_without_a_closed_form_and_the_dataset_method():
    x = torch.zeros(3, 2)
    for name in ("moons", "swiss_roll"):
        with pytest.raises(ValueError, match=f"no closed-form density for '{name}'; sets with one: eight_gaussians"):
            toy2d_log_prob(name, x)
        assert not Toy2D(name, n=10).has_density
    data = Toy2D("eight_gaussians", n=10)
    assert data.has_density
    torch.testing.assert_close(data.log_prob(data.data), toy2d_log_prob("eight_gaussians", data.data))
