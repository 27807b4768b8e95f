"""Benchmark genlab's samplers against diffusers' ODE schedulers: accuracy per NFE, likelihood, overhead.

1. Accuracy (float64). Two problems with an exact eps "network" eps(x, DDPM step index): the 2-D
   eight-Gaussian ring (``GaussianMixture.ring()``) and a 32-D mixture of 8 full-covariance
   Gaussians (:func:`mix32`: ``GaussianMixture.random(dim=32, k=8)``, generator seed 1, means
   shrunk 4x). Process: DDPM's linear schedule, genlab's :class:`DiscreteVP` built from diffusers'
   own ``alphas_cumprod`` (T = 1000). From one fixed batch x ~ N(0, I) at t_max every sampler
   integrates to the data (t = 0); the error is the RMS over points of ||x - x_ref||, x_ref the
   exact probability-flow ODE end point (``genlab.testing.exact_ode_solution``, DOP853 at rtol =
   atol = 1e-11, checked against 1e-9).

   diffusers: every ODE scheduler (DDIM, PNDM/PLMS, DPM-Solver++ 2M/3M multistep and 2S/3S
   single-step, UniPC bh1/bh2 of order 2/3, DEIS, SA-Solver with tau = 0, Euler, Heun, LMS), each
   with every ``timestep_spacing`` and every sigma schedule it offers (Karras, exponential, beta,
   Lu's uniform lambda). For an NFE budget each configuration runs with the number of inference
   steps whose model calls (``len(scheduler.timesteps)``, checked by a counting model) are the
   most within the budget; diffusers' best configuration per budget is the number to beat.
   Schedulers run in float64 (``genlab.testing.peers``): sigmas are recomputed at the timesteps the
   network is given, so solver and network always agree on the noise level (diffusers itself keeps
   the unrounded Karras sigma while the network sees the rounded step: our peer is, if anything,
   more accurate). Schedulers that stop at sigma_min instead of the data (DEIS, SA-Solver, UniPC
   bh1) are scored against the data like everyone (marked †; the CSV has their error at their end).

   genlab: rows ``(name, factory(budget, problem) -> Sampler)`` in ``GENLAB``; :func:`within_budget`
   turns a sampler of a step count into such a factory (most steps whose counted NFE fits).
   :func:`learned_rows` (the learned-grid hook) gives rows whose grid ``learn_grid`` fits per
   problem and budget; target: at most half of diffusers' best error at every NFE. ``DEFAULT``
   names genlab's default sampler; target: below diffusers' best at every NFE.
2. Likelihood: log p(x0) through the PF-ODE (``genlab.diffusion.likelihood``) by the exact trace
   and by Hutchinson's estimator, against the mixture's exact log p: error and wall time.
3. Model-free cost per step: the "model" returns a cached tensor, so only the sampler / scheduler
   work is timed (float32, [4, 4, 64, 64], one torch thread).

Usage: ``python scripts/bench_samplers.py [--quick] [--csv PATH] [--parts accuracy likelihood cost]``
(``--csv`` writes every run).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import importlib.util
import inspect
import io
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import diffusers
import torch
from torch import Tensor

from genlab.diffusion import (DDIM, DEIS, Denoiser, DiscreteVP, DPMSolverPP, DPMSolverSingle, Euler, ExplicitGrid, Heun,
                              Sampler, UniPC)
from genlab.core.io import atomic_write
from genlab.diffusion.grids import FAST_GRID
from genlab.diffusion.ode import ODESampler
from genlab.testing import GaussianMixture, exact_denoiser, exact_ode_solution
from genlab.testing.peers import KeepFloat64, set_timesteps_float64

BUDGETS = (5, 10, 20)
LINEAR = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)  # DDPM's (Heun defaults to SD's)
REF_TOL, CHECK_TOL, CHECK_POINTS = 1e-11, 1e-9, 500  # the reference, and its check on the first 500 points
Model = Callable[[Tensor, Tensor], Tensor]

# ----- problems ------------------------------------------------------------------------------------


@dataclass
class Problem:
    """A mixture, the DDPM process, test start noise ``x`` [N, D] at t_max and its exact ODE end
    points ``refs`` {t_end: [N, D]}. Learned-grid factories must fit on their own draws, never on x."""

    name: str
    mixture: GaussianMixture
    process: DiscreteVP
    x: Tensor
    refs: dict[float, Tensor] = field(default_factory=dict)
    ref_note: str = ""
    cache: dict[str, Any] = field(default_factory=dict)  # e.g. learned grids' fitting draws

    def ref(self, t_end: float) -> Tensor:
        """The exact solution at t_end (0: the data), solved once per end time."""
        key = round(t_end, 12)
        if key not in self.refs:
            self.refs[key] = exact_ode_solution(self.mixture, self.process, self.x, 1.0, t_end, REF_TOL, REF_TOL)
        return self.refs[key]


def mix32() -> GaussianMixture:
    """``GaussianMixture.random(dim=32, k=8)`` (generator seed 1) with its means shrunk 4x: mean
    distances 3.2-5.0 against component standard deviations 0.23-0.71. With random()'s own
    distances (13-20) the RMS is decided by the few points whose path ends in another component
    (at NFE 40 the median error is 0.015, the RMS 0.63), not by the solver's accuracy."""
    base = GaussianMixture.random(dim=32, k=8, generator=torch.Generator().manual_seed(1))
    return GaussianMixture(base.weights, base.means / 4, base.covs)


