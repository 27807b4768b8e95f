"""Learned time grids: where a sampler should evaluate a given model, for a given NFE budget.

LD3 (Tong et al. 2024, "Learning to Discretize Denoising Diffusion ODEs", Sec. 3) fits the N - 1
inner times of an N-step solver to a teacher: the same start noise solved with many steps. Here
the teacher is genlab's own DPM-Solver++ 3M on a fine Karras grid, Richardson-extrapolated from
two nested solves (it reports its own error), and the student is any genlab sampler run through
:meth:`Sampler.integrate`, so the gradient of

    L(times) = sum_b w_b mean_d (sample(x_T^b; times) - reference(x_T^b))^2

reaches the times by autograd. As in Align Your Steps (Sabour et al. 2024, Sec. 3.2) only the
model and its prior are needed: noise draws, no data. The end points t_max and 0 stay fixed; the
inner times are monotone by construction (:class:`GridParameters`: softmax increments of the
log-SNR with a floor), and L-BFGS fits them from several starting grids. The error is
heavy-tailed (a few trajectories near the boundary between two modes carry most of it), so the
training batches are stratified from a larger pool of noise (:func:`stratified_batch`) and the
grid kept is the best on the whole pool.

A learned grid is saved next to the checkpoint (``grids.json``, keyed by the sampler's
configuration and the number of steps) and used as ``grid: {type: learned, path: RUN}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.errors import ConfigError, GenlabError
from ..core.registry import build
from .grid_store import LearnedGrid, load_grids, sampler_spec, save_grid
from .grids import karras_sigmas
from .processes import Process
from .samplers.base import DenoiserLike, Sampler
from .samplers.dpm_solver import DPMSolverPP



# ----- the teacher ------------------------------------------------------------------------------
def log_snr_range(process: Process, log_snr_min: float = -30.0,
                  extend: float = 2 * math.log(100)) -> tuple[float, float]:
    """(start, stop) log-SNRs: the one at t_max (at least ``log_snr_min``, for processes that reach
    pure noise) and ``extend`` beyond the one at t_min (sigma 100 times smaller), as far as the
    process reaches before t = 0."""
    ends = process.log_snr(torch.tensor([process.t_max, process.t_min, process.t_min * 1e-6], dtype=torch.float64))
    start = max(float(ends[0]), log_snr_min)
    return start, max(min(float(ends[1]) + extend, float(ends[2])), float(ends[1]))


def reference_times(process: Process, steps: int = 800, rho: float = 7.0) -> Tensor:
    """The teacher's grid [steps + 1]: ``steps`` times with Karras sigmas (rho = 7, Karras et al.
    2022, Eq. 5) from sigma(t_max) down to 100 times below sigma(t_min) (t_max itself first), then 0."""
    start, stop = log_snr_range(process)
    inner = process.t_of_sigma_edm(karras_sigmas(math.exp(-start / 2), math.exp(-stop / 2), steps, rho)[1:])
    return torch.cat([torch.tensor([process.t_max], dtype=torch.float64), inner, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def reference_solve(denoiser: DenoiserLike, x: Tensor, steps: int = 800, cond: dict[str, Any] | None = None,
                    batch: int = 1024) -> tuple[Tensor, float]:
    """The teacher: x [B, ...] at t_max solved to t = 0, and an estimate of its RMS error.

    DPM-Solver++ 3M (Taylor third order) on :func:`reference_times` with about ``steps`` and
    ``steps / 2`` steps (nested grids: the coarse one is every other time of the fine one),
    combined by Richardson extrapolation (8 y_fine - y_coarse) / 7 for a third-order method; the
    error estimate is RMS(y_fine - y_coarse) / 7, the error of the finer solve alone (the
    extrapolated one is smaller still)."""
    half = max(steps // 2, 4)
    fine_t, coarse_t = reference_times(denoiser.process, 2 * half - 1), reference_times(denoiser.process, half)
    solver = DPMSolverPP(2 * half - 1, order=3, lower_order_final=False)
    outs, diffs = [], []
    for i in range(0, x.shape[0], batch):
        xb, cb = x[i:i + batch], _slice(cond, i, batch)
        fine = solver.sample(denoiser, xb.clone(), times=fine_t, progress=False, cond=cb)
        coarse = solver.sample(denoiser, xb.clone(), times=coarse_t, progress=False, cond=cb)
        outs.append((8 * fine - coarse) / 7)
        diffs.append((fine - coarse).double().pow(2).sum())
    return torch.cat(outs), math.sqrt(float(sum(diffs)) / x.numel()) / 7


def _fixed(x: Tensor) -> torch.Generator:
    """The same noise on every evaluation: a stochastic sampler then has a deterministic objective."""
    return torch.Generator(device=x.device).manual_seed(0)


def _slice(cond: dict[str, Any] | None, i: int, n: int) -> dict[str, Any] | None:
    return None if cond is None else {k: v[i:i + n] if torch.is_tensor(v) and v.ndim else v for k, v in cond.items()}


@torch.no_grad()
def sample_errors(sampler: Sampler, denoiser: DenoiserLike, times: Tensor, x: Tensor, reference: Tensor,
                  cond: dict[str, Any] | None = None, batch: int = 1024) -> Tensor:
    """Per-sample mean squared error [B] (float64) of sample(x; times) against ``reference`` (NaN or inf
    where a degenerate grid diverges: measured, not refused)."""
    out = []
    for i in range(0, x.shape[0], batch):
        y = sampler.sample(denoiser, x[i:i + batch].clone(), times=times.detach(), progress=False,
                           cond=_slice(cond, i, batch), generator=_fixed(x), check_finite=False)
        out.append((y - reference[i:i + batch]).double().pow(2).flatten(1).mean(1))
    return torch.cat(out)


def rms_error(sampler: Sampler, denoiser: DenoiserLike, times: Tensor, x: Tensor, reference: Tensor,
              cond: dict[str, Any] | None = None) -> float:
    """RMS over all entries of sample(x; times) - reference."""
    return math.sqrt(float(sample_errors(sampler, denoiser, times, x, reference, cond).mean()))


# ----- the student: a monotone grid with fixed ends ---------------------------------------------
def t_of_log_snr(process: Process, log_snr: Tensor) -> Tensor:
    """``process.t_of_log_snr`` with the gradient of the inverse function, dt/dl = 1 / (dl/dt) for the
    log-SNR l, dl/dt = 2 (alpha'/alpha - sigma'/sigma): one Newton step from the
    (possibly bisected, non-differentiable) solution."""
    t = process.t_of_log_snr(log_snr.detach())
    lv = process.level(t)
    slope = 2 * (lv.d_alpha / lv.alpha - lv.d_sigma / lv.sigma)
    return t + (log_snr - lv.log_snr) / slope


class GridParameters(torch.nn.Module):
    """N-step grids t_max > t_1 > ... > t_{N-1} > 0 with the inner log-SNRs at cumulative fractions
    of [log_snr_start, log_snr_stop]: increments (floor + (1 - N floor) softmax(theta)) with floor =
    ``min_step`` / N (N logits; the last increment ends at log_snr_stop). ``min_step`` > 0 keeps
    every log-SNR step above that fraction of the mean one: no near-duplicate times, whose large
    step ratios make multistep extrapolation fit the training noise and fail on other noise."""

    def __init__(self, process: Process, init: Tensor, min_step: float = 0.0) -> None:
        super().__init__()
        self.process, self.floor = process, min_step / (len(init) - 1)
        self.t_max = float(init[0])
        inner = process.log_snr(init[1:-1].double())
        self.log_snr_start, stop = log_snr_range(process)
        self.log_snr_stop = max(stop, float(inner[-1]) + 1.0) if len(inner) else stop
        full = torch.cat([torch.tensor([self.log_snr_start]), inner, torch.tensor([self.log_snr_stop])])
        inc = full.diff()
        if not (inc > 0).all():
            raise ConfigError(f"the starting grid must decrease in t (increase in log-SNR) from t_max = {self.t_max:g} "
                             f"to 0, got times {init.tolist()}")
        share = (inc / inc.sum() - self.floor).clamp_min(1e-3 / len(inc))
        self.theta = torch.nn.Parameter(share.log())

    @property
    def steps(self) -> int:
        return self.theta.numel()

    def forward(self) -> Tensor:
        """The grid [N + 1] (float64), differentiable in ``theta``."""
        n = self.theta.numel()
        frac = (self.floor + (1 - n * self.floor) * torch.softmax(self.theta, 0)).cumsum(0)[:-1]
        start, stop = self.log_snr_start, self.log_snr_stop
        inner = t_of_log_snr(self.process, start + (stop - start) * frac)
        ends = torch.tensor([self.t_max, 0.0], dtype=torch.float64)
        return torch.cat([ends[:1], inner, ends[1:]])


# ----- fitting ----------------------------------------------------------------------------------
@dataclass
class GridFit:
    """What :func:`learn_grid` found: the grid, the grid it started from, RMS errors to the teacher."""

    times: Tensor  # [N + 1], float64
    start: Tensor  # [N + 1]: the sampler's own grid
    init: Tensor  # [N + 1]: the starting grid whose optimisation won
    rms_start: float  # training RMS of ``start``
    rms_learned: float  # training RMS of ``times``
    reference_rms: float  # estimated RMS error of the teacher itself
    evaluations: int = 0  # forward-backward passes of the student

    def entry(self, sampler: Sampler, denoiser: DenoiserLike, nfe: int, samples: int) -> dict[str, Any]:
        """The record :func:`save_grid` stores."""
        return {"sampler": sampler_spec(sampler), "steps": len(self.times) - 1, "nfe": nfe,
                "process": repr(denoiser.process), "times": self.times.tolist(), "samples": samples,
                "rms": {"start": self.rms_start, "learned": self.rms_learned, "reference": self.reference_rms}}


def starting_grids(sampler: Sampler, process: Process, steps: int) -> dict[str, Tensor]:
    """Distinct candidate starting grids: the sampler's own, uniform in log-SNR, Karras rho = 7,
    uniform in t (those the process allows)."""
    own = sampler.grid if not isinstance(sampler.grid, LearnedGrid) else build("grid", sampler.default_grid)
    out = {"sampler": own(process, steps)}
    for name in ("log_snr", "karras", "uniform"):
        try:
            times = build("grid", name)(process, steps)
        except GenlabError:  # e.g. an infinite log-SNR at t_max
            continue
        if not any(torch.allclose(times, v, rtol=0, atol=1e-12) for v in out.values()):
            out[name] = times
    return out


class _Objective:
    """The weighted mean squared error to the teacher, sum_b w_b mean_d (sample_b - ref_b)^2, as a
    function of a grid's parameters; remembers the best grid seen (L-BFGS's line search evaluates
    many)."""

    def __init__(self, sampler: Sampler, denoiser: DenoiserLike, x: Tensor, reference: Tensor, weights: Tensor,
                 cond: dict[str, Any] | None) -> None:
        self.sampler, self.denoiser, self.x, self.reference, self.cond = sampler, denoiser, x, reference, cond
        self.weights = weights
        self.best: tuple[float, Tensor | None] = (math.inf, None)
        self.evaluations = 0

    def __call__(self, grid: GridParameters) -> Tensor:
        times = grid()
        out = self.sampler.integrate(self.denoiser, self.x, times=times, cond=self.cond, generator=_fixed(self.x))
        loss = (self.weights * (out - self.reference).double().pow(2).flatten(1).mean(1)).sum()
        self.evaluations += 1
        if not torch.isfinite(loss):  # a degenerate grid: a large value sends the line search back
            return (grid.theta * 0).sum() + 1e30
        if loss.item() < self.best[0]:
            self.best = (loss.item(), times.detach())
        return loss

    def fit(self, grid: GridParameters, evaluations: int) -> tuple[float, Tensor]:
        """L-BFGS with a strong-Wolfe line search on the grid's logits, at most ``evaluations``
        passes; returns the best (loss, times) of this fit."""
        self.best = (math.inf, None)
        opt = torch.optim.LBFGS(grid.parameters(), lr=1, max_iter=evaluations, max_eval=evaluations,
                                history_size=20, tolerance_grad=1e-12, tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = self(grid)
            loss.backward()
            return loss

        opt.step(closure)
        return self.best


def stratified_batch(errors: Tensor, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(indices, weights) of a training batch from a pool with per-sample errors [P]: the size / 4
    largest errors (weight 1 / P each) and random others (weight (P - k) / (r P) each), so the
    weighted loss is an unbiased estimate of the pool's mean while the rare hard samples that
    dominate it (trajectories that switch modes) are always in the batch."""
    pool = errors.numel()
    if pool <= size:
        return torch.arange(pool), torch.full((pool,), 1 / pool, dtype=torch.float64)
    k = size // 4
    order = errors.argsort(descending=True)
    rest = order[k:][torch.randperm(pool - k, generator=generator)[: size - k]]
    weights = torch.cat([torch.full((k,), 1 / pool, dtype=torch.float64),
                         torch.full((size - k,), (pool - k) / ((size - k) * pool), dtype=torch.float64)])
    return torch.cat([order[:k], rest]), weights


