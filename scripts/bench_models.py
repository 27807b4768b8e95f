"""Benchmark a training step of genlab's UNet and DiT against the identical diffusers models.

genlab builds each model and ``unet_to_diffusers`` / ``dit_to_diffusers`` export it: same architecture
and weights (outputs checked). UNet: 64/128/256 channels, 2 ResBlocks per level, attention (head width 8,
diffusers' default) at the lowest resolution and in the middle, unconditional, x [16, 3, 32, 32]. DiT:
depth 6, hidden 384, 6 heads, patch 2, 10 classes, ``time_freq_shift=1``, x [8, 4, 32, 32]. All weights
random (no zero init), so no step sees all-zero gradients.

Step (fp32): forward, MSE to a fixed random target, backward, AdamW step, ``zero_grad(set_to_none)``.
- time: the runs alternate in one process; median over repeats after warm-up (``torch.compile``,
  default mode, after its first, compiling, step);
- peak memory: peak live tensor bytes during a step above the level before it (params and AdamW
  state resident; gradients and activations counted). CUDA: ``max_memory_allocated``; CPU:
  ``torch.profiler(profile_memory=True)`` allocator events (+bytes alloc, -bytes free) summed in
  time order, the running maximum taken;
- MFU: FLOPs (``FlopCounterMode``, + CPU SDPA) / median step time / fp32 matmul peak (best of 10
  2048^3 matmuls, same threads); gradient checkpointing: genlab's, a third alternating run.

Usage: ``python scripts/bench_models.py [--quick] [--threads N] [--[no-]compile] [--profile]``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from typing import Any, Callable

import diffusers
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils import flop_counter

from genlab.interop.dit_weights import dit_to_diffusers
from genlab.interop.unet_weights import unet_to_diffusers
from genlab.models.dit import DiT
from genlab.models.unet import UNet

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
Step = Callable[[], None]
aten = torch.ops.aten
SDPA_CPU_FLOPS = {  # FlopCounterMode knows the CUDA attention kernels, not the CPU one
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *_, out_shape=None, **__: flop_counter.sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *_, out_shape=None, **__: flop_counter.sdpa_backward_flop_count(g, q, k, v),
}
sync: Step = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)


# ----- the models -----------------------------------------------------------------------------------

class Pair:
    """A genlab model, the diffusers model exported from it, and one batch for each call."""

    def __init__(self, name: str, ours: nn.Module, theirs: nn.Module, x: Tensor, t: Tensor, y: Tensor | None,
                 targets: dict[str, Any]) -> None:
        ours, theirs, x, t, y = (v.to(DEVICE) if v is not None else v for v in (ours, theirs, x, t, y))
        self.name, self.ours, self.theirs, self.x, self.targets = name, ours, theirs, x, targets
        self.call_ours = lambda m: m(x, t, y)
        self.call_theirs = lambda m: m(x, t, class_labels=y).sample
        ours.eval(), theirs.eval()
        with torch.no_grad():
            self.max_diff = (self.call_ours(ours) - self.call_theirs(theirs)).abs().max().item()
        ours.train(), theirs.train()


def unet_pair(batch: int) -> Pair:
    ours = UNet(in_channels=3, channels=64, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(2,),
                head_dim=8, zero_init=False)
    theirs = unet_to_diffusers(ours, sample_size=32)
    x, t = torch.randn(batch, 3, 32, 32), torch.randint(0, 1000, (batch,))
    return Pair("UNet", ours, theirs, x, t, None, dict(speed=1.1, memory=1.0))


def dit_pair(batch: int) -> Pair:
    ours = DiT(input_size=32, in_channels=4, patch_size=2, hidden=384, depth=6, num_heads=6, num_classes=10,
               time_freq_shift=1.0, mlp_norm_eps=1e-5)
    for p in ours.parameters():  # random adaLN and output layers (adaLN-Zero would zero their gradients)
        nn.init.normal_(p, std=0.02)
    theirs = dit_to_diffusers(ours)
    x, t, y = torch.randn(batch, 4, 32, 32), torch.randint(0, 1000, (batch,)), torch.randint(0, 10, (batch,))
    return Pair("DiT", ours, theirs, x, t, y, dict(speed=1.0, memory=1.0, ckpt="selective"))


def train_step(model: nn.Module, call: Callable[[nn.Module], Tensor], x: Tensor) -> Step:
    """One fp32 training step of ``model`` (its own AdamW); the gradients are freed at the end."""
    target, opt = torch.randn_like(x), torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        F.mse_loss(call(model), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# ----- measurements ---------------------------------------------------------------------------------

def others_cpu_s() -> float:
    """CPU seconds all processes but this one have used since boot (Linux ``/proc/stat``; else 0)."""
    if not os.path.exists("/proc/stat"):
        return 0.0
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK") - time.process_time()


def step_times(runs: list[tuple[Step, Step]], repeats: int, warmup: int,
               clock: Callable[[], float] = time.perf_counter) -> tuple[list[list[float]], float]:
    """Seconds of each ``run`` of ``runs = [(prepare, run), ...]`` (``prepare()`` untimed), alternating
    in an order reversed every round, ``repeats`` times after ``warmup``; and the share of the CPUs
    other processes took meanwhile (contention slows multi-threaded steps a lot: rerun if high).
    ``clock``: wall time by default; ``time.process_time`` counts this process's CPU seconds only."""
    times: list[list[float]] = [[] for _ in runs]
    wall, others = time.perf_counter(), others_cpu_s()
    for i in range(warmup + repeats):
        order = list(zip(runs, times))
        for (prepare, run), out in order if i % 2 else order[::-1]:  # ABBA: no run always goes first
            prepare()
            sync()
            start = clock()
            run()
            sync()
            out.append(clock() - start)
    share = (others_cpu_s() - others) / ((time.perf_counter() - wall) * (os.cpu_count() or 1))
    return [t[warmup:] for t in times], share


