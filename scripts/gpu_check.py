"""What only an accelerator can show: genlab's device-generic paths on a real GPU, and bf16 speed.

Run on a machine with a GPU (``python scripts/gpu_check.py``, about 3-5 minutes on one H100/H200);
on a CPU-only machine ``--device cpu`` runs the same checks there (the speed part is skipped).
Each check prints one line, ``ok`` or ``FAIL`` with the error; the exit code is the number of
failures. Checks:

1. every registered sampler samples from the prior with a generator on the device (shared grid in
   float32 and bf16, per-sample times in float32); the adaptive ``ode`` sampler and the likelihood;
2. every objective (three time distributions, EDM preconditioning, min-SNR) computes a loss and a
   backward pass on the device with a generator there;
3. the trainer: the toy 2-D job and a small digits job (bf16 autocast) train, checkpoint, resume and
   evaluate on the device (samples drawn there);
4. attention backends (flash_attn where installed, SDPA, math) agree in bf16;
5. speed (GPU only): a UNet and a DiT training step in bf16 autocast, genlab vs the identical
   diffusers model (exported with the converters), median of 20 after warm-up; the ratio genlab /
   diffusers steps per second is what the backbones' throughput targets are about (>= 1.1 UNet,
   >= 1.0 DiT).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FAILURES: list[str] = []


def check(name: str, fn: Callable[[], str | None]) -> None:
    """Run one check; print ``ok`` (with what it returned) or ``FAIL`` with the error's last line."""
    start = time.perf_counter()
    try:
        note = fn() or ""
        print(f"ok    {name:58} {time.perf_counter() - start:6.1f} s  {note}", flush=True)
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the others
        FAILURES.append(name)
        print(f"FAIL  {name:58} {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        traceback.print_exc(limit=3, file=sys.stdout)


def samplers(device: torch.device) -> None:
    from genlab.core.registry import build, registered
    from genlab.diffusion import VP, Denoiser, DiffusionLikelihood

    process = VP()
    net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2)).to(device)
    denoiser = Denoiser(lambda x, t: net(x.float()).to(x.dtype) * (1 + 1e-4 * t[:, None]), process, "v")
    for name in sorted(registered("sampler")["sampler"]):
        def run(name: str = name) -> str:
            sampler = build("sampler", {"type": name, "steps": 6} if name != "ode" else name)
            g = torch.Generator(device=device)
            outs = []
            for dtype in (torch.float32, torch.bfloat16):
                x = sampler.sample(denoiser, shape=(64, 2), generator=g.manual_seed(0), progress=False, dtype=dtype)
                assert x.device.type == device.type and x.dtype == dtype and torch.isfinite(x).all(), (x.dtype,)
                outs.append(x)
            if name != "ode":
                times = sampler.timesteps(process)[:, None].expand(-1, 64).to(device)
                x = sampler.sample(denoiser, shape=(64, 2), times=times, generator=g, progress=False)
                assert x.device.type == device.type and torch.isfinite(x).all()
            return f"bf16 vs fp32 max diff {(outs[0] - outs[1].float()).abs().max().item():.1e}"

        check(f"sampler {name}", run)

    def likelihood() -> str:
        x = torch.randn(32, 2, device=device, generator=torch.Generator(device=device).manual_seed(1))
        est = DiffusionLikelihood(denoiser, divergence="hutchinson", n_probes=2).estimate(
            x, generator=torch.Generator(device=device).manual_seed(2))
        assert est.log_prob.device.type == device.type and torch.isfinite(est.log_prob).all()
        return f"nfe {est.nfe}"

    check("likelihood (PF-ODE, Hutchinson)", likelihood)


def objectives(device: torch.device) -> None:
    from genlab.diffusion import EDM, VP
    from genlab.objectives import DenoisingObjective

    net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2)).to(device)
    x0 = torch.randn(128, 2, device=device)
    for dist in ("uniform", "log_normal", "logit_normal"):
        for kwargs, process in (({"prediction": "eps", "weighting": "min_snr"}, VP()),
                                ({"preconditioning": "edm", "weighting": "edm"}, EDM())):
            def run(dist: str = dist, kwargs: dict = kwargs, process: object = process) -> str:
                objective = DenoisingObjective(t_distribution=dist, **kwargs)
                loss = objective(objective.denoiser(lambda x, t: net(x), process), x0,
                                 generator=torch.Generator(device=device).manual_seed(0))
                loss.backward()
                assert loss.device.type == device.type and torch.isfinite(loss)
                return f"loss {loss.item():.3f}"

            check(f"objective {dist} {kwargs}", run)


def trainer(device: torch.device) -> None:
    from genlab.cli import main

    def job(config: str, *overrides: str) -> Callable[[], str]:
        def run() -> str:
            with tempfile.TemporaryDirectory() as out:
                args = ["train", str(ROOT / "configs" / config), "--out", out, "--quiet", *overrides]
                assert main(args) == 0
                assert main([*args, "--resume", "train.steps=40"]) == 0
                return ", ".join(p.name for p in sorted(Path(out).glob("*.png")))
        return run

    if device.type == "cpu":
        print("      (trainer checks run on the accelerator only: accelerate picks the device)")
        return
    check("train toy2d (fp32), resume, evaluate", job("toy2d.yaml", "train.steps=20", "train.eval_samples=500"))
    check("train digits (bf16), resume, evaluate", job("digits.yaml", "train.steps=20", "train.mixed_precision=bf16",
                                                       "train.eval_samples=100"))


def attention(device: torch.device) -> None:
    from genlab.models.attention import attention as attend
    from genlab.models.attention import available_backends

    q, k, v = (torch.randn(2, 4, 256, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    reference = attend(q.float(), k.float(), v.float(), backend="math")
    for backend in available_backends():
        def run(backend: str = backend) -> str:
            err = (attend(q, k, v, backend=backend).float() - reference).abs().max().item()
            assert err < 3e-2, err
            return f"max |bf16 - fp32 math| {err:.1e}"

        check(f"attention {backend}", run)


def speed(device: torch.device) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_models

    for make, batch in ((bench_models.unet_pair, 64), (bench_models.dit_pair, 64)):
        def run(make: Callable = make, batch: int = batch) -> str:
            pair = make(batch)
            steps = {}
            for label, model, call in (("genlab", pair.ours, pair.call_ours),
                                       ("diffusers", pair.theirs, pair.call_theirs)):
                step = bench_models.train_step(model, call, pair.x)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    for _ in range(5):
                        step()
                    times = []
                    for _ in range(20):
                        torch.cuda.synchronize()
                        start = time.perf_counter()
                        step()
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - start)
                steps[label] = statistics.median(times)
            ours, theirs = steps["genlab"], steps["diffusers"]
            return (f"batch {batch}: genlab {1e3 * ours:.1f} ms, diffusers {1e3 * theirs:.1f} ms per step; "
                    f"genlab/diffusers steps/s {theirs / ours:.2f}")

        check(f"speed {make.__name__} bf16 train step", run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", nargs="*", default=[], choices=("samplers", "objectives", "trainer", "attention",
                                                                  "speed"))
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"genlab gpu_check: torch {torch.__version__}, device {device} ({name})", flush=True)
    start = time.perf_counter()
    for part in (samplers, objectives, trainer, attention, speed):
        if part.__name__ in args.skip or (part is speed and device.type != "cuda"):
            continue
        print(f"== {part.__name__}", flush=True)
        part(device)
    print(f"{len(FAILURES)} failed: {', '.join(FAILURES) or 'none'}; {time.perf_counter() - start:.0f} s")
    return len(FAILURES)


if __name__ == "__main__":
    sys.exit(main())
