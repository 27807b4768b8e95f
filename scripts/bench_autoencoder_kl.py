"""Benchmark genlab's AutoencoderKL against the identical diffusers AutoencoderKL (``to_diffusers`` export:
same architecture and weights, outputs checked), side by side in one process.

Model: Stable Diffusion's VAE layout at reduced width: ``block_out_channels`` 64/128/256/256 (f = 8), 2 ResNet
blocks per level, 4 latent channels, 32 groups; x [4, 3, 64, 64]. Two measurements, fp32:
- training step: encode (posterior draw), decode, MSE to x + KL, backward, AdamW step;
- sampling-time decode: ``decode`` of latents [4, 4, 8, 8] under ``torch.no_grad``.
Steps/s: median over repeats after warm-up, the runs alternating (``bench_models.step_times``); peak memory:
bytes live during a step above the resident weights (``bench_models.peak_bytes``).

Usage: ``python scripts/bench_autoencoder_kl.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics

import diffusers
import torch
import torch.nn.functional as F
from bench_models import DEVICE, peak_bytes, print_table, step_times, sync

from genlab.interop.diffusers import to_diffusers
from genlab.models.autoencoders import AutoencoderKL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats, warmup = (3, 1) if args.quick else (10, 2)
    ours = AutoencoderKL(block_out_channels=(64, 128, 256, 256), layers_per_block=2, latent_channels=4).to(DEVICE)
    theirs = to_diffusers(ours).to(DEVICE)
    x = torch.rand(4, 3, 64, 64, device=DEVICE) * 2 - 1
    z = torch.randn(4, 4, 8, 8, device=DEVICE)
    with torch.no_grad():
        diff = (ours.decode(z) - theirs.decode(z).sample).abs().max().item()
    print(f"== AutoencoderKL, genlab vs diffusers {diffusers.__version__}: fp32 on {DEVICE}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); load average {os.getloadavg()[0]:.1f} ==")
    print(f"   params {sum(p.numel() for p in ours.parameters()) / 1e6:.2f} M; x {list(x.shape)}; max |decode "
          f"difference| {diff:.1e}; median of {repeats} after {warmup} warm-up")

    def train(model, call):  # one step with its own optimizer
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step() -> None:
            x_hat, kl = call(model)
            (F.mse_loss(x_hat, x) + 1e-6 * kl).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def ours_call(m):
        x_hat, enc = m(x, torch.Generator(DEVICE).manual_seed(0))
        return x_hat, enc.losses["kl"] / m.kl_weight

    def theirs_call(m):
        posterior = m.encode(x).latent_dist
        return m.decode(posterior.sample(torch.Generator(DEVICE).manual_seed(0))).sample, posterior.kl().mean()

    steps = [train(ours, ours_call), train(theirs, theirs_call)]
    times, _ = step_times([(sync, s) for s in steps], repeats, warmup)
    t_ours, t_theirs = map(statistics.median, times)
    m_ours, m_theirs = peak_bytes(steps[0]), peak_bytes(steps[1])

    def decode(model, diffusers_out: bool):
        def step() -> None:
            with torch.no_grad():
                out = model.decode(z)
                return out.sample if diffusers_out else out
        return step

    decodes = [decode(ours, False), decode(theirs, True)]
    times, busy = step_times([(sync, s) for s in decodes], repeats, warmup)
    d_ours, d_theirs = map(statistics.median, times)
    print_table([("train steps/s", 1 / t_ours, 1 / t_theirs, t_theirs / t_ours, ">= 0.95x"),
                 ("train peak step memory MiB", m_ours / 2**20, m_theirs / 2**20, m_ours / m_theirs, "<= 1.05x"),
                 ("decode calls/s (no grad)", 1 / d_ours, 1 / d_theirs, d_theirs / d_ours, ">= 0.95x"),
                 ("CPU share other processes took, %", 100 * busy, None, None, "")])


if __name__ == "__main__":
    main()
