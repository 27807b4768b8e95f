"""LPIPS, the learned perceptual image patch similarity (Zhang et al. 2018, Eq. 1), with a VGG16 trunk, in
the layout of the ``lpips`` package: the perceptual loss of taming-transformers' VQGAN and of latent
diffusion's autoencoders.

    d(x, x0) = sum_l 1 / (H_l W_l) sum_{h,w} || w_l * (y_hat_l - y_hat0_l)_{hw} ||_2^2

where ``y_hat_l`` are the activations of VGG16's relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (torchvision's
``vgg16().features`` cut into ``slice1`` ... ``slice5``), each divided by its norm over the channels
(``unit-normalised``), and ``w_l`` the learned 1x1 ``lin`` layers (no bias). Inputs in [-1, 1] are first
shifted and scaled by the package's ``scaling_layer`` (the ImageNet statistics in [-1, 1] units);
one-channel images are repeated to three.

Nothing downloads: :meth:`LPIPS.from_file` loads a local file (safetensors, or a ``torch.save`` file read with
``weights_only=True``) holding the state dict of ``lpips.LPIPS(net="vgg")``: ``net.slice{1-5}.{i}.weight/bias``
(VGG16's convolutions), ``lin{0-4}.model.1.weight`` and ``scaling_layer.shift/scale`` (the package's
``lins.{k}`` aliases of the lin weights, in its ``state_dict()``, may be there too and are ignored).
``scripts/lpips_weights.py`` writes one from an installed ``lpips`` (its lin weights) and a torchvision VGG16
state dict (:func:`lpips_state_dict`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from einops import repeat
from torch import Tensor, nn
from torchvision.models.vgg import cfgs, make_layers

from genlab.core.checkpoint import load_weights
from genlab.core.errors import CheckpointError

CHANNELS = (64, 128, 256, 512, 512)  # relu1_2 ... relu5_3
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # torchvision vgg16().features indices of each slice


class _ScalingLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class _VGG16Taps(nn.Module):
    """torchvision's VGG16 features (``vgg16().features``, configuration "D", built without weights and without
    the 120M-parameter classifier; never downloaded), as five slices."""

    def __init__(self) -> None:
        super().__init__()
        features = make_layers(cfgs["D"])
        for k, (start, stop) in enumerate(SLICES, 1):
            self.add_module(f"slice{k}", nn.Sequential())
            for i in range(start, stop):
                getattr(self, f"slice{k}").add_module(str(i), features[i])

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for k in range(1, len(SLICES) + 1):
            x = getattr(self, f"slice{k}")(x)
            taps.append(x)
        return taps


class _Lin(nn.Module):
    """The package's ``NetLinLayer`` (its dropout, index 0, an identity here): ``model.1`` is the 1x1 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def unit_normalize(x: Tensor, eps: float = 1e-10) -> Tensor:
    """``x [B, C, H, W]`` divided by its norm over the channels at each position (the package's ``normalize_tensor``)."""
    return x / (x.square().sum(1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS with a VGG16 trunk (see the module docstring); frozen, in eval mode. ``forward(x, y)`` with images
    ``[B, C, H, W]`` in [-1, 1], C = 1 or 3, returns the distance per image ``[B]``. Build it with
    :meth:`from_file`; a plain ``LPIPS()`` holds random weights."""

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = _ScalingLayer()
        self.net = _VGG16Taps()
        for k, channels in enumerate(CHANNELS):
            self.add_module(f"lin{k}", _Lin(channels))
        self.eval().requires_grad_(False)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LPIPS:
        """LPIPS with the weights of the local file ``path`` (``.safetensors``, or ``.pt`` / ``.pth`` read with
        ``torch.load(weights_only=True)``) in the ``lpips`` package's key layout. CheckpointError naming the
        path if the file is missing or unreadable, or naming the keys that are missing or unexpected."""
        module = cls()
        module.load_state_dict(read_state_dict(path, module))
        return module

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # a fixed metric: always in eval mode

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """``x, y [B, C, H, W]`` in [-1, 1] -> d(x, y) ``[B]`` (Zhang et al. 2018, Eq. 1)."""
        if x.shape[1] == 1:
            x, y = (repeat(t, "b 1 h w -> b c h w", c=3) for t in (x, y))
        taps_x, taps_y = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = x.new_zeros(x.shape[0])
        for k, (a, b) in enumerate(zip(taps_x, taps_y)):
            diff = (unit_normalize(a) - unit_normalize(b)).square()
            total = total + getattr(self, f"lin{k}")(diff).mean((1, 2, 3))
        return total


def read_state_dict(path: str | os.PathLike, module: nn.Module) -> dict[str, Tensor]:
    """The tensors of the weights file ``path`` for ``module``: CheckpointError if it is missing or unreadable,
    or if its keys are not exactly ``module``'s (naming the missing and the unexpected ones)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LPIPS weights file {path} does not exist; write one with scripts/lpips_weights.py "
                              "(from an installed lpips package and a torchvision VGG16 state dict)")
    if path.suffix == ".safetensors":
        state = load_weights(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (pickle, zip and weights_only errors alike)
            raise CheckpointError(f"{path}: not a readable weights file ({e})") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("lins.")}  # the package's aliases of lin{k}
    wanted = module.state_dict().keys()
    missing, unexpected = sorted(wanted - state.keys()), sorted(state.keys() - wanted)
    if missing or unexpected:
        raise CheckpointError(f"{path}: not an LPIPS (VGG16) state dict in the lpips package's layout: "
                              f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected keys "
                              f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    return dict(state)


def lpips_state_dict(vgg: Mapping[str, Tensor], lins: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An LPIPS state dict in the package's layout from a torchvision VGG16 state dict ``vgg`` (its
    ``features.{i}.weight/bias``; the classifier is ignored) and the package's lin weights ``lins``
    (``lin{k}.model.1.weight``, e.g. ``lpips/weights/v0.1/vgg.pth``)."""
    state = {f"scaling_layer.{k}": v for k, v in _ScalingLayer().state_dict().items()}
    for k, (start, stop) in enumerate(SLICES, 1):
        for i in range(start, stop):
            for kind in ("weight", "bias"):
                if f"features.{i}.{kind}" in vgg:
                    state[f"net.slice{k}.{i}.{kind}"] = vgg[f"features.{i}.{kind}"]
    state.update({k: v for k, v in lins.items() if k.startswith("lin") and not k.startswith("lins.")})
    return state
