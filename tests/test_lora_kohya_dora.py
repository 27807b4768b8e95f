"""DoRA in the kohya layout (LyCORIS's ``dora_scale``, ``wd_on_out``): peft -> genlab -> kohya -> genlab keeps
the outputs; each layer's output is the merged weight of LyCORIS's formula read from the file's tensors,
dora_scale * W' / ||W'||_rows with W' = W + (alpha / r) up @ down; the input-axis layout is refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from genlab.adapters.lora import lora_layers
from genlab.interop.lora_formats import _module_names, detect_format, load_lora, save_lora
from test_lora import _inputs
from test_lora_formats import _peft_model


def _merged(tensors: dict[str, torch.Tensor], key: str, weight: torch.Tensor) -> torch.Tensor:
    """LyCORIS's merged DoRA weight (wd_on_out) of layer ``key`` from the kohya file's tensors."""
    down, up, alpha = (tensors[f"{key}.{k}"] for k in ("lora_down.weight", "lora_up.weight", "alpha"))
    delta = (up.flatten(1) @ down.flatten(1)).view(weight.shape) * (alpha / down.shape[0])
    w = weight + delta
    norm = w.flatten(1).norm(dim=1).view(-1, *[1] * (w.ndim - 1))
    return tensors[f"{key}.dora_scale"] * w / norm


def _from_peft(tmp_path) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(the base UNet, a peft DoRA model of it, a genlab copy of the base with the peft adapter loaded)."""
    base, theirs = _peft_model(dora=True)
    theirs.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    load_lora(model, tmp_path / "peft")
    return base, theirs, model


def test_dora_round_trip_through_kohya_and_lycoris_formula(tmp_path) -> None:
    base, theirs, model = _from_peft(tmp_path)
    x = _inputs(base)
    y = theirs(*x)
    file = save_lora(model, tmp_path / "dora.safetensors", format="kohya")
    assert detect_format(file) == "kohya"
    back = copy.deepcopy(base)
    load_lora(back, file)
    torch.testing.assert_close(back(*x), y, rtol=0, atol=1e-6)
    tensors, names = load_file(file), _module_names(base, "kohya")
    layers, g = lora_layers(back), torch.Generator().manual_seed(5)
    for n in ("down.1.attns.0.blocks.0.attn_1.to_q", "down.0.blocks.0.conv_1"):
        layer, base_layer = layers[n], dict(base.named_modules())[n]
        w = _merged(tensors, names[n], base_layer.weight)
        if isinstance(layer, torch.nn.Conv2d):
            assert tensors[f"{names[n]}.dora_scale"].shape == (layer.out_channels, 1, 1, 1)
            h = torch.randn(2, layer.in_channels, 6, 6, generator=g, dtype=w.dtype)
            want = F.conv2d(h, w, base_layer.bias, layer.stride, layer.padding)
        else:
            assert tensors[f"{names[n]}.dora_scale"].shape == (layer.out_features, 1)
            h = torch.randn(3, layer.in_features, generator=g, dtype=w.dtype)
            want = F.linear(h, w, base_layer.bias)
        with torch.no_grad():
            torch.testing.assert_close(layer(h), want, rtol=0, atol=1e-10)


def test_input_axis_dora_scale_is_refused(tmp_path) -> None:
    base, _, model = _from_peft(tmp_path)
    tensors = load_file(save_lora(model, tmp_path / "k.safetensors", format="kohya"))
    key = next(k for k in tensors if k.endswith("to_k.dora_scale"))
    rows = tensors[f"{key.removesuffix('.dora_scale')}.lora_down.weight"].shape[1]
    tensors[key] = torch.ones(1, rows, dtype=tensors[key].dtype)  # LyCORIS wd_on_out: false
    save_file(tensors, tmp_path / "in_axis.safetensors")
    with pytest.raises(ValueError, match=r"dora_scale \[1, \d+\], LyCORIS's magnitudes per input column"):
        load_lora(copy.deepcopy(base), tmp_path / "in_axis.safetensors")
