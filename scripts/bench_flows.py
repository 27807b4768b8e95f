"""Benchmark genlab's normalizing flows against normflows (Glow) and zuko (neural spline flows), side by
side in one process: the same architecture at equal parameter counts, the same batches, the same
optimizer and number of steps, the two models' steps interleaved (so that a shared machine's load falls
on both alike).

- ``glow``: Glow at one scale on sklearn's digits at 8x8 (17 levels, uniform dequantization with the same
  noise for both): squeeze, K steps of flow (actnorm, LU 1x1 convolution, affine coupling with a
  3-1-3 convolutional network), N(0, I) base. genlab: ``Flow([Squeeze, GlowStep x K, Unsqueeze])``;
  normflows: ``NormalizingFlow`` of K ``GlowBlock`` (the same coupling: sigmoid scale, channel split,
  zero-initialised last convolution) and ``Squeeze``. Reported: bits/dim of the discrete test split
  (the dequantization bound with the bin-count term, same noise draws) and the training step time.
- ``nsf``: coupling neural spline flows (Durkan et al. 2019) on 2-D toy sets with exact densities and on an
  8-D Gaussian mixture. genlab: K ``SplineCoupling`` (even / odd features alternating, the kept half
  unchanged: Durkan et al.'s coupling); zuko:
  ``zuko.flows.NSF(passes=2)`` (halves of the features, its order reversed in every other layer).
  Both splines on [-5, 5] with the same bins; genlab's hidden width is chosen so that the parameter
  counts match (zuko's count includes its masked-out weights). ``--kept-spline``: genlab's coupling also
  runs an unconditional learned spline on the kept half, as zuko's does. Reported:
  held-out NLL (nats) next to the true density's, and the training step time.

Times are the total wall time of each side's training steps (one torch thread unless ``--threads``);
ratio = genlab's / the peer's (below 1: genlab faster).

- ``cnf``: the continuous flow (FFJORD) against zuko's CNF on the same vector field: ``scripts/bench_cnf.py``'s
  tables (NFE, time and error of log p at three tolerances; a training step).

Usage: ``nice python scripts/bench_flows.py --part glow|nsf|cnf|all [--steps-glow 600] [--steps-nsf 1500]``
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from genlab.data import Digits
from genlab.data.toy2d import toy2d, toy2d_log_prob
from genlab.models.flows import Flow, GlowStep, SplineCoupling, Squeeze, Unsqueeze
from genlab.models.flows.dequantization import UniformDequantization, dequantized_log_likelihood
from genlab.testing.gaussian_mixture import GaussianMixture

LEVELS = 17  # sklearn's digits at 8x8: 0..16


@dataclass
class Side:
    """One model in the race: its log-density, parameters, optimizer and accumulated step time."""

    name: str
    model: nn.Module
    log_prob: Callable[[Tensor], Tensor]
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def step(self, x: Tensor) -> float:
        start = time.perf_counter()
        loss = -self.log_prob(x).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.seconds += time.perf_counter() - start
        return float(loss.detach())


def race(sides: list[Side], batches: Callable[[int], Tensor], steps: int) -> None:
    """``steps`` training steps of every side on the same batch, interleaved."""
    for k in range(steps):
        x = batches(k)
        for side in sides:
            side.step(x)


# --- Glow on digits ----------------------------------------------------------------------------------

def glow_sides(k: int, hidden: int) -> list[Side]:
    import normflows as nf

    torch.manual_seed(0)
    ours = Flow([1, 8, 8], [Squeeze(), *[GlowStep(4, hidden) for _ in range(k)], Unsqueeze()])
    blocks = [nf.flows.GlowBlock(4, hidden, scale=True, scale_map="sigmoid", split_mode="channel", leaky=0.0,
                                 init_zeros=True, use_lu=True) for _ in range(k)]
    theirs = nf.NormalizingFlow(nf.distributions.DiagGaussian((4, 4, 4), trainable=False), [*blocks[::-1], nf.flows.Squeeze()])
    return [Side("genlab", ours, ours.log_prob), Side("normflows", theirs, theirs.log_prob)]


def bench_glow(steps: int, k: int, hidden: int, batch: int) -> list[str]:
    train, test = Digits(image_size=8, split="train").data, Digits(image_size=8, split="test").data
    deq = UniformDequantization(LEVELS, (-1.0, 1.0))
    g = torch.Generator().manual_seed(0)

    def batches(_: int) -> Tensor:
        return deq(train[torch.randint(len(train), (batch,), generator=g)], g)[0]

    sides = glow_sides(k, hidden)
    for side in sides:  # actnorm's data-dependent initialisation on the same first batch
        with torch.no_grad():
            side.log_prob(batches(0))
    race(sides, batches, steps)
    rows = []
    for side in sides:
        side.model.eval()
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            log_p = torch.stack([dequantized_log_likelihood(side.log_prob, deq, test, gen) for _ in range(4)]).mean(0)
        rows.append((side, float(-log_p.mean() / (64 * math.log(2)))))
    ratio = sides[0].seconds / sides[1].seconds
    lines = [f"Glow on digits 8x8 ({LEVELS} levels), {k} steps of flow, hidden {hidden}, batch {batch}, {steps} "
             f"training steps, test split {len(test)} images (bits/dim: uniform dequantization bound)",
             f"{'':<10} {'params':>8} {'bits/dim':>9} {'ms/step':>8}"]
    lines += [f"{s.name:<10} {s.params:>8,} {bpd:>9.4f} {1e3 * s.seconds / steps:>8.1f}" for s, bpd in rows]
    lines.append(f"time ratio genlab / normflows: {ratio:.2f}x; bits/dim genlab - normflows: {rows[0][1] - rows[1][1]:+.4f}")
    return lines


# --- NSF on toy sets ---------------------------------------------------------------------------------

def nsf_sides(dim: int, k: int, bins: int, hidden: int, seed: int, kept_spline: bool = False) -> list[Side]:
    import zuko

    torch.manual_seed(seed)
    theirs = zuko.flows.NSF(dim, bins=bins, transforms=k, passes=2, hidden_features=(hidden, hidden))
    target = sum(p.numel() for p in theirs.parameters())

    def ours_with(width: int) -> Flow:
        return Flow([dim], [SplineCoupling(dim, bins, 5.0, parity=i % 2, hidden=width, depth=2, kept_spline=kept_spline)
                            for i in range(k)])

    width = min(range(8, 4 * hidden), key=lambda w: abs(sum(p.numel() for p in ours_with(w).parameters()) - target))
    torch.manual_seed(seed)
    ours = ours_with(width)
    return [Side("genlab", ours, ours.log_prob), Side("zuko", theirs, lambda x: theirs().log_prob(x))]


def bench_nsf(steps: int, k: int, bins: int, hidden: int, batch: int, seed: int = 0,
              kept_spline: bool = False) -> list[str]:
    mixture = GaussianMixture.random(8, 6, torch.Generator().manual_seed(0), scale=0.5)
    sets: dict[str, tuple[Callable[[int, torch.Generator], Tensor], Callable[[Tensor], Tensor], int]] = {
        "eight_gaussians": (lambda n, g: toy2d("eight_gaussians", n, g), lambda x: toy2d_log_prob("eight_gaussians", x), 2),
        "rings": (lambda n, g: toy2d("rings", n, g), lambda x: toy2d_log_prob("rings", x), 2),
        "mixture_8d": (lambda n, g: mixture.sample(n, g, torch.float32), mixture.log_prob, 8),
    }
    lines = [f"coupling NSF, {k} layers, {bins} bins, zuko hidden ({hidden}, {hidden}), batch {batch}, {steps} steps, "
             f"seed {seed}, genlab kept_spline={kept_spline}; held-out NLL (nats) of 20000 points",
             f"{'set':<16} {'side':<7} {'params':>7} {'NLL':>8} {'true NLL':>9} {'ms/step':>8} {'time ratio':>11}"]
    for name, (draw, true_log_prob, dim) in sets.items():
        g = torch.Generator().manual_seed(seed)
        sides = nsf_sides(dim, k, bins, hidden, seed, kept_spline)
        race(sides, lambda _: draw(batch, g), steps)
        held = draw(20000, torch.Generator().manual_seed(123))
        true = float(-true_log_prob(held.double()).mean())
        for i, side in enumerate(sides):
            with torch.no_grad():
                nll = float(-side.log_prob(held).double().mean())
            ratio = f"{sides[0].seconds / sides[1].seconds:.2f}x" if i == 0 else ""
            lines.append(f"{name:<16} {side.name:<7} {side.params:>7,} {nll:>8.4f} {true:>9.4f} "
                         f"{1e3 * side.seconds / steps:>8.2f} {ratio:>11}")
    lines.append("time ratio: genlab's / zuko's training time")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["glow", "nsf", "cnf", "all"], default="all")
    parser.add_argument("--steps-glow", type=int, default=600)
    parser.add_argument("--steps-nsf", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0, help="the NSF part's initialisation and batches")
    parser.add_argument("--kept-spline", action="store_true", help="genlab's coupling splines the kept half too")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("glow", "all"):
        print("\n".join(bench_glow(args.steps_glow, k=8, hidden=64, batch=64)), flush=True)
    if args.part in ("nsf", "all"):
        print("\n".join(bench_nsf(args.steps_nsf, k=4, bins=8, hidden=64, batch=256, seed=args.seed,
                                   kept_spline=args.kept_spline)), flush=True)
    if args.part in ("cnf", "all"):
        from bench_cnf import cnf_lines  # scripts/ is on the path when this script runs

        print("\n".join(cnf_lines()), flush=True)


if __name__ == "__main__":
    main()