MIXTURES = {"ring": GaussianMixture.ring(), "mix32": mix32()}
PROCESS = DiscreteVP(alphas_cumprod=diffusers.DDIMScheduler(**LINEAR).alphas_cumprod.double().tolist())


def make_problems(n: int) -> list[Problem]:
    """The ring and the 32-D mixture with n start points each; references to t_min and the data."""
    process, gen = PROCESS, torch.Generator().manual_seed(0)
    problems = []
    for name, mixture in MIXTURES.items():
        x = torch.randn(n, mixture.dim, generator=gen, dtype=torch.float64)
        problem = Problem(name, mixture, process, x)
        start = time.perf_counter()
        # in two legs (log sigma to t_min, then sigma to 0): far cheaper than one leg in sigma to 0
        at_min = exact_ode_solution(mixture, process, x, 1.0, process.t_min, REF_TOL, REF_TOL)
        data = exact_ode_solution(mixture, process, at_min, process.t_min, 0.0, REF_TOL, REF_TOL)
        problem.refs = {round(process.t_min, 12): at_min, 0.0: data}
        seconds = time.perf_counter() - start
        some = x[:CHECK_POINTS]
        loose = exact_ode_solution(mixture, process, some, 1.0, process.t_min, CHECK_TOL, CHECK_TOL)
        loose = exact_ode_solution(mixture, process, loose, process.t_min, 0.0, CHECK_TOL, CHECK_TOL)
        problem.ref_note = (f"reference: DOP853 tol {REF_TOL:g} in {seconds:.0f} s; RMS change from tol "
                            f"{CHECK_TOL:g} on {len(some)} points: {rms(loose, data[:CHECK_POINTS]):.1e}")
        problems.append(problem)
    return problems


class MixtureEps:
    """The mixture's exact E[eps | x_t] as a network (x [B, D], DDPM step index t) -> [B, D], with
    alpha, sigma at t from ``process.level((t + 1) / T)``; counts its calls (the NFE)."""

    def __init__(self, mixture: GaussianMixture, process: DiscreteVP) -> None:
        self.mixture, self.process, self.calls = mixture, process, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=torch.float64).flatten().unique()  # one time for the batch here
        level = self.process.level((t + 1) / self.process.T)
        return self.mixture.eps(x, level.alpha, level.sigma)


def rms(a: Tensor, b: Tensor) -> float:
    return float((a - b).square().sum(-1).mean().sqrt())


def errors(out: Tensor, problem: Problem, t_end: float) -> tuple[float, float, float]:
    """(RMS to the data's reference, RMS to the reference at t_end, median distance to the data's)."""
    if not torch.isfinite(out).all():
        return math.inf, math.inf, math.inf
    ref = problem.ref(0.0)
    return rms(out, ref), rms(out, problem.ref(t_end)), float((out - ref).norm(dim=-1).median())


@dataclass
class Result:
    """One run: library, row / configuration, steps, counted NFE, errors, precision."""

    problem: str
    budget: int
    library: str
    name: str
    steps: int
    nfe: int
    error: float  # RMS to the exact solution at the data (t = 0)
    error_own_end: float  # RMS to the exact solution at the time the run ended
    median: float  # median over points of ||x - x_ref|| at the data (RMS is sensitive to a few far points)
    t_end: float
    dtype: str


# ----- diffusers, in float64 ------------------------------------------------------------------------


def ode_tau(t: Any) -> float:
    """SA-Solver's stochasticity tau(t) = 0: the probability-flow ODE (its docs: ``lambda t: 0``)."""
    return 0.0


