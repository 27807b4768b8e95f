"""Benchmark genlab's quantizers against vector-quantize-pytorch (vqp) in one process, with the same settings.

Parts (``--parts time,train``):

- ``time``: one training-mode forward + backward of the quantizer alone on an autoencoder's latent
  ``z [64, 16, 8, 8]`` (channel-first; vqp with ``accept_image_fmap``): VQ (256 codes, EMA decay 0.99,
  commitment 0.25, straight-through), FSQ (levels 8, 5, 5, 5 on 4 channels, projections from 16) and LFQ
  (8 bits, entropy weight 0.1, projections from 16). Runs alternate (ABBA, ``bench_models.step_times``);
  the median of this process's CPU seconds (``time.process_time``: other processes sharing the cores do
  not inflate it) or, on CUDA, of wall time.
- ``train``: the same small conv autoencoder (32x32 digits -> 16 x 8 x 8 latents -> 32x32; the same initial
  weights and batches for both libraries) trained with MSE + the quantizer's losses, Adam lr 1e-3, batch 32,
  with a 256-code EMA VQ (decay 0.99, commitment 0.25) in these settings: plain, k-means initialisation
  (10 iterations), dead-code replacement (threshold 1, vqp's ``threshold_ema_dead_code``), each library from
  its own initial codebook, and plain from vqp's initial codebook in both (the algorithms alone); and
  dead-code replacement with genlab's expiry added on its side (``dead_code_batches=5``: codes no vector
  chose in 5 consecutive batches of 2,048 vectors are replaced too; SoundStream's rule, which vqp does not
  have) against vqp's dead-code replacement. At steps 30, 150,
  500 and the end it prints the codebook usage (the fraction of the 256 codes used) and perplexity (exp of
  the codes' entropy) on the held-out digits, and the held-out reconstruction MSE (pixels in [0, 1]) at the end.
  The single starts differ by the draw (the initial codebook, k-means seeds, replacement vectors), so
  ``--seeds S`` repeats plain, k-means, dead-code and dead-code + expiry from S seeds per library and prints
  the mean over seeds with [min, max] (the model's initial weights and the batches stay the same). With
  ``--draws paired`` (the default) both libraries take the same seed per start (common random numbers: the
  same initial codebook and draws, so a seed's two runs differ only by the implementations' arithmetic, which
  is the same bit for bit on CPU: ``tests/test_quantizers_vqp_training.py``), and the last column tallies,
  seed by seed, where genlab is better, the same (usage: as many codes used; MSE: within 1%) or worse;
  ``independent`` gives each library its own seeds, ``swapped`` each library the other's.

Usage: ``python scripts/bench_autoencoders.py [--parts time,train] [--steps 1500] [--seeds 3] [--threads 1]
[--setting plain --setting k-means] [--draws paired|independent|swapped]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_models import DEVICE, step_times
from torch import Tensor, nn

from genlab.data import Digits
from genlab.models.quantizers import FSQ, LFQ, VectorQuantizer
from genlab.objectives.autoencoder import code_statistics

CODES, DIM, CHECKPOINTS = 256, 16, (30, 150, 500)
EXPIRY = 5  # genlab's dead_code_batches in the "dead-code + expiry" setting
SETTINGS = {"plain": {}, "plain, vqp's init": {"same_init": True}, "k-means": {"kmeans": True},
            "dead-code": {"dead": 1.0}, f"dead-code + genlab's expiry ({EXPIRY})": {"dead": 1.0, "expire": EXPIRY}}
SEEDED = ("plain", "k-means", "dead-code", f"dead-code + genlab's expiry ({EXPIRY})")  # repeated with --seeds


def vq_pair(kmeans: bool = False, dead: float = 0.0, same_init: bool = False, expire: int = 0,
            seeds: tuple[int, int] | None = None) -> tuple[nn.Module, nn.Module]:
    """genlab's VectorQuantizer and vqp's VectorQuantize with the same settings, channel-first images; each
    with its own initial codebook (both Kaiming-uniform, drawn one after the other from the global generator,
    or, with ``seeds``, genlab's after ``torch.manual_seed(seeds[0])`` and vqp's after ``seeds[1]``) or, with
    ``same_init``, vqp's in both. ``expire``: genlab's ``dead_code_batches`` (vqp has no such rule)."""
    import vector_quantize_pytorch as vqp

    if seeds:
        torch.manual_seed(seeds[0])
    ours = VectorQuantizer(DIM, CODES, decay=0.99, beta=0.25, kmeans_init=kmeans, kmeans_iters=10,
                           dead_code_threshold=dead, dead_code_batches=expire)
    if seeds:
        torch.manual_seed(seeds[1])
    theirs = vqp.VectorQuantize(dim=DIM, codebook_size=CODES, decay=0.99, commitment_weight=0.25,
                                kmeans_init=kmeans, kmeans_iters=10, threshold_ema_dead_code=dead,
                                rotation_trick=False, accept_image_fmap=True)
    if same_init:
        with torch.no_grad():
            ours.codebook.copy_(theirs._codebook.embed[0])
            ours.embed_sum.copy_(theirs._codebook.embed_avg[0])
            ours.cluster_size.copy_(theirs._codebook.cluster_size[0])
    return ours, theirs


def quantizer_losses(q: nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(quantized, indices, summed losses)`` from either library."""
    out = q(z)
    if len(out) == 2:  # vqp's FSQ: no loss
        return out[0], out[1], z.new_zeros(())
    if isinstance(out[2], dict):  # genlab: losses by name
        return out[0], out[1], sum(out[2].values(), z.new_zeros(()))
    return out[0], out[1], out[2].sum()


