"""What only an accelerator can show: genlab's device-generic paths on a real GPU, mixed precision,
attention kernels, torch.compile, DDP, and bf16 speed.

Run on a machine with a GPU (``python scripts/gpu_check.py``, about 4-6 minutes on one H100/H200).
Without a CUDA device it says so and exits 0, checking nothing; ``--device cpu`` runs the checks on
the CPU instead (the trainer, DDP and speed parts are skipped there). Each check prints one line as
it ends, ``ok`` or ``FAIL`` with the error (``skip`` with the reason for one that cannot run here),
and a table of every check (name, ok/FAIL/skip, detail) ends the output; the exit code is the number
of failures. Checks:

1. every registered sampler samples from the prior with a generator on the device (shared grid in
   float32 and bf16, per-sample times in float32); the adaptive ``ode`` sampler and the likelihood;
   classifier-free guidance (rescale, interval) and classifier guidance (a gradient per step) on the device;
2. every objective (three time distributions, EDM preconditioning, min-SNR; consistency training: CT,
   iCT and ECT with dropout, whose student-as-target call replays the device's dropout masks) computes a
   loss and a backward pass on the device with a generator there;
3. the trainer: the toy 2-D job and a small digits job (bf16 autocast) train, checkpoint, resume and
   evaluate on the device (samples drawn there);
4. attention: each backend (flash_attn where installed, sdpa) equals ``math`` in the same dtype
   (float32, bf16, fp16; forward and gradients, with and without a mask), and every backend in bf16
   is close to float32 ``math``;
5. mixed precision: a small UNet and a small DiT train 8 steps under bf16 and fp16 autocast (fp16
   with a GradScaler) on a fixed batch: finite losses and gradients, the loss going down
   (:mod:`genlab.testing.accelerator`, which ``tests/test_cuda.py`` runs too);
6. ``torch.compile`` of a small UNet gives the eager forward and parameter gradients (float32);
7. DDP (more than one GPU): ``accelerate launch --multi_gpu`` trains the toy 2-D job on every GPU;
8. speed (GPU only): a UNet and a DiT training step in bf16 autocast, genlab vs the identical
   diffusers model (exported with the converters), median of 20 after warm-up; the ratio genlab /
   diffusers steps per second is what the backbones' throughput targets are about (>= 1.1 UNet,
   >= 1.0 DiT).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS: list[tuple[str, str, str]] = []  # (name, "ok" | "FAIL" | "skip", detail), in order
PARTS = ("samplers", "objectives", "trainer", "attention", "precision", "compile", "ddp", "speed")


def failures() -> list[str]:
    return [name for name, status, _ in RESULTS if status == "FAIL"]


def check(name: str, fn: Callable[[], str | None]) -> None:
    """Run one check; print ``ok`` (with what it returned) or ``FAIL`` with the error's first line."""
    start = time.perf_counter()
    try:
        note = fn() or ""
        RESULTS.append((name, "ok", note))
        print(f"ok    {name:58} {time.perf_counter() - start:6.1f} s  {note}", flush=True)
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the others
        detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        RESULTS.append((name, "FAIL", detail))
        print(f"FAIL  {name:58} {detail}", flush=True)
        traceback.print_exc(limit=3, file=sys.stdout)


def skip(name: str, why: str) -> None:
    """A check that cannot run here: listed, not counted as a failure."""
    RESULTS.append((name, "skip", why))
    print(f"skip  {name:58} {why}", flush=True)


