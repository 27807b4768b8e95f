"""Autoregressive flows built on MADE: MAF (Papamakarios et al. 2017), IAF (Kingma et al. 2016) and the
autoregressive rational-quadratic spline (Durkan et al. 2019, Sec. 3.3).

Every one is an elementwise bijection u_i -> v_i = tau(u_i; theta_i) whose parameters theta_i come from
MADE applied to the *conditioning* side. MAF conditions on the data x (forward x -> z in one pass:
z_i = (x_i - mu_i(x_{<i})) exp(-alpha_i(x_{<i})); the inverse takes D passes). IAF conditions on the
noise z (Kingma et al. 2016: x_i = mu_i(z_{<i}) + sigma_i(z_{<i}) z_i, one pass from z to x;
forward x -> z takes D passes). log|det dz/dx| = -sum alpha_i (MAF) and -sum log sigma_i (IAF).
With ``num_classes`` (class labels) or ``context`` (a context vector's features), MADE sees cond too:
theta_i = MADE(c_{<i}, cond) (Papamakarios et al. 2017, Sec. 3.4; :mod:`.context`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from genlab.core.bounds import NonNegativeInt, PositiveFloat, PositiveInt
from genlab.core.registry import register
from genlab.models.flows.base import FlowTransform, check_channels, sum_except_batch
from genlab.models.flows.context import Context
from genlab.models.flows.made import MADE
from genlab.models.flows.splines import rq_spline, spline_params_count


class _Autoregressive(FlowTransform):
    """tau(u; theta) with theta = MADE(c): ``conditions_on_data`` (MAF) takes c = x, else (IAF) c = z.
    Subclasses give ``_tau(u, theta, inverse) -> (v, log|dv/du| [B])`` mapping data side -> noise side."""

    conditions_on_data = True

    def __init__(self, features: int, params_per_value: int, hidden: int, depth: int, reverse: bool,
                 context: int = 0, num_classes: int | None = None) -> None:
        super().__init__()
        self.features = features
        self.context = Context(context, num_classes, type(self).__name__)
        self.made = MADE(features, params_per_value, hidden, depth, reverse, self.context.features)

    def _tau(self, u: Tensor, theta: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _one_pass(self, c: Tensor, ctx: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        return self._tau(c, self.made(c, ctx), inverse)

    def _sequential(self, v: Tensor, ctx: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        """Solve c = tau(v; MADE(c)) (tau^{-1} when ``inverse``) for c, one dimension per pass in the
        autoregressive order (theta_i needs c_{<i} only); log|dc/dv| = -log|dv/dc| at the solution."""
        c = torch.zeros_like(v)
        for i in self.made.order:
            c_new, _ = self._tau(v, self.made(c, ctx), inverse)
            c = c.index_copy(1, torch.tensor([i], device=v.device), c_new[:, i:i + 1])
        _, logdet = self._tau(c, self.made(c, ctx), not inverse)
        return c, -logdet

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_channels(x, self.features, type(self).__name__)
        ctx = self.context(cond, x)
        return self._one_pass(x, ctx, False) if self.conditions_on_data else self._sequential(x, ctx, False)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_channels(z, self.features, type(self).__name__)
        ctx = self.context(cond, z)
        return self._sequential(z, ctx, True) if self.conditions_on_data else self._one_pass(z, ctx, True)


class _Affine(_Autoregressive):
    """tau(x; mu, alpha) = (x - mu) exp(-alpha) (data -> noise) and its inverse z exp(alpha) + mu."""

    def _tau(self, u: Tensor, theta: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        mu, alpha = theta[..., 0], theta[..., 1]
        if inverse:
            return u * alpha.exp() + mu, sum_except_batch(alpha)
        return (u - mu) * (-alpha).exp(), -sum_except_batch(alpha)


@register("flow_transform", "maf")
class MAF(_Affine):
    """Masked autoregressive flow (Papamakarios et al. 2017, Sec. 3): ``[B, features]``, fast density
    (x -> z one pass), slow sampling (D passes). ``reverse`` flips the order (alternate it between
    layers); ``num_classes`` or ``context``: a conditional MAF. Ranges: features, hidden, depth >= 1,
    context >= 0, num_classes >= 1."""

    def __init__(self, features: PositiveInt, hidden: PositiveInt = 64, depth: PositiveInt = 2,
                 reverse: bool = False, context: NonNegativeInt = 0, num_classes: PositiveInt | None = None) -> None:
        super().__init__(features, 2, hidden, depth, reverse, context, num_classes)


@register("flow_transform", "iaf")
class IAF(_Affine):
    """Inverse autoregressive flow (Kingma et al. 2016): x = mu(z) + sigma(z) z with sigma = exp(alpha),
    autoregressive in z: fast sampling (z -> x one pass), slow density (D passes). Ranges as MAF's."""

    conditions_on_data = False

    def __init__(self, features: PositiveInt, hidden: PositiveInt = 64, depth: PositiveInt = 2,
                 reverse: bool = False, context: NonNegativeInt = 0, num_classes: PositiveInt | None = None) -> None:
        super().__init__(features, 2, hidden, depth, reverse, context, num_classes)


@register("flow_transform", "spline_autoregressive")
class SplineAutoregressive(_Autoregressive):
    """Autoregressive rational-quadratic spline flow (Durkan et al. 2019, Sec. 3.3), MAF-style:
    z_i = g(x_i; theta_i(x_{<i})) on [-B, B], identity outside; ``num_classes`` or ``context`` as MAF's.
    Ranges: features, bins, hidden, depth >= 1; bound > 0, context >= 0, num_classes >= 1."""

    def __init__(self, features: PositiveInt, bins: PositiveInt = 8, bound: PositiveFloat = 5.0,
                 hidden: PositiveInt = 64, depth: PositiveInt = 2, reverse: bool = False,
                 context: NonNegativeInt = 0, num_classes: PositiveInt | None = None) -> None:
        super().__init__(features, spline_params_count(bins), hidden, depth, reverse, context, num_classes)
        self.bound = bound

    def _tau(self, u: Tensor, theta: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        v, log_grad = rq_spline(u, theta, self.bound, inverse=inverse)
        return v, log_grad.sum(1)
