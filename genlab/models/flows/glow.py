"""Glow's invertible 1x1 convolution (LU-parameterised), its coupling, and one step of flow
(Kingma and Dhariwal 2018, Sec. 3 and Table 1): actnorm -> 1x1 conv -> coupling.

1x1 convolution (Sec. 3.2): y = W x at every pixel, W = P L (U + diag(sign_s exp(log_s))) with
P a fixed permutation, L unit lower triangular, U strictly upper triangular; log|det| = H W sum log_s.

Coupling (Table 1, written as openai/glow's code computes it): x_a, x_b = split(x) by channels,
(t, s_raw) = NN(x_a) with t = h[:, 0::2], s_raw = h[:, 1::2], s = sigmoid(s_raw + 2),
y_b = (x_b + t) * s, log|det| = sum log s; ``additive``: y_b = x_b + t (NN's output has only t).
NN's last convolution starts at zero (Sec. 3.3), so each coupling starts as (nearly) the identity.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.core.bounds import NonNegativeInt, PositiveInt
from genlab.core.registry import register
from genlab.models.flows.base import (FlowChain, FlowTransform, batch_logdet, check_channels, sum_except_batch,
                                      zero_logdet)
from genlab.models.flows.context import Context, with_context
from genlab.models.flows.nets import ConvNet
from genlab.models.flows.normalization import ActNorm


@register("flow_transform", "invertible_conv1x1")
class InvertibleConv1x1(FlowTransform):
    """Glow's invertible 1x1 convolution with the LU parameterisation (Sec. 3.2), initialised from a random
    rotation: ``[B, C, H, W] -> [B, C, H, W]``, or ``[B, D]`` (a learned linear map of the features).
    Range: channels >= 1."""

    def __init__(self, channels: PositiveInt) -> None:
        super().__init__()
        self.channels = channels
        q, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("P", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.L = nn.Parameter(torch.tril(lower, -1).float())
        self.U = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(s.abs().log().float())

    def weight(self, like: Tensor) -> Tensor:
        """W = P L (U + diag(sign_s exp(log_s))): [C, C] in ``like``'s dtype."""
        eye = torch.eye(self.channels, dtype=like.dtype, device=like.device)
        lower = torch.tril(self.L.to(like.dtype), -1) + eye
        upper = torch.triu(self.U.to(like.dtype), 1) + torch.diag(self.sign_s.to(like.dtype) * self.log_s.to(like.dtype).exp())
        return self.P.to(like.dtype) @ lower @ upper

    def _mix(self, x: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(x, w[:, :, None, None]) if x.ndim == 4 else x @ w.T

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_channels(x, self.channels, "InvertibleConv1x1")
        logdet = self.log_s.to(x.dtype).sum() * x[0, 0].numel()
        return self._mix(x, self.weight(x)), batch_logdet(logdet, x)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_channels(z, self.channels, "InvertibleConv1x1")
        w = self.weight(z.double() if z.dtype in (torch.float16, torch.bfloat16) else z)
        w_inv = torch.linalg.inv(w).to(z.dtype)
        logdet = -self.log_s.to(z.dtype).sum() * z[0, 0].numel()
        return self._mix(z, w_inv), batch_logdet(logdet, z)


@register("flow_transform", "glow_coupling")
class GlowCoupling(FlowTransform):
    """Glow's affine (or ``additive``) coupling on channels: ``[B, C, H, W]``, C >= 2; the first
    ceil(C / 2) channels condition the rest; with ``num_classes`` (class labels) or ``context`` (a context
    tensor's features) NN sees cond too (:mod:`.context`). Range: channels >= 2 (checked), hidden >= 1,
    context >= 0, num_classes >= 1."""

    def __init__(self, channels: PositiveInt, hidden: PositiveInt = 128,
                 kind: Literal["affine", "additive"] = "affine", context: NonNegativeInt = 0,
                 num_classes: PositiveInt | None = None) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"GlowCoupling: channels must be >= 2 (a channel split), got {channels}")
        self.channels, self.kind = channels, kind
        self.split = (channels + 1) // 2
        self.context = Context(context, num_classes, "GlowCoupling")
        self.net = ConvNet(self.split + self.context.features, (2 if kind == "affine" else 1) * (channels - self.split),
                           hidden)

    def _t_log_s(self, x_a: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
        h = self.net(with_context(x_a, self.context(cond, x_a)))
        if self.kind == "additive":
            return h, None
        return h[:, 0::2], F.logsigmoid(h[:, 1::2] + 2)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_channels(x, self.channels, "GlowCoupling")
        x_a, x_b = x[:, :self.split], x[:, self.split:]
        t, log_s = self._t_log_s(x_a, cond)
        if log_s is None:
            return torch.cat([x_a, x_b + t], 1), zero_logdet(x)
        return torch.cat([x_a, (x_b + t) * log_s.exp()], 1), sum_except_batch(log_s)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_channels(z, self.channels, "GlowCoupling")
        z_a, z_b = z[:, :self.split], z[:, self.split:]
        t, log_s = self._t_log_s(z_a, cond)
        if log_s is None:
            return torch.cat([z_a, z_b - t], 1), zero_logdet(z)
        return torch.cat([z_a, z_b * (-log_s).exp() - t], 1), -sum_except_batch(log_s)


@register("flow_transform", "glow_step")
class GlowStep(FlowChain):
    """One step of flow (Glow Fig. 2a): actnorm -> invertible 1x1 conv -> coupling, on ``[B, C, H, W]``.
    Submodules ``transforms.0`` (ActNorm), ``.1`` (InvertibleConv1x1), ``.2`` (GlowCoupling, conditioned on
    ``num_classes`` labels or a ``context`` tensor if given). Range: channels >= 2, hidden >= 1, context >= 0,
    num_classes >= 1."""

    def __init__(self, channels: PositiveInt, hidden: PositiveInt = 128,
                 coupling: Literal["affine", "additive"] = "affine", context: NonNegativeInt = 0,
                 num_classes: PositiveInt | None = None) -> None:
        super().__init__([ActNorm(channels), InvertibleConv1x1(channels),
                          GlowCoupling(channels, hidden, coupling, context, num_classes)])
