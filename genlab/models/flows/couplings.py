"""Masked coupling layers: NICE's additive coupling and diagonal scaling (Dinh et al. 2015) and
RealNVP's affine coupling with checkerboard and channel masks (Dinh et al. 2017).

With a binary mask b, the coupling keeps x_b = b * x and changes the rest (RealNVP Sec. 3.4, the masked form):

    additive (NICE Sec. 3.2): y = b * x + (1 - b) * (x + m(b * x)),                    log|det| = 0
    affine (RealNVP):         y = b * x + (1 - b) * (x * exp(s(b * x)) + t(b * x)),   log|det| = sum (1 - b) s

with s = a * tanh(s_raw) (a learned per feature: a bounded log-scale keeps early training stable) and s_raw, t, m
from one conditioner network (zero-initialised last layer: a fresh coupling is the identity).
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from genlab.core.bounds import NonNegativeInt, PositiveInt
from genlab.core.errors import ShapeError
from genlab.core.registry import register
from genlab.models.flows.base import FlowTransform, Parity, batch_logdet, sum_except_batch, zero_logdet
from genlab.models.flows.context import Context, with_context
from genlab.models.flows.nets import ConvNet, DenseNet

MaskKind = Literal["checkerboard", "channel"]


def coupling_mask(shape: tuple[int, ...], kind: MaskKind, parity: int) -> Tensor:
    """The kept part b (1 = kept) for items of ``shape`` = [D] or [C, H, W] (RealNVP Sec. 3.6):
    ``checkerboard``: b = 1 where the (feature or pixel) index sum is even; ``channel``: the first half of
    the features or channels; ``parity`` 1 takes the complement."""
    if kind == "checkerboard":
        if len(shape) == 1:
            mask = torch.arange(shape[0]) % 2 == 0
        else:
            h, w = torch.arange(shape[1]), torch.arange(shape[2])
            mask = rearrange((h[:, None] + w[None, :]) % 2 == 0, "h w -> 1 h w").expand(*shape)
    else:
        if shape[0] < 2:
            raise ValueError(f"a channel mask needs at least 2 features or channels, got shape {list(shape)}")
        mask = rearrange(torch.arange(shape[0]) < shape[0] // 2, "c -> c" if len(shape) == 1 else "c -> c 1 1")
        mask = mask.expand(*shape)
    return (mask != bool(parity)).float()


def _check_shape(shape: list[int], who: str) -> tuple[int, ...]:
    if len(shape) not in (1, 3) or any(s < 1 for s in shape):
        raise ValueError(f"{who}: shape must be [D] (vectors) or [C, H, W] (images) of positive sizes, got {shape}")
    return tuple(shape)


class _MaskedCoupling(FlowTransform):
    """Shared by the additive and affine couplings: the mask and the conditioner ``params_per_value``."""

    def __init__(self, shape: list[int], mask: MaskKind, parity: int, hidden: int, depth: int,
                 params_per_value: int, context: int = 0, num_classes: int | None = None) -> None:
        super().__init__()
        who = type(self).__name__
        self.shape = _check_shape(shape, who)
        if parity not in (0, 1):
            raise ValueError(f"{who}: parity must be 0 or 1 (which part the mask keeps), got {parity}")
        self.register_buffer("mask", coupling_mask(self.shape, mask, parity))
        self.context = Context(context, num_classes, who)
        c, c_in = self.shape[0], self.shape[0] + self.context.features
        self.net = (DenseNet(c_in, params_per_value * c, hidden, depth) if len(self.shape) == 1
                    else ConvNet(c_in, params_per_value * c, hidden))

    def params(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """The conditioner's output on [b * x, context(cond)]: ``[B, params_per_value * C, ...]``."""
        if tuple(x.shape[1:]) != self.shape:
            raise ShapeError(f"{type(self).__name__}: expected x: [B, {', '.join(map(str, self.shape))}], "
                             f"got {list(x.shape)}")
        return self.net(with_context(x * self.mask.to(x.dtype), self.context(cond, x)))


@register("flow_transform", "additive_coupling")
class AdditiveCoupling(_MaskedCoupling):
    """NICE's additive coupling (Dinh et al. 2015, Sec. 3.2): ``y = x + (1 - b) m(b x)``, volume preserving.
    ``shape``: an item's [D] or [C, H, W]; ``mask``: ``checkerboard`` or ``channel``; ``parity`` 0 or 1;
    ``num_classes`` (class labels) or ``context`` (features of a context tensor): m sees cond too
    (:mod:`.context`). Ranges: hidden, depth >= 1, context >= 0, num_classes >= 1."""

    def __init__(self, shape: list[int], mask: MaskKind = "checkerboard", parity: Parity = 0,
                 hidden: PositiveInt = 64, depth: PositiveInt = 2, context: NonNegativeInt = 0,
                 num_classes: PositiveInt | None = None) -> None:
        super().__init__(shape, mask, parity, hidden, depth, 1, context, num_classes)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = x + (1 - self.mask.to(x.dtype)) * self.params(x, cond)
        return y, zero_logdet(x)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z - (1 - self.mask.to(z.dtype)) * self.params(z, cond), zero_logdet(z)


@register("flow_transform", "affine_coupling")
class AffineCoupling(_MaskedCoupling):
    """RealNVP's affine coupling (Dinh et al. 2017, Sec. 3.4): ``y = b x + (1 - b)(x exp(s) + t)`` with
    (s, t) functions of b x, s = a tanh(s_raw); log|det| = sum (1 - b) s (a triangular Jacobian). ``shape``: [D] or
    [C, H, W]; ``mask``: ``checkerboard`` or ``channel``; ``parity`` 0 or 1; ``num_classes`` or ``context``: (s, t)
    see cond too (:mod:`.context`). Ranges: hidden, depth >= 1, context >= 0, num_classes >= 1."""

    def __init__(self, shape: list[int], mask: MaskKind = "checkerboard", parity: Parity = 0,
                 hidden: PositiveInt = 64, depth: PositiveInt = 2, context: NonNegativeInt = 0,
                 num_classes: PositiveInt | None = None) -> None:
        super().__init__(shape, mask, parity, hidden, depth, 2, context, num_classes)
        self.scale = nn.Parameter(torch.ones(self.shape[0]))

    def _s_t(self, x: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        s_raw, t = self.params(x, cond).chunk(2, dim=1)
        a = self.scale.to(x.dtype).view(-1, *[1] * (x.ndim - 2))
        keep = 1 - self.mask.to(x.dtype)
        return keep * a * torch.tanh(s_raw), keep * t

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s, t = self._s_t(x, cond)
        return x * torch.exp(s) + t, sum_except_batch(s)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s, t = self._s_t(z, cond)  # b z = b x: the conditioner sees the same input both ways
        return (z - t) * torch.exp(-s), -sum_except_batch(s)


@register("flow_transform", "diagonal_scaling")
class DiagonalScaling(FlowTransform):
    """NICE's last layer (Dinh et al. 2015, Sec. 3.3): ``z = exp(s) * x``, log|det| = sum s, one s per
    value of an item of ``shape`` ([D] or [C, H, W]), zero-initialised."""

    def __init__(self, shape: list[int]) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(_check_shape(shape, "DiagonalScaling")))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s = self.log_scale.to(x.dtype)
        return x * torch.exp(s), batch_logdet(s.sum(), x)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s = self.log_scale.to(z.dtype)
        return z * torch.exp(-s), batch_logdet(-s.sum(), z)
