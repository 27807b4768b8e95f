from __future__ import annotations

import pytest
import torch
from scipy import stats

from genlab.core.errors import ShapeError
from genlab.metrics import sliced_wasserstein

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_zero_for_identical_sets() -> None:
    x = torch.randn(100, 3, generator=_gen(0))
    assert sliced_wasserstein(x, x, generator=_gen(1)).item() == 0.0
    assert sliced_wasserstein(x, x[torch.randperm(100, generator=_gen(2))]).item() == 0.0


@pytest.mark.parametrize("n,m", [(50, 50), (37, 53), (1, 20), (64, 16)])
def test_1d_matches_scipy(n: int, m: int) -> None:
    g = _gen(n * 100 + m)
    x, y = torch.randn(n, 1, dtype=F64, generator=g), 2 * torch.randn(m, 1, dtype=F64, generator=g) + 0.5
    ref = stats.wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy())
    got = sliced_wasserstein(x, y, n_projections=8, generator=g, p=1)
    assert got.item() == pytest.approx(ref, rel=1e-12)


def test_1d_p2_equal_sizes_is_rms_of_sorted_differences() -> None:
    x, y = torch.randn(40, 1, dtype=F64, generator=_gen(3)), torch.rand(40, 1, dtype=F64, generator=_gen(4))
    ref = (x.sort(0).values - y.sort(0).values).square().mean().sqrt()
    torch.testing.assert_close(sliced_wasserstein(x, y, n_projections=4), ref)


def test_translation() -> None:
    """Shifting a set by c shifts every projection by theta . c, so SW_2^2 = E[(theta . c)^2] = |c|^2 / D."""
    x = torch.randn(500, 3, dtype=F64, generator=_gen(5))
    c = torch.tensor([1.0, 2.0, -1.0], dtype=F64)
    sw2 = sliced_wasserstein(x, x + c, n_projections=20_000, generator=_gen(6))
    assert sw2.item() ** 2 == pytest.approx(c.square().sum().item() / 3, rel=0.03)


def test_symmetric_and_differentiable() -> None:
    x = torch.randn(30, 2, requires_grad=True)
    y = torch.randn(45, 2) + 1
    a = sliced_wasserstein(x, y, generator=_gen(7))
    b = sliced_wasserstein(y, x, generator=_gen(7))
    assert a.shape == () and a.item() > 0
    torch.testing.assert_close(a, b)
    a.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_separates_distributions() -> None:
    g = _gen(8)
    x, y, z = (torch.randn(400, 2, generator=g) for _ in range(3))
    near = sliced_wasserstein(x, y, generator=_gen(9))
    far = sliced_wasserstein(x, 1.5 * z, generator=_gen(9))
    assert near < 0.2 < far


def test_shape_errors() -> None:
    with pytest.raises(ShapeError, match=r"expected x: \[N, D\] and y: \[M, D\], got \[5, 2\] and \[5, 3\]"):
        sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ShapeError, match=r"got \[5\] and \[5, 1\]"):
        sliced_wasserstein(torch.zeros(5), torch.zeros(5, 1))
    with pytest.raises(ShapeError, match="at least one point"):
        sliced_wasserstein(torch.zeros(0, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="p >= 1"):
        sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 2), p=0)
