from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.core import build
from genlab.core.errors import ConfigError, GenlabError
from genlab.data import images as images_module
from genlab.data.images import ImageFolder, TorchvisionDataset, images_to_tensor, resize_center_crop


def _save(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (12, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Two classes: 'cats' (3 white images: one nested, one a wide JPEG) and 'dogs' (2 black), plus non-images."""
    root = tmp_path / "pets"
    _save(root / "cats" / "a.png", (255, 255, 255))
    _save(root / "cats" / "b.JPG", (255, 255, 255), size=(20, 10))
    _save(root / "cats" / "deep" / "c.png", (255, 255, 255))
    _save(root / "dogs" / "a.png", (0, 0, 0))
    _save(root / "dogs" / "b.png", (0, 0, 0))
    (root / "dogs" / "notes.txt").write_text("not an image")
    _save(root / ".hidden" / "x.png", (0, 0, 0))
    return root


def test_image_folder(folder: Path) -> None:
    ds = ImageFolder(str(folder), image_size=8)
    assert ds.class_names == ("cats", "dogs") and ds.num_classes == 2
    assert ds.data.shape == (5, 3, 8, 8) and ds.data.dtype == torch.float32
    assert ds.shape == (3, 8, 8) and ds.dim == 192 and len(ds) == 5
    assert ds.labels.tolist() == [0, 0, 0, 1, 1] and ds.labels.dtype == torch.long
    torch.testing.assert_close(ds.data[:3], torch.ones(3, 3, 8, 8))
    torch.testing.assert_close(ds.data[3:], -torch.ones(2, 3, 8, 8))
    image, label = ds[4]
    assert image.shape == (3, 8, 8) and label == 1
    grey = build("dataset", {"type": "image_folder", "root": str(folder), "image_size": 4, "channels": 1})
    assert grey.data.shape == (5, 1, 4, 4)


def test_single_class_at_top_level(tmp_path: Path) -> None:
    for i, v in enumerate([0, 51, 255]):
        _save(tmp_path / f"{i}.png", (v, v, v))
    ds = ImageFolder(str(tmp_path), image_size=6, channels=1)
    assert ds.num_classes == 1 and ds.class_names == (tmp_path.name,) and ds.labels.tolist() == [0, 0, 0]
    torch.testing.assert_close(ds.data[:, 0, 0, 0], torch.tensor([-1.0, 51 / 127.5 - 1, 1.0]))


def test_resize_center_crop() -> None:
    """The shorter side goes to the target size and the middle is kept."""
    x = torch.randn(2, 3, 4, 8)
    assert torch.equal(resize_center_crop(x, 4), x[..., 2:6])  # no resize needed: a pure crop
    assert torch.equal(resize_center_crop(x.transpose(-1, -2), 4), x.transpose(-1, -2)[..., 2:6, :])
    assert resize_center_crop(torch.zeros(2, 3, 9, 7), 5).shape == (2, 3, 5, 5)
    torch.testing.assert_close(resize_center_crop(torch.full((1, 1, 30, 50), 0.3), 7), torch.full((1, 1, 7, 7), 0.3))


def test_images_to_tensor_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed sizes and grey ``[H, W]`` arrays; chunking does not change the result."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(8, 8), (8, 8), (6, 10), (8, 8), (8, 8), (8, 8)]]
    x = images_to_tensor(arrays, 4, 1)
    assert x.shape == (6, 1, 4, 4) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    monkeypatch.setattr(images_module, "_CHUNK_VALUES", 100)  # flush after every other 8x8 image
    assert torch.equal(images_to_tensor(arrays, 4, 1), x)
    assert images_to_tensor([], 4, 3).shape == (0, 3, 4, 4)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(GenlabError, match="'.*nowhere' does not exist"):
        ImageFolder(str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(GenlabError, match=r"no images found in '.*empty' \(searched for .png, .jpg, .jpeg, .bmp"):
        ImageFolder(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(GenlabError, match="cannot read image '.*broken.png'"):
        ImageFolder(str(tmp_path / "bad"))
    with pytest.raises(ConfigError, match="channels: expected one of 1, 3"):
        build("dataset", {"type": "image_folder", "root": str(tmp_path), "channels": 2})


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_torchvision_missing_root(tmp_path: Path, no_network: None) -> None:
    root = tmp_path / "no_data_here"
    with pytest.raises(GenlabError, match=r"MNIST files not found under '.*no_data_here'.*pass `download: true`"):
        TorchvisionDataset("MNIST", str(root))
    assert not (root / "MNIST").exists()


def test_torchvision_unknown_name() -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'; did you mean 'MNIST'"):
        TorchvisionDataset("mnist", "unused")
    with pytest.raises(ConfigError, match="unknown dataset 'CIFAR11'; did you mean 'CIFAR10'"):
        TorchvisionDataset("CIFAR11", "unused")


def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX format: magic (0, 0, uint8 = 0x08, ndim), big-endian int32 sizes, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_reads_local_mnist_files(tmp_path: Path, no_network: None) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.zeros((6, 28, 28), np.uint8)
    images[:, 10:18, 10:18] = 255  # a white square in the middle
    for split in ("train", "t10k"):  # torchvision checks that all four files exist
        _write_idx(raw / f"{split}-images-idx3-ubyte", images)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.array([3, 1, 4, 1, 5, 9]))
    cfg = {"type": "torchvision", "name": "MNIST", "root": str(tmp_path), "train": False, "image_size": 14, "limit": 4}
    ds = build("dataset", cfg)
    assert ds.data.shape == (4, 1, 14, 14) and ds.shape == (1, 14, 14) and ds.dim == 196
    assert ds.labels.tolist() == [3, 1, 4, 1] and ds.num_classes == 10 and ds.class_names[3] == "3 - three"
    assert ds.data.min() == -1 and ds.data.max() == 1 and ds.data[0, 0, 7, 7] == 1 and ds.data[0, 0, 0, 0] == -1
    rgb = TorchvisionDataset("MNIST", str(tmp_path), train=False, image_size=28, channels=3)
    assert rgb.data.shape == (6, 3, 28, 28) and torch.equal(rgb.data[:, 0], rgb.data[:, 2])
    assert torch.equal(rgb.data[:, 0], torch.from_numpy(images).float() / 127.5 - 1)