def time_part(repeats: int, rows: list) -> None:
    import vector_quantize_pytorch as vqp

    torch.manual_seed(0)
    z = torch.randn(64, DIM, 8, 8, device=DEVICE)
    pairs = {"VQ (256 codes, EMA)": vq_pair(),
             "FSQ (8-5-5-5)": (FSQ([8, 5, 5, 5], dim=DIM), vqp.FSQ(levels=[8, 5, 5, 5], dim=DIM)),
             "LFQ (8 bits)": (LFQ(DIM, bits=8, entropy_weight=0.1),
                              vqp.LFQ(dim=DIM, codebook_size=256, entropy_loss_weight=0.1, commitment_loss_weight=0.25))}
    for name, (ours, theirs) in pairs.items():
        ours, theirs = ours.to(DEVICE).train(), theirs.to(DEVICE).train()

        def step(q: nn.Module) -> Callable[[], None]:
            def run() -> None:
                x = z.detach().requires_grad_(True)
                quantized, _, loss = quantizer_losses(q, x)
                (quantized.square().mean() + loss).backward()
            return run

        clock = time.process_time if DEVICE == "cpu" else time.perf_counter
        (t_ours, t_theirs), share = step_times([(lambda: None, step(ours)), (lambda: None, step(theirs))],
                                               repeats, warmup=5, clock=clock)
        a, b = statistics.median(t_ours), statistics.median(t_theirs)
        rows.append((f"{name} fwd+bwd ms", f"{a * 1e3:.3f}", f"{b * 1e3:.3f}", f"{a / b:.2f}x",
                     f"others' CPU share {share:.0%}"))


class ConvAutoencoder(nn.Module):
    """32x32 -> DIM x 8 x 8 -> 32x32: two stride-2 convs down, two transposed convs up."""

    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
                                     nn.Conv2d(64, DIM, 1))
        self.decoder = nn.Sequential(nn.Conv2d(DIM, 64, 3, 1, 1), nn.ReLU(), nn.ConvTranspose2d(64, 32, 4, 2, 1),
                                     nn.ReLU(), nn.ConvTranspose2d(32, 1, 4, 2, 1))
        self.quantizer = quantizer

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        quantized, indices, loss = quantizer_losses(self.quantizer, self.encoder(x))
        return self.decoder(quantized), indices, loss


@torch.no_grad()
def evaluate(model: ConvAutoencoder, held: Tensor) -> tuple[float, float, float]:
    """Held-out ``(usage, perplexity, MSE in [0, 1] pixel units)``."""
    model.eval()
    x_hat, indices, _ = model(held)
    model.train()
    usage, perplexity = code_statistics(indices, CODES)
    return usage, perplexity, ((x_hat.clamp(-1, 1) - held) / 2).square().mean().item()


def train(base: ConvAutoencoder, q: nn.Module, data: Tensor, held: Tensor, marks: list[int],
          seed: int) -> tuple[list[tuple[float, float, float]], float]:
    """Train a copy of ``base`` with quantizer ``q`` for ``marks[-1]`` steps (the same batches every time; the
    library's own draws after ``torch.manual_seed(seed)``) -> ``evaluate`` at each mark, training CPU s."""
    model = copy.deepcopy(base)
    model.quantizer = q.to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g, out, start = torch.Generator(device=DEVICE).manual_seed(1), [], time.process_time()
    torch.manual_seed(seed)
    for step in range(1, marks[-1] + 1):
        x = data[torch.randint(len(data), (32,), generator=g, device=DEVICE)]
        x_hat, _, loss = model(x)
        (F.mse_loss(x_hat, x) + loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in marks:
            out.append(evaluate(model, held))
    return out, time.process_time() - start


def spread(values: list[float], fmt: str) -> str:
    """``mean [min, max]`` (the value alone for one)."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def tally(ours: list[float], theirs: list[float], sign: int, rtol: float = 0.0) -> str:
    """Paired seeds: how many of genlab's values are better than, the same as (within ``rtol`` of vqp's) or
    worse than vqp's from the same seed (``sign`` -1 for a loss, where lower is better)."""
    d = [0.0 if abs(a - b) <= rtol * abs(b) else sign * (a - b) for a, b in zip(ours, theirs)]
    better, same = sum(x > 0 for x in d), sum(x == 0 for x in d)
    return f"better / same / worse at {better} / {same} / {len(d) - better - same} seeds"