def table() -> str:
    """Every check's name, status and detail, one line each."""
    width = max([len(name) for name, _, _ in RESULTS] + [5])
    lines = [f"{'check':{width}}  status  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{name:{width}}  {status:6}  {detail}" for name, status, detail in RESULTS]
    return "\n".join(lines)


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

    def guidance() -> str:
        from genlab.adapters import CFG, ClassifierGuidance

        def model(x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
            return denoiser.model(x, t) + 0.1 * class_labels[:, None].to(x.dtype)

        def classifier(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x.square()], 1)[:, :3].float() * (1 + 1e-3 * t[:, None])

        sampler, labels = build("sampler", {"type": "ddpm", "steps": 6}), torch.arange(64, device=device) % 3
        times = sampler.timesteps(process)[:, None].expand(-1, 64).to(device)
        guides = (CFG(scale=3.0, rescale=0.5, interval=(0.5, 50.0)),
                  ClassifierGuidance(classifier, 2.0, model_labels=True))
        for guide in guides:
            guided = guide.wrap(Denoiser(model, process, "v"))
            for dtype, per_sample in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)):
                x = sampler.sample(guided, shape=(64, 2), generator=torch.Generator(device=device).manual_seed(0),
                                   progress=False, dtype=dtype, times=times if per_sample else None,
                                   cond={"class_labels": labels})
                assert x.device.type == device.type and x.dtype == dtype and torch.isfinite(x).all(), (guide, dtype)
        return "cfg and classifier, fp32 / bf16 / per-sample times"

    check("guidance (cfg rescale + interval, classifier)", guidance)


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

    from genlab.models import MLP
    from genlab.objectives import BuildContext, ConsistencyTraining, EasyConsistencyTuning, ImprovedConsistencyTraining

    for make in (ConsistencyTraining, ImprovedConsistencyTraining, EasyConsistencyTuning):
        def consistency(make: type = make) -> str:
            model = MLP(dim=2, hidden=32, depth=2, dropout=0.1, time_embedding="fourier").to(device).train()
            objective = make()
            objective.build(BuildContext(model=model, process=VP(), data_shape=(2,)))
            objective.at_step(5, 10)
            loss = objective.loss({"model": model, "target": model}, {"x": x0},
                                  torch.Generator(device=device).manual_seed(0))
            loss.backward()
            assert loss.device.type == device.type and torch.isfinite(loss)
            return f"loss {loss.item():.3f}"

        check(f"objective {make.__name__}", consistency)


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
        skip("trainer", "runs on the accelerator only: accelerate picks the device")
        return
    check("train toy2d (fp32), resume, evaluate", job("toy2d.yaml", "train.steps=20", "train.eval_samples=500"))
    check("train digits (bf16), resume, evaluate", job("digits.yaml", "train.steps=20", "train.mixed_precision=bf16",
                                                       "train.eval_samples=100"))


