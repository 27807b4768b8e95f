"""Benchmark genlab's conditional flow matching (objective ``cfm``) side by side with torchcfm, in one process.

The task is torchcfm's 8 gaussians -> moons example with torchcfm's own samplers (``sample_8gaussians``:
scale 5, variance 0.1; ``sample_moons``: sklearn's moons, noise 0.2, times 3 minus 1; 50000 training
points of each, drawn once): torchcfm's MLP (width 64, time appended; genlab's ``concat_mlp``, the
same initial weights from the same seed), batch 256, Adam at lr 1e-3, path std sigma = 0.1
(torchcfm's ``ConditionalFlowMatcher(0.1)`` and ``ExactOptimalTransportConditionalFlowMatcher(0.1)``;
genlab's ``cond_ot`` with sigma 0.1 and coupling ``independent`` or ``exact_ot``). genlab's exact_ot
uses the OT permutation itself; torchcfm draws 256 pairs from the plan with replacement.

1. Training step time, genlab / torchcfm (median over the steps after 50 of warm-up, one torch thread):
   both models are trained in lock-step, alternating which goes first, on the same data batches.
   "objective" is genlab's ``ConditionalFlowMatching.loss`` + backward + Adam step, the same loop as
   torchcfm's README; "Trainer" is a whole ``Trainer.train_step`` of ``otcfm_moons.yaml`` (its
   standardised toy sets; batches, step generator, finiteness checks, EMA, lr schedule, loss read
   back; fused AdamW), against torchcfm steps interleaved with it; once more with independent pairs and
   genlab's SELU dispatching to ``torch.selu`` (nn.SELU's kernel, as torchcfm's MLP).
2. OT plan time per batch of 256 and 1024 (2-D): genlab's ``ExactOT().pair`` against torchcfm's
   ``OTPlanSampler("exact").sample_plan`` (POT's network simplex), median of ``--repeats``.
3. Exact W2 (POT ``emd2``) of ``--points`` samples from held-out source points against as many held-out
   moons: I-CFM weights trained by genlab, sampled by genlab's samplers on the rectified-flow process
   (grid linspace(1, 0, N + 1), and the same with SD3's time shift 0.5) and by torchcfm's recipe (torchdyn ``NeuralODE``, Euler on linspace(0, 1,
   N + 1) and dopri5 at atol = rtol = 1e-4), NFE counted.
4. The issue's comparison: W2 at NFE 1 (one Euler step) of OT-CFM and I-CFM, each trained by genlab and
   by torchcfm, and with dopri5 (near the flow's exact end point).

Usage: ``python scripts/bench_flow_matching.py [--steps 5000] [--points 1000] [--plot samples.png]``

Measured with the defaults (2-core machine, nothing else running, 92 s in all): step time genlab /
torchcfm 0.99 (I-CFM) and 0.38 (OT-CFM) for the objective's step, 0.92 and 0.39 for a whole
``Trainer.train_step`` (1.03 with ``torch.selu`` in genlab's MLP; a probe calling ``trainer_step_times`` six
times in one process: 0.90-0.98); exact_ot against OTPlanSampler 0.20x at B = 256 and 0.14x at B = 1024
(2-D; the compiled auction solver and the matmul cost); genlab's flow_euler equal to torchdyn's Euler at
every NFE on the same weights (I-CFM W2 2.02, 1.70, 0.92, 0.59 at NFE 1, 2, 5, 10; dopri5 0.362 at 62 NFE);
the best genlab sampler at NFE 5, UniPC on the uniform grid with time shift 0.5, 0.460 = 0.50x Euler's; at
NFE 1, I-CFM / OT-CFM = 4.30x trained by genlab (2.02 / 0.469), 3.87x trained by torchcfm (2.06 / 0.534).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher, ExactOptimalTransportConditionalFlowMatcher
from torchcfm.models.models import MLP as TorchCFMMLP
from torchcfm.optimal_transport import OTPlanSampler
from torchcfm.utils import sample_8gaussians, sample_moons, torch_wrapper
from torchdyn.core import NeuralODE

from genlab.core.config import load_config
from genlab.diffusion import DPMSolverPP, FlowEuler, Heun, RectifiedFlow, Sampler, UniPC
from genlab.metrics import wasserstein2
from genlab.models import ConcatMLP, layers
from genlab.objectives import BuildContext, ConditionalFlowMatching
from genlab.objectives.couplings import ExactOT
from genlab.training import Experiment, Trainer

# importing torchdyn sets this, and on a CUDA build of torch without a GPU every optimizer.step() then
# re-opens NVML in its graph-capture check (about 120 us a call here, against 2 us): neither library's
# own training imports torchdyn, so the steps are timed without it
os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)

CONFIG = "configs/flow_matching/otcfm_moons.yaml"
SIGMA, WIDTH, BATCH, LR, WARMUP = 0.1, 64, 256, 1e-3, 50
SHIFT = 0.5  # the time shift of the few-step grid rows (uniform grid, SD3's shift; < 1: denser near the data)
GRID = {"type": "uniform", "t_min": 0.0, "final": "min"}  # linspace(1, 0, N + 1), torchdyn's Euler grid reversed
MATCHERS = {"independent": lambda: ConditionalFlowMatcher(SIGMA),
            "exact_ot": lambda: ExactOptimalTransportConditionalFlowMatcher(SIGMA)}


class Points:
    """A data set of points ``data`` [N, 2] (what :func:`train_both` reads)."""

    def __init__(self, data: Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)


def eight_gaussians(n: int, seed: int) -> Tensor:
    """torchcfm's ``sample_8gaussians`` (scale 5, variance 0.1) [n, 2], drawn under ``seed``."""
    torch.manual_seed(seed)
    return sample_8gaussians(n)


