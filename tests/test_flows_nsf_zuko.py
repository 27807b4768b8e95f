"""zuko's neural spline flows as oracles for genlab's: with zuko's weights copied
(:func:`genlab.testing.zuko_flows.flow_from_zuko_nsf`), genlab's spline coupling flow equals
``zuko.flows.NSF(passes=2)`` and its autoregressive spline flow equals the fully autoregressive ``NSF``
(log-density, forward map and inverse); the coupling's ``channel`` mask; the spline's knots at a tiny slope."""

from __future__ import annotations

import math

import pytest
import torch

from genlab.models.flows import SplineCoupling, rq_knots
from genlab.testing.zuko_flows import flow_from_zuko_nsf

zuko = pytest.importorskip("zuko")


def _zuko_nsf(features: int, passes: int | None, seed: int = 0) -> torch.nn.Module:
    """A float64 zuko NSF with every parameter moved off its initialisation (masked-out weights too)."""
    torch.manual_seed(seed)
    nsf = zuko.flows.NSF(features, bins=5, transforms=3, passes=passes, hidden_features=(16, 16)).double()
    with torch.no_grad():
        for p in nsf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return nsf


@pytest.mark.parametrize(("features", "passes"), [(2, 2), (6, 2), (5, None)])
def test_flow_equals_zuko_nsf(features: int, passes: int | None) -> None:
    nsf = _zuko_nsf(features, passes)
    ours = flow_from_zuko_nsf(nsf)
    x = 2 * torch.randn(200, features, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(ours.log_prob(x), nsf().log_prob(x), atol=1e-9, rtol=0)
    z = nsf().transform(x)
    torch.testing.assert_close(ours(x)[0], z, atol=1e-9, rtol=0)
    torch.testing.assert_close(ours.inverse(z)[0], x, atol=1e-7, rtol=0)


def test_flow_from_zuko_nsf_rejects_what_it_cannot_carry() -> None:
    with pytest.raises(ValueError, match="randperm"):
        flow_from_zuko_nsf(zuko.flows.NSF(4, transforms=2, randperm=True))
    with pytest.raises(ValueError, match="even number"):
        flow_from_zuko_nsf(zuko.flows.NSF(5, transforms=2, passes=2))
    with pytest.raises(ValueError, match="context"):
        flow_from_zuko_nsf(zuko.flows.NSF(4, 3, transforms=2))


def test_channel_mask_keeps_halves() -> None:
    first, second = SplineCoupling(6, mask="channel"), SplineCoupling(6, mask="channel", parity=1)
    assert first.kept.tolist() == [0, 1, 2] and first.changed.tolist() == [3, 4, 5]
    assert second.kept.tolist() == [3, 4, 5] and second.changed.tolist() == [0, 1, 2]
    assert SplineCoupling(6).kept.tolist() == [0, 2, 4]  # the default: checkerboard (even / odd)
    with pytest.raises(ValueError, match="mask must be"):
        SplineCoupling(6, mask="halves")


def test_knots_at_a_tiny_slope_equal_zuko() -> None:
    """Soft-clipped widths of 3000 at slope 1e-100 are 111 (|log slope| / 2 = 115 at most): exp overflows float32
    unless shifted."""
    slope, bound = 1e-100, 5.0
    params = torch.cat([torch.tensor([[3000.0, -3000.0, 0.0]]).repeat(1, 2), torch.zeros(1, 2)], -1)
    ref = zuko.transforms.MonotonicRQSTransform(*params.double().split([3, 3, 2], -1), bound=bound, slope=slope)
    xk, yk, dk = rq_knots(params, bound, slope)
    assert torch.isfinite(xk).all() and torch.isfinite(yk).all()
    torch.testing.assert_close(xk.double(), ref.horizontal, atol=1e-5, rtol=0)
    torch.testing.assert_close(yk.double(), ref.vertical, atol=1e-5, rtol=0)
    assert math.isclose(float(dk[0, 0]), 1.0) and math.isclose(float(dk[0, -1]), 1.0)
