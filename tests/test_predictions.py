"""Every prediction type converts to every other and back (property tests)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genlab.diffusion import PREDICTIONS, Level, convert, from_x0_eps, to_x0_eps

coef = st.floats(0.05, 20.0)
deriv = st.floats(-5.0, 5.0)


def make_level(alpha: float, sigma: float, d_alpha: float, d_sigma: float) -> Level:
    t = torch.tensor(0.5, dtype=torch.float64)
    return Level(t, *(torch.tensor(v, dtype=torch.float64) for v in (alpha, sigma, d_alpha, d_sigma)))


def det_ok(alpha, sigma, d_alpha, d_sigma) -> bool:
    return abs(alpha * d_sigma - sigma * d_alpha) > 1e-2 * (abs(alpha) + abs(sigma))


@settings(max_examples=200, deadline=None)
@given(alpha=coef, sigma=coef, d_alpha=deriv, d_sigma=deriv, seed=st.integers(0, 2**31 - 1),
       source=st.sampled_from(PREDICTIONS), target=st.sampled_from(PREDICTIONS))
def test_any_prediction_converts_to_any_other_and_back(alpha, sigma, d_alpha, d_sigma, seed, source, target):
    if not det_ok(alpha, sigma, d_alpha, d_sigma):
        return
    level = make_level(alpha, sigma, d_alpha, d_sigma)
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).unbind(0)
    x = alpha * x0 + sigma * eps
    out = from_x0_eps(source, x0, eps, level)
    back = convert(convert(out, source, target, x, level), target, source, x, level)
    assert torch.allclose(back, out, rtol=1e-9, atol=1e-9 * (1 + out.abs().max()))
    x0_hat, eps_hat = to_x0_eps(target, from_x0_eps(target, x0, eps, level), x, level)
    assert torch.allclose(x0_hat, x0, atol=1e-8) and torch.allclose(eps_hat, eps, atol=1e-8)


@settings(max_examples=50, deadline=None)
@given(alpha=coef, sigma=coef, seed=st.integers(0, 2**31 - 1))
def test_known_formulas(alpha, sigma, seed):
    level = make_level(alpha, sigma, -1.0, 1.0)
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 5, generator=g, dtype=torch.float64).unbind(0)
    assert torch.allclose(from_x0_eps("v", x0, eps, level), alpha * eps - sigma * x0)
    assert torch.allclose(from_x0_eps("score", x0, eps, level), -eps / sigma)
    assert torch.allclose(from_x0_eps("velocity", x0, eps, level), eps - x0)  # rectified flow's d/dt


def test_per_sample_levels_broadcast():
    level = make_level(0.8, 0.6, -0.3, 0.4)
    batched = Level(*(v.expand(3) for v in (level.t, level.alpha, level.sigma, level.d_alpha, level.d_sigma)))
    x0, eps = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64).unbind(0)
    x = 0.8 * x0 + 0.6 * eps
    for p in PREDICTIONS:
        a = to_x0_eps(p, from_x0_eps(p, x0, eps, batched), x, batched)
        assert torch.allclose(a[0], x0) and torch.allclose(a[1], eps)