def learn_grid(denoiser: DenoiserLike, sampler: Sampler, nfe: int | None = None, *, steps: int | None = None,
               x: Tensor | None = None, samples: int = 256, pool: int | None = None,
               shape: tuple[int, ...] | None = None, reference: Tensor | None = None, reference_steps: int = 800,
               init: str | Tensor = "all", evaluations: int = 300, rounds: int = 3, min_step: float = 0.3,
               cond: dict[str, Any] | None = None, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> GridFit:
    """Fit the N - 1 inner times of ``sampler``'s grid (N = nfe // sampler.nfe_per_step, or
    ``steps``) to the teacher (LD3, Tong et al. 2024, Eq. 7 without the slack term), by L-BFGS
    on the logits of :class:`GridParameters`.

    The loss has several local minima at small N, so by default (``init="all"``) each of
    :func:`starting_grids` gets an equal share of half the first round's evaluations and the
    best then continues. The squared error is heavy-tailed (a few trajectories near the boundary
    of two modes carry most of it), so with a pool larger than ``samples`` the training batch of
    each round is :func:`stratified_batch` under the current grid, and the grid kept is the one
    with the lowest error on the whole pool.

    Args:
        x: start noise [P, ...] at t_max (the pool); default ``pool`` (default: 4 * ``samples``)
            prior draws of ``shape`` (the data shape without the batch) from ``generator``.
        samples: the training batch (forward and backward passes); all of x when P <= samples.
        reference: the teacher's solution for x; default :func:`reference_solve`.
        init: ``"all"``, one name of :func:`starting_grids` or times [N + 1].
        evaluations: forward-backward passes over the batch in all; ``rounds``: batch re-draws.
        min_step: the smallest log-SNR step as a fraction of the mean one (:class:`GridParameters`).
    Returns a :class:`GridFit` (RMS errors over the pool); the learned grid is never worse on the
    pool than the sampler's own.
    """
    process = denoiser.process
    if steps is None:
        if nfe is None:
            raise ConfigError("learn_grid needs nfe (model evaluations) or steps")
        steps = nfe // sampler.nfe_per_step
    if steps < 2:
        raise ConfigError(f"a learned grid needs at least 2 steps (one inner time), got {steps} "
                          f"(nfe={nfe}, {type(sampler).__name__}.nfe_per_step={sampler.nfe_per_step})")
    if x is None:
        if shape is None:
            raise ConfigError("learn_grid needs x (start noise) or shape (the data shape, without the batch)")
        x = process.prior((pool or 4 * samples, *shape), generator=generator, dtype=dtype)
    ref_rms = float("nan")
    if reference is None:
        reference, ref_rms = reference_solve(denoiser, x, reference_steps, cond)
    candidates = starting_grids(sampler, process, steps)
    start = candidates["sampler"]
    if not isinstance(init, str):
        candidates = {"given": torch.as_tensor(init, dtype=torch.float64)}
    elif init != "all":
        if init not in candidates:
            raise ConfigError(f"init must be 'all', one of {', '.join(candidates)} or times [N + 1], got {init!r}")
        candidates = {init: candidates[init]}
    rounds = rounds if x.shape[0] > samples else 1
    errors = sample_errors(sampler, denoiser, start, x, reference, cond)
    best = rms_start = (float(errors.mean()), start)
    pick = torch.Generator().manual_seed(0)
    grid, used, name = None, 0, "sampler"
    for r in range(rounds):
        index, weights = stratified_batch(errors, samples, pick)
        objective = _Objective(sampler, denoiser, x[index], reference[index], weights.to(x.device),
                               _take(cond, index))
        budget = (evaluations - used) // (rounds - r)
        if grid is None:  # the first round: every starting grid, then the best of them
            share = max(5, budget // (2 * len(candidates))) if len(candidates) > 1 else budget
            fits = []
            for key, times in candidates.items():
                g = GridParameters(process, times, min_step)
                fits.append((objective.fit(g, share)[0], key, g))
            _, name, grid = min(fits, key=lambda f: f[0])
        objective.fit(grid, max(1, budget - objective.evaluations))
        used += objective.evaluations
        times = objective.best[1] if objective.best[1] is not None else grid().detach()
        errors = sample_errors(sampler, denoiser, times, x, reference, cond)
        if float(errors.mean()) < best[0]:
            best = (float(errors.mean()), times)
    return GridFit(best[1], start, candidates[name], math.sqrt(rms_start[0]), math.sqrt(best[0]), ref_rms, used)


def _take(cond: dict[str, Any] | None, index: Tensor) -> dict[str, Any] | None:
    return None if cond is None else {k: v[index] if torch.is_tensor(v) and v.ndim else v for k, v in cond.items()}


__all__ = ["GridFit", "GridParameters", "LearnedGrid", "learn_grid", "load_grids", "reference_solve",
           "reference_times", "rms_error", "sampler_spec", "save_grid", "starting_grids", "t_of_log_snr"]