S = diffusers
FAMILIES: list[tuple[str, type, dict, dict]] = [  # (name, scheduler, constructor options, step() options)
    ("DDIM", S.DDIMScheduler, dict(set_alpha_to_one=True, clip_sample=False, steps_offset=0), {}),
    ("PNDM (PLMS)", S.PNDMScheduler, dict(skip_prk_steps=True, set_alpha_to_one=True, steps_offset=0), {}),
    ("DPM++ 2M", S.DPMSolverMultistepScheduler, dict(solver_order=2, algorithm_type="dpmsolver++"), {}),
    ("DPM++ 2M heun", S.DPMSolverMultistepScheduler,
     dict(solver_order=2, algorithm_type="dpmsolver++", solver_type="heun"), {}),
    ("DPM++ 3M", S.DPMSolverMultistepScheduler, dict(solver_order=3, algorithm_type="dpmsolver++"), {}),
    ("DPM++ 2S single", S.DPMSolverSinglestepScheduler, dict(solver_order=2, algorithm_type="dpmsolver++"), {}),
    ("DPM++ 3S single", S.DPMSolverSinglestepScheduler, dict(solver_order=3, algorithm_type="dpmsolver++"), {}),
    # bh1 gives NaN on a step into sigma = 0 (its B(h) = h is infinite there): it stops at sigma_min
    *[(f"UniPC bh1 o{order}", S.UniPCMultistepScheduler,
       dict(solver_order=order, solver_type="bh1", final_sigmas_type="sigma_min"), {}) for order in (2, 3)],
    *[(f"UniPC bh2 o{order}", S.UniPCMultistepScheduler, dict(solver_order=order, solver_type="bh2"), {})
      for order in (2, 3)],
    *[(f"DEIS o{order}", S.DEISMultistepScheduler, dict(solver_order=order), {}) for order in (2, 3)],
    *[(f"SA-Solver ODE p{order}c{order}", S.SASolverScheduler,
       dict(predictor_order=order, corrector_order=order, tau_func=ode_tau), {}) for order in (2, 3)],
    ("Euler", S.EulerDiscreteScheduler, {}, {}),
    ("Heun", S.HeunDiscreteScheduler, {}, {}),
    *[(f"LMS o{order}", S.LMSDiscreteScheduler, {}, dict(order=order)) for order in (2, 3, 4)],
]
SPACINGS = ("leading", "trailing", "linspace")
SIGMA_SCHEDULES = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential",
                   "use_beta_sigmas": "beta", "use_lu_lambdas": "lu lambdas"}  # these ignore the spacing
SIGMA_SPACE = (S.EulerDiscreteScheduler, S.HeunDiscreteScheduler, S.LMSDiscreteScheduler)  # work on x / alpha


@dataclass(frozen=True)
class Peer:
    """One diffusers configuration."""

    family: str
    cls: type
    options: tuple  # constructor keyword arguments (items) beyond LINEAR
    step_options: tuple
    variant: str  # the spacing or the sigma schedule

    @property
    def label(self) -> str:
        return f"{self.family} {self.variant}"

    def make(self) -> Any:
        return self.cls(**LINEAR, **dict(self.options))


def peers() -> Iterator[Peer]:
    """Every family with every spacing, then with each sigma schedule it supports."""
    for family, cls, options, step_options in FAMILIES:
        accepted = inspect.signature(cls.__init__).parameters
        variants = ([({"timestep_spacing": s}, s) for s in SPACINGS] if "timestep_spacing" in accepted
                    else [({}, "default")])  # DPMSolverSinglestep: no spacing option
        variants += [({flag: True}, name) for flag, name in SIGMA_SCHEDULES.items() if flag in accepted]
        for extra, variant in variants:
            yield Peer(family, cls, tuple({**options, **extra}.items()), tuple(step_options.items()), variant)


@contextlib.contextmanager
def default_float64() -> Iterator[None]:
    """Tensors a scheduler builds inside step() (UniPC's rks, R, b) are then float64 too."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@functools.lru_cache(maxsize=None)
def nfe_table(peer: Peer, most: int = max(BUDGETS)) -> dict[int, int]:
    """{inference steps: model calls (= len(timesteps))} for steps up to the first that costs more
    than ``most`` (steps a configuration refuses, e.g. too few for its order, are left out)."""
    sched, table = peer.make(), {}
    for steps in range(1, 2 * most + 2):
        try:
            sched.set_timesteps(steps)
        except Exception:  # noqa: BLE001
            continue
        table[steps] = len(sched.timesteps)
        if table[steps] > most:
            break
    return table


def peer_steps(peer: Peer, budget: int) -> int | None:
    """Inference steps giving the most model calls within the budget (the most steps on a tie)."""
    fits = [(nfe, steps) for steps, nfe in nfe_table(peer).items() if nfe <= budget]
    return max(fits)[1] if fits else None


def diffusers_loop(scheduler: Any, model: Model, sample: Tensor, **step_options: Any) -> Tensor:
    """diffusers' sampling loop over ``scheduler.timesteps``: scale_model_input, model, step."""
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(out, t, sample, **step_options).prev_sample
    return sample


