"""Pairs of (source, sample) drawn from a trained flow: the data of rectified-flow reflow (Liu et al.
2023, "Flow straight and fast", Sec. 2.2). ``genlab reflow RUN --pairs N`` writes them as a
safetensors file with ``source`` [N, ...] (the start points, noise or a source data set's rows) and
``x`` [N, ...] (where the flow carried them); the data set ``pairs`` reads it, and the trainer hands
each batch's ``source`` rows to the objective with their ``x`` (``cfm`` then trains on the given pairs)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from genlab.core.checkpoint import load_weights
from genlab.core.errors import GenlabError
from genlab.core.io import atomic_write
from genlab.core.registry import register

PAIRS_FILE = "pairs.safetensors"


def save_pairs(path: str | os.PathLike, source: Tensor, x: Tensor) -> Path:
    """Write ``source`` and ``x`` (both [N, ...], same shape) atomically as safetensors."""
    from safetensors.torch import save

    if source.shape != x.shape:
        raise ValueError(f"pairs: source {list(source.shape)} and x {list(x.shape)} must have one shape")
    path = Path(path)
    atomic_write(path, save({"source": source.detach().float().contiguous().cpu(),
                             "x": x.detach().float().contiguous().cpu()}))
    return path


@register("dataset", "pairs")
class FlowPairs(torch.utils.data.Dataset):
    """(source, x) pairs from ``path`` (a pairs file, or a run directory holding ``pairs.safetensors``):
    ``data`` [N, ...] = x, ``source`` [N, ...]; items ``{"x", "source"}``."""

    def __init__(self, path: str) -> None:
        file = Path(path)
        file = file / PAIRS_FILE if file.is_dir() else file
        if not file.is_file():
            raise GenlabError(f"pairs: no pairs file {str(file)!r}; write one with `genlab reflow RUN --pairs N`")
        tensors = load_weights(file)
        if set(tensors) != {"source", "x"} or tensors["source"].shape != tensors["x"].shape:
            raise GenlabError(f"pairs: {file} must hold 'source' and 'x' of one shape, got "
                              f"{ {k: list(v.shape) for k, v in tensors.items()} }")
        self.path, self.data, self.source = file, tensors["x"], tensors["source"]

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x": self.data[index], "source": self.source[index]}
