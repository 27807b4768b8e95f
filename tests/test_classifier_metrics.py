from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from genlab.core.errors import ShapeError
from genlab.data.digits import Digits
from genlab.metrics import classifier
from genlab.metrics.classifier import DigitsClassifier, confident_fraction, random_shift, train_digits_classifier
from genlab.metrics.frechet import frechet_distance, gaussian_frechet, mean_cov

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_cov(f: int, seed: int) -> torch.Tensor:
    a = torch.randn(f, f, dtype=F64, generator=_gen(seed))
    return a @ a.T / f + 0.1 * torch.eye(f, dtype=F64)


def test_diagonal_gaussians_closed_form() -> None:
    """Diagonal covariances commute: d^2 = sum (m1 - m2)^2 + sum (sqrt(v1) - sqrt(v2))^2."""
    m1, m2 = torch.tensor([0.0, 1.0, -2.0], dtype=F64), torch.tensor([0.5, 1.0, 1.0], dtype=F64)
    v1, v2 = torch.tensor([1.0, 4.0, 0.25], dtype=F64), torch.tensor([9.0, 1.0, 0.25], dtype=F64)
    expected = (m1 - m2).square().sum() + (v1.sqrt() - v2.sqrt()).square().sum()  # 9.25 + 4 + 1 = 14.25
    assert gaussian_frechet(m1, torch.diag(v1), m2, torch.diag(v2)) == pytest.approx(expected.item(), rel=1e-12)
    assert expected.item() == 14.25


def test_general_gaussians_match_scipy_sqrtm() -> None:
    """Against the pytorch-fid formula with scipy's matrix square root of the non-symmetric product."""
    s1, s2 = _random_cov(6, 0), _random_cov(6, 1)
    mu1, mu2 = torch.randn(6, dtype=F64, generator=_gen(2)), torch.randn(6, dtype=F64, generator=_gen(3))
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    ref = ((mu1 - mu2).square().sum() + s1.trace() + s2.trace()).item() - 2 * np.trace(covmean)
    assert gaussian_frechet(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-10)
    assert gaussian_frechet(mu1, s1, mu2, s2) == pytest.approx(gaussian_frechet(mu2, s2, mu1, s1), rel=1e-10)


def test_frechet_distance_of_samples() -> None:
    a = torch.randn(500, 8, generator=_gen(4))
    b = 0.5 * torch.randn(300, 8, generator=_gen(5)) + 0.2
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a[torch.randperm(500, generator=_gen(6))]) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) == pytest.approx(gaussian_frechet(*mean_cov(a), *mean_cov(b)), rel=1e-12)
    big_a, big_b = torch.randn(200_000, 2, generator=_gen(7)), 0.5 * torch.randn(200_000, 2, generator=_gen(8)) + 0.2
    assert frechet_distance(big_a, big_b) == pytest.approx(2 * 0.2**2 + 2 * 0.5**2, rel=0.02)  # population value 0.58


def test_mean_shift_adds_its_squared_norm() -> None:
    """Same covariance: d^2(a, a + t v) = t^2 |v|^2, increasing in t."""
    a, v = torch.randn(200, 5, dtype=F64, generator=_gen(9)), torch.randn(5, dtype=F64, generator=_gen(10))
    d = [frechet_distance(a, a + t * v) for t in (0.0, 0.5, 1.0, 2.0)]
    assert d == sorted(d) and d[0] < 1e-9
    assert d[3] == pytest.approx(4 * v.square().sum().item(), rel=1e-7)


