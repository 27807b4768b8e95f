"""Rational-quadratic spline coupling (Durkan et al. 2019, Sec. 3.1 and 3.3): a coupling layer whose
elementwise map is the spline of :mod:`.splines`, its 3K - 1 parameters per changed value computed by a
network of the kept values; y_b = g(x_b; theta(x_a)), log|det| = sum log g'(x_b). With ``kept_spline`` the
kept values also go through a spline of their own with learned, unconditional parameters, y_a = h(x_a)
(zuko's coupling, ``NSF(passes=2)``): the Jacobian stays triangular and log|det| gains sum log h'(x_a)."""

from __future__ import annotations

from typing import Annotated

import torch
from einops import rearrange
from torch import Tensor, nn

from genlab.core.bounds import NonNegativeInt, PositiveFloat, PositiveInt, Range
from genlab.core.registry import register
from genlab.models.flows.base import FlowTransform, Parity, check_channels
from genlab.models.flows.context import Context, with_context
from genlab.models.flows.couplings import MaskKind, coupling_mask
from genlab.models.flows.nets import DenseNet
from genlab.models.flows.splines import rq_spline, spline_params_count


@register("flow_transform", "spline_coupling")
class SplineCoupling(FlowTransform):
    """Spline coupling on vectors ``[B, features]``: the kept values condition the spline of the others;
    ``mask`` ``checkerboard`` keeps the features i with i % 2 == ``parity``, ``channel`` the first half
    (``parity`` 1: the second half; zuko's ``NSF(passes=2)`` split, :func:`.couplings.coupling_mask`).
    ``bins`` K, ``bound`` B (the spline's interval [-B, B]; identity outside); ``num_classes`` (class labels)
    or ``context`` (a context vector's features): the spline's parameters see cond too (:mod:`.context`);
    ``kept_spline``: the kept values pass through an unconditional learned spline (zero-initialised: the
    identity). ``zero_init`` (default): the network's last layer starts at zero, a fresh coupling is the
    identity; False: PyTorch's random initialisation, as zuko's. With ``mask="channel"``,
    ``kept_spline=True``, ``zero_init=False`` the layer is zuko's coupling (``tests/test_flows_nsf_zuko.py``).
    Ranges: features >= 2, bins, hidden, depth >= 1, bound > 0, context >= 0, num_classes >= 1."""

    def __init__(self, features: Annotated[int, Range(ge=2)], bins: PositiveInt = 8, bound: PositiveFloat = 5.0,
                 parity: Parity = 0, hidden: PositiveInt = 64, depth: PositiveInt = 2, context: NonNegativeInt = 0,
                 num_classes: PositiveInt | None = None, kept_spline: bool = False, zero_init: bool = True,
                 mask: MaskKind = "checkerboard") -> None:
        super().__init__()
        if mask not in ("checkerboard", "channel"):
            raise ValueError(f"SplineCoupling: mask must be 'checkerboard' or 'channel', got {mask!r}")
        self.features, self.bins, self.bound = features, bins, bound
        kept = coupling_mask((features,), mask, parity).bool()
        self.register_buffer("kept", kept.nonzero()[:, 0], persistent=False)
        self.register_buffer("changed", (~kept).nonzero()[:, 0], persistent=False)
        self.context = Context(context, num_classes, "SplineCoupling")
        self.net = DenseNet(len(self.kept) + self.context.features, len(self.changed) * spline_params_count(bins),
                            hidden, depth, zero_init)
        self.kept_params = nn.Parameter(torch.zeros(len(self.kept), spline_params_count(bins))) if kept_spline else None

    def _spline(self, x: Tensor, cond: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        check_channels(x, self.features, "SplineCoupling")
        if x.ndim != 2:
            raise ValueError(f"SplineCoupling: expected vectors [B, {self.features}], got {list(x.shape)}")
        x_a, log_grad_a = x[:, self.kept], None
        if self.kept_params is not None and inverse:  # recover the kept x_a first: the conditioner's input
            x_a, log_grad_a = rq_spline(x_a, self.kept_params, self.bound, inverse=True)
        h = with_context(x_a, self.context(cond, x))
        params = rearrange(self.net(h), "b (d p) -> b d p", d=len(self.changed))
        if self.kept_params is not None and not inverse:  # both halves' splines in one evaluation
            theta = params.new_zeros(x.shape[0], self.features, params.shape[-1]).index_copy(1, self.changed, params)
            theta = theta.index_copy(1, self.kept, self.kept_params.to(params.dtype).expand(x.shape[0], -1, -1))
            y, log_grad = rq_spline(x, theta, self.bound)
            return y, log_grad.sum(1)
        y_b, log_grad = rq_spline(x[:, self.changed], params, self.bound, inverse=inverse)
        y = x.index_copy(1, self.changed, y_b.to(x.dtype))
        if log_grad_a is None:
            return y, log_grad.sum(1)
        return y.index_copy(1, self.kept, x_a.to(x.dtype)), log_grad.sum(1) + log_grad_a.sum(1)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._spline(x, cond, inverse=False)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._spline(z, cond, inverse=True)