def moons(n: int, seed: int) -> Tensor:
    """torchcfm's ``sample_moons`` (sklearn's moons, noise 0.2, times 3 minus 1) [n, 2], drawn under ``seed``."""
    np.random.seed(seed)
    return sample_moons(n).float()


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


class Trained:
    """A coupling's two models after lock-step training, and their step times (s)."""

    def __init__(self, genlab: ConcatMLP, torchcfm: nn.Module, objective: ConditionalFlowMatching,
                 genlab_times: list[float], torchcfm_times: list[float]) -> None:
        self.genlab, self.torchcfm, self.objective = genlab, torchcfm, objective
        self.genlab_times, self.torchcfm_times = genlab_times, torchcfm_times


def train_both(coupling: str, steps: int, source: Points, data: Points, seed: int) -> Trained:
    """Train genlab's cfm and torchcfm's matcher for ``steps`` steps each, alternating steps, on the same
    data batches (torchcfm's source batch drawn here; genlab's by its objective from the same source set)."""
    torch.manual_seed(seed)
    ours = ConcatMLP(2, WIDTH)
    torch.manual_seed(seed)
    theirs = TorchCFMMLP(2, w=WIDTH, time_varying=True)
    objective = ConditionalFlowMatching(coupling=coupling, path={"type": "cond_ot", "sigma": SIGMA}, source=source)
    objective.build(BuildContext(model=ours, process=RectifiedFlow(), sampler=FlowEuler(1, GRID), data_shape=(2,)))
    matcher = MATCHERS[coupling]()
    opt_ours, opt_theirs = torch.optim.Adam(ours.parameters(), LR), torch.optim.Adam(theirs.parameters(), LR)
    rows = torch.Generator().manual_seed(seed + 1)
    modules = {"model": ours}

    def genlab_step(x1: Tensor, x0: Tensor, k: int) -> None:
        opt_ours.zero_grad()
        objective.loss(modules, {"x": x1}, torch.Generator().manual_seed(seed * 1_000_003 + k)).backward()
        opt_ours.step()

    def torchcfm_step(x1: Tensor, x0: Tensor, k: int) -> None:
        opt_theirs.zero_grad()
        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        vt = theirs(torch.cat([xt, t[:, None]], dim=-1))
        torch.mean((vt - ut) ** 2).backward()
        opt_theirs.step()

    times: dict[Callable, list[float]] = {genlab_step: [], torchcfm_step: []}
    for k in range(steps):
        x1 = data.data[torch.randint(len(data), (BATCH,), generator=rows)]
        x0 = source.data[torch.randint(len(source), (BATCH,), generator=rows)]
        for step in (genlab_step, torchcfm_step) if k % 2 == 0 else (torchcfm_step, genlab_step):
            start = time.perf_counter()
            step(x1, x0, k)
            times[step].append(time.perf_counter() - start)
    return Trained(ours, theirs, objective, times[genlab_step][WARMUP:], times[torchcfm_step][WARMUP:])


