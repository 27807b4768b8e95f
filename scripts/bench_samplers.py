"""Benchmark genlab's samplers against diffusers' schedulers: accuracy and per-step overhead.

1. Accuracy (float64). Data: Gaussian mixtures with an exact eps "network" eps(x, DDPM step index);
   process: DDPM's linear schedule, genlab's :class:`DiscreteVP` built from diffusers' own
   ``alphas_cumprod``. From one fixed batch x ~ N(0, I) at t_max every sampler integrates to the
   data (t = 0); the error is the RMS over samples of ||x - x_ref||, x_ref the exact
   probability-flow ODE end point (``genlab.testing.exact_ode_solution``). Rows pair the same
   algorithm on the same grid (diffusers' timesteps), then genlab's samplers on their default grids.
2. Model-free cost per step: the "model" returns a cached tensor, so only the sampler / scheduler
   work is timed (float32, [4, 4, 64, 64], one torch thread).

Usage: ``python scripts/bench_samplers.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import diffusers
import torch
from torch import Tensor

from genlab.diffusion import DDIM, Denoiser, DiscreteVP, DPMSolverPP, Euler, Heun, Sampler
from genlab.testing import GaussianMixture, exact_ode_solution
from genlab.testing.peers import KeepFloat64, set_timesteps_float64

BUDGETS = (5, 10, 20)
LINEAR = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)  # DDPM's (Heun defaults to SD's)
Model = Callable[[Tensor, Tensor], Tensor]

# ----- diffusers, in float64 ------------------------------------------------------------------------

SCHEDULERS = {  # diffusers' counterpart of each genlab sampler, configured as in tests/test_samplers_diffusers.py
    "ddim": lambda: diffusers.DDIMScheduler(**LINEAR, timestep_spacing="trailing", set_alpha_to_one=True,
                                            clip_sample=False, steps_offset=0),
    "euler": lambda: diffusers.EulerDiscreteScheduler(**LINEAR, timestep_spacing="linspace"),
    "heun": lambda: diffusers.HeunDiscreteScheduler(**LINEAR, timestep_spacing="linspace"),
    "dpm2m": lambda: diffusers.DPMSolverMultistepScheduler(**LINEAR, solver_order=2, algorithm_type="dpmsolver++"),
    "dpm3m": lambda: diffusers.DPMSolverMultistepScheduler(**LINEAR, solver_order=3, algorithm_type="dpmsolver++"),
}


def diffusers_loop(scheduler, model: Model, sample: Tensor) -> Tensor:
    """diffusers' sampling loop over ``scheduler.timesteps``: scale_model_input, model, step."""
    for t in scheduler.timesteps:
        sample = scheduler.step(model(scheduler.scale_model_input(sample, t), t), t, sample).prev_sample
    return sample


EULER_LIKE = (diffusers.EulerDiscreteScheduler, diffusers.HeunDiscreteScheduler)


def run_diffusers(scheduler, model: Model, x: Tensor) -> Tensor:
    """x [B, D] at t_max -> the data. Euler / Heun integrate x / alpha, so they start from
    x sqrt(1 + sigma_max^2); at the data alpha = 1, so their result needs no mapping back."""
    start = x * (1 + scheduler.sigmas[0] ** 2).sqrt() if isinstance(scheduler, EULER_LIKE) else x
    out = diffusers_loop(scheduler, lambda xin, t: model(xin.as_subclass(Tensor), t), start.as_subclass(KeepFloat64))
    return out.as_subclass(Tensor)

# ----- accuracy ------------------------------------------------------------------------------------


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


def steps_for(nfe: int, make: Callable[[int], Sampler]) -> int:
    """Most steps within an NFE budget; the last step into the data costs one evaluation."""
    per_step = make(1).nfe_per_step
    return (nfe + per_step - 1) // per_step


PAIRS = [  # (row, genlab sampler of `steps`, diffusers scheduler key)
    ("DDIM", lambda n: DDIM(n), "ddim"),
    ("Euler", lambda n: Euler(n), "euler"),
    ("Heun", lambda n: Heun(n), "heun"),
    ("DPM-Solver++ 2M", lambda n: DPMSolverPP(n, order=2), "dpm2m"),
    # 3M: diffusers' D2 weight ("reference") is the same algorithm; genlab's default ("taylor") differs
    ("DPM-Solver++ 3M", lambda n: DPMSolverPP(n, order=3, third_order="reference"), "dpm3m"),
    ("DPM++ 3M taylor", lambda n: DPMSolverPP(n, order=3), "dpm3m"),
]


