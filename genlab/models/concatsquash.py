"""FFJORD's time-dependent vector field for continuous normalizing flows: an MLP of ConcatSquash layers.

A ConcatSquash layer (Grathwohl et al. 2019, FFJORD; their ``ConcatSquashLinear``) lets a context c
(the time t, and a class) gate and shift every unit of a linear layer:

    h' = (W h + b) * sigmoid(A c + a) + B c,

so the field's dependence on t is multiplicative at every depth, not only an extra input (as in
``concat_mlp``). FFJORD's 2D toy field is three such layers of 64 units with tanh between them: a
smooth field (tanh, unlike ReLU, has the continuous derivatives the divergence and adaptive solvers
want). With ``num_classes`` the context is [t, one-hot(label + 1)] (label -1: the null class).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from genlab.core.bounds import PositiveInt
from genlab.core.errors import ShapeError
from genlab.core.registry import register
from genlab.models.layers import batch_labels, batch_times

ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU, "silu": nn.SiLU}


class ConcatSquashLinear(nn.Module):
    """``(h [B, dim_in], c [B, context]) -> [B, dim_out]``: (W h + b) * sigmoid(A c + a) + B c."""

    def __init__(self, dim_in: int, dim_out: int, context: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim_in, dim_out)
        self.hyper_gate = nn.Linear(context, dim_out)
        self.hyper_bias = nn.Linear(context, dim_out, bias=False)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        return self.layer(h) * torch.sigmoid(self.hyper_gate(c)) + self.hyper_bias(c)


@register("model", "concatsquash_mlp")
class ConcatSquashMLP(nn.Module):
    """FFJORD's vector field ``(x: [B, dim], t: [B] or scalar, class_labels: [B] | None) -> [B, dim]``:
    ``depth`` ConcatSquash layers of ``hidden`` units and a ConcatSquash output layer, ``activation``
    between them. t enters as it is (a CNF hands t in [0, 1]). Ranges: dim, hidden, depth, num_classes >= 1.
    """

    def __init__(self, dim: PositiveInt = 2, hidden: PositiveInt = 64, depth: PositiveInt = 3,
                 activation: Literal["tanh", "softplus", "elu", "silu"] = "tanh",
                 num_classes: PositiveInt | None = None) -> None:
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        context = 1 + (0 if num_classes is None else num_classes + 1)
        widths = [dim] + [hidden] * depth + [dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b, context) for a, b in zip(widths[:-1], widths[1:]))
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: Tensor, t: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """``x: [B, dim]``, ``t: [B]`` or scalar, ``class_labels: [B]`` long (-1 = null) -> ``[B, dim]``."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ShapeError(f"ConcatSquashMLP: expected x: [B, dim] = [B, {self.dim}], got {list(x.shape)}")
        c = batch_times(t, x, "ConcatSquashMLP").to(x.dtype)[:, None]  # [B, 1]
        if self.num_classes is not None:
            labels = batch_labels(class_labels, x, self.num_classes, "ConcatSquashMLP")
            c = torch.cat([c, nn.functional.one_hot(labels + 1, self.num_classes + 1).to(x.dtype)], dim=1)
        elif class_labels is not None:
            raise ValueError("ConcatSquashMLP: class_labels given, but the model was built with num_classes=None")
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h, c)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h
