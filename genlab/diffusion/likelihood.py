"""log p(x) of a diffusion or flow-matching model through the probability-flow ODE.

The PF-ODE maps data at t_start to x_{t_end}; along it d log p_t(x_t) / dt = -div(dx/dt)
(instantaneous change of variables: Chen et al. 2018, Thm. 1; Song et al. 2021, Eq. 39):

    log p_start(x) = log p_end(x_end) + int div(drift) dt.

It is solved in the variables of :mod:`genlab.diffusion.ode` (y = x / (alpha + sigma) in tau), so
the x -> y rescaling adds D log(alpha + sigma) at each end. The divergence is ``"exact"`` (D
backward passes per evaluation: small D) or ``"hutchinson"``: E_v[v^T J v] with ``n_probes``
Rademacher or Gaussian probes v held fixed over the solve (Hutchinson 1990; Grathwohl et al. 2019,
FFJORD, Sec. 3.1); solver and estimators are :mod:`genlab.core.ode`'s, shared with the continuous
normalizing flow. Each probe gives an unbiased estimate of the whole integral along the same
(probe-free) path, so their spread gives the estimate's standard error.

The prior: by default the process's own N(0, prior_std^2 I), the distribution samplers start from,
so ``log_prob`` is the exact density of the generative model "prior, then the PF-ODE" (and of the
data exactly where alpha(t_end) = 0: rectified flow, zero-terminal-SNR VP). Where alpha(t_end) > 0
(VP: 0.0066 at t = 1; VE, EDM: 1) the true marginal p_{t_end} = p_data * noise is not that
Gaussian; a perfect denoiser's ``log_prob`` then differs from log p_data by log prior(x_end) -
log p_end(x_end), whose leading term alpha x_end . E[x0] / sigma^2 is about alpha |E x0| / sigma
nats per dimension (0.02 for VE's sigma = 50 and |E x0| = 1; 0.007 for VP); for centred data
only O((alpha / sigma)^2) terms remain. Pass ``prior`` (a log-density of x_end) to use another,
e.g. the exact marginal in tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..core.ode import Divergence, Method, Probe, check_divergence, check_method, draw_probes, solve_unit, with_divergence
from ..metrics.likelihood import Likelihood, normal_log_prob
from .levels import combine, log
from .ode import ProbabilityFlow, path_scale, reaches_data
from .samplers.base import DenoiserLike, non_finite, non_finite_error


@dataclass
class LogProbEstimate:
    """``log_prob`` [B] in nats, its ``stderr`` [B] (0 for the exact divergence; NaN for one
    probe), the number of denoiser calls ``nfe`` and the ODE's end point ``x_end`` [B, ...]."""

    log_prob: Tensor
    stderr: Tensor
    nfe: int
    x_end: Tensor


class DiffusionLikelihood(Likelihood):
    """log p(x) [B] of a Denoiser's probability-flow ODE (any process and prediction type).

    Args:
        denoiser: the model; ``denoiser.process`` gives the noise levels.
        divergence: ``"exact"`` or ``"hutchinson"``.
        probe: Hutchinson probes, ``"rademacher"`` (lower variance) or ``"gaussian"``.
        n_probes: probes per sample; >= 2 for a standard error.
        method, rtol, atol: the torchdiffeq solver (see :mod:`genlab.diffusion.ode`); ``steps``
            equal steps in r for fixed-step methods.
        t_start: where the data sits (default ``process.t_min``, as Song et al. 2021 use 1e-5;
            0 integrates from the data itself where the process reaches it, not VE).
        t_end: where the prior is evaluated (default ``process.t_max``).
        prior: log-density of x_end [B, ...] -> [B]; default N(0, process.prior_std()^2 I).
    """

    def __init__(self, denoiser: DenoiserLike, divergence: Divergence = "exact",
                 probe: Probe = "rademacher", n_probes: int = 1,
                 method: Method = "dopri5", rtol: float = 1e-5, atol: float = 1e-5, steps: int = 100,
                 t_start: float | None = None, t_end: float | None = None,
                 prior: Callable[[Tensor], Tensor] | None = None) -> None:
        process = denoiser.process
        check_divergence(divergence, probe, n_probes)
        check_method(method, rtol, atol, steps)
        self.t_start = process.t_min if t_start is None else t_start
        self.t_end = process.t_max if t_end is None else t_end
        if not 0 <= self.t_start < self.t_end <= process.t_max:
            raise ValueError(f"need 0 <= t_start < t_end <= t_max = {process.t_max:g}, got t_start={self.t_start:g}, "
                             f"t_end={self.t_end:g}")
        if self.t_start == 0 and not reaches_data(process):
            raise ValueError(f"{process}: sigma jumps to 0 at t = 0, so the ODE cannot start from the data; "
                             f"use t_start > 0 (e.g. t_min = {process.t_min:g})")
        self.denoiser, self.divergence, self.probe, self.n_probes = denoiser, divergence, probe, n_probes
        self.method, self.rtol, self.atol, self.steps = method, rtol, atol, steps
        self.prior = prior or (lambda x: normal_log_prob(x, process.prior_std()))

    def log_prob(self, x: Tensor, generator: torch.Generator | None = None,
                 cond: dict[str, Any] | None = None, check_finite: bool = True) -> Tensor:
        """log p(x) [B] in nats for x [B, ...] at t_start (an estimate with Hutchinson)."""
        return self.estimate(x, generator, cond, check_finite).log_prob

    @torch.no_grad()
    def estimate(self, x: Tensor, generator: torch.Generator | None = None,
                 cond: dict[str, Any] | None = None, check_finite: bool = True) -> LogProbEstimate:
        """log p(x) with its standard error, the NFE and the end point (see :class:`LogProbEstimate`).
        ``check_finite``: NonFiniteError if a log p(x) is NaN or inf (one check at the end)."""
        process = self.denoiser.process
        start, end = process.level(self.t_start), process.level(self.t_end)
        flow = ProbabilityFlow(self.denoiser, start, end, cond)
        probes = None if self.divergence == "exact" else draw_probes(x, self.n_probes, self.probe, generator)
        columns = 1 if probes is None else len(probes)
        y0 = combine((1 / path_scale(start), x))
        zero = x.new_zeros(x.shape[0], columns)
        y1, integral = solve_unit(with_divergence(flow, probes), (y0, zero), self.method, self.rtol, self.atol,
                                  steps=self.steps)
        x_end = combine((path_scale(end), y1))
        d = x[0].numel()
        rescale = d * (log(path_scale(end)) - log(path_scale(start)))
        per_probe = (self.prior(x_end) + rescale)[:, None] + integral  # [B, columns]
        if probes is None:
            stderr = torch.zeros_like(per_probe[:, 0])
        else:
            stderr = per_probe.std(1) / math.sqrt(columns) if columns > 1 else torch.full_like(per_probe[:, 0], math.nan)
        log_prob = per_probe.mean(1)
        if check_finite and non_finite(log_prob):
            raise non_finite_error("DiffusionLikelihood: {} of {} log-probabilities are NaN or inf", log_prob, x)
        return LogProbEstimate(log_prob, stderr, flow.nfe, x_end)