def run_peer(peer: Peer, steps: int, problem: Problem) -> tuple[Tensor, float, int]:
    """x [N, D] at t_max -> (x at the scheduler's last time, that time, model calls), in float64.

    Euler, Heun and LMS integrate x / alpha: they start from x sqrt(1 + sigma_0^2) and their end
    point is mapped back with alpha = 1 / sqrt(1 + sigma_last^2) (1 at the data)."""
    process = problem.process
    with default_float64():
        sched = set_timesteps_float64(peer.make(), steps)
        assert torch.equal(sched.alphas_cumprod, process.alphas_cumprod), "tables differ"
        sigma_last = float(sched.sigmas[-1]) if hasattr(sched, "sigmas") else 0.0  # DDIM, PNDM: alpha_final = 1
        scale = math.sqrt(1 + float(sched.sigmas[0]) ** 2) if isinstance(sched, SIGMA_SPACE) else 1.0
        model = MixtureEps(problem.mixture, process)
        out = diffusers_loop(sched, lambda xin, t: model(xin.as_subclass(Tensor), t),
                             (problem.x * scale).as_subclass(KeepFloat64), **dict(peer.step_options))
    out = out.as_subclass(Tensor)
    if isinstance(sched, SIGMA_SPACE):
        out = out / math.sqrt(1 + sigma_last**2)
    assert model.calls == len(sched.timesteps), (peer.label, model.calls, len(sched.timesteps))
    t_end = 0.0 if sigma_last == 0 else float(process.t_of_sigma_edm(torch.tensor(sigma_last, dtype=torch.float64)))
    return out, t_end, model.calls


def diffusers_results(problem: Problem, budgets: tuple[int, ...]) -> list[Result]:
    results = []
    for peer in peers():
        for budget in budgets:
            steps = peer_steps(peer, budget)
            if steps is None:
                continue
            out, t_end, nfe = run_peer(peer, steps, problem)
            results.append(Result(problem.name, budget, "diffusers", peer.label, steps, nfe,
                                  *errors(out, problem, t_end), t_end, "f64" if out.dtype == torch.float64 else "f32"))
    return results


# ----- genlab ---------------------------------------------------------------------------------------

Factory = Callable[[int, Problem], Sampler]  # (NFE budget, problem) -> a sampler with its steps and grid


def count_nfe(sampler: Sampler, process: DiscreteVP) -> int:
    """Model calls of one sampling with a cheap model on one point (the grid is the sampler's own)."""
    calls = [0]

    def model(x: Tensor, t: Tensor) -> Tensor:
        calls[0] += 1
        return 0.5 * x

    sampler.sample(Denoiser(model, process, "eps"), torch.zeros(1, 2, dtype=torch.float64),
                   generator=torch.Generator().manual_seed(0), progress=False)
    return calls[0]