def trainer_step_times(coupling: str, steps: int, source: Points, data: Points, torch_selu: bool = False
                       ) -> tuple[float, float]:
    """Median ms of ``Trainer.train_step`` on the config (this coupling) and of torchcfm's step, interleaved.
    ``torch_selu``: genlab's MLP runs ``torch.selu`` (nn.SELU's float32 kernel) rather than its own SELU."""
    exp = Experiment.from_config(load_config(CONFIG, [f"objective.coupling={coupling}", f"train.steps={steps}"]))
    torch.manual_seed(0)
    theirs = TorchCFMMLP(2, w=WIDTH, time_varying=True)
    opt = torch.optim.Adam(theirs.parameters(), LR)
    matcher, rows = MATCHERS[coupling](), torch.Generator().manual_seed(3)
    ours_t, theirs_t = [], []
    kernel_choice = layers._avx512_float32_selu_is_slow
    with tempfile.TemporaryDirectory() as out, Trainer(exp, out, progress=False) as trainer:
        if torch_selu:
            layers._avx512_float32_selu_is_slow = lambda: False
        for k in range(steps):
            start = time.perf_counter()
            trainer.train_step()
            trainer.step += 1
            ours_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            x1 = data.data[torch.randint(len(data), (BATCH,), generator=rows)]
            x0 = source.data[torch.randint(len(source), (BATCH,), generator=rows)]
            opt.zero_grad()
            t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
            torch.mean((theirs(torch.cat([xt, t[:, None]], dim=-1)) - ut) ** 2).backward()
            opt.step()
            theirs_t.append(time.perf_counter() - start)
    layers._avx512_float32_selu_is_slow = kernel_choice
    return median_ms(ours_t[WARMUP:]), median_ms(theirs_t[WARMUP:])


def plan_times(source: Points, data: Points, repeats: int) -> list[tuple[int, float, float]]:
    """(B, genlab ms, torchcfm ms) for the exact OT pairing of a batch."""
    out, g, sampler = [], torch.Generator().manual_seed(5), OTPlanSampler("exact")
    for b in (256, 1024):
        batches = [(source.data[torch.randint(len(source), (b,), generator=g)],
                    data.data[torch.randint(len(data), (b,), generator=g)]) for _ in range(repeats)]
        ours, theirs = [], []
        for x0, x1 in batches:
            start = time.perf_counter()
            ExactOT().pair(x0, x1)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            sampler.sample_plan(x0, x1)
            theirs.append(time.perf_counter() - start)
        out.append((b, median_ms(ours), median_ms(theirs)))
    return out


