"""LPIPS (VGG16) against the lpips package: its pretrained lin weights (shipped inside it) and a randomly
initialised VGG16 trunk (``pnet_rand``, nothing downloaded), saved to a temp file and loaded by genlab."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import vgg16

from genlab.core.errors import CheckpointError
from genlab.models.autoencoders.perceptual import LPIPS, lpips_state_dict, read_state_dict

lpips = pytest.importorskip("lpips")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> "lpips.LPIPS":
    home = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as mp:  # a download attempt would fail here, and leave files in home
        mp.setenv("TORCH_HOME", str(home))
        mp.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
        torch.manual_seed(0)
        ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    assert not any(home.iterdir())
    return ref


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_lpips_equals_the_package(reference: "lpips.LPIPS", tmp_path, suffix: str) -> None:
    path = tmp_path / f"lpips{suffix}"
    state = reference.state_dict()  # with the package's lins.{k} aliases of lin{k} (a .pt file keeps them)
    if suffix == ".safetensors":  # which refuses tensors that share memory: without the aliases
        save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("lins.")}, str(path))
    else:
        torch.save(state, path)
    ours = LPIPS.from_file(path)
    g = torch.Generator().manual_seed(1)
    for channels, size in ((3, 32), (1, 16)):
        x, y = (torch.rand(3, channels, size, size, generator=g) * 2 - 1 for _ in range(2))
        with torch.no_grad():
            want = reference(x, y).flatten() if channels == 3 else reference(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)).flatten()
            got = ours(x, y)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert got.shape == (3,) and (got > 0).all()
    x = torch.rand(2, 3, 16, 16, generator=g, requires_grad=True)  # a loss: gradients reach the input only
    ours(x, torch.zeros_like(x)).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in ours.parameters())


def test_lpips_state_dict_from_torchvision_and_lins(reference: "lpips.LPIPS") -> None:
    """The converter's layout: torchvision's ``features.{i}`` -> ``net.slice{k}.{i}``, the package's lin weights."""
    vgg = vgg16(weights=None).state_dict()
    lins = {k: v for k, v in reference.state_dict().items() if k.startswith("lin")}
    state = lpips_state_dict(vgg, lins)
    assert state.keys() == {k for k in reference.state_dict() if not k.startswith("lins.")}
    torch.testing.assert_close(state["net.slice3.14.weight"], vgg["features.14.weight"])
    torch.testing.assert_close(state["lin2.model.1.weight"], lins["lin2.model.1.weight"])


def test_lpips_file_errors_name_the_path_and_keys(reference: "lpips.LPIPS", tmp_path) -> None:
    with pytest.raises(CheckpointError, match="missing.safetensors does not exist"):
        LPIPS.from_file(tmp_path / "missing.safetensors")
    state = {k: v.contiguous() for k, v in reference.state_dict().items()
             if not k.startswith("lins.") and k != "lin4.model.1.weight"}
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"bad.safetensors.*lin4\.model\.1\.weight.*extra\.weight"):
        read_state_dict(tmp_path / "bad.safetensors", LPIPS())