def within_budget(build: Callable[[int], Sampler]) -> Factory:
    """A factory giving ``build(steps)`` with the most steps whose counted NFE is within the budget:
    from the estimate budget // nfe_per_step, up while the next step count still fits (Heun's
    last step costs one call, not two), else down until one fits."""

    def make(budget: int, problem: Problem) -> Sampler:
        fits = lambda n: count_nfe(build(n), problem.process) <= budget  # noqa: E731
        steps = max(1, budget // build(1).nfe_per_step)
        if fits(steps):
            while steps < budget and fits(steps + 1):
                steps += 1
            return build(steps)
        while steps > 1:
            steps -= 1
            if fits(steps):
                return build(steps)
        raise ValueError(f"{build(1)!r}: even one step costs more than {budget} model calls")

    return make


GENLAB: list[tuple[str, Factory]] = [  # add a sampler with one line: (row name, factory)
    ("DDIM (uniform)", within_budget(lambda n: DDIM(n))),
    ("Euler (karras)", within_budget(lambda n: Euler(n))),
    ("Heun (karras)", within_budget(lambda n: Heun(n))),
    ("DPM-Solver++ 2M (log_snr)", within_budget(lambda n: DPMSolverPP(n, order=2))),
    ("DPM-Solver++ 3M (log_snr)", within_budget(lambda n: DPMSolverPP(n, order=3))),
    ("DPM-Solver++ 3M ref (log_snr)", within_budget(lambda n: DPMSolverPP(n, order=3, third_order="reference"))),
]
GENLAB += [
    ("UniPC bh2 (log_snr)", within_budget(lambda n: UniPC(n, grid="log_snr"))),
    ("DEIS 2 (log_snr)", within_budget(lambda n: DEIS(n, order=2))),
    ("DEIS 3 (log_snr)", within_budget(lambda n: DEIS(n, order=3))),
    ("DPM-Solver++ 2S single (log_snr)", within_budget(lambda n: DPMSolverSingle(n, order=2))),
    ("DPM-Solver++ 3S single (log_snr)", within_budget(lambda n: DPMSolverSingle(n, order=3))),
    ("PF-ODE heun2 (log_snr)", within_budget(lambda n: ODESampler(n, grid="log_snr", method="heun2"))),
    ("PF-ODE rk4 (log_snr)", within_budget(lambda n: ODESampler(n, grid="log_snr", method="rk4"))),
    ("UniPC bh1 (FAST_GRID)", within_budget(lambda n: UniPC(n, variant="bh1"))),
    ("UniPC bh2 o3 (FAST_GRID)", within_budget(lambda n: UniPC(n, order=3))),
    ("DPM-Solver++ 2M (FAST_GRID)", within_budget(lambda n: DPMSolverPP(n, grid=FAST_GRID))),
    # genlab's default fast sampler: UniPC() as it comes, bh2, order 2, on FAST_GRID (its default grid)
    ("UniPC bh2 (default)", within_budget(lambda n: UniPC(n))),
]
DEFAULT = "UniPC bh2 (default)"


LEARN = {"pool": 512, "evaluations": 200}  # a learned grid's own start noise (seed 99); its fitting passes


def fit_draws(problem: Problem) -> tuple[Tensor, Tensor]:
    """Start noise for fitting grids, drawn apart from the test points, and the teacher's solution for it
    (``reference_solve``: what a user has, a many-step solve with their own model; not the exact ODE)."""
    from genlab.diffusion.learned_grid import reference_solve

    if "fit" not in problem.cache:
        gen = torch.Generator().manual_seed(99)
        x = problem.process.prior((LEARN["pool"], problem.mixture.dim), generator=gen, dtype=torch.float64)
        problem.cache["fit"] = (x, reference_solve(exact_denoiser(problem.mixture, problem.process), x)[0])
    return problem.cache["fit"]


def learned(build: Callable[..., Sampler]) -> Factory:
    """A factory giving ``build(steps, grid=...)`` on a grid fitted by ``learn_grid`` (LD3) for the
    problem's exact denoiser and the steps :func:`within_budget` picks, on :func:`fit_draws` (the
    pool) against the teacher solve, with ``LEARN["evaluations"]``."""
    from genlab.diffusion.learned_grid import learn_grid

    def make(budget: int, problem: Problem) -> Sampler:
        steps = within_budget(build)(budget, problem).steps
        x, ref = fit_draws(problem)
        fit = learn_grid(exact_denoiser(problem.mixture, problem.process), build(steps), steps=steps, x=x,
                         reference=ref, evaluations=LEARN["evaluations"])
        return build(steps, grid=ExplicitGrid(fit.times.tolist()))

    return make


def learned_rows() -> list[tuple[str, Factory]]:
    """LEARNED-GRID HOOK: rows whose grid is learned per (problem, budget); the best of them is held
    to <= 0.5 x diffusers' best at every NFE. Add a sampler with one line."""
    if importlib.util.find_spec("genlab.diffusion.learned_grid") is None:
        return []
    return [
        ("DPM-Solver++ 2M learned", learned(lambda n, grid=None: DPMSolverPP(n, grid=grid, order=2))),
        ("UniPC bh2 learned", learned(lambda n, grid=None: UniPC(n, grid=grid))),
        ("UniPC bh2 o3 learned", learned(lambda n, grid=None: UniPC(n, grid=grid, order=3))),
    ]


def genlab_results(problem: Problem, rows: list[tuple[str, Factory]], budgets: tuple[int, ...]) -> list[Result]:
    results = []
    for name, make in rows:
        for budget in budgets:
            sampler, model = make(budget, problem), MixtureEps(problem.mixture, problem.process)
            out = sampler.sample(Denoiser(model, problem.process, "eps"), problem.x.clone(), progress=False,
                                 generator=torch.Generator().manual_seed(0))
            assert model.calls <= budget, f"{name}: {model.calls} model calls for a budget of {budget}"
            t_end = float(sampler.timesteps(problem.process)[-1])
            results.append(Result(problem.name, budget, "genlab", name, sampler.steps, model.calls,
                                  *errors(out, problem, t_end), t_end, "f64" if out.dtype == torch.float64 else "f32"))
    return results


def parity(problem: Problem) -> str:
    """genlab on diffusers' own grid reproduces diffusers' error (same algorithm, float64)."""
    pairs = [("DDIM trailing", lambda n: DDIM(n)), ("Euler linspace", lambda n: Euler(n)),
             ("Heun linspace", lambda n: Heun(n)), ("DPM++ 2M linspace", lambda n: DPMSolverPP(n, order=2)),
             ("DPM++ 3M linspace", lambda n: DPMSolverPP(n, order=3, third_order="reference"))]
    by_label = {p.label: p for p in peers()}
    worst = 0.0
    for label, build in pairs:
        peer = by_label[label]
        steps = peer_steps(peer, 10)
        theirs, _, _ = run_peer(peer, steps, problem)
        with default_float64():
            sched = set_timesteps_float64(peer.make(), steps)
        times = torch.cat([(sched.timesteps.unique_consecutive().double() + 1) / problem.process.T, torch.zeros(1)])
        ours = build(steps).sample(Denoiser(MixtureEps(problem.mixture, problem.process), problem.process, "eps"),
                                   problem.x.clone(), times=times, progress=False)
        worst = max(worst, rms(ours, theirs) / rms(theirs, problem.ref(0.0)))
    return (f"parity: genlab on diffusers' grid vs diffusers (DDIM, Euler, Heun, DPM++ 2M, 3M-reference at NFE <= 10):"
            f" max RMS difference {worst:.1e} of the error")


# ----- accuracy report -----------------------------------------------------------------------------


def best(results: list[Result], budget: int, library: str | None = None, names: set | None = None) -> Result | None:
    pool = [r for r in results if r.budget == budget and (library is None or r.library == library)
            and (names is None or r.name in names)]
    return min(pool, key=lambda r: r.error) if pool else None


def cell(r: Result | None, name: str = "") -> str:
    """error, a mark († stops at sigma_min, (f32) not float64), NFE and ``name``."""
    if r is None:
        return f"{'-':>9}"
    mark = ("" if r.t_end == 0 else "†") + ("" if r.dtype == "f64" else "(f32)")
    return f"{r.error:9.3e}{mark:1} n{r.nfe:<2} {name}"


def print_accuracy(problem: Problem, results: list[Result], learned: set[str], budgets: tuple[int, ...]) -> None:
    print(f"\n--- {problem.name}: {problem.mixture}, {len(problem.x)} points; {problem.ref_note}")
    print("    error = RMS ||x - x_ref|| at the data; n = model calls; † = stops at sigma_min "
          "(error at its own end in the CSV); median = median ||x - x_ref||")
    head = "".join(f" | {'NFE <= ' + str(b):^30}" for b in budgets)
    print(f"{'diffusers (best variant)':30}{head}")
    for family, *_ in FAMILIES:
        variants = {p.label: p.variant for p in peers() if p.family == family}
        cells = [best(results, b, "diffusers", set(variants)) for b in budgets]
        print(f"{family:30}" + "".join(f" | {cell(r, variants[r.name] if r else ''):30}" for r in cells))
    print(f"{'genlab':30}" + "".join(f" | {'error':>9}  n   / diffusers best" for _ in budgets))
    for name in dict.fromkeys(r.name for r in results if r.library == "genlab"):
        cells = []
        for b in budgets:
            ours, theirs = best(results, b, "genlab", {name}), best(results, b, "diffusers")
            cells.append(f" | {cell(ours, f'{ours.error / theirs.error:6.3f}'):30}")
        print(f"{name:30}" + "".join(cells))
    print("summary")
    for b in budgets:
        theirs = best(results, b, "diffusers")
        default = best(results, b, "genlab", {DEFAULT})
        ours = best(results, b, "genlab")
        met = "met" if default.error < theirs.error else "MISSED"
        line = (f"  NFE <= {b:2}: diffusers best {theirs.error:.3e} ({theirs.name}, n{theirs.nfe}, median "
                f"{theirs.median:.1e}); genlab default {default.error:.3e} (median {default.median:.1e}) -> ratio "
                f"{default.error / theirs.error:.3f} (target < 1: {met}); genlab best {ours.error:.3e} ({ours.name}, "
                f"median {ours.median:.1e})")
        mine = best(results, b, "genlab", learned) if learned else None
        line += (f"; learned {mine.error / theirs.error:.3f} (target <= 0.5: "
                 f"{'met' if mine.error <= 0.5 * theirs.error else 'MISSED'})" if mine
                 else "; learned grid: no rows yet (hook: learned_rows)")
        print(line)


CONVERGENCE = {"default (FAST_GRID: end moves beyond 20)": None,
               "FAST_GRID with a fixed end": {k: v for k, v in FAST_GRID.items() if k != "sigma_min_steps"},
               "FAST_GRID, sigma_min=None": {**FAST_GRID, "sigma_min": None}, "log_snr": "log_snr"}


def print_convergence(problem: Problem, steps: tuple[int, ...] = (20, 40, 80, 160)) -> None:
    """The default UniPC at more steps. A fixed sigma_min end leaves an error more steps do not remove
    (the last step returns x0_hat at sigma 0.045); FAST_GRID's end moves down as (20 / N)^1.5 beyond 20
    steps, so the default converges until the grid reaches the process's t_min (DDPM's first step),
    whose own error no grid ending there removes."""
    print(f"    UniPC bh2 at more steps, error (NFE = steps): {' | '.join(f'{n:>9}' for n in steps)}")
    for name, grid in CONVERGENCE.items():
        errs = []
        for n in steps:
            out = UniPC(n, grid=grid).sample(Denoiser(MixtureEps(problem.mixture, problem.process), problem.process,
                                                      "eps"), problem.x.clone(), progress=False)
            errs.append(errors(out, problem, 0.0)[0])
        print(f"    {name:44}  " + " | ".join(f"{e:9.2e}" for e in errs))


def part_accuracy(n: int, csv_path: str | None) -> None:
    print(f"== Accuracy per NFE: exact eps of Gaussian mixtures, DDPM linear schedule (T = 1000), float64, "
          f"{n} start points, {torch.get_num_threads()} torch thread(s) ==")
    print(f"   diffusers {diffusers.__version__}: {len(FAMILIES)} schedulers x (3 spacings + their sigma schedules) = "
          f"{sum(1 for _ in peers())} configurations; steps per budget = most model calls within it")
    learned = learned_rows()
    rows = GENLAB + learned
    everything = []
    for problem in make_problems(n):
        start = time.perf_counter()
        results = diffusers_results(problem, BUDGETS) + genlab_results(problem, rows, BUDGETS)
        print_accuracy(problem, results, {name for name, _ in learned}, BUDGETS)
        print_convergence(problem)
        print(f"    {parity(problem)}; runs took {time.perf_counter() - start:.0f} s")
        everything += results
    if csv_path:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(Result.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(r.__dict__ for r in everything)
        atomic_write(csv_path, text.getvalue())
        print(f"   every run written to {csv_path}")


# ----- likelihood (hook) ----------------------------------------------------------------------------


LIKELIHOOD_ROUTES = [("exact trace", dict(divergence="exact")),
                     ("Hutchinson, 1 probe", dict(divergence="hutchinson", n_probes=1)),
                     ("Hutchinson, 4 probes", dict(divergence="hutchinson", n_probes=4))]


def part_likelihood(n: int) -> None:
    """log p(x0) of x0 drawn from each mixture through the PF-ODE (``DiffusionLikelihood``, dopri5 at
    its default tolerance, from t = 0 to t_max) with the exact denoiser and the exact marginal
    p_{t_max} as prior, so the result should equal ``mixture.log_prob(x0)``: the error is the ODE
    solver's plus the divergence estimator's. (The default N(0, I) prior adds the prior mismatch.)"""
    print(f"\n== Likelihood: log p(x0) by the probability-flow ODE vs the mixture's exact log p, {n} points, "
          f"{torch.get_num_threads()} torch thread(s) ==")
    if importlib.util.find_spec("genlab.diffusion.likelihood") is None:
        print("   skipped: genlab.diffusion.likelihood does not exist yet")
        return
    from genlab.diffusion.likelihood import DiffusionLikelihood

    print(f"{'problem':8}{'route':22}{'NFE':>5}{'time s':>8}{'mean err':>11}{'RMS err':>10}{'bits/dim':>10}"
          f"{'mean stderr':>13}")
    for name, mixture in MIXTURES.items():
        x0 = mixture.sample(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        truth = mixture.log_prob(x0)
        end = PROCESS.level(torch.tensor(PROCESS.t_max, dtype=torch.float64))
        prior = lambda x, m=mixture: m.log_prob_t(x, end.alpha, end.sigma)  # noqa: E731
        for route, options in LIKELIHOOD_ROUTES:
            likelihood = DiffusionLikelihood(exact_denoiser(mixture, PROCESS), t_start=0.0, prior=prior, **options)
            start = time.perf_counter()
            est = likelihood.estimate(x0, generator=torch.Generator().manual_seed(0))
            seconds = time.perf_counter() - start
            err = est.log_prob - truth
            rmse = float(err.square().mean().sqrt())
            print(f"{name:8}{route:22}{est.nfe:5}{seconds:8.1f}{float(err.mean()):11.2e}{rmse:10.2e}"
                  f"{rmse / (mixture.dim * math.log(2)):10.2e}{float(est.stderr.mean()):13.2e}")


# ----- model-free cost per step ---------------------------------------------------------------------


def median_ms(runs: list[tuple[Callable[[], object], Callable[[], object]]], repeats: int) -> list[float]:
    """Median wall time in ms of each ``run`` of ``runs = [(prepare, run), ...]`` over ``repeats``,
    after one warm-up; ``prepare()`` is not timed. The runs alternate, so load changes hit all alike."""
    times = [[] for _ in runs]
    for _ in range(repeats + 1):
        for (prepare, run), out in zip(runs, times):
            prepare()
            start = time.perf_counter()
            run()
            out.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t[1:]) for t in times]


COST_PEERS = {  # diffusers' counterpart of each genlab sampler, as in tests/test_samplers_diffusers.py
    "ddim": lambda: diffusers.DDIMScheduler(**LINEAR, timestep_spacing="trailing", set_alpha_to_one=True,
                                            clip_sample=False, steps_offset=0),
    "dpm2m": lambda: diffusers.DPMSolverMultistepScheduler(**LINEAR, solver_order=2, algorithm_type="dpmsolver++"),
}


def part_cost(steps: int, repeats: int) -> None:
    x = torch.randn(4, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    cached = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    model = lambda x_in, t: cached  # noqa: E731  (no compute: only the sampler is timed)
    print(f"\n== Model-free cost per step: float32 x {list(x.shape)}, N = {steps} steps, median of {repeats}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} thread(s), diffusers {diffusers.__version__} ==")
    print(f"   load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("   diffusers: set_timesteps(N) untimed, then the loop scale_model_input + step; "
          "genlab: sampler.sample(...) in full (grid and levels included)")
    print(f"{'sampler':20}{'genlab ms/step':>16}{'diffusers ms/step':>19}{'genlab/diffusers':>18}   target")
    for name, sampler, key in [("DDIM", DDIM(steps), "ddim"), ("DPM-Solver++ 2M", DPMSolverPP(steps), "dpm2m")]:
        sched = COST_PEERS[key]()
        process = DiscreteVP(alphas_cumprod=sched.alphas_cumprod.double().tolist())
        denoiser = Denoiser(model, process, "eps")
        ours, theirs = median_ms([(lambda: None, lambda: sampler.sample(denoiser, x, steps=steps, progress=False)),
                                  (lambda: sched.set_timesteps(steps), lambda: diffusers_loop(sched, model, x))],
                                 repeats)
        ratio = ours / theirs
        print(f"{name:20}{ours / steps:16.4f}{theirs / steps:19.4f}{ratio:18.2f}   <= 0.50 "
              f"{'met' if ratio <= 0.5 else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer points and timing repeats")
    parser.add_argument("--csv", help="write every accuracy run (problem, budget, configuration, error) here")
    parser.add_argument("--parts", nargs="+", choices=("accuracy", "convergence", "likelihood", "cost"),
                        default=["accuracy", "likelihood", "cost"],
                        help="which parts to run (default: all; accuracy includes the convergence lines)")
    args = parser.parse_args()
    diffusers.utils.logging.set_verbosity_error()  # DPMSolverSinglestep warns on every odd step count
    torch.set_num_threads(1)  # faster here than 2 (small tensors) and stable timings
    LEARN["evaluations"] = 60 if args.quick else 200
    start = time.perf_counter()
    if "accuracy" in args.parts:
        part_accuracy(n=300 if args.quick else 2000, csv_path=args.csv)
    elif "convergence" in args.parts:  # the convergence lines alone, on the accuracy part's problems
        for problem in make_problems(300 if args.quick else 2000):
            print(f"--- {problem.name}: {problem.mixture}, {len(problem.x)} points; {problem.ref_note}")
            print_convergence(problem)
    if "likelihood" in args.parts:
        part_likelihood(n=100 if args.quick else 500)
    if "cost" in args.parts:
        part_cost(steps=50, repeats=5 if args.quick else 20)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