class Counting(nn.Module):
    """Counts the calls of a genlab model ``(x, t_model)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.module(x, t)


class CountingField(nn.Module):
    """Counts the calls of a torchdyn field ``(t, x)`` (torchdyn passes t only to a forward that names it)."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field, self.calls = field, 0

    def forward(self, t: Tensor, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        self.calls += 1
        return self.field(t, x)


class TorchdynField(nn.Module):
    """A genlab velocity model u(x, 1000 t) as torchdyn's field in torchcfm's time: v(tau, x) = -u(x, 1 - tau)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, t: Tensor, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        """t: torchcfm's tau (torchdyn passes it only to a forward whose argument is named t)."""
        return -self.model(x, (1000 * (1 - t)).expand(len(x)))


@torch.no_grad()
def genlab_w2(objective: ConditionalFlowMatching, model: nn.Module, sampler: Sampler, x0: Tensor,
              target: Tensor) -> tuple[int, float]:
    """(NFE, W2) of ``sampler`` on the rectified-flow process from the source points x0."""
    counting = Counting(model)
    out = sampler.sample(objective.denoiser(counting), x=x0, progress=False)
    return counting.calls, wasserstein2(out, target)


@torch.no_grad()
def torchdyn_w2(field: nn.Module, solver: str, steps: int, x0: Tensor, target: Tensor) -> tuple[int, float]:
    """(NFE, W2) of torchcfm's recipe: torchdyn's NeuralODE from tau = 0 (source) to 1 (data)."""
    counting = CountingField(field)
    kwargs = {"atol": 1e-4, "rtol": 1e-4} if solver == "dopri5" else {}
    node = NeuralODE(counting, solver=solver, sensitivity="adjoint", **kwargs)
    out = node.trajectory(x0, t_span=torch.linspace(0, 1, steps + 1))[-1]
    return counting.calls, wasserstein2(out, target)


def plot(path: str, panels: dict[str, Tensor], target: Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), sharex=True, sharey=True)
    for ax, (title, x) in zip(axes, panels.items()):
        ax.scatter(*target.T, s=1, c="0.85")
        ax.scatter(*x.T, s=1, c="tab:orange")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000, help="training steps of each model (the issue's 5000)")
    parser.add_argument("--trainer-steps", type=int, default=300, help="Trainer.train_step calls timed")
    parser.add_argument("--points", type=int, default=1000, help="held-out points of each W2")
    parser.add_argument("--repeats", type=int, default=20, help="OT plans timed per batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="write one-step samples of the four models here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    source, data = Points(eight_gaussians(50_000, 1)), Points(moons(50_000, 0))
    x0, target = eight_gaussians(args.points, 101), moons(args.points, 102)
    floor = wasserstein2(moons(args.points, 103), target)

    trained = {c: train_both(c, args.steps, source, data, args.seed) for c in ("independent", "exact_ot")}
    trainer = {c: trainer_step_times(c, args.trainer_steps, source, data) for c in ("independent", "exact_ot")}
    with_torch_selu = trainer_step_times("independent", args.trainer_steps, source, data, torch_selu=True)
    print(f"8 gaussians -> moons, MLP width {WIDTH}, batch {BATCH}, lr {LR:g}, sigma {SIGMA}, {args.steps} steps, "
          f"one torch thread\n")
    print("1. training step time (median ms; genlab / torchcfm)")
    print(f"   {'coupling':<12} {'genlab objective':>17} {'torchcfm':>9} {'ratio':>6}   {'genlab Trainer':>15} "
          f"{'torchcfm':>9} {'ratio':>6}")
    for c, tr in trained.items():
        ours, theirs = median_ms(tr.genlab_times), median_ms(tr.torchcfm_times)
        t_ours, t_theirs = trainer[c]
        print(f"   {c:<12} {ours:>17.3f} {theirs:>9.3f} {ours / theirs:>6.2f}   {t_ours:>15.3f} {t_theirs:>9.3f} "
              f"{t_ours / t_theirs:>6.2f}")
    t_ours, t_theirs = with_torch_selu
    print(f"   {'independent, genlab MLP on torch.selu':<50} {t_ours:>15.3f} {t_theirs:>9.3f} "
          f"{t_ours / t_theirs:>6.2f}")
    kernel = "float64 kernel, AVX-512 CPU" if layers._avx512_float32_selu_is_slow() else "torch.selu"
    print(f"   (genlab's SELU: {kernel};"
          " torchcfm's MLP: nn.SELU; the last row: genlab's Trainer step with torch's kernel in its MLP)")

    print("\n2. exact OT plan of one batch, 2-D (median ms)")
    print(f"   {'B':>5} {'genlab exact_ot':>16} {'torchcfm OTPlanSampler':>23} {'ratio':>6}")
    for b, ours, theirs in plan_times(source, data, args.repeats):
        print(f"   {b:>5} {ours:>16.2f} {theirs:>23.2f} {ours / theirs:>6.2f}")

    icfm = trained["independent"]
    print(f"\n3. I-CFM, genlab-trained weights: exact W2 to {args.points} held-out moons "
          f"(two held-out draws: {floor:.4f})")
    print(f"   {'sampler':<34} " + " ".join(f"{'NFE ' + str(n):>14}" for n in (1, 2, 5, 10)))
    makers = {}
    for shift in (1.0, SHIFT):
        grid, tag = dict(GRID, shift=shift), "" if shift == 1.0 else f", shift {shift:g}"
        makers.update({f"genlab flow_euler{tag}": lambda n, g=grid: FlowEuler(n, g),
                       f"genlab heun{tag}": lambda n, g=grid: Heun(max(1, (n + 1) // 2), g),
                       f"genlab dpm_solver_pp (2M){tag}": lambda n, g=grid: DPMSolverPP(n, g),
                       f"genlab unipc (bh2, order 2){tag}": lambda n, g=grid: UniPC(n, g)})
    best = (math.inf, "")
    for name, make in makers.items():
        cells = [genlab_w2(icfm.objective, icfm.genlab, make(n), x0, target) for n in (1, 2, 5, 10)]
        print(f"   {name:<34} " + " ".join(f"{w:>8.4f} ({k:>2})" for k, w in cells))
        best = min(best, (cells[2][1], name)) if cells[2][0] <= 5 else best
    field = TorchdynField(icfm.genlab)
    cells = [torchdyn_w2(field, "euler", n, x0, target) for n in (1, 2, 5, 10)]
    print(f"   {'torchdyn euler (torchcfm recipe)':<34} " + " ".join(f"{w:>8.4f} ({k:>2})" for k, w in cells))
    k, w = torchdyn_w2(field, "dopri5", 1, x0, target)
    print(f"   {'torchdyn dopri5, tol 1e-4':<34} {w:>8.4f} ({k}) [adaptive]")
    print("   (cells: W2 (NFE); heun takes 2 NFE a step but 1 on its last, into t = 0; shift: grid uniform with "
          "SD3's time shift)")
    print(f"   best genlab sampler at NFE <= 5: {best[1]}, W2 {best[0]:.4f} = {best[0] / cells[2][1]:.2f}x torchdyn's "
          "Euler at NFE 5 (target <= 0.6x)")

    print(f"\n4. the issue's comparison: exact W2 at NFE 1 (one Euler step) and with dopri5, {args.steps} steps")
    print(f"   {'trained by':<10} {'coupling':<12} {'W2 NFE 1':>9} {'W2 dopri5':>10}")
    one_step, panels = {}, {}
    for c, tr in trained.items():
        for who, field, model in (("genlab", TorchdynField(tr.genlab), tr.genlab),
                                  ("torchcfm", torch_wrapper(tr.torchcfm), tr.torchcfm)):
            k1, w1 = torchdyn_w2(field, "euler", 1, x0, target)
            _, wd = torchdyn_w2(field, "dopri5", 1, x0, target)
            if who == "genlab":
                assert abs(genlab_w2(tr.objective, model, FlowEuler(1, GRID), x0, target)[1] - w1) < 1e-4
            one_step[who, c] = w1
            if args.plot:
                node = NeuralODE(field, solver="euler", sensitivity="adjoint")
                panels[f"{who} {c}: NFE 1, W2 {w1:.3f}"] = node.trajectory(x0, torch.linspace(0, 1, 2))[-1].detach()
            print(f"   {who:<10} {c:<12} {w1:>9.4f} {wd:>10.4f}")
    for who in ("genlab", "torchcfm"):
        print(f"   {who}: I-CFM / OT-CFM at NFE 1 = {one_step[who, 'independent'] / one_step[who, 'exact_ot']:.2f}x")
    if args.plot:
        plot(args.plot, panels, target)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
