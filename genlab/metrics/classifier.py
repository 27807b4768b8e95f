"""A small CNN digits classifier that genlab trains in seconds, to judge generated digits.

Its accuracy on class-conditional samples measures whether a model draws the digit it was asked
for; its penultimate features stand in for Inception-v3's pool features in a Frechet distance on
digits, as FID does for natural images (Heusel et al. 2017). Trained on ``Digits(split="train")``
with random shifts of +-1 pixel; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor, nn

from genlab.core.errors import ConfigError, ShapeError
from genlab.core.io import atomic_write
from genlab.data.digits import DIGITS_SIZES, Digits

_VERSION = 1  # bump when the architecture or the training recipe changes: old disk caches are then ignored
_WORK_SIZE = 16  # the network's working resolution
CONFIDENCE = 0.9  # the default threshold of ``confident_fraction``: a largest class probability above it


class DigitsClassifier(nn.Module):
    """``forward(x: [B, 1, S, S] in [-1, 1]) -> logits [B, 10]``; ``features(x) -> [B, 128]``.

    conv3x3(16) - maxpool - conv3x3(32) - maxpool - linear(512 -> 128) - linear(128 -> 10), ReLU after
    each hidden layer. It runs at 16x16: inputs of another size ``S`` are first resized (bilinear,
    antialiased), so one architecture serves S = 8, 16 and 32.
    """

    feature_dim = 128

    def __init__(self, image_size: int = 16) -> None:
        super().__init__()
        self.image_size = image_size
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 -> 8
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 -> 4
            nn.Flatten(), nn.Linear(32 * 4 * 4, self.feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[B, 128]`` of images ``x: [B, 1, S, S]`` in [-1, 1]."""
        s = self.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, s, s):
            raise ShapeError(f"DigitsClassifier: expected x: [B, 1, {s}, {s}], got {list(x.shape)}")
        if s != _WORK_SIZE:
            x = F.interpolate(x, size=(_WORK_SIZE, _WORK_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, 10]`` of images ``x: [B, 1, S, S]`` in [-1, 1]."""
        return self.head(self.features(x))

    @torch.no_grad()
    def accuracy(self, x: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
        """Fraction of ``x: [N, 1, S, S]`` classified as ``labels: [N]``."""
        if labels.shape != x.shape[:1]:
            raise ShapeError(f"accuracy: expected labels: [{x.shape[0]}], got {list(labels.shape)}")
        batches = zip(x.split(batch_size), labels.split(batch_size))
        return sum((self(xb).argmax(1) == yb).sum().item() for xb, yb in batches) / max(len(labels), 1)

    @torch.no_grad()
    def confident_fraction(self, x: Tensor, threshold: float = CONFIDENCE, batch_size: int = 1024) -> float:
        """Fraction of ``x: [N, 1, S, S]`` that the classifier assigns to some class (whichever) with
        probability above ``threshold``: see :func:`confident_fraction`."""
        n = sum(confident_count(self(xb), threshold) for xb in x.split(batch_size))
        return n / max(len(x), 1)


def confident_count(logits: Tensor, threshold: float = CONFIDENCE) -> int:
    """How many rows of ``logits: [N, K]`` have a largest softmax probability above ``threshold``."""
    if logits.ndim != 2:
        raise ShapeError(f"confident_count: expected logits: [N, K], got {list(logits.shape)}")
    if not 0 < threshold < 1:
        raise ValueError(f"confident_count: threshold must be in (0, 1), got {threshold}")
    return int((logits.float().softmax(dim=1).amax(dim=1) > threshold).sum().item())


def confident_fraction(logits: Tensor, threshold: float = CONFIDENCE) -> float:
    """Fraction of rows of ``logits: [N, K]`` whose largest softmax probability exceeds ``threshold``.

    Unlike accuracy it needs no requested labels and sees samples that look like no digit at all
    (a noise blob gets a flat or unsure prediction); compare it with the same fraction for real
    held-out images, which is below 1 because some real digits are ambiguous.
    """
    return confident_count(logits, threshold) / max(len(logits), 1)


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Shift each image of ``x: [B, C, H, W]`` by a random ``(dy, dx)`` in ``[-max_shift, max_shift]^2``; fill -1."""
    b, _, h, w = x.shape
    m = max_shift
    padded = F.pad(x, (m, m, m, m), value=-1.0)
    dy, dx = torch.randint(0, 2 * m + 1, (2, b), generator=generator)
    out = torch.empty_like(x)
    for oy in range(2 * m + 1):
        for ox in range(2 * m + 1):
            pick = (dy == oy) & (dx == ox)
            out[pick] = padded[pick, :, oy : oy + h, ox : ox + w]
    return out


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread: this network's ops are too small to gain from more (waking
    threads costs more than they save, several times so on some VMs), and results do not depend on
    the machine's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=8)
def _train_state(image_size: int, steps: int, seed: int) -> dict[str, Tensor]:
    """Train on the Digits train split (Adam, cosine-decayed lr, batch 64) and return the weights."""
    with _one_thread(), torch.random.fork_rng(devices=[]):  # initialisation uses the global RNG: restore it
        return _train(image_size, steps, seed)


def _train(image_size: int, steps: int, seed: int) -> dict[str, Tensor]:
    data = Digits(image_size=image_size, split="train")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier(image_size)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (64,), generator=g)
        loss = F.cross_entropy(model(random_shift(data.data[idx], g)), data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_digits_classifier(
    image_size: int = 16, steps: int = 600, seed: int = 0, cache_dir: str | os.PathLike | None = None
) -> DigitsClassifier:
    """A ``DigitsClassifier`` for ``[B, 1, image_size, image_size]`` digits, in eval mode with frozen weights.

    Trained on ``Digits(image_size, split="train")`` (the default split, whatever ``seed``), so the
    default test split stays held out. Deterministic in ``seed`` (training runs on one thread). The
    weights are cached per process (keyed by the arguments), and in ``cache_dir`` as safetensors when
    one is given; each call returns a fresh module.
    """
    if image_size not in DIGITS_SIZES:
        raise ConfigError(f"digits classifier: image_size must be one of 8, 16, 32, got {image_size!r}")
    if steps < 1:
        raise ConfigError(f"digits classifier: steps must be positive, got {steps}")
    name = f"digits_classifier_v{_VERSION}_s{image_size}_{steps}_{seed}.safetensors"
    file = None if cache_dir is None else Path(cache_dir) / name
    if file is not None and file.is_file():
        state = load_file(file)
    else:
        state = _train_state(image_size, steps, seed)
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            metadata = {"image_size": str(image_size), "steps": str(steps), "seed": str(seed)}
            atomic_write(file, save(state, metadata=metadata))
    model = DigitsClassifier(image_size)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)