def report(rows: list, setting: str, marks: list[int], results: dict, paired: bool = False) -> None:
    """Rows for one setting: ``results[lib] = [(evaluations at marks, CPU s) per seed]``; ``paired``:
    the libraries' runs of one seed started from the same draws, so the last column tallies them by seed."""
    ours, theirs = results["genlab"], results["vqp"]
    for i, step in enumerate(marks):
        values = [([r[0][i][0] for r in runs], [r[0][i][1] for r in runs]) for runs in (ours, theirs)]
        cells = [f"{spread(u, '.3f')} / {spread(p, '.1f')}" for u, p in values]
        usage = [statistics.mean(u) for u, _ in values]
        rows.append((f"{setting} step {step}: usage / perplexity", *cells,
                     f"{usage[0] / usage[1]:.2f}x" if len(ours) > 1 else "",
                     tally(values[0][0], values[1][0], 1) if paired else ""))
    mse = [[r[0][-1][2] for r in runs] for runs in (ours, theirs)]
    cpu = [sum(r[1] for r in runs) for runs in (ours, theirs)]
    paired_mse = f"{tally(mse[0], mse[1], -1, rtol=0.01)} (same: within 1%); " if paired else ""
    rows.append((f"{setting} held-out MSE at {marks[-1]}", spread(mse[0], ".5f"), spread(mse[1], ".5f"),
                 f"{statistics.mean(mse[0]) / statistics.mean(mse[1]):.2f}x",
                 f"{paired_mse}train CPU s {cpu[0]:.0f} / {cpu[1]:.0f}"))


def train_part(steps: int, seeds: int, rows: list, settings: list[str] | None = None,
               draws: str = "paired") -> None:
    """``settings``: those to run (default all); ``draws``: in the seeded rows both libraries take the same
    seeds (``paired``), each its own (``independent``) or each the other's (``swapped``)."""
    data, held = Digits(image_size=32).data.to(DEVICE), Digits(image_size=32, split="test").data.to(DEVICE)
    torch.manual_seed(0)
    base = ConvAutoencoder(nn.Identity()).to(DEVICE)
    marks = [s for s in CHECKPOINTS if s < steps] + [steps]
    for setting, kw in SETTINGS.items():  # one start each; the libraries' draws from the same global state
        if settings is not None and setting not in settings:
            continue
        pair = vq_pair(**kw)
        report(rows, setting, marks, {lib: [train(base, q, data, held, marks, 2)]
                                      for lib, q in zip(("genlab", "vqp"), pair)})
    for setting in SEEDED if seeds > 1 else ():
        if settings is not None and setting not in settings:
            continue
        results: dict = {"genlab": [], "vqp": []}
        for seed in range(seeds):
            own = (100 * seed + 11, 100 * seed + 12)  # different per seed
            own = {"paired": own[:1] * 2, "independent": own, "swapped": own[::-1]}[draws]
            for lib, q, s in zip(("genlab", "vqp"), vq_pair(**SETTINGS[setting], seeds=own), own):
                results[lib].append(train(base, q, data, held, marks, s + 50))
        paired = draws == "paired"
        report(rows, f"{setting}, {seeds} {'paired ' if paired else ''}seeds", marks, results, paired)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="time,train")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3, help="seeded starts per library (1: none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--setting", action="append", choices=list(SETTINGS),
                        help="run this setting (repeatable; default: all)")
    parser.add_argument("--draws", choices=("paired", "independent", "swapped"), default="paired",
                        help="the seeded rows' seeds: the same for both libraries, each its own, or swapped")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list = []
    if "time" in args.parts:
        time_part(args.repeats, rows)
    if "train" in args.parts:
        train_part(args.steps, args.seeds, rows, args.setting, args.draws)
    header = ("", "genlab", "vqp", "genlab/vqp", "")
    width = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    print(f"device {DEVICE}, {args.threads} thread(s)")
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, width)).rstrip())


if __name__ == "__main__":
    main()