def accuracy_rows(mixture: GaussianMixture, process: DiscreteVP, x: Tensor, ref: Tensor) -> list:
    """Rows (name, grid, NFEs, [(genlab error, diffusers error or None) per budget])."""
    rows = []
    for name, make, key in PAIRS:
        cells, nfes, spacing = [], [], SCHEDULERS[key]().config.timestep_spacing
        for nfe in BUDGETS:
            steps = steps_for(nfe, make)
            sched = set_timesteps_float64(SCHEDULERS[key](), steps)
            assert torch.equal(sched.alphas_cumprod, process.alphas_cumprod), "tables differ"
            ours, theirs = MixtureEps(mixture, process), MixtureEps(mixture, process)
            times = torch.cat([(sched.timesteps.unique_consecutive().double() + 1) / process.T, torch.zeros(1)])
            out = make(steps).sample(Denoiser(ours, process, "eps"), x.clone(), times=times, progress=False)
            peer = run_diffusers(sched, theirs, x)
            assert ours.calls == theirs.calls <= nfe, (name, ours.calls, theirs.calls)
            cells.append((rms(out, ref), rms(peer, ref)))
            nfes.append(ours.calls)
        rows.append((name, f"diffusers {spacing}", nfes, cells))
    for name, make, _ in PAIRS:  # genlab alone, on its default grids
        cells, nfes = [], []
        for nfe in BUDGETS:
            sampler, model = make(steps_for(nfe, make)), MixtureEps(mixture, process)
            out = sampler.sample(Denoiser(model, process, "eps"), x.clone(), progress=False)
            cells.append((rms(out, ref), None))
            nfes.append(model.calls)
        rows.append((name, f"genlab {type(sampler.grid).__name__}", nfes, cells))
    return rows


def print_accuracy(title: str, rows: list) -> None:
    print(f"\n{title}")
    print(f"{'':48}" + "".join(f" | {'NFE budget ' + str(b):^27}" for b in BUDGETS))
    print(f"{'sampler':16}{'grid':24}{'NFE':8}" + " | genlab    diffusers g/d   " * len(BUDGETS))
    for name, grid, nfes, cells in rows:
        text = "".join(f" | {g:.3e} {d:.3e} {g / d:5.3f}" if d is not None else f" | {g:.3e} {'-':>9} {'':5}"
                       for g, d in cells)
        print(f"{name:16}{grid:24}{'/'.join(map(str, nfes)):8}{text}")


def part_accuracy(n: int) -> None:
    process = DiscreteVP(alphas_cumprod=SCHEDULERS["ddim"]().alphas_cumprod.double().tolist())
    gen = torch.Generator().manual_seed(0)
    mixtures = {"ring": GaussianMixture.ring(), "random": GaussianMixture.random(dim=8, k=4, generator=gen)}
    print(f"== Accuracy: RMS ||x - x_ref|| to the exact probability-flow ODE solution, float64, {n} samples ==")
    print("   process: DiscreteVP from diffusers' linear-schedule alphas_cumprod (T = 1000); "
          "g/d = genlab / diffusers")
    for label, mixture in mixtures.items():
        x = torch.randn(n, mixture.dim, generator=gen, dtype=torch.float64)
        start = time.perf_counter()
        ref = exact_ode_solution(mixture, process, x, t_start=1.0, t_end=0.0)
        title = f"{label}: {mixture}  (reference solve {time.perf_counter() - start:.1f} s)"
        print_accuracy(title, accuracy_rows(mixture, process, x, ref))


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
        sched = SCHEDULERS[key]()
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
    parser.add_argument("--quick", action="store_true", help="fewer samples and timing repeats")
    args = parser.parse_args()
    torch.set_num_threads(1)  # stable timings; more threads only contend on these small tensors
    part_accuracy(n=400 if args.quick else 2000)
    part_cost(steps=50, repeats=5 if args.quick else 20)


if __name__ == "__main__":
    main()
