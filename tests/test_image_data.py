from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.core import build
from genlab.core.checkpoint import latest_checkpoint
from genlab.core.config import load_config
from genlab.core.errors import ConfigError, GenlabError
from genlab.data import images as images_module
from genlab.data.images import ImageFolder, TorchvisionDataset, images_to_tensor, resize_center_crop
from genlab.data.loading import BatchStream, ItemKey, training_batches
from genlab.training import Experiment, Trainer
from genlab.training.experiment import item_shape


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
    assert not hasattr(ds, "data")  # lazy: the trainer reads it through a DataLoader
    assert ds.shape == (3, 8, 8) and ds.dim == 192 and len(ds) == 5
    assert ds.labels.tolist() == [0, 0, 0, 1, 1] and ds.labels.dtype == torch.long
    images = ds.images(range(5))
    assert images.shape == (5, 3, 8, 8) and images.dtype == torch.float32
    torch.testing.assert_close(images[:3], torch.ones(3, 3, 8, 8))
    torch.testing.assert_close(images[3:], -torch.ones(2, 3, 8, 8))
    image, label = ds[4]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == 1
    assert torch.equal(ds[-1][0], image)
    with pytest.raises(IndexError):
        ds[5]
    grey = build("dataset", {"type": "image_folder", "root": str(folder), "image_size": 4, "channels": 1})
    assert grey.shape == (1, 4, 4) and grey[0][0].shape == (1, 4, 4)


def test_single_class_at_top_level(tmp_path: Path) -> None:
    for i, v in enumerate([0, 51, 255]):
        _save(tmp_path / f"{i}.png", (v, v, v))
    ds = ImageFolder(str(tmp_path), image_size=6, channels=1)
    assert ds.num_classes == 1 and ds.class_names == (tmp_path.name,) and ds.labels.tolist() == [0, 0, 0]
    torch.testing.assert_close(ds.images([0, 1, 2])[:, 0, 0, 0], torch.tensor([-1.0, 51 / 127.5 - 1, 1.0]))


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
    bad = ImageFolder(str(tmp_path / "bad"))  # files are read when an item is, not before
    with pytest.raises(GenlabError, match="cannot read image '.*broken.png'"):
        bad[0]
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


# ---- lazy reading, the random flip, training from a folder ---------------------------------------------

@pytest.fixture()
def noisy_folder(tmp_path: Path) -> Path:
    """20 random RGB PNGs in two classes (12 and 8), of three sizes (square, wide, tall): no image is
    its own mirror image, and every path of the resize is taken."""
    rng = np.random.default_rng(0)
    root = tmp_path / "noisy"
    for i in range(20):
        h, w = [(10, 10), (9, 14), (15, 11)][i % 3]
        path = root / ("a" if i < 12 else "b") / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return root


def counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the image folder reads from now on (through ``images._read``), in order."""
    reads: list[Path] = []
    real = images_module._read

    def read(path: Path, channels: int) -> np.ndarray:
        reads.append(path)
        return real(path, channels)

    monkeypatch.setattr(images_module, "_read", read)
    return reads


def test_image_folder_reads_no_image_until_an_item_is_asked_for(noisy_folder: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    reads = counting_reads(monkeypatch)
    ds = build("dataset", {"type": "image_folder", "root": str(noisy_folder), "image_size": 8, "channels": 1})
    assert reads == []  # listing files and labels reads no image
    assert len(ds) == 20 and ds.shape == (1, 8, 8) and ds.labels.tolist() == [0] * 12 + [1] * 8
    assert item_shape(ds) == (1, 8, 8) and reads == []  # what a model is built for
    image, label = ds[13]
    assert reads == [ds.files[13]] and image.shape == (1, 8, 8) and label == 1
    ds.images([2, 5])
    assert reads == [ds.files[13], ds.files[2], ds.files[5]]


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_lazy_items_equal_the_eager_conversion(noisy_folder: Path, channels: int, mode: str) -> None:
    """Item i is what converting the whole folder at once (the former in-memory path) gave for it."""
    ds = ImageFolder(str(noisy_folder), image_size=7, channels=channels)
    eager = images_to_tensor((np.asarray(Image.open(f).convert(mode)) for f in ds.files), 7, channels)
    lazy = torch.stack([ds[i][0] for i in range(len(ds))])
    assert lazy.shape == (20, channels, 7, 7) and lazy.min() >= -1 and lazy.max() <= 1
    torch.testing.assert_close(lazy, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(ds.images(torch.arange(20)), eager, rtol=0, atol=1e-6)


def test_flip_is_a_fair_coin_of_seed_epoch_and_index(noisy_folder: Path) -> None:
    ds = ImageFolder(str(noisy_folder), image_size=8, flip=True)
    keys = [ItemKey(i, epoch, seed) for seed in (0, 1) for epoch in range(25) for i in range(20)]
    coins = [ds.flipped(k) for k in keys]
    assert 0.45 < sum(coins) / len(coins) < 0.55  # 1000 keys: 3 standard deviations is 0.047
    assert coins == [ds.flipped(k) for k in keys]  # a function of the key
    per_item = {i: {ds.flipped(ItemKey(i, e, 0)) for e in range(25)} for i in range(20)}
    assert all(s == {True, False} for s in per_item.values())  # an item is flipped in some epochs, not others
    assert [ds.flipped(ItemKey(i, 0, 0)) for i in range(20)] != [ds.flipped(ItemKey(i, 0, 1)) for i in range(20)]
    plain, _ = ds[3]
    flipped_key = next(k for k in keys if k.index == 3 and ds.flipped(k))
    kept_key = next(k for k in keys if k.index == 3 and not ds.flipped(k))
    assert torch.equal(ds[flipped_key][0], plain.flip(-1)) and not torch.equal(plain.flip(-1), plain)
    assert torch.equal(ds[kept_key][0], plain)  # and a plain index is never flipped
    assert not any(ImageFolder(str(noisy_folder), flip=False).flipped(k) for k in keys[:50])


def test_flips_repeat_when_a_stream_restarts_mid_epoch(noisy_folder: Path) -> None:
    """Batch k of a stream started at batch k is batch k of the whole stream, flips included, whatever
    the number of workers (20 items in batches of 6: restarts mid-epoch, the stream crosses epochs)."""
    ds = ImageFolder(str(noisy_folder), image_size=6, flip=True)
    whole = iter(training_batches(ds, 6, seed=3))
    batches = [next(whole) for _ in range(8)]
    unflipped = torch.stack([ds[i][0] for i in range(len(ds))])
    order = [i for e in range(3) for i in BatchStream(20, 6, seed=3).epoch_order(e)][:48]
    x = torch.cat([b["x"] for b in batches])
    flipped = [torch.equal(x[j], unflipped[i].flip(-1)) for j, i in enumerate(order)]
    assert all(flipped[j] or torch.equal(x[j], unflipped[i]) for j, i in enumerate(order))
    assert 12 < sum(flipped) < 36  # some flipped, some not
    assert torch.equal(torch.cat([b["class_labels"] for b in batches]), ds.labels[order])
    for start, workers in ((2, 0), (5, 0), (3, 2)):
        resumed = iter(training_batches(ds, 6, seed=3, start=start, num_workers=workers))
        for k in range(start, 8):
            b = next(resumed)
            assert torch.equal(b["x"], batches[k]["x"]), (start, workers, k)
    other_seed = next(iter(training_batches(ds, 6, seed=4)))
    assert other_seed["x"].shape == (6, 3, 6, 6)


TINY_UNET = ["model.channels=8", "model.channel_mult=[1]", "model.attention_levels=[]", "model.norm_groups=4",
             "model.num_classes=2", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1",
             "train.checkpoint_every=2", "sampler.steps=2"]


def folder_experiment(root: Path, *overrides: str) -> Experiment:
    config = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
    data = ["data.type=image_folder", f"data.root={root}", "data.image_size=8", "data.channels=1", "data.flip=true"]
    return Experiment.from_config(load_config(config, [*data, *TINY_UNET, *overrides]))


def test_training_from_an_image_folder_with_workers(noisy_folder: Path, tmp_path: Path) -> None:
    """A class-conditional UNet trains from a lazy, flipped image folder read by 2 worker processes;
    an unconditional one gets batches without labels."""
    exp = folder_experiment(noisy_folder, "train.steps=2", "train.num_workers=2")
    assert exp.data_shape == (1, 8, 8) and exp.num_classes == 2 and exp.model.in_channels == 1
    with Trainer(exp, tmp_path / "run", progress=False) as tr:
        tr.fit()
        assert tr.step == 2 and all(math.isfinite(loss) for _, loss in tr.losses)
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002"
    exp = folder_experiment(noisy_folder, "train.steps=1", "model.num_classes=null")
    with Trainer(exp, tmp_path / "unconditional", progress=False) as tr:
        assert "class_labels" not in next(tr._batches())
        tr.fit()
    with pytest.raises(ConfigError, match="'image_folder' has no test split"):
        exp.heldout_images()  # an image folder has no test split to load at once


def test_a_flipped_folder_run_resumed_mid_epoch_ends_with_the_same_weights(noisy_folder: Path, tmp_path: Path) -> None:
    """20 images in batches of 3 with 2 micro-batches a step: the step-2 checkpoint falls mid-epoch,
    the resumed run (read by 2 workers, the whole one by none) crosses into the next epoch."""
    import shutil

    from genlab.core.checkpoint import load_weights

    args = ("train.steps=4", "train.grad_accum=2", "train.batch_size=3")
    with Trainer(folder_experiment(noisy_folder, *args), tmp_path / "whole", progress=False) as tr:
        tr.fit()
    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step_0000004")
    with Trainer(folder_experiment(noisy_folder, *args, "train.num_workers=2"), tmp_path / "split", progress=False,
                 resume=True) as tr:
        assert tr.step == 2
        tr.fit()
    a, b = (load_weights(latest_checkpoint(tmp_path / d) / "model.safetensors") for d in ("whole", "split"))
    assert latest_checkpoint(tmp_path / "split").name == "step_0000004" and all(torch.equal(a[k], b[k]) for k in a)
