"""Benchmark a training step of latent diffusion against the pixel model it replaces (Rombach et al. 2022,
Sec. 4.1: the point of the latent space is a cheaper step at the same quality).

Two Trainers in one process, built from their configs as ``genlab train`` builds them: the pixel model
(configs/digits.yaml at ``data.image_size=32``: a UNet on [1, 32, 32] digits) and the latent model
(configs/latent/ldm_digits.yaml: a UNet on the [4, 8, 8] latents of a trained vae_digits run, which encodes
each batch first). A step is the Trainer's ``train_step`` (the batch read, for the latent model its encoding,
forward, backward, AdamW, EMA); the two alternate, and the median of ``--repeats`` steps after ``--warmup`` is
printed (wall and this process's CPU time: on shared cores the CPU time is the steadier) with the
ratios, the latent step's encoding alone beside them. With ``--runs RUN ...`` (finished runs'
directories, or the JSON a ``genlab sample`` wrote) their evaluations are printed under the times: the quality each
reached.

Usage: ``python scripts/bench_latent.py --autoencoder runs/vae_digits [--repeats 30] [--threads 1]
[--runs runs/digits32 runs/ldm_digits]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from genlab.core.config import load_config
from genlab.training import Experiment, Trainer

ROOT = Path(__file__).resolve().parents[1]
PIXEL = (ROOT / "configs" / "digits.yaml", ["data.image_size=32"])
LATENT = (ROOT / "configs" / "latent" / "ldm_digits.yaml", [])


def trainer(config: Path, overrides: list[str], out: Path) -> Trainer:
    return Trainer(Experiment.from_config(load_config(config, overrides)), out, progress=False)


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``: on shared cores the CPU time of this process is the steadier one."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--autoencoder", default="runs/vae_digits", help="the latent model's autoencoder run")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", nargs="+", metavar="RUN",
                        help="finished runs (samples.json) or evaluations (a genlab sample JSON) whose quality to print")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pixel = trainer(*PIXEL, Path(tmp) / "pixel")
        latent = trainer(LATENT[0], [*LATENT[1], f"latent.autoencoder={args.autoencoder}"], Path(tmp) / "latent")
        times = {"pixel": [], "latent": [], "encode": []}
        batch = next(latent.batches)
        for i in range(args.warmup + args.repeats):
            t_pixel, t_latent = timed(pixel.train_step), timed(latent.train_step)
            t_encode = timed(lambda: latent.exp.latent.encode(batch, torch.Generator().manual_seed(i)))
            if i >= args.warmup:
                for key, t in zip(times, (t_pixel, t_latent, t_encode)):
                    times[key].append(t)
        pixel.close(), latent.close()
    med = {k: statistics.median(w for w, _ in v) * 1e3 for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) * 1e3 for k, v in times.items()}
    params = {n: sum(p.numel() for p in t.exp.model.parameters()) for n, t in (("pixel", pixel), ("latent", latent))}
    shapes = {"pixel": pixel.exp.data_shape, "latent": latent.exp.data_shape}
    batch_size = latent.exp.train.batch_size
    print(f"training step, batch {batch_size}, {args.threads} thread(s), median of {args.repeats} "
          f"({'cuda' if torch.cuda.is_available() else 'cpu'}):")
    print(f"{'model':<8} {'input':>12} {'params':>9} {'wall ms':>9} {'CPU ms':>9}")
    for name in ("pixel", "latent"):
        print(f"{name:<8} {'x'.join(map(str, shapes[name])):>12} {params[name]:>9,} {med[name]:>9.1f} {cpu[name]:>9.1f}")
    print(f"latent step / pixel step: wall {med['latent'] / med['pixel']:.2f}, CPU {cpu['latent'] / cpu['pixel']:.2f} "
          f"(of the latent step, encoding the batch: wall {med['encode']:.1f} ms, CPU {cpu['encode']:.1f} ms)")
    if args.runs:
        # no step column: genlab sample records the config's train.steps, not the checkpoint's step
        print(f"{'accuracy':>9} {'FD':>8} {'FD data':>8} {'confident':>9}  run")
        for run in args.runs:
            file = Path(run) / "samples.json" if Path(run).is_dir() else Path(run)
            m = json.loads(file.read_text())
            print(f"{m['classifier_accuracy']:>9.1%} {m['frechet_distance']:>8.3f} "
                  f"{m['frechet_distance_data_vs_data']:>8.3f} {m['confident_fraction']:>9.1%}  {run}")


if __name__ == "__main__":
    main()
