"""The trainer: gradient accumulation, non-finite losses, pictures, a run killed with SIGKILL and
resumed, and two DDP ranks holding identical weights."""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genlab.core.checkpoint import latest_checkpoint, load_weights
from genlab.core.config import load_config
from genlab.core.errors import GenlabError, NonFiniteError
from genlab.training import Experiment, Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy2d.yaml"
TINY = ["train.batch_size=64", "model.hidden=32", "model.depth=1", "data.n=2000", "sampler.steps=5",
        "train.eval_samples=300", "train.warmup_steps=5"]


def experiment(*overrides: str) -> Experiment:
    return Experiment.from_config(load_config(CONFIG, [*TINY, *overrides]))


def test_gradient_accumulation_sums_micro_batch_gradients(tmp_path):
    tr = Trainer(experiment("train.grad_accum=3", "train.grad_clip=null"), tmp_path, progress=False)
    captured = {}
    tr.opt.optimizer.step = lambda *a, **k: captured.update({n: p.grad.clone() for n, p in tr.model.named_parameters()})
    peek = tr._batches()  # the batches of step 0, read again
    batches = [next(peek) for _ in range(3)]
    tr.train_step()
    tr.opt.zero_grad()
    sum(tr.micro_loss(m, batches[m]) / 3 for m in range(3)).backward()
    for n, p in tr.model.named_parameters():
        assert torch.allclose(captured[n], p.grad, atol=1e-7), n


def test_adam_betas_reach_every_optimizer_and_old_runs_still_resume(tmp_path):
    """train.adam_beta1 / adam_beta2 are AdamW's betas (taming's VQGAN: 0.5, 0.9). A run saved before the
    keys existed resumes as long as they keep their defaults (what it ran with), and not otherwise."""
    import yaml

    from genlab.training.resume import check_resume_config

    tr = Trainer(experiment("train.adam_beta1=0.5", "train.adam_beta2=0.9"), tmp_path / "a", progress=False)
    assert [g["betas"] for o in tr.opts.values() for g in o.optimizer.param_groups] == [(0.5, 0.9)]
    tr.close()
    run = tmp_path / "b"
    with Trainer(experiment("train.steps=2", "train.checkpoint_every=2"), run, progress=False) as trainer:
        trainer.fit()
    ckpt = latest_checkpoint(run)
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    for key in ("adam_beta1", "adam_beta2"):  # a run from before the keys
        del saved["train"][key]
    (ckpt / "config.yaml").write_text(yaml.safe_dump(saved))
    check_resume_config(ckpt, experiment("train.steps=2", "train.checkpoint_every=2").resolved())
    with pytest.raises(GenlabError, match=r"train.adam_beta1 is not set in the run \(.*\) and 0.5 now"):
        check_resume_config(ckpt, experiment("train.steps=2", "train.checkpoint_every=2",
                                             "train.adam_beta1=0.5").resolved())


def test_non_finite_losses_are_skipped_then_abort(tmp_path):
    exp = experiment("train.steps=20", "train.max_bad_steps=3")
    before = {k: v.clone() for k, v in exp.model.state_dict().items()}
    exp.objective.t_distribution.sample = lambda *a, **k: torch.full((64,), float("nan"), dtype=torch.float64)
    tr = Trainer(exp, tmp_path, progress=False)
    with pytest.warns(UserWarning, match="non-finite loss"), pytest.raises(NonFiniteError, match="3 non-finite losses"):
        tr.fit()
    assert all(torch.equal(v, before[k]) for k, v in exp.model.state_dict().items())


