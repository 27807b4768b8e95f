"""The compiled assignment solver (genlab.metrics.auction): exact against SciPy's linear_sum_assignment and
POT's emd on random, tied, clustered and extreme costs; the auction stage ends in epsilon-complementary
slackness; the shortest-augmenting-path stage is exact from any potentials and any start; bad input is
refused; transport.assignment picks it for square costs and keeps SciPy for the rest."""

from __future__ import annotations

import numpy as np
import ot
import pytest
from scipy.optimize import linear_sum_assignment

from genlab.metrics import auction
from genlab.metrics.transport import assignment

pytestmark = pytest.mark.skipif(not auction.AVAILABLE, reason="needs numba")


def optimum(cost: np.ndarray) -> float:
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].sum())


def total(cost: np.ndarray, cols: np.ndarray) -> float:
    assert sorted(cols.tolist()) == list(range(len(cost))), "not a permutation"
    return float(cost[np.arange(len(cost)), cols].sum())


def costs(seed: int):
    """(name, cost) pairs: uniform, integer (many ties), squared distances of clustered 2-D points, scaled."""
    rng = np.random.default_rng(seed)
    for n in (1, 2, 3, 7, 33, 100):
        yield f"uniform{n}", rng.random((n, n))
        yield f"ties{n}", rng.integers(0, 3, (n, n)).astype(float)
    centres = 4 * rng.normal(size=(8, 2))
    x = centres[np.arange(200) % 8] + 0.05 * rng.normal(size=(200, 2))
    y = np.stack([np.cos(np.linspace(0, 6, 200)), np.sin(np.linspace(0, 6, 200))], 1) * 3
    d = ((x[:, None] - y[None]) ** 2).sum(-1)
    for scale in (1e-8, 1.0, 1e8):
        yield f"clustered*{scale:g}", scale * d


@pytest.mark.parametrize("seed", [0, 1])
def test_solve_reaches_scipy_s_optimum(seed):
    for name, cost in costs(seed):
        got, want = total(cost, auction.solve(cost)), optimum(cost)
        assert abs(got - want) <= 1e-10 * max(abs(want), 1e-300) + 1e-300, (name, got, want)


def test_solve_has_the_cost_of_pot_emd_on_a_batch_of_1024():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(size=(512, 2)) * 0.3 + 5, rng.normal(size=(512, 2)) * 0.3 - 5])
    y = rng.normal(size=(1024, 2))
    cost = ((x[:, None] - y[None]) ** 2).sum(-1)
    n = len(cost)
    want = float((ot.emd(ot.unif(n), ot.unif(n), cost) * cost).sum()) * n
    assert abs(total(cost, auction.solve(cost)) - want) <= 1e-9 * want


def test_the_auction_ends_in_epsilon_complementary_slackness():
    """Each row holds a column within eps_min of its cheapest under the final prices (Bertsekas 1988, Eq. 5),
    so the auction's own total is within n * eps_min of the optimum (in the normalised cost's units, up to
    its float32 rounding)."""
    rng = np.random.default_rng(2)
    cost = rng.random((80, 80)) * 7 - 3
    low, spread = cost.min(), np.ptp(cost)
    scaled = auction._normalised(cost, low, spread)
    assert scaled.dtype == np.float32 and scaled.min() == 0 and abs(scaled.max() - 1) < 1e-7
    eps_min = 1e-3
    cols, prices = auction._auction(scaled, 0.5, eps_min, 4.0)
    reduced = scaled.astype(np.float64) + prices[None, :]
    held = reduced[np.arange(80), cols]
    assert sorted(cols.tolist()) == list(range(80))
    assert np.all(held <= reduced.min(axis=1) + eps_min + 1e-6)
    assert total(cost, cols) <= optimum(cost) + 80 * (eps_min + 1e-6) * spread


def test_the_augmenting_stage_is_exact_from_any_potentials_and_any_start():
    """The second stage alone is a complete solver: from random column potentials and a random start it
    returns an optimal permutation and optimal duals (u_i + v_j <= C_ij, equality on the permutation)."""
    rng = np.random.default_rng(5)
    for trial in range(10):
        n = int(rng.integers(1, 60))
        cost = rng.random((n, n)) * 10 if trial % 2 else rng.integers(0, 4, (n, n)).astype(float)
        cols, u, v = auction._finish(cost, 5 * rng.normal(size=n), rng.permutation(n))
        assert abs(total(cost, cols) - optimum(cost)) <= 1e-9 * max(1.0, optimum(cost))
        reduced = cost - u[:, None] - v[None, :]
        assert reduced.min() >= -1e-9 and np.abs(reduced[np.arange(n), cols]).max() <= 1e-9


def test_constant_and_empty_costs_and_bad_input():
    assert auction.solve(np.full((4, 4), 2.5)).tolist() == [0, 1, 2, 3]
    assert auction.solve(np.zeros((0, 0))).tolist() == []
    with pytest.raises(ValueError, match="square"):
        auction.solve(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="theta > 1"):
        auction.solve(np.eye(3), theta=1.0)
    with pytest.raises(ValueError, match="0 < stop <= start"):
        auction.solve(np.eye(3), stop=0.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        auction.solve(np.array([[0.0, np.inf], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="solver must be"):
        assignment(np.zeros((2, 2)), solver="hungarian")
    with pytest.raises(ValueError, match="square cost and numba"):
        assignment(np.zeros((2, 3)), solver="auction")


def test_assignment_uses_the_auction_for_square_costs_and_scipy_for_rectangular_ones(monkeypatch):
    calls = []
    monkeypatch.setattr(auction, "solve", lambda cost: calls.append(cost.shape) or np.arange(len(cost)))
    assignment(np.random.default_rng(0).random((5, 5)))
    assert calls == [(5, 5)]
    cols = assignment(np.array([[3.0, 1.0, 2.0]]))
    assert calls == [(5, 5)] and cols.tolist() == [1]
    assignment(np.random.default_rng(0).random((5, 5)), solver="scipy")
    assert calls == [(5, 5)]
    monkeypatch.setattr(auction, "AVAILABLE", False)  # without numba: SciPy, the same optimum
    cost = np.random.default_rng(1).random((70, 70))
    assert calls == [(5, 5)] and abs(total(cost, assignment(cost)) - optimum(cost)) < 1e-12


def test_squared_distances_equal_the_explicit_differences():
    import torch

    from genlab.metrics.transport import squared_distances

    g = torch.Generator().manual_seed(0)
    for shape in [(2,), (64,), (1, 4, 4)]:
        x0, x1 = torch.randn(7, *shape, generator=g), torch.randn(5, *shape, generator=g)
        explicit = (x0.double().flatten(1)[:, None] - x1.double().flatten(1)[None]).square().sum(-1)
        got = squared_distances(x0, x1)
        assert got.dtype == torch.float64 and got.shape == (7, 5)
        torch.testing.assert_close(got, explicit, rtol=1e-12, atol=1e-12)
    same = squared_distances(x0, x0)
    assert bool((same >= 0).all()) and float(same.diagonal().abs().max()) < 1e-12