def peak_bytes(step: Step) -> int:
    """Peak live tensor bytes during ``step`` above the level before it (method: module docstring)."""
    if DEVICE == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate(nbytes for _, nbytes in events), default=0)


def step_flops(step: Step) -> int:
    with flop_counter.FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
        step()
    return counter.get_total_flops()


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of the fastest of ``reps`` fp32 ``n x n`` matmuls (after two warm-up ones)."""
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    return 2 * n**3 / min(step_times([(sync, lambda: a @ b)], reps, warmup=2)[0][0])


# ----- report ---------------------------------------------------------------------------------------

def bench(pair: Pair, peak: float, repeats: int, warmup: int, compile_: bool, rows: list) -> None:
    """Time, memory and MFU of a step of both models (and genlab's with checkpointing); add the rows."""
    ours, theirs = train_step(pair.ours, pair.call_ours, pair.x), train_step(pair.theirs, pair.call_theirs, pair.x)
    ckpt = lambda on: lambda: setattr(pair.ours, "gradient_checkpointing", on)  # noqa: E731
    mode = pair.targets.get("ckpt", True)  # the DiT uses selective checkpointing
    runs = [(ckpt(False), ours), (ckpt(False), theirs), (ckpt(mode), ours)]
    times, busy = step_times(runs, repeats, warmup)
    t_ours, t_theirs, t_ckpt = map(statistics.median, times)
    ckpt(mode)()
    m_ckpt = peak_bytes(ours)
    ckpt(False)()
    m_ours, m_theirs = peak_bytes(ours), peak_bytes(theirs)
    flops = step_flops(ours), step_flops(theirs)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (pair.ours, pair.theirs))
    print(f"{pair.name}: x {list(pair.x.shape)}; params genlab {n_ours:.2f} M, diffusers {n_theirs:.2f} M; GFLOP/step "
          f"genlab {flops[0] / 1e9:.1f}, diffusers {flops[1] / 1e9:.1f}; max |output difference| {pair.max_diff:.1e}")
    name, speed, mem = pair.name, f">= {pair.targets['speed']:.2f}x", f"<= {pair.targets['memory']:.2f}x"
    mfu = lambda t_g, t_d: (100 * flops[0] / t_g / peak, 100 * flops[1] / t_d / peak, None, "")  # noqa: E731
    rows += [(f"{name} steps/s, eager", 1 / t_ours, 1 / t_theirs, t_theirs / t_ours, speed),
             (f"{name} peak step memory MiB", m_ours / 2**20, m_theirs / 2**20, m_ours / m_theirs, mem),
             (f"{name} MFU eager %", *mfu(t_ours, t_theirs))]
    if compile_:
        try:
            steps, first = [], []
            for model, call in ((pair.ours, pair.call_ours), (pair.theirs, pair.call_theirs)):
                steps.append(train_step(torch.compile(model), call, pair.x))
                start = time.perf_counter()
                steps[-1]()  # compiles forward and backward
                first.append(time.perf_counter() - start)
            times, busy_c = step_times([(sync, s) for s in steps], repeats, warmup)
            c_ours, c_theirs, busy = *map(statistics.median, times), max(busy, busy_c)
            rows += [(f"{name} compile s (first step)", *first, None, ""),
                     (f"{name} steps/s, torch.compile", 1 / c_ours, 1 / c_theirs, c_theirs / c_ours, speed),
                     (f"{name} MFU torch.compile %", *mfu(c_ours, c_theirs))]
        except Exception as e:  # noqa: BLE001  (a backend failure is a result: report it, go on)
            rows.append((f"{name} torch.compile failed: {type(e).__name__}: {str(e)[:60]}", None, None, None, ""))
    label = f"{name} ckpt ({'selective' if mode == 'selective' else 'full'})"
    rows += [(f"{label}: peak memory reduction %", 100 * (1 - m_ckpt / m_ours), None, None, ">= 40%"),
             (f"{label}: step time increase %", 100 * (t_ckpt / t_ours - 1), None, None, "<= 30%"),
             (f"{name} CPU share other processes took, max %", 100 * busy, None, None, "")]


