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

Random augmentation (a flip, a crop) must repeat on resume too, and a worker process's global
generator cannot give that: a data set that draws per item declares ``wants_item_keys = True`` and is
then indexed with :class:`ItemKey` ``(index, epoch, seed)`` instead of ``index``; its draws for the
item are a function of the key (:func:`item_seed`, :func:`item_generator`), so an item read in a
resumed run, by any worker, is the one an uninterrupted run read. Indexed with a plain ``int``, such
a data set returns the item without augmentation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s permutation."""
    return (seed * 1_000_003 + epoch) * 7919 + 17


class ItemKey(NamedTuple):
    """Which item to read and in which pass: item ``index`` in epoch ``epoch`` of the stream seeded by
    ``seed``. The index a data set that ``wants_item_keys`` receives; its random draws for the item
    are a function of this key (see :func:`item_seed`)."""

    index: int
    epoch: int
    seed: int


_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """SplitMix64's finaliser (Steele et al. 2014): a bijection of 64-bit integers that spreads every
    input bit over every output bit."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def item_seed(key: ItemKey, salt: int = 0) -> int:
    """A 64-bit seed that is a function of ``key`` (and ``salt``, to draw independent decisions for
    one item); every bit of it is a fair coin over keys."""
    z = 0
    for part in (key.seed, key.epoch, key.index, salt):
        z = _mix64((z + (part & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64)
    return z


def item_generator(key: ItemKey, salt: int = 0) -> torch.Generator:
    """A CPU generator seeded from ``key``: for data sets that draw more than coin flips per item."""
    return torch.Generator().manual_seed(item_seed(key, salt) >> 1)  # manual_seed takes < 2**63


class BatchStream(Sampler[list[Any]]):
    """An endless stream of batches of ``batch_size`` indices into a data set of ``n`` items, for ``rank``
    of ``world``, starting at batch ``start`` (see the module's docstring); ``shuffle=False`` keeps the
    data set's order in every epoch. With ``keys``, a batch holds :class:`ItemKey` s ``(index, epoch,
    seed)`` instead of indices, for data sets that draw random augmentations per item."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1, start: int = 0,
                 shuffle: bool = True, keys: bool = False) -> None:
        if n < world:
            raise ValueError(f"a data set of {n} items cannot be shared by {world} processes")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.start, self.shuffle, self.keys = start, shuffle, keys
        self.per_rank = n // world

    def epoch_indices(self, epoch: int) -> Tensor:
        """The indices rank ``rank`` visits in epoch ``epoch``, in order [per_rank] (int64, CPU)."""
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))
        else:
            order = torch.arange(self.n)
        return order[: self.per_rank * self.world][self.rank :: self.world]

    def epoch_order(self, epoch: int) -> list[int]:
        """:meth:`epoch_indices` as a list."""
        return self.epoch_indices(epoch).tolist()

    def position(self, batch: int) -> tuple[int, int]:
        """(epoch, offset in it) where batch ``batch`` of this rank begins."""
        return divmod(batch * self.batch_size, self.per_rank)

    def __iter__(self) -> Iterator[list[Any]]:
        if not self.keys:
            yield from (batch.tolist() for batch in self.index_batches())
            return  # (never reached: the stream is endless)
        epoch, offset = self.position(self.start)
        batch: list[Any] = []
        while True:
            for index in self.epoch_order(epoch)[offset:]:
                batch.append(ItemKey(index, epoch, self.seed))
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            epoch, offset = epoch + 1, 0

    def index_batches(self) -> Iterator[Tensor]:
        """The same stream of batches as index tensors [batch_size] (int64, CPU), cut from each epoch's
        permutation without a Python loop over items."""
        epoch, offset = self.position(self.start)
        parts: list[Tensor] = []
        have = 0
        while True:
            order = self.epoch_indices(epoch)[offset:]
            while len(order):
                take, order = order[: self.batch_size - have], order[self.batch_size - have:]
                parts.append(take)
                have += len(take)
                if have == self.batch_size:
                    yield parts[0] if len(parts) == 1 else torch.cat(parts)
                    parts, have = [], 0
            epoch, offset = epoch + 1, 0


PAIRED = ("source", "control")  # per-item tensors [N, ...] a data set may hold besides data and labels


class TensorItems(Dataset):
    """A data set holding its items as tensors, ``data`` [N, ...] and optionally ``labels`` [N], read a
    batch at a time: ``__getitems__(indices)`` -> ``{"x": [B, ...], "class_labels": [B]}``, plus the
    rows of each :data:`PAIRED` tensor it holds: ``source`` (reflow's paired start points) and
    ``control`` (a ControlNet's conditioning image of each item), and with ``captions`` (a string per item)
    ``"caption"``: the batch's captions, a list of B strings."""

    def __init__(self, data: Tensor, labels: Tensor | None = None, source: Tensor | None = None,
                 control: Tensor | None = None, captions: Sequence[str] | None = None) -> None:
        self.data, self.labels, self.source, self.control = data, labels, source, control
        self.captions = captions

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int] | Tensor) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, device=self.data.device)
        batch = {"x": self.data[idx]}
        if self.labels is not None:
            batch["class_labels"] = self.labels[idx]
        for name in PAIRED:
            if getattr(self, name) is not None:
                batch[name] = getattr(self, name)[idx]
        if self.captions is not None:
            batch["caption"] = [self.captions[i] for i in idx.tolist()]
        return batch


class Collate:
    """Collate items of a map-style data set into ``{"x", "class_labels"}``: an item is a tensor, an
    ``(x, label)`` pair or a mapping with ``x``; ``labels=False`` leaves ``class_labels`` out (for a
    model without classes). A class, not a closure, so that worker processes can receive it."""

    def __init__(self, labels: bool = True) -> None:
        self.labels = labels

    def __call__(self, items: Any) -> dict[str, Tensor]:
        if isinstance(items, dict):
            batch = items  # a whole batch from __getitems__
        else:
            collated = default_collate(items)
            if isinstance(collated, Tensor):
                batch = {"x": collated}
            elif isinstance(collated, dict):
                batch = collated
            else:
                batch = {"x": collated[0], "class_labels": collated[1]}
        return batch if self.labels else {k: v for k, v in batch.items() if k != "class_labels"}


class TensorBatches:
    """The batches of :class:`TensorItems` in the order of a :class:`BatchStream`, read in the training
    process by one tensor index each, without a DataLoader's per-batch machinery (which cost more
    than a small model's whole training step)."""

    def __init__(self, items: TensorItems, stream: BatchStream) -> None:
        self.items, self.stream = items, stream

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return (self.items.__getitems__(idx) for idx in self.stream.index_batches())


def training_batches(dataset: Any, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                     start: int = 0, num_workers: int = 0, labels: bool = True,
                     device: torch.device | str | None = None) -> DataLoader | TensorBatches:
    """An iterable of training batches ``{"x": [B, ...], "class_labels": [B]}`` (and the data set's
    :data:`PAIRED` tensors' rows) in the order of
    :class:`BatchStream` from batch ``start``. A data set with a ``data`` tensor (and ``labels``, used
    when ``labels``) is read by tensor indexing, on ``device`` (:class:`TensorBatches`) when there are
    no workers; any other map-style data set through its items by a DataLoader, with ``num_workers``
    worker processes; one that ``wants_item_keys`` is indexed with :class:`ItemKey` s (see the
    module's docstring)."""
    data = getattr(dataset, "data", None)
    if isinstance(data, Tensor):
        targets = getattr(dataset, "labels", None) if labels else None
        paired = {name: getattr(dataset, name, None) for name in PAIRED}
        paired = {name: v if isinstance(v, Tensor) else None for name, v in paired.items()}
        if num_workers == 0 and device is not None:
            data, targets = (None if v is None else v.to(device) for v in (data, targets))
            paired = {name: None if v is None else v.to(device) for name, v in paired.items()}
        dataset = TensorItems(data, targets, **paired, captions=getattr(dataset, "captions", None))
    stream = BatchStream(len(dataset), batch_size, seed=seed, rank=rank, world=world, start=start,
                         keys=bool(getattr(dataset, "wants_item_keys", False)))
    if isinstance(dataset, TensorItems) and num_workers == 0:
        return TensorBatches(dataset, stream)
    return DataLoader(dataset, batch_sampler=stream, num_workers=num_workers, collate_fn=Collate(labels),
                      persistent_workers=num_workers > 0)
