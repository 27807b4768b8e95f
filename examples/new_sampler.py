"""Adding a sampler from a paper: one small subclass of :class:`genlab.diffusion.Sampler`.

The base class owns the loop, the time grid, progress, callbacks and state; a new method only writes
``step`` in the paper's notation (alpha, sigma, lambda = log(alpha / sigma) = ``level.lam``).
Written against the Denoiser's (x0, eps), it runs with every process and every prediction type.

This file adds iPNDM (Zhang & Chen 2023), the Adams-Bashforth method of order up to 4 on eps in the
EDM variables, and checks it on an exact Gaussian-mixture denoiser against the exactly solved
probability-flow ODE, on VP, VE, EDM, rectified flow and sub-VP, next to Euler and DPM-Solver++(3M)
at the same NFE (one per step). Two checks with different answers:

- One AB-p step started from the exact solution and exact history has local error O(h^(p+1)) on a
  grid uniform in s = sigma / alpha (the last lines of the output): the weights are right.
- Over a whole run the method is only second order (the "order" column, and the line for 80-320
  steps): its first step is Euler (the lower-order warm start, local error O(h^2)) and its weights
  assume equal steps, which Karras and log-SNR grids are not. What it is for is few steps: on this
  ring it has the smallest error of the three at 10, 20 and 40 steps on every process.

Run:  python examples/new_sampler.py
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from genlab.core.registry import register
from genlab.diffusion import (EDM, PREDICTIONS, VE, VP, DPMSolverPP, Euler, Karras, Level, Process, RectifiedFlow,
                              Sampler, StepContext, SubVP, UniformLogSNR)
from genlab.diffusion.grids import GridSpec
from genlab.diffusion.levels import combine
from genlab.testing import GaussianMixture, exact_denoiser, exact_ode_solution


@register("sampler", "ipndm")
class IPNDM(Sampler):
    """iPNDM (Zhang & Chen 2023, "DEIS", Sec. 4; k-diffusion's ``sample_ipndm``): PNDM's linear
    multistep method with a lower-order warm start instead of pseudo Runge-Kutta steps. In the EDM
    variables x^ = x / alpha, s = sigma / alpha the probability-flow ODE is dx^/ds = eps (Karras et
    al. 2022, Eq. 4); each step is Adams-Bashforth on the eps history, of order p = min(max_order,
    step + 1), with the weights c_p of equal steps (whatever the grid):

        x^_next = x^ + (s_next - s) sum_j c_p[j] eps_(n-j),   x_next = alpha_next x^_next

    One model evaluation per step; ``state.history`` holds (level, eps), newest last.
    """

    default_grid = "karras"
    multistep = True  # a step reads the eps of earlier steps
    WEIGHTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))

    def __init__(self, steps: int = 20, grid: GridSpec | None = None, max_order: Literal[1, 2, 3, 4] = 4) -> None:
        super().__init__(steps, grid)
        if max_order not in (1, 2, 3, 4):
            raise ValueError(f"iPNDM max_order must be 1, 2, 3 or 4, got {max_order!r}")
        self.max_order = max_order

    def step(self, ctx: StepContext, x: Tensor, level: Level, level_next: Level) -> Tensor:
        _, eps = ctx.denoise(x, level)
        history = ctx.state.history = [*ctx.state.history, (level, eps)][-self.max_order:]
        eps_ab = combine(*zip(self.WEIGHTS[len(history) - 1], (e for _, e in reversed(history))))
        (a_s, s_s), (a_t, s_t) = level_next.coef("alpha", "sigma_edm"), level.coef("alpha", "sigma_edm")
        return combine((a_s / a_t, x), (a_s * (s_s - s_t), eps_ab))


# ----- checking it against the exact probability-flow ODE -----------------------------------------


def start_and_end(process: Process, grid: Any) -> tuple[float, float]:
    """The first and last time of ``grid`` on ``process`` (the grid ends at t_min with final="min")."""
    times = grid(process, 2)
    return float(times[0]), float(times[-1])


def noisy_batch(mixture: GaussianMixture, process: Process, t: float, n: int, seed: int = 0) -> Tensor:
    """x_t = alpha x0 + sigma eps [n, D] (float64) for x0 drawn from the mixture."""
    g = torch.Generator().manual_seed(seed)
    lv = process.level(torch.tensor(t, dtype=torch.float64))
    x0 = mixture.sample(n, generator=g, dtype=torch.float64)
    return lv.alpha * x0 + lv.sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)


def rms(a: Tensor, b: Tensor) -> float:
    return float((a - b).square().mean().sqrt())


def errors(make: Callable[..., Sampler], mixture: GaussianMixture, process: Process, prediction: str, grid: Any,
           steps: tuple[int, ...], x: Tensor, reference: Tensor) -> list[float]:
    """RMS error of ``make(n, grid=grid)`` on the exact denoiser against the exact ODE solution, per step count."""
    denoiser = exact_denoiser(mixture, process, prediction)
    return [rms(make(n, grid=grid).sample(denoiser, x.clone(), progress=False), reference) for n in steps]


def local_errors(sampler: IPNDM, mixture: GaussianMixture, process: Process, t_end: float,
                 hs: tuple[float, ...], n: int = 64) -> list[float]:
    """RMS error of one step from t_end + h to t_end, started on the exact trajectory with the eps
    history at t_end + 2h, 3h, 4h taken on it too (times uniform in t), per step size h."""
    denoiser, errs = exact_denoiser(mixture, process, "eps"), []
    for h in hs:
        times = torch.tensor([t_end + k * h for k in (4, 3, 2, 1, 0)], dtype=torch.float64)
        path = [noisy_batch(mixture, process, float(times[0]), n)]
        for t, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
            path.append(exact_ode_solution(mixture, process, path[-1], t, t_next))
        levels = process.level(times).steps()
        ctx = sampler.context(denoiser, 4)
        ctx.state.step, ctx.state.history = 3, [(lv, denoiser(x, lv)[1]) for lv, x in zip(levels[:3], path[:3])]
        errs.append(rms(sampler.step(ctx, path[3], levels[3], levels[4]), path[4]))
    return errs


def orders(errs: list[float]) -> str:
    return " ".join(f"{math.log2(a / b):.2f}" for a, b in zip(errs, errs[1:]))


CASES = [  # (name, process, prediction, grid): each grid ends at t_min, where the ODE solution is finite
    ("VP", VP(), "eps", UniformLogSNR(final="min")),
    ("VE", VE(), "score", UniformLogSNR(final="min")),
    ("EDM", EDM(), "x0", Karras(final="min")),
    ("RectifiedFlow", RectifiedFlow(), "velocity", UniformLogSNR(t_max=0.99, final="min")),
    ("SubVP", SubVP(), "v", UniformLogSNR(final="min")),
]
LOCAL_STEPS = (0.1, 0.05, 0.025, 0.0125)  # h for the local-order check (asymptotic from about 0.05 on)
PEERS = [("ipndm", IPNDM), ("euler", Euler), ("dpm_solver_pp_3m", functools.partial(DPMSolverPP, order=3))]


def main(steps: tuple[int, ...] = (10, 20, 40), n: int = 256) -> None:
    start = time.perf_counter()
    mixture = GaussianMixture.ring()
    print(f"iPNDM vs Euler and DPM-Solver++(3M) on {mixture}, {n} points, float64; RMS error against the exact "
          "ODE solution")
    print(f"{'process':<14}{'pred':<9}{'grid':<14}" + "".join(f"{f'N={s} (NFE {s})':>16}" for s in steps)
          + f"{'order':>14}")
    for name, process, prediction, grid in CASES:
        t_start, t_end = start_and_end(process, grid)
        x = noisy_batch(mixture, process, t_start, n)
        reference = exact_ode_solution(mixture, process, x, t_start, t_end)
        for i, (label, make) in enumerate(PEERS):
            errs = errors(make, mixture, process, prediction, grid, steps, x, reference)
            head = f"{name:<14}{prediction:<9}{type(grid).__name__:<14}" if i == 0 else " " * 37
            print(head + "".join(f"{e:>16.3e}" for e in errs) + f"{orders(errs):>14}   {label}")

    # every prediction type gives the same samples: the exact model is the same in each parameterisation
    process, grid = VP(), UniformLogSNR(final="min")
    x = noisy_batch(mixture, process, start_and_end(process, grid)[0], n)
    outs = {p: IPNDM(10, grid=grid).sample(exact_denoiser(mixture, process, p), x.clone(), progress=False)
            for p in PREDICTIONS}
    spread = max(rms(o, outs["eps"]) for o in outs.values())
    print(f"VP, 10 steps: largest RMS difference between prediction types {', '.join(outs)}: {spread:.1e}")

    # over a whole run: second order (the Euler warm start and the equal-step weights)
    fine = (80, 160, 320)
    reference = exact_ode_solution(mixture, process, x, *start_and_end(process, grid))
    errs = errors(IPNDM, mixture, process, "eps", grid, fine, x, reference)
    print(f"VP, eps, iPNDM at N = {fine}: RMS error " + " ".join(f"{e:.2e}" for e in errs) + f", order {orders(errs)}")

    # one AB-p step from the exact solution and history, uniform in s (EDM): local order p + 1
    hs = LOCAL_STEPS
    for p in (1, 2, 3, 4):
        errs = local_errors(IPNDM(max_order=p), GaussianMixture.ring(std=0.5), EDM(), 1.0, hs)
        print(f"EDM, ring of std 0.5, one AB-{p} step from s = 1 + h to 1, h = {hs}: error "
              + " ".join(f"{e:.2e}" for e in errs) + f", local order {orders(errs)} (expected {p + 1})")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    torch.set_num_threads(1)  # [256, 2] tensors: threads only add overhead (and contention on a busy CPU)
    main()
