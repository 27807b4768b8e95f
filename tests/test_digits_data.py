from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from genlab.core import build
from genlab.core.errors import ConfigError
from genlab.data.digits import Digits, digits_split


@pytest.mark.parametrize("size", [8, 16, 32])
def test_shapes_range_and_attributes(size: int) -> None:
    ds = Digits(image_size=size, split="test")
    assert ds.data.shape == (len(ds), 1, size, size) and ds.data.dtype == torch.float32
    assert ds.labels.shape == (len(ds),) and ds.labels.dtype == torch.long
    assert ds.shape == (1, size, size) and ds.dim == size * size and ds.num_classes == 10
    assert ds.data.min() == -1 and ds.data.max() == 1
    image, label = ds[5]
    assert image.shape == (1, size, size) and torch.equal(image, ds.data[5]) and label == ds.labels[5]
    images, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=16)))
    assert images.shape == (16, 1, size, size) and labels.shape == (16,)


def test_size_8_is_the_raw_data_rescaled() -> None:
    raw = load_digits()
    ds = Digits(image_size=8, split="all")
    assert len(ds) == 1797
    torch.testing.assert_close(ds.data[:, 0], torch.from_numpy(raw.images).float() / 8 - 1)
    assert torch.equal(ds.labels, torch.from_numpy(raw.target).long())


def test_resize_keeps_the_mean_image() -> None:
    """Bilinear antialiased resizing preserves each image's average intensity up to border effects."""
    small, large = Digits(image_size=8, split="test"), Digits(image_size=32, split="test")
    torch.testing.assert_close(large.data.mean((1, 2, 3)), small.data.mean((1, 2, 3)), atol=0.03, rtol=0)
    assert torch.equal(small.labels, large.labels)


def test_split_is_fixed_disjoint_and_stratified() -> None:
    train, test = digits_split("train"), digits_split("test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert not set(train) & set(test)
    assert np.array_equal(test, digits_split("test")) and not np.array_equal(test, digits_split("test", seed=1))
    counts = Digits(split="test").labels.bincount()
    assert counts.shape == (10,) and counts.min() >= 35 and counts.max() <= 37
    assert len(Digits(split="test", test_fraction=0.5)) == 899


def test_n_repeats_or_truncates_deterministically() -> None:
    full = Digits(split="test")
    short, long = Digits(split="test", n=100), Digits(split="test", n=1000)
    assert len(short) == 100 and torch.equal(short.data, full.data[:100])
    assert len(long) == 1000 and torch.equal(long.data[720:1000], full.data[:280])
    assert torch.equal(long.labels[360:720], full.labels)


def test_errors() -> None:
    with pytest.raises(ConfigError, match="image_size must be one of 8, 16, 32, got 28"):
        Digits(image_size=28)
    with pytest.raises(ConfigError, match="unknown split 'tset'.*did you mean 'test'"):
        Digits(split="tset")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Digits: test_fraction must be > 0 and < 1, got 1.5"):
        Digits(test_fraction=1.5)
    with pytest.raises(ConfigError, match="every class"):
        Digits(test_fraction=0.001)


def test_built_from_config() -> None:
    ds = build("dataset", {"type": "digits", "image_size": 8, "split": "test", "n": 10})
    assert isinstance(ds, Digits) and ds.data.shape == (10, 1, 8, 8)
    with pytest.raises(ConfigError, match="split: expected one of 'train', 'test', 'all'"):
        build("dataset", {"type": "digits", "split": "val"})