@pytest.mark.parametrize("clip", ["1.0", "null"])
def test_a_non_finite_gradient_with_a_finite_loss_is_skipped(tmp_path, clip):
    tr = Trainer(experiment(f"train.grad_clip={clip}"), tmp_path, progress=False)
    before = {k: v.clone() for k, v in tr.unwrapped().state_dict().items()}
    first = next(tr.unwrapped().parameters())
    first.register_hook(lambda g: g * float("inf"))
    assert math.isnan(tr.train_step())
    assert all(torch.equal(v, before[k]) for k, v in tr.unwrapped().state_dict().items())
    assert all(p.grad is None for p in tr.unwrapped().parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_gradients_finite_finds_any_non_finite_element_and_changes_no_value(bad):
    from genlab.training.steps import gradients_finite

    grads = [torch.tensor([1.5, -0.0, 3e38, 1e-45]), torch.randn(3, 4, dtype=torch.float64),
             torch.randn(5).to(torch.bfloat16), torch.randn(2, 2, dtype=torch.float16)]
    if bad is not None:
        grads[2][3] = bad
    before = [g.clone() for g in grads]
    assert gradients_finite(grads) is (bad is None)
    assert all(torch.equal(g, b) or (torch.isnan(b).any() and torch.equal(g.isnan(), b.isnan()))
               for g, b in zip(grads, before))
    assert torch.equal(grads[0].signbit(), before[0].signbit()) and gradients_finite([])


def test_gradients_finite_without_the_fused_kernel_reads_the_norm(monkeypatch):
    from genlab.training.steps import gradients_finite

    def missing(*args):
        raise NotImplementedError("no kernel")

    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", missing)
    assert gradients_finite([torch.ones(3), torch.zeros(2)])
    assert not gradients_finite([torch.ones(3), torch.tensor([0.0, float("nan")])])


def test_resume_hashes_the_checkpoint_once_and_a_run_that_slipped_in_is_refused(tmp_path, monkeypatch):
    """The Trainer checks the run directory before and again under its lock; the checkpoint's files are
    hashed in the first check only, unless the checkpoints changed in between: then a fresh run finds the
    directory taken, a resumed one a newer checkpoint it did not check."""
    import shutil

    from genlab.core import checkpoint as ckpt_module
    from genlab.core.errors import RunDirError
    from genlab.training import trainer as trainer_module

    args = ("train.steps=2", "train.checkpoint_every=2", "train.sample_every=0")
    with Trainer(experiment(*args), tmp_path / "run", progress=False) as tr:
        tr.fit()
    hashed: list[str] = []
    real = ckpt_module._size_and_sha256
    monkeypatch.setattr(ckpt_module, "_size_and_sha256", lambda path, *a: hashed.append(path.name) or real(path, *a))
    with Trainer(experiment(*args), tmp_path / "run", progress=False, resume=True) as tr:
        assert tr.resumed_from.name == "step_0000002"
    assert sorted(hashed) == sorted(set(hashed)) and "model.safetensors" in hashed

    real_lock = trainer_module.RunLock

    def slipped_in(out, **kwargs):  # another run writes before this one takes the lock
        if not (out / "checkpoints").is_dir():
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text("name: other\n")
        else:
            shutil.copytree(out / "checkpoints" / "step_0000002", out / "checkpoints" / "step_0000004")
        return real_lock(out, **kwargs)

    monkeypatch.setattr(trainer_module, "RunLock", slipped_in)
    with pytest.raises(RunDirError):
        Trainer(experiment(*args), tmp_path / "fresh", progress=False)
    with pytest.raises(GenlabError, match="another run wrote .*step_0000004 while this one started"):
        Trainer(experiment(*args), tmp_path / "run", progress=False, resume=True)


def test_stored_pins_come_from_the_newest_intact_config_without_hashing_weights(tmp_path, monkeypatch):
    import hashlib
    import json

    import yaml

    from genlab.core import checkpoint as ckpt_module
    from genlab.training.resume import with_stored_pins

    with Trainer(experiment("train.steps=4", "train.checkpoint_every=2", "train.sample_every=0"), tmp_path,
                 progress=False) as tr:
        tr.fit()
    old, new = tmp_path / "checkpoints" / "step_0000002", tmp_path / "checkpoints" / "step_0000004"
    pins = {"runs/teacher": {"checkpoint": "step_0000100", "state_sha256": "ab" * 32}}
    config = {**yaml.safe_load((old / "config.yaml").read_text()), "pinned": pins}
    data = yaml.safe_dump(config).encode()
    (old / "config.yaml").write_bytes(data)  # pins in the older checkpoint, its checksum kept right
    state = json.loads((old / "state.json").read_text())
    state["files"]["config.yaml"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (old / "state.json").write_text(json.dumps(state))
    with open(new / "config.yaml", "ab") as f:  # the newest one's config damaged
        f.write(b"# damaged\n")
    hashed: list[str] = []
    real = ckpt_module._size_and_sha256
    monkeypatch.setattr(ckpt_module, "_size_and_sha256", lambda path, *a: hashed.append(path.name) or real(path, *a))
    assert with_stored_pins({"name": "x"}, tmp_path) == {"name": "x", "pinned": pins}
    assert hashed == ["config.yaml", "config.yaml"]
    assert with_stored_pins({"pinned": {}}, tmp_path) == {"pinned": {}}  # a config that pins its own


def test_loss_curve_and_periodic_samples(tmp_path):
    tr = Trainer(experiment("train.steps=40", "train.log_every=10", "train.sample_every=20",
                            "train.checkpoint_every=40"), tmp_path, progress=False)
    tr.fit()
    assert (tmp_path / "loss.png").stat().st_size > 5000
    assert (tmp_path / "samples" / "step_0000020.png").is_file() and len(tr.losses) == 4


def genlab_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("genlab")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "genlab.cli"]


def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path):
    args = [*genlab_cmd(), "train", str(CONFIG), *TINY, "train.steps=400", "train.checkpoint_every=40",
            "--quiet"]
    subprocess.run([*args, "--out", str(tmp_path / "full")], check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while latest_checkpoint(tmp_path / "killed") is None or latest_checkpoint(tmp_path / "killed").name < "step_0000120":
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped = latest_checkpoint(tmp_path / "killed").name
    assert stopped < "step_0000400"
    subprocess.run([*args, "--out", str(tmp_path / "killed"), "--resume"], check=True, capture_output=True,
                   timeout=300)
    a = load_weights(latest_checkpoint(tmp_path / "full") / "model.safetensors")
    b = load_weights(latest_checkpoint(tmp_path / "killed") / "model.safetensors")
    assert latest_checkpoint(tmp_path / "killed").name == "step_0000400"
    assert all(torch.equal(a[k], b[k]) for k in a), f"killed at {stopped}"


DDP_SCRIPT = """
import sys, torch
from genlab.core.config import load_config
from genlab.training import Experiment, Trainer
exp = Experiment.from_config(load_config(sys.argv[1], sys.argv[3:]))
tr = Trainer(exp, sys.argv[2], progress=False)
for _ in range(5):
    tr.train_step(); tr.step += 1
flat = torch.cat([p.detach().flatten() for p in tr.unwrapped().parameters()])
print(f"RANK {tr.acc.process_index} OF {tr.acc.num_processes} SUM {flat.double().sum().item():.12e} "
      f"FIRST {flat[:3].tolist()}", flush=True)
"""


def test_ddp_ranks_hold_identical_weights(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate launcher not installed")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port for the rendezvous, so parallel runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # on a machine without GPUs, --multi_gpu starts torchrun and the Accelerator picks gloo on the
    # CPU; `accelerate launch --cpu --num_processes 2` would start a single process
    res = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--main_process_port", str(port),
                          "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(CONFIG),
                          str(tmp_path / "run"), *TINY], capture_output=True, text=True, timeout=300, env=env)
    ranks = dict(re.findall(r"RANK (\d) OF 2 SUM (\S+)", res.stdout))  # the ranks' lines may interleave
    assert sorted(ranks) == ["0", "1"], res.stdout + res.stderr
    assert ranks["0"] == ranks["1"], ranks


