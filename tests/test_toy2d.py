from __future__ import annotations

import math

import pytest
import torch

from genlab.core import registry
from genlab.data import TOY2D_NAMES, Toy2D, toy2d


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_shape_and_determinism(name: str) -> None:
    x = toy2d(name, 1000, _gen(0))
    assert x.shape == (1000, 2) and x.dtype == torch.get_default_dtype()
    assert torch.isfinite(x).all()
    assert torch.equal(x, toy2d(name, 1000, _gen(0)))
    assert not torch.equal(x, toy2d(name, 1000, _gen(1)))


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_normalised(name: str) -> None:
    x = toy2d(name, 100_000, _gen(2))
    torch.testing.assert_close(x.mean(0), torch.zeros(2), atol=0.02, rtol=0)
    torch.testing.assert_close(x.std(0), torch.ones(2), atol=0.02, rtol=0)


def test_eight_gaussians_has_eight_clusters() -> None:
    x = toy2d("eight_gaussians", 8000, _gen(3))
    angle = torch.atan2(x[:, 1], x[:, 0])
    cluster = torch.round(angle / (math.pi / 4)).long() % 8
    off_centre = torch.remainder(angle + math.pi / 8, math.pi / 4) - math.pi / 8
    assert off_centre.abs().max() < math.pi / 8 * 0.9  # every point clearly belongs to one cluster
    counts = torch.bincount(cluster, minlength=8)
    assert counts.shape == (8,) and (counts > 800).all()
    radius = x.norm(dim=1)
    assert (radius.std() / radius.mean()) < 0.1  # all clusters at the same distance


def test_unknown_name_error() -> None:
    with pytest.raises(ValueError, match="unknown toy2d dataset 'moon'.*checkerboard.*did you mean 'moons'"):
        toy2d("moon", 10)
    with pytest.raises(ValueError, match="valid: eight_gaussians, moons"):
        toy2d("zzz", 10)


def test_dataset() -> None:
    ds = Toy2D("rings", n=64, seed=5)
    assert len(ds) == 64 and ds.dim == 2 and ds.data.shape == (64, 2)
    assert torch.equal(ds[3], ds.data[3]) and ds[3].shape == (2,)
    assert torch.equal(ds.data, Toy2D("rings", n=64, seed=5).data)
    assert torch.equal(ds.data, toy2d("rings", 64, _gen(5)))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=16)))
    assert batch.shape == (16, 2)


def test_registered() -> None:
    if not hasattr(registry, "lookup"):
        pytest.skip("registry without lookup (being rewritten)")
    assert registry.lookup("dataset", "toy2d") is Toy2D