def print_table(rows: list) -> None:
    """Rows ``(metric, genlab, diffusers, genlab/diffusers, target)``; a target is on the ratio, if any."""
    print(f"\n{'metric':46}{'genlab':>10}{'diffusers':>11}{'g/d':>7}   {'target':10}status")
    num = lambda v, w, d=2: f"{v:{w}.{d}f}" if v is not None else " " * w  # noqa: E731
    for name, ours, theirs, ratio, target in rows:
        status = ""
        if target:
            op, bound = target.split()
            value, bound = ratio if ratio is not None else ours, float(bound.rstrip("x%"))
            status = "met" if (value >= bound if op == ">=" else value <= bound) else "MISSED"
        print(f"{name:46}{num(ours, 10)}{num(theirs, 11)}{num(ratio, 7, 3)}   {target:10}{status}")
    print("g/d: genlab / diffusers of steps/s or of memory; ckpt rows: genlab with gradient checkpointing vs without")


def show_profile(pair: Pair, steps: int = 3, top: int = 15) -> None:
    """The ops whose self CPU time per step (mean of ``steps``) differs most, genlab vs diffusers."""
    ours, theirs = {}, {}
    for m, call, out in ((pair.ours, pair.call_ours, ours), (pair.theirs, pair.call_theirs, theirs)):
        step = train_step(m, call, pair.x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        out.update({e.key: (e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()})
    total = lambda d: sum(ms for ms, _ in d.values())  # noqa: E731
    print(f"\n{pair.name} profile, self CPU ms per step: genlab {total(ours):.0f}, diffusers {total(theirs):.0f}")
    print(f"{'op':56}{'genlab ms':>10}{'calls':>7}{'diffusers ms':>14}{'calls':>7}{'diff ms':>9}")
    get = lambda d, k: d.get(k, (0.0, 0))  # noqa: E731
    for k in sorted(set(ours) | set(theirs), key=lambda k: -abs(get(ours, k)[0] - get(theirs, k)[0]))[:top]:
        (a, na), (b, nb) = get(ours, k), get(theirs, k)
        print(f"{k[:55]:56}{a:10.1f}{na:7}{b:14.1f}{nb:7}{a - b:+9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats; no torch.compile unless --compile")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="time torch.compile too "
                        "(default: unless --quick)")
    parser.add_argument("--profile", action="store_true", help="print per-op self CPU time, genlab vs diffusers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats, warmup = (3, 1) if args.quick else (10, 2)
    peak = matmul_peak()
    print(f"== Training step, genlab vs diffusers: fp32 on {DEVICE}, torch {torch.__version__} with "
          f"{torch.get_num_threads()} thread(s) ({os.cpu_count()} CPUs), diffusers {diffusers.__version__} ==")
    print(f"   fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3, best of 10); steps/s: median of {repeats} after "
          f"{warmup} warm-up; load average {os.getloadavg()[0]:.1f}")
    method = "torch.cuda.max_memory_allocated" if DEVICE == "cuda" else "torch.profiler allocator events"
    print(f"   peak memory: {method}, bytes live during a step above the resident params + AdamW state")
    rows: list = []
    for pair in (unet_pair(16), dit_pair(8)):
        bench(pair, peak, repeats, warmup, not args.quick if args.compile is None else args.compile, rows)
        if args.profile:
            show_profile(pair)
    print_table(rows)


if __name__ == "__main__":
    main()
