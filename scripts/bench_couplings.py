"""Benchmark the exact minibatch-OT plan: genlab's ``exact_ot`` against POT's ``ot.emd``.

For B in (256, 1024) and 2-D / 784-D data (x0 ~ N(0, I), x1 a shifted Gaussian mixture, float32 on the
CPU), in one process and on the same batches:

- genlab: ``ExactOT().permutation(x0, x1)``: the squared distances in float64 by one matmul, then
  ``genlab.metrics.transport.assignment``: the compiled auction + shortest augmenting paths
  (``genlab.metrics.auction``, numba), and, in the "scipy" column, its fallback without numba,
  ``scipy.optimize.linear_sum_assignment`` on the entropically reduced cost.
- POT: what torchcfm's ``OTPlanSampler("exact").get_map`` does: ``torch.cdist ** 2`` in the inputs'
  dtype, then ``ot.emd(unif, unif, M)`` (network simplex).

Times are medians of ``--repeats`` runs (wall clock, one torch thread unless ``--threads``); "solver"
columns time the solver alone on one precomputed float64 cost. The last column is the relative
difference of the two plans' costs <P, M> (float64 M): 0 up to float32 ties in POT's cost.

Usage: ``python scripts/bench_couplings.py [--repeats 5] [--threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import ot
import torch

from genlab.objectives.couplings import ExactOT, assignment, squared_distances


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def batch(b: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 ~ N(0, I) and x1 from an 8-component mixture (centres 2 N(0, I), std 0.5), [b, d] float32."""
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(8, d, generator=g)
    x1 = centres[torch.randint(8, (b,), generator=g)] + 0.5 * torch.randn(b, d, generator=g)
    return torch.randn(b, d, generator=g), x1


def pot_plan(x0: torch.Tensor, x1: torch.Tensor) -> np.ndarray:
    """torchcfm's ``OTPlanSampler("exact").get_map``: cdist ** 2 in the inputs' dtype, then POT's emd."""
    m = (torch.cdist(x0, x1) ** 2).numpy()
    return ot.emd(ot.unif(len(x0)), ot.unif(len(x1)), m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    coupling = ExactOT()
    header = (f"{'B':>5} {'dim':>4} | {'genlab exact_ot':>15} {'POT emd':>9} {'ratio':>6} | "
              f"{'solver: auction':>15} {'scipy':>7} {'emd':>9} {'ratio':>6} | {'cost rel. diff':>14}")
    print(f"exact minibatch-OT plan, median of {args.repeats} (ms), torch threads {args.threads}, "
          f"POT {ot.__version__}, torch {torch.__version__}")
    print(header)
    print("-" * len(header))
    assignment(np.random.default_rng(0).random((4, 4)))  # compiles the solver (or loads it from numba's cache)
    for b in (256, 1024):
        for d in (2, 784):
            x0, x1 = batch(b, d)
            cost = squared_distances(x0, x1)
            m = cost.numpy()
            ours = median_time(lambda: coupling.permutation(x0, x1), args.repeats)
            theirs = median_time(lambda: pot_plan(x0, x1), args.repeats)
            solver = median_time(lambda: assignment(m.T), args.repeats)
            scipy = median_time(lambda: assignment(m.T, solver="scipy"), args.repeats)
            emd = median_time(lambda: ot.emd(ot.unif(b), ot.unif(b), m), args.repeats)
            sigma = coupling.permutation(x0, x1).numpy()
            ours_cost = m[sigma, np.arange(b)].sum() / b
            theirs_cost = float((pot_plan(x0, x1) * m).sum())
            diff = abs(ours_cost - theirs_cost) / theirs_cost
            print(f"{b:>5} {d:>4} | {ours:>15.2f} {theirs:>9.2f} {theirs / ours:>5.1f}x | "
                  f"{solver:>15.2f} {scipy:>7.2f} {emd:>9.2f} {emd / solver:>5.1f}x | {diff:>14.1e}")
    print("ratio: POT's time / genlab's (above 1: genlab faster)")


if __name__ == "__main__":
    main()
