"""Nearest codes and k-means (Lloyd's algorithm), the codebook's initialisation from a first batch
(as in Zeghidour et al. 2021, Sec. III-C; spherical k-means for cosine codebooks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from genlab.models.quantizers.distributed import all_reduce_, broadcast_, sample_vectors


def distances(x: Tensor, codebook: Tensor, cosine: bool) -> Tensor:
    """``x: [M, d]``, ``codebook: [K, d]`` -> ``[M, K]``, smaller is nearer: the squared L2 distance
    ``max((|x|^2 + |e|^2) - 2 x . e, 1e-8)``, or the negative dot product (``-cos`` for unit vectors).
    Below 1e-8 the expanded form is rounding (it can be negative for a vector at a code, as the repeated
    background vectors of images are at their k-means codes), so such codes tie and the first wins. The
    terms are added, and the floor taken, as in vector-quantize-pytorch, so both pick the same code in
    near-ties (its square root, monotone, is not taken here)."""
    dots = x @ codebook.T
    if cosine:
        return -dots
    return ((x.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(-1)) - 2 * dots).clamp_(min=1e-8)


def nearest(x: Tensor, codebook: Tensor, cosine: bool) -> Tensor:
    """The index of the nearest code for each row of ``x: [M, d]`` -> ``[M]`` (long)."""
    return distances(x, codebook, cosine).argmin(dim=-1)


def cluster_sums(x: Tensor, assign: Tensor, k: int, ordered: bool = False) -> tuple[Tensor, Tensor]:
    """Per cluster: the count ``n_i = sum_j 1[a_j = i]`` ``[K]`` and the sum ``sum_{j: a_j = i} x_j`` ``[K, d]``,
    as a one-hot matmul or, ``ordered``, adding the rows one after another (``index_add_``). The two differ
    only by float rounding; they are vector-quantize-pytorch's EMA ``einsum`` and k-means ``scatter_add_``."""
    if ordered:
        return torch.bincount(assign, minlength=k).to(x.dtype), x.new_zeros(k, x.shape[-1]).index_add_(0, assign, x)
    onehot = F.one_hot(assign, k).to(x.dtype)
    return onehot.sum(0), onehot.T @ x


def kmeans(x: Tensor, k: int, iters: int, cosine: bool, sync: bool) -> tuple[Tensor, Tensor]:
    """``k`` means of ``x: [M, d]`` after ``iters`` Lloyd steps from ``k`` random rows -> (means ``[K, d]``,
    counts of the last assignment ``[K]``). Empty clusters keep their mean. Under data parallelism (``sync``)
    the counts and sums are summed over ranks, so every rank runs the same algorithm on all the data."""
    means = sample_vectors(x, k, sync)
    counts = torch.zeros(k, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        counts, sums = cluster_sums(x, nearest(x, means, cosine), k, ordered=True)
        all_reduce_(counts, sync)
        all_reduce_(sums, sync)
        new = sums / counts.clamp(min=1).unsqueeze(-1)
        if cosine:
            new = F.normalize(new, dim=-1)
        means = torch.where(counts.unsqueeze(-1) > 0, new, means)
    return broadcast_(means.contiguous(), sync), broadcast_(counts, sync)
