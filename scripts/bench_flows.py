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
- ``nsf``: neural spline flows (Durkan et al. 2019) on 2-D toy sets with exact densities and on an 8-D
  Gaussian mixture. zuko: ``zuko.flows.NSF(passes=2)``, a coupling (the first / second half of the features
  kept in alternate layers, the kept half through an unconditional spline whose parameters are the output
  layer's biases, PyTorch's random initialisation); on the mixture also the fully autoregressive
  ``NSF`` ("AR"). genlab: the same layers, ``SplineCoupling(mask="channel", kept_spline=True,
  zero_init=False)`` (AR: ``SplineAutoregressive``, MADE with zuko's masks), the same function of the same
  parameters (``tests/test_flows_nsf_zuko.py``), twice: "genlab" starts from zuko's initial weights
  (:func:`genlab.testing.zuko_flows.flow_from_zuko_nsf`), "genlab own init" from its own draw (AR: MADE's
  zero-initialised output layer). Both splines on [-5, 5] with the same bins, the same hidden sizes, so the
  same number of parameters that can change (zuko's modules also hold masked-out weights, listed below the
  table). At 1500 steps the held-out NLL of one architecture depends on the initial draw by a few
  hundredths of a nat (up to 0.1 on rings), which is why the same-start side is there: it compares the
  implementations. "genlab tuned" (couplings) spends the same budget as genlab recommends: zero-initialised
  couplings (each layer starts as the identity on the changed half) with the widest hidden layers that keep
  the parameters that can change at most zuko's; in 2-D, where the conditioner sees one value, 16 bins
  instead of 8; on the mixture 6 couplings instead of 4, without the kept-half spline, the split alternating
  between halves and odd / even features every two layers (:func:`tuned_layers`). Reported: held-out NLL
  (nats) next to the true density's, and the training step time.

Times are the total wall time of each side's training steps (one torch thread unless ``--threads``);
ratio = genlab's / the peer's (below 1: genlab faster).

- ``cnf``: the continuous flow (FFJORD) against zuko's CNF on the same vector field: ``scripts/bench_cnf.py``'s
  tables (NFE, time and error of log p at three tolerances; a training step).

Usage: ``nice python scripts/bench_flows.py --part glow|nsf|cnf|all [--steps-glow 600] [--steps-nsf 1500] [--seed 0]``
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

def effective_params(model: nn.Module) -> int:
    """Trainable values that can change: a masked linear layer's masked-out weights (zuko's ``MaskedLinear``,
    genlab's MADE) do not count."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    masked = [m for m in model.modules() if isinstance(m, nn.Linear) and isinstance(getattr(m, "mask", None), Tensor)]
    return total - sum(int((m.mask == 0).sum()) for m in masked)


def tuned_layers(dim: int, k: int, bins: int, hidden: int, budget: int) -> list[SplineCoupling]:
    """genlab's recommended coupling NSF within ``budget`` parameters, zero-initialised couplings with the widest
    hidden layers (at most ``hidden``) that keep the count within the budget. 2-D (the conditioner sees one
    value): ``k`` channel-split couplings with a spline on the kept half, 16 bins (not ``bins``). Higher
    dimensions: 3k/2 couplings without the kept-half spline, the split alternating between halves and
    odd / even features every two layers (kept: first half, second half, even, odd, first half, ...), so
    that features of one half (those of different parity) condition each other."""
    if dim == 2:
        bins, count, kept_spline, masks = 16, k, True, ["channel"] * k
    else:
        count, kept_spline = 3 * k // 2, False
        masks = ["channel" if t % 4 < 2 else "checkerboard" for t in range(count)]
    start = torch.random.get_rng_state()  # each candidate width from the same draw: the kept one is a single build's
    for width in range(hidden, 0, -1):
        torch.random.set_rng_state(start)
        layers = [SplineCoupling(dim, bins, 5.0, parity=t % 2, hidden=width, depth=2, kept_spline=kept_spline,
                                 mask=mask) for t, mask in enumerate(masks)]
        if sum(effective_params(layer) for layer in layers) <= budget:
            return layers
    raise ValueError(f"no coupling NSF with {bins} bins fits {budget} parameters")


def nsf_sides(dim: int, k: int, bins: int, hidden: int, seed: int, passes: int | None) -> list[Side]:
    """zuko's ``NSF`` (``passes=2``: coupling; None: autoregressive) and genlab's same layers twice: from
    zuko's initial weights and from genlab's own draw (same seed); for couplings also "genlab tuned"
    (:func:`tuned_layers` within zuko's parameter count)."""
    import zuko

    from genlab.testing.zuko_flows import flow_from_zuko_nsf, nsf_layers

    torch.manual_seed(seed)
    theirs = zuko.flows.NSF(dim, bins=bins, transforms=k, passes=passes, hidden_features=(hidden, hidden))
    same = flow_from_zuko_nsf(theirs)
    torch.manual_seed(seed)
    own = Flow([dim], nsf_layers(dim, bins, hidden, 2, k, coupling=passes == 2))
    sides = [Side("genlab", same, same.log_prob), Side("genlab own init", own, own.log_prob)]
    if passes == 2:
        torch.manual_seed(seed)
        tuned = Flow([dim], tuned_layers(dim, k, bins, hidden, effective_params(theirs)))
        sides.append(Side("genlab tuned", tuned, tuned.log_prob))
    return [*sides, Side("zuko", theirs, lambda x: theirs().log_prob(x))]


def bench_nsf(steps: int, k: int, bins: int, hidden: int, batch: int, seed: int = 0) -> list[str]:
    mixture = GaussianMixture.random(8, 6, torch.Generator().manual_seed(0), scale=0.5)
    toys = {name: ((lambda n, g, name=name: toy2d(name, n, g)), (lambda x, name=name: toy2d_log_prob(name, x)), 2)
            for name in ("eight_gaussians", "rings")}
    mix = (lambda n, g: mixture.sample(n, g, torch.float32), mixture.log_prob, 8)
    runs = [(name, set_, 2) for name, set_ in toys.items()] + [("mixture_8d", mix, 2), ("mixture_8d AR", mix, None)]
    lines = [f"NSF, {k} layers, {bins} bins, hidden ({hidden}, {hidden}), batch {batch}, {steps} steps, seed {seed}: zuko's "
             "NSF(passes=2) (coupling; AR: fully autoregressive) and genlab's same layers (SplineCoupling(mask=channel, "
             "kept_spline, zero_init=False); AR: SplineAutoregressive), 'genlab' from zuko's initial weights, "
             "'genlab own init' from its own draw, 'genlab tuned' zero-initialised couplings (2-D: 16 bins; 8-D: 6 "
             "layers, halves and odd / even splits, no kept-half spline) within zuko's parameter count; held-out NLL "
             "(nats) of 20000 points",
             f"{'set':<15} {'side':<15} {'params':>7} {'NLL':>8} {'true NLL':>9} {'ms/step':>8} {'time ratio':>11}"]
    totals: dict[str, int] = {}  # zuko's parameter count with its masked-out weights
    for name, (draw, true_log_prob, dim), passes in runs:
        g = torch.Generator().manual_seed(seed)
        sides = nsf_sides(dim, k, bins, hidden, seed, passes)
        totals[f"{dim}-D"] = sum(p.numel() for p in sides[-1].model.parameters())
        race(sides, lambda _: draw(batch, g), steps)
        held = draw(20000, torch.Generator().manual_seed(123))
        true = float(-true_log_prob(held.double()).mean())
        for side in sides:
            with torch.no_grad():
                nll = float(-side.log_prob(held).double().mean())
            ratio = f"{side.seconds / sides[-1].seconds:.2f}x" if side is not sides[-1] else ""
            lines.append(f"{name:<15} {side.name:<15} {effective_params(side.model):>7,} {nll:>8.4f} {true:>9.4f} "
                         f"{1e3 * side.seconds / steps:>8.2f} {ratio:>11}")
    lines.append("params: values that can change (zuko's modules also hold masked-out weights: "
                 + ", ".join(f"{n:,} in all at {d}" for d, n in totals.items()) + ")")
    lines.append("time ratio: the genlab side's training time / zuko's")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["glow", "nsf", "cnf", "all"], default="all")
    parser.add_argument("--steps-glow", type=int, default=600)
    parser.add_argument("--steps-nsf", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0, help="the NSF part's initialisation and batches")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("glow", "all"):
        print("\n".join(bench_glow(args.steps_glow, k=8, hidden=64, batch=64)), flush=True)
    if args.part in ("nsf", "all"):
        print("\n".join(bench_nsf(args.steps_nsf, k=4, bins=8, hidden=64, batch=256, seed=args.seed)), flush=True)
    if args.part in ("cnf", "all"):
        from bench_cnf import cnf_lines  # scripts/ is on the path when this script runs

        print("\n".join(cnf_lines()), flush=True)


if __name__ == "__main__":
    main()
