"""Batches for training through ``torch.utils.data``, in an order that is a function of (seed, epoch,
rank), so that a run resumed at any step, mid-epoch included, sees the batches an uninterrupted one
would have seen.

Each epoch is a permutation of the data set drawn from a generator seeded with (seed, epoch); rank r
of W takes positions r, r + W, ... of it (the tail that does not divide by W is left out, so every
rank sees as many items); a rank's epochs are concatenated into one stream, cut into batches. Batch
k of a rank is therefore fixed, and a loader started at batch k (:class:`BatchStream`'s ``start``)
continues exactly. Data sets that hold their items as tensors (``data`` [N, ...] and optionally
``labels`` [N]) are indexed a batch at a time (``__getitems__``), other map-style data sets item by
item and collated.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s permutation."""
    return (seed * 1_000_003 + epoch) * 7919 + 17


class BatchStream(Sampler[list[int]]):
    """An endless stream of batches of ``batch_size`` indices into a data set of ``n`` items, for ``rank``
    of ``world``, starting at batch ``start`` (see the module's docstring); ``shuffle=False`` keeps the
    data set's order in every epoch."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1, start: int = 0,
                 shuffle: bool = True) -> None:
        if n < world:
            raise ValueError(f"a data set of {n} items cannot be shared by {world} processes")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.start, self.shuffle = start, shuffle
        self.per_rank = n // world

    def epoch_order(self, epoch: int) -> list[int]:
        """The indices rank ``rank`` visits in epoch ``epoch``, in order [per_rank]."""
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))
        else:
            order = torch.arange(self.n)
        return order[: self.per_rank * self.world][self.rank :: self.world].tolist()

    def position(self, batch: int) -> tuple[int, int]:
        """(epoch, offset in it) where batch ``batch`` of this rank begins."""
        return divmod(batch * self.batch_size, self.per_rank)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = self.position(self.start)
        batch: list[int] = []
        while True:
            for index in self.epoch_order(epoch)[offset:]:
                batch.append(index)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            epoch, offset = epoch + 1, 0


class TensorItems(Dataset):
    """A data set holding its items as tensors, ``data`` [N, ...] and optionally ``labels`` [N], read a
    batch at a time: ``__getitems__(indices)`` -> ``{"x": [B, ...], "class_labels": [B]}``."""

    def __init__(self, data: Tensor, labels: Tensor | None = None) -> None:
        self.data, self.labels = data, labels

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, device=self.data.device)
        batch = {"x": self.data[idx]}
        if self.labels is not None:
            batch["class_labels"] = self.labels[idx]
        return batch


def _as_batch(items: Any) -> dict[str, Tensor]:
    """Collate items of a map-style data set into ``{"x", "class_labels"}``: an item is a tensor, an
    ``(x, label)`` pair or a mapping with ``x``."""
    if isinstance(items, dict):
        return items  # a whole batch from __getitems__
    batch = default_collate(items)
    if isinstance(batch, Tensor):
        return {"x": batch}
    if isinstance(batch, dict):
        return batch
    return {"x": batch[0], "class_labels": batch[1]}


def training_batches(dataset: Any, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                     start: int = 0, num_workers: int = 0, labels: bool = True,
                     device: torch.device | str | None = None) -> DataLoader:
    """A DataLoader of training batches ``{"x": [B, ...], "class_labels": [B]}`` in the order of
    :class:`BatchStream` from batch ``start``. A data set with a ``data`` tensor (and ``labels``, used
    when ``labels``) is read by tensor indexing, on ``device`` when there are no workers; any other
    map-style data set through its items, with ``num_workers`` worker processes."""
    data = getattr(dataset, "data", None)
    if isinstance(data, Tensor):
        targets = getattr(dataset, "labels", None) if labels else None
        if num_workers == 0 and device is not None:
            data, targets = data.to(device), None if targets is None else targets.to(device)
        dataset = TensorItems(data, targets)
    stream = BatchStream(len(dataset), batch_size, seed=seed, rank=rank, world=world, start=start)
    return DataLoader(dataset, batch_sampler=stream, num_workers=num_workers, collate_fn=_as_batch,
                      persistent_workers=num_workers > 0)
