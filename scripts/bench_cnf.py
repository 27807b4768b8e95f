"""Benchmark genlab's continuous normalizing flow (flow transform ``cnf``) side by side with zuko's CNF, in one process.

Both integrate the same vector field: zuko's ``FFJTransform`` network (an MLP on [cos, sin of pi k t,
k = 1..3; z], ``--hidden`` units x 3, tanh: a smooth field), its weights from one seed, handed to
genlab's CNF as ``net=lambda z, t: f(t, z)``; both on dopri5 at rtol = atol = tol (1e-3, 1e-4, 1e-5;
float32) with the exact divergence. For each D and tol the script prints, for log p of ``--batch``
held-out points (no grad): field evaluations (NFE), time (median of ``--repeats`` after a warm-up call,
alternating which runs first), and the largest error against a reference (genlab's RK4 in 400 fixed
steps, float64); then one training step (log p, backward) at tol 1e-5: genlab backpropagates through
the solver, zuko uses its adaptive checkpoint adjoint. Ratios are genlab / zuko (below 1: genlab faster).

zuko's error control scales its log-det state by 1e-2 (``trace_scale``), so at one tol it takes fewer
steps and its log p is less accurate; compare the error columns, not only NFE and time.

Usage: ``nice python scripts/bench_cnf.py [--batch 1000] [--repeats 3] [--hidden 64] [--dims 2 8]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import Tensor, nn
from zuko.flows import CNF as ZukoCNF

from genlab.models.flows import CNF, Flow


class Counted:
    """A callable that counts its calls."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs) -> Tensor:
        self.calls += 1
        return self.fn(*args, **kwargs)


def timed(fn) -> tuple[float, Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_log_prob(dims: int, tol: float, batch: int, repeats: int, hidden: int) -> dict:
    torch.manual_seed(0)
    peer = ZukoCNF(dims, hidden_features=(hidden,) * 3, rtol=tol, atol=tol, activation=nn.Tanh).eval()
    exact = copy.deepcopy(peer.transform).double()  # the same field in float64, for the reference
    field = Counted(peer.transform.f)
    peer.transform.f = field  # zuko's transform calls self.f: count its evaluations too
    ours = Flow([dims], [CNF(dims, net=lambda z, t: field(t, z), rtol=tol, atol=tol)]).eval()
    x = torch.randn(batch, dims, generator=torch.Generator().manual_seed(1))
    times, nfe, out = {"genlab": [], "zuko": []}, {}, {}
    runs = {"genlab": lambda: ours.log_prob(x), "zuko": lambda: peer().log_prob(x)}
    with torch.no_grad():
        for run in runs.values():  # warm-up, untimed
            run()
        for r in range(repeats):
            for name in (("genlab", "zuko") if r % 2 == 0 else ("zuko", "genlab")):
                field.calls = 0
                seconds, out[name] = timed(runs[name])
                times[name].append(seconds)
                nfe[name] = field.calls
        ref = Flow([dims], [CNF(dims, net=lambda z, t: exact.f(t, z), method="rk4", steps=400)])
        truth = ref.double().eval().log_prob(x.double())
    return {"dims": dims, "tol": tol, **{f"nfe_{k}": v for k, v in nfe.items()},
            **{f"ms_{k}": 1e3 * statistics.median(v) for k, v in times.items()},
            **{f"err_{k}": float((v.double() - truth).abs().max()) for k, v in out.items()}}


def bench_train_step(dims: int, batch: int, repeats: int, hidden: int, tol: float = 1e-5) -> dict:
    torch.manual_seed(0)
    peer = ZukoCNF(dims, hidden_features=(hidden,) * 3, rtol=tol, atol=tol, activation=nn.Tanh).train()
    f = peer.transform.f
    ours = Flow([dims], [CNF(dims, net=lambda z, t: f(t, z), rtol=tol, atol=tol)]).train()
    ours.register_module("peer", peer)  # the field's parameters, for the backward pass
    x = torch.randn(batch, dims, generator=torch.Generator().manual_seed(2))
    steps = {"genlab": lambda: ours.log_prob(x).mean().backward(),
             "zuko": lambda: peer().log_prob(x).mean().backward()}
    times = {"genlab": [], "zuko": []}
    for step in steps.values():  # warm-up, untimed
        step()
    for r in range(repeats):
        for name in (("genlab", "zuko") if r % 2 == 0 else ("zuko", "genlab")):
            peer.zero_grad()
            times[name].append(timed(steps[name])[0])
    return {"dims": dims, **{f"ms_{k}": 1e3 * statistics.median(v) for k, v in times.items()}}


def cnf_lines(batch: int = 1000, repeats: int = 3, hidden: int = 64, dims: tuple[int, ...] = (2, 8)) -> list[str]:
    """The two tables (log p at three tolerances, a training step) as printed lines."""
    lines = [f"log p of {batch} points, float32, dopri5, exact divergence; genlab / zuko "
             f"(torch {torch.__version__}, one thread, median of {repeats})",
             "| D | tol | NFE genlab | NFE zuko | ms genlab | ms zuko | time ratio | max err genlab | max err zuko |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d in dims:
        for tol in (1e-3, 1e-4, 1e-5):  # float32: tighter tolerances sit at its rounding (1.2e-7)
            r = bench_log_prob(d, tol, batch, repeats, hidden)
            lines.append(f"| {d} | {tol:g} | {r['nfe_genlab']} | {r['nfe_zuko']} | {r['ms_genlab']:.0f} | "
                         f"{r['ms_zuko']:.0f} | {r['ms_genlab'] / r['ms_zuko']:.2f} | {r['err_genlab']:.1e} | "
                         f"{r['err_zuko']:.1e} |")
    lines += [f"\ntraining step (log p of {batch // 4} points, backward), tol 1e-5: genlab backpropagates through "
              "the solver, zuko's adaptive checkpoint adjoint", "| D | ms genlab | ms zuko | time ratio |", "|---|---|---|---|"]
    for d in dims:
        r = bench_train_step(d, batch // 4, repeats, hidden)
        lines.append(f"| {d} | {r['ms_genlab']:.0f} | {r['ms_zuko']:.0f} | {r['ms_genlab'] / r['ms_zuko']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("\n".join(cnf_lines(args.batch, args.repeats, args.hidden, tuple(args.dims))))


if __name__ == "__main__":
    main()
