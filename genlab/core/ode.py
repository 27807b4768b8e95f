"""ODE integration and divergence estimators shared by every continuous-time likelihood in genlab.

Two families integrate the same augmented ODE (Chen et al. 2018, Thm. 1: the instantaneous change
of variables) for a state y with dy/dtau = v(tau, y):

    d/dtau [y, l] = [v(tau, y), div_y v(tau, y)],   log p_0(y(0)) = log p_1(y(1)) + l(1) - l(0),

the probability-flow likelihood and ODE sampler of diffusion and flow-matching models
(:mod:`genlab.diffusion.likelihood`, :mod:`genlab.diffusion.ode`) and the continuous normalizing flow
(:mod:`genlab.models.flows.cnf`, FFJORD). ``genlab.models`` and ``genlab.diffusion`` never import each
other (README, Design: layers), so the integrator and the divergence estimators live here, in the
layer both sit on; they know nothing of processes or networks: a function of (tau, y) and tensors.

Integration: :func:`solve_unit` integrates over tau in [0, 1] with torchdiffeq (Chen et al. 2018):
adaptive Runge-Kutta pairs (dopri5: Dormand & Prince 1980, ...) to ``rtol`` / ``atol``, or fixed-step
methods (euler, midpoint, heun2 = Heun, heun3, rk4: the 3/8 rule) with ``steps`` equal steps. Batched
tensors and tuple states on any device in their own dtype; autograd runs through the solver steps
(direct backpropagation, FFJORD's non-adjoint training).

Divergence: :func:`divergence` gives div_y v exactly (the D basis vectors as probes: D vector-Jacobian
products in one batched backward pass, for small D) or Hutchinson's estimate p^T (dv/dy) p with
E[p p^T] = I (Hutchinson 1990; Grathwohl et al. 2019, FFJORD, Sec. 3.1), probes from
:func:`draw_probes` (Rademacher or Gaussian, from a ``torch.Generator``), held fixed over one solve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor
from torchdiffeq import odeint

Method = Literal["dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "heun2", "heun3",
                 "rk4"]
FIXED_STEP_NFE = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}  # field calls per step
Divergence = Literal["exact", "hutchinson"]
Probe = Literal["rademacher", "gaussian"]
State = Tensor | tuple[Tensor, ...]


def check_method(method: str, rtol: float, atol: float, steps: int = 1) -> None:
    """ValueError for an unknown solver, a non-positive tolerance or a non-positive step count."""
    if method not in get_args(Method):
        raise ValueError(f"unknown ODE method {method!r}; expected one of {', '.join(get_args(Method))}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int (solver steps of a fixed-step method), got {steps!r}")


def check_divergence(divergence: str, probe: str, n_probes: int) -> None:
    """ValueError for an unknown divergence or probe kind, or fewer than one probe."""
    if divergence not in get_args(Divergence):
        raise ValueError(f"unknown divergence {divergence!r}; expected 'exact' or 'hutchinson'")
    if probe not in get_args(Probe):
        raise ValueError(f"unknown probe {probe!r}; expected 'rademacher' or 'gaussian'")
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive int, got {n_probes!r}")


def solve_unit(func: Callable[[Tensor, State], State], y0: State, method: Method, rtol: float, atol: float,
               steps: int = 1) -> State:
    """y at tau = 1 of dy/dtau = func(tau, y), y(0) = y0 (a tensor or a tuple of tensors), with
    torchdiffeq's ``method``: fixed-step methods take ``steps`` equal steps; adaptive ones are made to
    land on tau = 1 (``step_t``) instead of stepping past it and interpolating back."""
    if method in FIXED_STEP_NFE:
        t, options = torch.linspace(0, 1, steps + 1, dtype=torch.float64), None
    else:
        t = torch.tensor([0.0, 1.0], dtype=torch.float64)
        options = {"step_t": t[1:]}
    first = y0 if torch.is_tensor(y0) else y0[0]
    out = odeint(func, y0, t.to(first.device), rtol=rtol, atol=atol, method=method, options=options)
    return out[-1] if torch.is_tensor(out) else tuple(o[-1] for o in out)


def draw_probes(x: Tensor, n_probes: int, probe: Probe, generator: torch.Generator | None) -> Tensor:
    """Hutchinson probes [n_probes, *x.shape] with E[p p^T] = I: Rademacher (+-1, the lower-variance
    choice) or standard Gaussian, drawn from ``generator`` in x's dtype and on x's device."""
    shape = (n_probes, *x.shape)
    if probe == "gaussian":
        return torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
    return torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1


def divergence(v: Tensor, y: Tensor, probes: Tensor | None, create_graph: bool = False) -> Tensor:
    """div_y v per sample for v = field(y), both [B, ...]: [B, 1] exactly (``probes`` None: the D basis
    vectors as probes, for small D), or [B, n] Hutchinson estimates p^T (dv/dy) p for probes [n, B, ...].
    One vectorised backward pass (``is_grads_batched``) for all probes; ``create_graph`` keeps it
    differentiable (training). Assumes sample b's output depends on y_b only (no batch statistics)."""
    if probes is None:
        d = v[0].numel()
        basis = torch.eye(d, dtype=v.dtype, device=v.device).reshape(d, 1, *v.shape[1:]).expand(d, *v.shape)
        return divergence(v, y, basis, create_graph).sum(1, keepdim=True)
    vjps = torch.autograd.grad(v, y, probes, create_graph=create_graph, is_grads_batched=True)[0]  # [n, B, ...]
    return (vjps * probes).flatten(2).sum(2).T


def with_divergence(field: Callable[[Tensor, Tensor], Tensor], probes: Tensor | None,
                    create_graph: bool = False) -> Callable[[Tensor, tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    """The augmented dynamics (tau, (y, l)) -> (v, div_y v) of ``field(tau, y) -> v`` for
    :func:`solve_unit`: l [B, columns] integrates the divergence (see :func:`divergence` for ``probes``).
    Without ``create_graph`` the state is detached (inference under ``torch.no_grad`` works: the
    divergence's own graph is built inside); with it, gradients flow through the whole solve."""

    def augmented(tau: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        y = state[0]
        with torch.enable_grad():
            if not (create_graph and y.requires_grad):
                y = y.detach().requires_grad_(True)
            v = field(tau, y)
            div = divergence(v, y, probes, create_graph)
        return (v, div) if create_graph else (v.detach(), div.detach())

    return augmented
