"""Pictures a person looks at: samples over data (2D), loss curves."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402


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
    fig.savefig(path, dpi=110)
    plt.close(fig)
