"""Keeping codebooks identical across data-parallel ranks (``torch.distributed`` initialised, world > 1).

A codebook's statistics are sums over the batch: summed over ranks too, every rank makes the same update
(:func:`all_reduce_`). Random draws (k-means seeds, dead-code replacements) are made on every rank from its
own data, gathered, and chosen the same way everywhere (:func:`sample_vectors`), so every rank adopts the
same vectors; :func:`broadcast_` copies rank 0's tensor where bit-identity must not rest on arithmetic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size(sync: bool) -> int:
    """The number of ranks to keep in step: 1 unless ``sync`` and a process group of more than one rank."""
    if not sync or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def all_reduce_(t: Tensor, sync: bool) -> Tensor:
    """Sum ``t`` over the ranks in place (nothing on one rank); returns ``t``."""
    if world_size(sync) > 1:
        dist.all_reduce(t)
    return t


def broadcast_(t: Tensor, sync: bool) -> Tensor:
    """Rank 0's ``t`` on every rank, in place; returns ``t``."""
    if world_size(sync) > 1:
        dist.broadcast(t, src=0)
    return t


def sample_vectors(x: Tensor, n: int, sync: bool) -> Tensor:
    """``n`` rows of ``x: [M, d]`` drawn at random (without replacement when ``M >= n``) -> ``[n, d]``.
    Across W ranks each draws ``n`` rows of its own ``x``, and row ``j`` is taken from rank ``j mod W``:
    the same ``[n, d]`` on every rank, drawn from all ranks' data."""
    m = x.shape[0]
    pick = torch.randperm(m, device=x.device)[:n] if m >= n else torch.randint(0, m, (n,), device=x.device)
    local = x[pick].contiguous()
    w = world_size(sync)
    if w == 1:
        return local
    gathered = [torch.empty_like(local) for _ in range(w)]
    dist.all_gather(gathered, local)
    rows = torch.arange(n, device=x.device)
    return torch.stack(gathered)[rows % w, rows]
