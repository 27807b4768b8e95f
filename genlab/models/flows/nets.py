"""Conditioner networks of couplings: they map the unchanged part of x to the parameters of the rest.

They need not be invertible (Dinh et al. 2015, Sec. 3.2). The last layer starts at zero when
``zero_init`` (Kingma and Dhariwal 2018, Sec. 3.3), so a fresh coupling is the identity.
"""

from __future__ import annotations

from torch import Tensor, nn


def zeroed(layer: nn.Module) -> nn.Module:
    """``layer`` with its weight and bias set to zero (its output starts at zero)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class DenseNet(nn.Module):
    """``[B, features_in] -> [B, features_out]``: Linear -> (ReLU -> Linear) x depth."""

    def __init__(self, features_in: int, features_out: int, hidden: int, depth: int, zero_init: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(features_in, hidden)]
        for _ in range(depth - 1):
            layers += [nn.ReLU(), nn.Linear(hidden, hidden)]
        last = nn.Linear(hidden, features_out)
        self.net = nn.Sequential(*layers, nn.ReLU(), zeroed(last) if zero_init else last)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    """``[B, c_in, H, W] -> [B, c_out, H, W]``: Conv3x3 -> ReLU -> Conv1x1 -> ReLU -> Conv3x3, Glow's
    coupling network (Kingma and Dhariwal 2018, Sec. 3.3; normflows' ``ConvNet2d`` with kernels 3, 1, 3)."""

    def __init__(self, channels_in: int, channels_out: int, hidden: int, zero_init: bool = True) -> None:
        super().__init__()
        last = nn.Conv2d(hidden, channels_out, 3, padding=1)
        self.net = nn.Sequential(nn.Conv2d(channels_in, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, hidden, 1), nn.ReLU(), zeroed(last) if zero_init else last)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
