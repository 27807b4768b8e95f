"""Labelled image sets: a folder of images (read lazily, file by file) and torchvision's datasets
(held in memory).

Every set has ``labels: [N]`` long, ``class_names`` and ``shape`` ``(C, S, S)``; items are
``(image: [C, S, S] float32 in [-1, 1], label: [])``. In-memory sets also store ``data: [N, C, S, S]``
(the trainer then indexes it a batch at a time); a lazy set has no ``data`` and is read through a
DataLoader with ``train.num_workers`` workers. Images are resized so that the shorter side is ``S``
(bilinear, antialiased) and center-cropped to ``S x S``.
"""

from __future__ import annotations

import difflib
import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor

from genlab.core.bounds import PositiveInt
from genlab.core.errors import ConfigError, GenlabError
from genlab.core.registry import register
from genlab.data.loading import ItemKey, item_seed

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_CHUNK_VALUES = 2**24  # uint8 values resized per call: bounds the float copy at 64 MB


class LabelledImages(torch.utils.data.Dataset):
    """``labels: [N]`` long, ``class_names``; items ``(image [C, S, S] float32 in [-1, 1], label)``.

    This base holds its images in memory, ``data: [N, C, S, S]``; a lazy subclass (:class:`ImageFolder`)
    has no ``data`` and overrides ``shape``, ``__getitem__`` and ``images``.
    """

    data: Tensor
    labels: Tensor
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, S, S)``, the shape of one image."""
        return tuple(self.data.shape[1:])

    @property
    def dim(self) -> int:
        """``C * S * S``, the size of one flattened image."""
        return math.prod(self.shape)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.data[index], self.labels[index]

    def images(self, indices: Sequence[int] | Tensor) -> Tensor:
        """The images ``indices`` as one tensor ``[len(indices), C, S, S]``, without augmentation: what
        needs many images at once (metrics) asks for the ones it uses, and a lazy set reads only those."""
        return self.data[torch.as_tensor(indices, dtype=torch.long)]


def resize_center_crop(x: Tensor, size: int) -> Tensor:
    """``x: [B, C, H, W]`` float -> ``[B, C, size, size]``: shorter side to ``size`` (bilinear, antialiased), then
    the central ``size x size``."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size]


def images_to_tensor(arrays: Iterable[np.ndarray], size: int, channels: int) -> Tensor:
    """uint8 arrays ``[H, W]`` or ``[H, W, C]`` -> ``[N, C, size, size]`` float32 in [-1, 1].

    Consecutive arrays of one shape are resized together, about ``_CHUNK_VALUES`` values at a time.
    """
    out: list[Tensor] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            x = rearrange(torch.from_numpy(np.stack(pending)).float(), "b h w c -> b c h w")
            out.append((resize_center_crop(x, size) / 127.5 - 1).clamp(-1, 1).contiguous())
            pending.clear()

    for a in arrays:
        a = a.reshape(*a.shape[:2], -1)  # [H, W, C]
        if pending and (a.shape != pending[0].shape or len(pending) * a.size >= _CHUNK_VALUES):
            flush()
        pending.append(a)
    flush()
    return torch.cat(out) if out else torch.empty(0, channels, size, size)