def test_frechet_shape_errors() -> None:
    with pytest.raises(ShapeError, match="expected a: \\[N, F\\] and b: \\[M, F\\]"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ShapeError, match="at least 2 rows"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


def test_random_shift() -> None:
    x = torch.rand(500, 1, 6, 6) * 2 - 1
    y = random_shift(x, _gen(11))
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    for i in range(500):  # the inner 4x4 of each output is a shifted window of its input
        assert any(torch.equal(y[i, :, 1:5, 1:5], x[i, :, 1 + dy : 5 + dy, 1 + dx : 5 + dx]) for dy, dx in shifts)
    assert (y == -1).any(dim=(1, 2, 3)).float().mean() > 0.7  # 8 of 9 shifts bring in a -1 border


@pytest.fixture(scope="module")
def trained() -> tuple[DigitsClassifier, float]:
    start = time.perf_counter()
    model = train_digits_classifier(image_size=16)
    return model, time.perf_counter() - start


def test_classifier_accuracy(trained: tuple[DigitsClassifier, float]) -> None:
    model, seconds = trained
    test = Digits(image_size=16, split="test")
    accuracy = model.accuracy(test.data, test.labels)
    print(f"digits classifier: test accuracy {accuracy:.4f}, trained in {seconds:.1f} s")
    assert accuracy >= 0.95
    assert seconds < 60  # about 4 s on 2 idle cores; generous against shared machines
    assert model(test.data[:7]).shape == (7, 10) and model.features(test.data[:7]).shape == (7, 128)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert train_digits_classifier(image_size=16) is not model  # a fresh module from the in-memory cache
    with pytest.raises(ShapeError, match=r"expected x: \[B, 1, 16, 16\], got \[2, 1, 8, 8\]"):
        model(torch.zeros(2, 1, 8, 8))


def test_training_is_deterministic_and_cached_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = train_digits_classifier(image_size=8, steps=5, seed=3, cache_dir=tmp_path)
    again = classifier._train_state.__wrapped__(8, 5, 3)  # retrain, bypassing the in-memory cache
    assert all(torch.equal(v, again[k]) for k, v in first.state_dict().items())
    assert len(list(tmp_path.glob("digits_classifier_*.safetensors"))) == 1

    def refuse(*args: object) -> None:
        raise AssertionError("retrained despite the disk cache")

    monkeypatch.setattr(classifier, "_train_state", refuse)
    loaded = train_digits_classifier(image_size=8, steps=5, seed=3, cache_dir=tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in first.state_dict().items())


def test_classifier_frechet_distance_sees_noise(trained: tuple[DigitsClassifier, float]) -> None:
    """Noisy digits are farther from the test split than one half of it is from the other.

    The Frechet estimate is biased upwards at small N (here 180 points in 128 dimensions), so the
    main comparison keeps N fixed: half A against half B, clean and noisy.
    """
    model, _ = trained
    test = Digits(image_size=16, split="test").data
    a, b = torch.randperm(len(test), generator=_gen(12)).chunk(2)
    noise = torch.randn(test.shape, generator=_gen(13))
    with torch.no_grad():
        feats = [model.features((test + sigma * noise).clamp(-1, 1)) for sigma in (0.0, 0.2, 0.5)]
    fd_halves = [frechet_distance(feats[0][a], f[b]) for f in feats]
    fd_full = frechet_distance(feats[0], feats[2])
    print(f"FD(half A, half B + noise 0 / 0.2 / 0.5) = {fd_halves}, FD(test, test + noise 0.5) = {fd_full:.1f}")
    assert fd_halves == sorted(fd_halves) and fd_halves[2] > 2 * fd_halves[0]
    assert fd_full > fd_halves[0]


def test_confident_fraction_hand_checked() -> None:
    """Largest softmax probabilities 0.95, 0.8, 0.1 (ten equal logits) and 0.99: two of four exceed 0.9."""
    ten = torch.zeros(10)
    rows = [ten.clone(), ten.clone(), ten.clone(), ten.clone()]
    rows[0][3] = math.log(0.95 / 0.05 * 9)  # p = 0.95 on class 3 (the other nine share 0.05)
    rows[1][7] = math.log(0.8 / 0.2 * 9)  # p = 0.8
    rows[3][0] = math.log(0.99 / 0.01 * 9)  # p = 0.99
    logits = torch.stack(rows)
    assert logits.softmax(1).amax(1).tolist() == pytest.approx([0.95, 0.8, 0.1, 0.99])
    assert confident_fraction(logits) == 0.5
    assert confident_fraction(logits, threshold=0.5) == 0.75
    assert confident_fraction(logits, threshold=0.96) == 0.25
    assert confident_fraction(torch.zeros(0, 10)) == 0.0
    with pytest.raises(ShapeError, match=r"expected logits: \[N, K\]"):
        confident_fraction(torch.zeros(10))
    with pytest.raises(ValueError, match="threshold"):
        confident_fraction(logits, threshold=1.0)


def test_classifier_confident_fraction_real_digits_vs_noise(trained: tuple[DigitsClassifier, float]) -> None:
    """Real held-out digits are mostly classified with p > 0.9, noise images (the blobs a broken
    sampler draws) hardly ever; a mix of the two scores in between, in proportion."""
    model, _ = trained
    test = Digits(image_size=16, split="test").data
    noise = (0.5 * torch.randn(test.shape, generator=_gen(14))).clamp(-1, 1)
    real, fake = model.confident_fraction(test), model.confident_fraction(noise)
    print(f"confident fraction: test digits {real:.3f}, noise {fake:.3f}")
    assert real > 0.9 and fake < 0.1
    with torch.no_grad():
        assert model.confident_fraction(test) == confident_fraction(model(test))
    assert model.confident_fraction(test, batch_size=7) == real  # batching does not change the count
    n = len(test) // 4
    mixed = torch.cat([test[n:], noise[:n]])
    with torch.no_grad():
        parts = confident_fraction(model(test[n:])) * (len(test) - n) + confident_fraction(model(noise[:n])) * n
    assert model.confident_fraction(mixed) == pytest.approx(parts / len(test), abs=1e-12)
