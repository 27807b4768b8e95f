"""Pictures a person looks at: samples over data (2D), image grids, loss curves; every PNG is
written atomically (:func:`genlab.core.io.atomic_open`)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from ..core.io import atomic_open  # noqa: E402


def save_figure(fig: Figure, path: str | os.PathLike, **kwargs: object) -> None:
    """Save ``fig`` as a PNG at ``path`` atomically, then close it (also when saving fails)."""
    try:
        with atomic_open(path) as f:
            fig.savefig(f, format="png", **kwargs)
    finally:
        plt.close(fig)


def plot_samples_2d(samples: Tensor, data: Tensor, path: str | os.PathLike, title: str = "") -> None:
    """Scatter samples [N, 2] (orange) over data [M, 2] (grey) and save a PNG."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharex=True, sharey=True)
    lim = float(data.abs().max()) * 1.15
    for ax, points, label, color in ((axes[0], data, "held-out data", "0.4"), (axes[1], samples, "samples", "C1")):
        ax.scatter(data[:, 0], data[:, 1], s=2, c="0.85", alpha=0.5, linewidths=0)
        ax.scatter(points[:, 0], points[:, 1], s=2, c=color, alpha=0.6, linewidths=0)
        ax.set(title=label, xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def plot_image_grid(images: Tensor, path: str | os.PathLike, rows: int | None = None, per_row: int | None = None,
                    title: str = "") -> None:
    """Save images [N, C, H, W] in [-1, 1] as a grid PNG: ``per_row`` images a row (default:
    about sqrt(N)); with ``rows`` and ``per_row`` the first ``per_row`` of each consecutive block of
    N / rows images (one block per class) form a row."""
    n = images.shape[0]
    if rows and per_row:
        block = n // rows
        images = images.reshape(rows, block, *images.shape[1:])[:, :per_row].reshape(-1, *images.shape[1:])
    else:
        per_row = per_row or max(1, int(n**0.5))
    grid = make_grid(images.clamp(-1, 1) * 0.5 + 0.5, nrow=per_row, padding=1, pad_value=1.0)
    fig = plt.figure(figsize=(max(4, grid.shape[2] / 40), max(4, grid.shape[1] / 40) + 0.4))
    plt.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    plt.axis("off")
    plt.title(title, fontsize=8)
    save_figure(fig, path, dpi=110, bbox_inches="tight")


def plot_losses(losses: list[list[float]], path: str | os.PathLike) -> None:
    """Loss curve PNG from [[step, mean loss], ...] (log scale)."""
    if not losses:
        return
    steps, values = zip(*losses)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values)
    ax.set(xlabel="step", ylabel="training loss", yscale="log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
