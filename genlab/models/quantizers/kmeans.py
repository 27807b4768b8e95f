"""Nearest codes and k-means (Lloyd's algorithm), the codebook's initialisation from a first batch
(as in Zeghidour et al. 2021, Sec. III-C; spherical k-means for cosine codebooks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.models.quantizers.distributed import all_reduce_, broadcast_, sample_vectors


def distances(x: Tensor, codebook: Tensor, cosine: bool) -> Tensor:
    """``x: [M, d]``, ``codebook: [K, d]`` -> ``[M, K]``, smaller is nearer: the squared L2 distance
    ``|x|^2 - 2 x . e + |e|^2``, or the negative dot product (``-cos`` for unit vectors)."""
    dots = x @ codebook.T
    if cosine:
        return -dots
    return x.pow(2).sum(-1, keepdim=True) - 2 * dots + codebook.pow(2).sum(-1)


def nearest(x: Tensor, codebook: Tensor, cosine: bool) -> Tensor:
    """The index of the nearest code for each row of ``x: [M, d]`` -> ``[M]`` (long)."""
    return distances(x, codebook, cosine).argmin(dim=-1)


def cluster_sums(x: Tensor, assign: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per cluster: the count ``n_i = sum_j 1[a_j = i]`` ``[K]`` and the sum ``sum_{j: a_j = i} x_j`` ``[K, d]``."""
    onehot = F.one_hot(assign, k).to(x.dtype)
    return onehot.sum(0), onehot.T @ x


def kmeans(x: Tensor, k: int, iters: int, cosine: bool, sync: bool) -> tuple[Tensor, Tensor]:
    """``k`` means of ``x: [M, d]`` after ``iters`` Lloyd steps from ``k`` random rows -> (means ``[K, d]``,
    counts of the last assignment ``[K]``). Empty clusters keep their mean. Under data parallelism (``sync``)
    the counts and sums are summed over ranks, so every rank runs the same algorithm on all the data."""
    means = sample_vectors(x, k, sync)
    counts = torch.zeros(k, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        counts, sums = cluster_sums(x, nearest(x, means, cosine), k)
        all_reduce_(counts, sync)
        all_reduce_(sums, sync)
        new = sums / counts.clamp(min=1).unsqueeze(-1)
        if cosine:
            new = F.normalize(new, dim=-1)
        means = torch.where(counts.unsqueeze(-1) > 0, new, means)
    return broadcast_(means.contiguous(), sync), broadcast_(counts, sync)