def test_digits_job_in_bf16_reports_classifier_metrics(tmp_path, capsys):
    """The image path end to end, tiny: class-conditional UNet, bf16 autocast through accelerate,
    a grid with one row per digit, classifier accuracy, Frechet distance and the confident fraction
    of the samples next to that of the held-out test digits."""
    from genlab.cli import main

    code = main(["train", str(ROOT / "configs" / "digits.yaml"), "model.channels=8", "model.channel_mult=[1]",
                 "model.attention_levels=[]", "model.norm_groups=4", "train.steps=3", "train.batch_size=8",
                 "train.eval_samples=20", "train.mixed_precision=bf16", "sampler.steps=2", "--out", str(tmp_path),
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "digits classifier accuracy on the requested labels" in out and "Frechet distance" in out
    assert "classified as some digit with probability > 0.9" in out
    import json

    metrics = json.loads((tmp_path / "samples.json").read_text())
    assert 0.0 <= metrics["classifier_accuracy"] <= 1.0 and metrics["frechet_distance"] > 0
    assert 0.0 <= metrics["confident_fraction"] <= 1.0
    assert metrics["confident_fraction_data"] > 0.9  # the test split: real digits, mostly classified with p > 0.9
    assert (tmp_path / "samples.png").stat().st_size > 5000


def test_tensorboard_logs_or_says_what_is_missing(tmp_path):
    exp = experiment("train.steps=4", "train.log_every=2", "train.tensorboard=true")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(GenlabError, match="needs the tensorboard package"):
            Trainer(exp, tmp_path, progress=False)
        return
    tr = Trainer(exp, tmp_path, progress=False)
    tr.fit()
    tr.writer.flush()
    assert any((tmp_path / "tensorboard").iterdir())


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tmp_path):
    """train.compile: torch.compile gives the same first steps (to float tolerance)."""
    runs = {}
    for flag in ("false", "true"):
        tr = Trainer(experiment("train.steps=3", f"train.compile={flag}", "train.grad_clip=null"), tmp_path / flag,
                     progress=False)
        runs[flag] = [tr.train_step() for _ in range(3)]
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-4)


@pytest.mark.slow
def test_resume_under_compile_continues_the_run(tmp_path):
    """train.compile with --resume: the checkpoint loads into the uncompiled module and the resumed run
    ends with the weights of an uninterrupted compiled run (to float tolerance)."""
    args = ("train.steps=4", "train.compile=true", "train.checkpoint_every=2", "train.sample_every=0")
    whole = Trainer(experiment(*args), tmp_path / "whole", progress=False)
    whole.fit()
    half = Trainer(experiment(*args[1:], "train.steps=2"), tmp_path / "split", progress=False)
    half.fit()
    resumed = Trainer(experiment(*args), tmp_path / "split", progress=False, resume=True)
    assert resumed.resumed_from is not None and resumed.step == 2
    resumed.fit()
    for (name, a), b in zip(whole.unwrapped().state_dict().items(), resumed.unwrapped().state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