def attention(device: torch.device) -> None:
    from genlab.models.attention import attention as attend
    from genlab.models.attention import available_backends
    from genlab.testing.accelerator import attention_backend_errors

    # flash runs on CUDA only (on a GPU machine checked with --device cpu it is listed, not usable)
    backends = [b for b in available_backends() if b != "flash" or device.type == "cuda"]
    for backend in [b for b in backends if b != "math"]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            label = str(dtype).removeprefix("torch.")
            if backend == "flash" and dtype == torch.float32:
                continue  # flash_attn runs in fp16/bf16 only

            def run(backend: str = backend, dtype: torch.dtype = dtype) -> str:
                errors = attention_backend_errors(device, dtype, backends=(backend,))
                assert errors, f"{backend} did not run"
                bad = [str(e) for e in errors if not e.ok]
                assert not bad, "; ".join(bad)
                return "; ".join(f"{'masked' if e.masked else 'no mask'}: forward {e.forward:.1e}, grad {e.grad:.1e}"
                                 for e in errors)

            check(f"attention {backend} == math, {label}", run)
    if "flash" not in backends:
        skip("attention flash == math", "flash needs CUDA" if device.type != "cuda" else "flash_attn not installed")

    q, k, v = (torch.randn(2, 4, 256, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    reference = attend(q.float(), k.float(), v.float(), backend="math")
    for backend in backends:
        def close(backend: str = backend) -> str:
            err = (attend(q, k, v, backend=backend).float() - reference).abs().max().item()
            assert err < 3e-2, err
            return f"max |bf16 - fp32 math| {err:.1e}"

        check(f"attention {backend} bf16 vs float32 math", close)


def precision(device: torch.device) -> None:
    from genlab.testing.accelerator import autocast_train_steps, small_dit, small_unet

    x = torch.randn(16, 3, 16, 16, device=device, generator=torch.Generator(device=device).manual_seed(0))
    for name, make in (("UNet", small_unet), ("DiT", small_dit)):
        for dtype in ("bf16", "fp16"):
            def run(make: Callable = make, dtype: str = dtype) -> str:
                torch.manual_seed(0)
                report = autocast_train_steps(make().to(device), x, dtype, steps=8)
                problems = report.problems()
                assert not problems, "; ".join(problems) + f" ({report.summary()})"
                return report.summary()

            check(f"autocast {dtype} train steps, small {name}", run)


def compiled(device: torch.device) -> None:
    from genlab.testing.accelerator import small_unet

    def run() -> str:
        torch.manual_seed(0)
        model = small_unet().to(device)
        g = torch.Generator(device=device).manual_seed(0)
        x, w = (torch.randn(4, 3, 16, 16, device=device, generator=g) for _ in range(2))
        t = torch.rand(4, device=device, generator=g)

        def forward_backward(fn: Callable) -> tuple[torch.Tensor, list[torch.Tensor]]:
            model.zero_grad(set_to_none=True)
            out = fn(x, t)
            (out * w).sum().backward()
            return out.detach(), [p.grad.detach().clone() for p in model.parameters()]

        # TF32 off for the comparison (cuDNN allows it for convolutions by default): its 10-bit rounding,
        # met by inputs that differ in the last float32 bits, would hide the difference this measures
        flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            eager_out, eager_grads = forward_backward(model)
            start = time.perf_counter()
            out, grads = forward_backward(torch.compile(model))
            seconds = time.perf_counter() - start
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
        scale = eager_out.abs().max().clamp(min=1)
        out_err = ((out - eager_out).abs().max() / scale).item()
        grad_err = max(((a - b).abs().max() / b.abs().max().clamp(min=1)).item() for a, b in zip(grads, eager_grads))
        assert out_err < 1e-4 and grad_err < 1e-3, f"forward {out_err:.1e}, gradients {grad_err:.1e}"
        return f"vs eager: forward {out_err:.1e}, gradients {grad_err:.1e} (relative); first call {seconds:.0f} s"

    check("torch.compile small UNet == eager (forward, backward)", run)


def ddp(device: torch.device) -> None:
    name = "DDP: accelerate launch --multi_gpu, toy2d, 20 steps"
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if count < 2:
        skip(name, f"needs 2 or more GPUs, {count} here")
        return
    launcher = Path(sys.executable).with_name("accelerate")
    launch = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "accelerate.commands.launch"]

    def run() -> str:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        import genlab  # the processes import the genlab this one does

        where = str(Path(genlab.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [where, os.environ.get("PYTHONPATH")]))}
        with tempfile.TemporaryDirectory() as out:
            cmd = [*launch, "launch", "--multi_gpu", "--num_processes", str(count), "--num_machines", "1",
                   "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "genlab.cli", "train", str(ROOT / "configs" / "toy2d.yaml"), "train.steps=20",
                   "train.eval_samples=500", "--out", out, "--quiet"]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
            tail = (res.stdout + res.stderr).strip().splitlines()[-3:]
            assert res.returncode == 0, f"exit {res.returncode}: {' | '.join(tail)}"
            assert (Path(out) / "checkpoints" / "step_0000020").is_dir(), f"no step-20 checkpoint: {' | '.join(tail)}"
        return f"{count} processes, checkpoint step_0000020 written"

    check(name, run)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None,
                        help="cuda (default, when there is a CUDA device) or cpu (the checks on the CPU)")
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    args = parser.parse_args(argv)
    if args.device is None or torch.device(args.device).type == "cuda":
        if not torch.cuda.is_available():
            print(f"genlab gpu_check: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is "
                  "False): nothing checked. Run it on a machine with a GPU, or with --device cpu to run the "
                  "checks on the CPU.", flush=True)
            return 0
    device = torch.device(args.device or "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"genlab gpu_check: torch {torch.__version__}, device {device} ({name})", flush=True)
    start = time.perf_counter()
    parts = {"samplers": samplers, "objectives": objectives, "trainer": trainer, "attention": attention,
             "precision": precision, "compile": compiled, "ddp": ddp, "speed": speed}
    for part, run in parts.items():
        if part in args.skip:
            continue
        if part == "speed" and device.type != "cuda":
            skip("speed", "GPU only")
            continue
        print(f"== {part}", flush=True)
        run(device)
    failed = failures()
    print(f"\n== summary ({device}, {name})\n{table()}")
    print(f"{len(failed)} failed: {', '.join(failed) or 'none'}; {time.perf_counter() - start:.0f} s")
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