def _check(kind: str, channels: int | None) -> None:
    """``channels`` from Python (a config's is checked against its Literal; ranges by the registry)."""
    if channels not in (1, 3, None):
        raise ConfigError(f"{kind}: channels must be 1 or 3, got {channels!r}")


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    """Image files in ``folder`` (and its subfolders if ``recursive``), sorted; hidden files and folders skipped."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    visible = (p for p in found if not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return sorted(p for p in visible if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


@register("dataset", "image_folder")
class ImageFolder(LabelledImages):
    """Every image under ``root`` (png, jpg, jpeg, bmp, webp), one class per subfolder, read lazily.

    Class ``i`` is the i-th subfolder (sorted) holding images at any depth; ``class_names`` are the
    folder names. With no such subfolder, the images at the top level of ``root`` form a single class
    named after ``root``; otherwise top-level images are ignored, as in torchvision's ImageFolder.
    ``channels`` 1 converts to grey ("L"), 3 to RGB (dropping alpha); ``image_size`` >= 1.

    Construction only lists the files (``files``, ``labels``); ``ds[i]`` reads, converts and resizes
    file ``i``, so a folder larger than memory trains (through a DataLoader with ``train.num_workers``
    workers: there is no ``data`` tensor). A file that cannot be read raises GenlabError when it is read.

    ``flip``: a random horizontal flip, with probability 1/2, of items indexed by an
    :class:`~genlab.data.loading.ItemKey` (as the trainer indexes them): the coin is a function of
    (seed, epoch, index), so a resumed run sees the flips an uninterrupted one saw, whichever worker
    reads the item. ``ds[i]`` with a plain index is never flipped (nor are ``images(...)``).
    """

    def __init__(self, root: str, image_size: PositiveInt = 32, channels: Literal[1, 3] = 3,
                 flip: bool = False) -> None:
        _check("image_folder", channels)
        path = Path(root).expanduser()
        if not path.is_dir():
            problem = "is not a directory" if path.exists() else "does not exist"
            raise GenlabError(f"image_folder: {str(path)!r} {problem}")
        folders = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
        classes = [(d.name, files) for d in folders if (files := _image_files(d, recursive=True))]
        if not classes and (files := _image_files(path, recursive=False)):
            classes = [(path.resolve().name or "images", files)]
        if not classes:
            searched = ", ".join(IMAGE_EXTENSIONS)
            where = "at the top level and in class subfolders"
            raise GenlabError(f"image_folder: no images found in {str(path)!r} (searched for {searched} {where})")
        self.root, self.class_names = path, tuple(name for name, _ in classes)
        self.files: list[Path] = [f for _, fs in classes for f in fs]
        self.labels = torch.tensor([i for i, (_, fs) in enumerate(classes) for _ in fs], dtype=torch.long)
        self.image_size, self.channels, self.flip = image_size, channels, flip

    @property
    def wants_item_keys(self) -> bool:
        """Whether items draw a random flip (then the trainer indexes them with ItemKeys)."""
        return self.flip

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.files)

    def flipped(self, key: ItemKey) -> bool:
        """Whether the item read under ``key`` is flipped: a fair coin of (seed, epoch, index)."""
        return self.flip and item_seed(key) & 1 == 1

    def __getitem__(self, index: int | ItemKey) -> tuple[Tensor, Tensor]:
        i = operator.index(index.index if isinstance(index, ItemKey) else index)
        image = self._load(self.files[i])  # IndexError past the end, as a sequence
        if isinstance(index, ItemKey) and self.flipped(index):
            image = image.flip(-1)
        return image, self.labels[i]

    def images(self, indices: Sequence[int] | Tensor) -> Tensor:
        """The images ``indices`` (read now, not flipped) as one tensor ``[len(indices), C, S, S]``."""
        indices = torch.as_tensor(indices, dtype=torch.long).tolist()
        return images_to_tensor((_read(self.files[i], self.channels) for i in indices), self.image_size,
                                self.channels)

    def _load(self, file: Path) -> Tensor:
        """File ``file`` as ``[C, S, S]`` float32 in [-1, 1]: the conversion of :func:`images_to_tensor`."""
        return images_to_tensor([_read(file, self.channels)], self.image_size, self.channels)[0]


def _read(path: Path, channels: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except OSError as e:  # includes PIL.UnidentifiedImageError
        raise GenlabError(f"image_folder: cannot read image {str(path)!r}: {e}") from e


def _torchvision_class(name: str) -> type:
    import torchvision.datasets as tvd

    valid = [n for n in tvd.__all__ if isinstance(c := getattr(tvd, n), type) and issubclass(c, tvd.VisionDataset)]
    if name not in valid:
        lower = {v.lower(): v for v in valid}
        close = difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.5)
        hint = f"; did you mean '{lower[close[0]]}'?" if close else " (e.g. MNIST, FashionMNIST, CIFAR10, CIFAR100)"
        raise ConfigError(f"torchvision: unknown dataset {name!r}{hint}")
    return getattr(tvd, name)


@register("dataset", "torchvision")
class TorchvisionDataset(LabelledImages):
    """A torchvision dataset taking ``(root, train=, download=)`` (MNIST, FashionMNIST, KMNIST, CIFAR10, ...).

    Constructs ``torchvision.datasets.<name>(root, train=train, download=download)`` and loads its
    first ``limit`` items (all if None) into memory, as ``data``: these sets fit in memory, and the
    trainer then indexes them a batch at a time (a folder of images larger than memory is read lazily
    by :class:`ImageFolder`). ``channels`` None keeps the native ones (1 for grey sets such as MNIST,
    else 3). Nothing is downloaded unless ``download`` is true. ``image_size`` and ``limit`` are >= 1.
    """

    def __init__(
        self,
        name: str,
        root: str,
        train: bool = True,
        download: bool = False,
        image_size: PositiveInt = 32,
        channels: Literal[1, 3] | None = None,
        limit: PositiveInt | None = None,
    ) -> None:
        _check("torchvision", channels)
        cls = _torchvision_class(name)
        try:
            ds = cls(str(Path(root).expanduser()), train=train, download=download)
        except TypeError as e:
            raise ConfigError(f"torchvision: {name} does not take (root, train=, download=) arguments: {e}") from e
        except (RuntimeError, FileNotFoundError) as e:
            if download:
                raise
            raise GenlabError(
                f"torchvision: {name} files not found under {str(Path(root).expanduser().resolve())!r} ({e}); "
                "pass `download: true` on a machine with an internet connection, or copy the files there"
            ) from e
        n = len(ds) if limit is None else min(limit, len(ds))
        if channels is None:
            channels = 1 if n and ds[0][0].mode in ("1", "L") else 3
        targets: list[int] = []

        def arrays() -> Iterator[np.ndarray]:
            for i in range(n):
                image, target = ds[i]
                targets.append(int(target))
                yield np.asarray(image.convert("L" if channels == 1 else "RGB"))

        self.name, self.root = name, root
        self.data = images_to_tensor(arrays(), image_size, channels)
        self.labels = torch.tensor(targets, dtype=torch.long)
        classes = getattr(ds, "classes", None)
        count = max(targets, default=-1) + 1
        self.class_names = tuple(classes) if classes and len(classes) >= count else tuple(map(str, range(count)))
