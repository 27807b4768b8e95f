"""Continuous normalizing flow (Chen et al. 2018; FFJORD, Grathwohl et al. 2019) as a flow transform.

Data x = z(0) flows to noise z(1) along dz/dt = f(z, t, c) for t in [0, 1]; by the instantaneous
change of variables (Chen et al. 2018, Thm. 1) d log p(z(t)) / dt = -div f, so

    log p(x) = log p(z(1)) + int_0^1 div_z f(z(t), t, c) dt,

and ``forward`` returns (z(1), log|det dz(1)/dx| = int div f dt), the convention of every flow
transform; ``inverse`` integrates dz/dt = f backwards from z(1) to z(0) (as dz/dtau = -f(z, 1 - tau)),
with log-determinant -int div f dt. The divergence is exact (D backward passes in one batched call:
small D) or FFJORD's Hutchinson estimate p^T (df/dz) p (Sec. 3.1), with ``n_probes`` probes per
sample held fixed over one solve and their estimates averaged. Solver, probes and divergence are
:mod:`genlab.core.ode`'s, the ones the diffusion likelihood uses: a flow-matching model's likelihood
is this CNF on its velocity field. Training backpropagates through the solver steps (direct
backpropagation; no adjoint).

Probes are drawn from the generator handed by :func:`probes_from` (the ``flow_likelihood``
objective hands its own, so training is reproducible and resumes bit for bit); outside it each solve
draws from a fresh generator seeded ``seed`` on the data's device, so ``log_prob`` is a deterministic
function of x.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from genlab.core.bounds import NonNegativeInt, PositiveFloat, PositiveInt
from genlab.core.ode import (Divergence, Method, Probe, check_divergence, check_method, draw_probes, solve_unit,
                             with_divergence)
from genlab.core.registry import build, register
from genlab.models.concatsquash import ConcatSquashMLP
from genlab.models.flows.base import FlowTransform, check_channels

_PROBE_GENERATOR: contextvars.ContextVar[torch.Generator | None] = contextvars.ContextVar("probe_generator",
                                                                                         default=None)


@contextlib.contextmanager
def probes_from(generator: torch.Generator | None) -> Iterator[None]:
    """Within the block, CNFs draw their Hutchinson probes from ``generator`` (on the data's device)."""
    token = _PROBE_GENERATOR.set(generator)
    try:
        yield
    finally:
        _PROBE_GENERATOR.reset(token)


@register("flow_transform", "cnf")
class CNF(FlowTransform):
    """FFJORD's continuous normalizing flow on ``[B, features]`` (or [B, features, H, W] with a network
    that takes images).

    Args:
        features: D, the values per item.
        net: the vector field f, a ``model`` config called as ``net(z, t)`` (``net(z, t, class_labels=cond)``
            with a condition) with t in [0, 1] (``[B]``): default FFJORD's ``concatsquash_mlp`` (64 x 3, tanh);
            ``concat_mlp`` with ``time_scale: 1`` and ``mlp`` with ``time_embedding: fourier`` fit too. From
            Python, any module or function of (z, t).
        divergence: ``"exact"`` or ``"hutchinson"``.
        probe, n_probes: Hutchinson's probes, ``"rademacher"`` or ``"gaussian"``, per sample.
        method, rtol, atol, steps: the solver (:mod:`genlab.core.ode`): dopri5 (default) and the other
            adaptive methods to ``rtol`` / ``atol``; euler, midpoint, heun2, heun3, rk4 in ``steps`` steps.
        eval_divergence, eval_method: used instead in eval mode (default: the same). A likelihood is the
            continuous model's only where the solve is accurate: training may take a cheap fixed-step solver
            and Hutchinson (FFJORD trains with Hutchinson), evaluation ``dopri5`` and ``exact`` (small D).
        seed: the probes' seed outside :func:`probes_from`.
    Attribute ``nfe``: field evaluations of the latest solve. Ranges: features, n_probes, steps >= 1;
    rtol, atol > 0; seed >= 0.
    """

    def __init__(self, features: PositiveInt, net: dict[str, Any] | Callable[..., Tensor] | None = None,
                 divergence: Divergence = "exact", probe: Probe = "rademacher", n_probes: PositiveInt = 1,
                 method: Method = "dopri5", rtol: PositiveFloat = 1e-5, atol: PositiveFloat = 1e-5,
                 steps: PositiveInt = 20, eval_divergence: Divergence | None = None, eval_method: Method | None = None,
                 seed: NonNegativeInt = 0) -> None:
        super().__init__()
        eval_divergence, eval_method = eval_divergence or divergence, eval_method or method
        check_divergence(divergence, probe, n_probes)
        check_divergence(eval_divergence, probe, n_probes)
        check_method(method, rtol, atol, steps)
        check_method(eval_method, rtol, atol, steps)
        self.features = features
        self.net = ConcatSquashMLP(features) if net is None else build("model", net, path="net")
        if not callable(self.net):
            raise TypeError(f"CNF: net must be a model config or a callable f(z, t), got {type(self.net).__name__}")
        self.divergence, self.eval_divergence, self.probe, self.n_probes = divergence, eval_divergence, probe, n_probes
        self.method, self.eval_method, self.rtol, self.atol, self.steps = method, eval_method, rtol, atol, steps
        self.seed = seed
        self.nfe = 0

    def field(self, t: Tensor, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """f(z, t, cond): z [B, ...], t a scalar tensor -> [B, ...]."""
        t = t.to(z.dtype).expand(z.shape[0])
        return self.net(z, t) if cond is None else self.net(z, t, class_labels=cond)

    def _probes(self, x: Tensor) -> Tensor | None:
        if (self.divergence if self.training else self.eval_divergence) == "exact":
            return None
        generator = _PROBE_GENERATOR.get()
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return draw_probes(x, self.n_probes, self.probe, generator)

    def _velocity(self, x: Tensor, cond: Tensor | None, backwards: bool) -> Callable[[Tensor, Tensor], Tensor]:
        """dz/dtau = +-f(z, tau or 1 - tau) of a solve from x [B, D] (checked), counting its evaluations in
        ``nfe`` (reset here)."""
        check_channels(x, self.features, "CNF")
        self.nfe = 0

        def velocity(tau: Tensor, z: Tensor) -> Tensor:
            self.nfe += 1
            return -self.field(1 - tau, z, cond) if backwards else self.field(tau, z, cond)

        return velocity

    def _solve(self, x: Tensor, cond: Tensor | None, backwards: bool) -> tuple[Tensor, Tensor]:
        """(z at tau = 1, int_0^1 div dtau [B]) of dz/dtau = +-f(z, tau or 1 - tau) from z(0) = x."""
        velocity = self._velocity(x, cond, backwards)
        probes = self._probes(x)
        train = torch.is_grad_enabled()  # the field may hold parameters the CNF does not see (a function)
        zero = x.new_zeros(x.shape[0], 1 if probes is None else len(probes))
        method = self.method if self.training else self.eval_method
        z, integral = solve_unit(with_divergence(velocity, probes, create_graph=train), (x, zero), method,
                                 self.rtol, self.atol, steps=self.steps)
        return z, integral.mean(1)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x = z(0) [B, D] -> (z(1), int_0^1 div f dt [B])."""
        return self._solve(x, cond, backwards=False)

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """z(1) [B, D] -> (z(0), -int_0^1 div f dt [B])."""
        return self._solve(z, cond, backwards=True)

    def inverse_only(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """z(1) [B, D] -> z(0), the velocity alone integrated (no divergence: no probes, no vector-Jacobian
        products; an adaptive solver's steps are then controlled on z alone)."""
        method = self.method if self.training else self.eval_method
        return solve_unit(self._velocity(z, cond, backwards=True), z, method, self.rtol, self.atol, steps=self.steps)

    def extra_repr(self) -> str:
        return (f"features={self.features}, divergence={self.divergence} (eval: {self.eval_divergence}), "
                f"method={self.method} (eval: {self.eval_method}), steps={self.steps}, rtol={self.rtol:g}, "
                f"atol={self.atol:g}")
