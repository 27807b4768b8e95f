"""The command line: config errors in one or two lines with exit code 2, a tiny end-to-end run,
sampling from it, and an exact resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genlab.cli import main
from genlab.core.checkpoint import latest_checkpoint, load_weights

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy2d.yaml"
TINY = ["train.steps=40", "train.checkpoint_every=20", "train.eval_samples=500", "train.batch_size=64",
        "model.hidden=32", "model.depth=1", "data.n=2000", "sampler.steps=5"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("override, message", [
    ("model.hiden=3", "toy2d.yaml: model.hiden: unknown key; did you mean 'hidden'?"),
    ("train.lr=abc", "toy2d.yaml: train.lr: expected float > 0, got str 'abc'"),
    ("model.type=mlpp", "toy2d.yaml: model.type: unknown model 'mlpp'; did you mean 'mlp'?"),
    ("sampler.type=dpm_solver", "toy2d.yaml: sampler.type: unknown sampler 'dpm_solver'; did you mean 'dpm_solver_pp'?"),
    ("trian.lr=1", "toy2d.yaml: trian: unknown key; did you mean 'train'?"),
    ("sampler.grid.type=karas", "toy2d.yaml: sampler.grid.type: unknown grid 'karas'; did you mean 'karras'?"),
])
def test_config_errors_are_short_and_exit_2(capsys, tmp_path, override, message):
    code, out, err = run_cli(capsys, "train", str(CONFIG), override, "--out", str(tmp_path / "run"))
    assert code == 2
    assert err.strip().startswith(f"genlab: error: {message}"), err
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2 and err.strip() == f"genlab: error: {tmp_path / 'nope.yaml'}: no such config file"


def test_sample_from_missing_run(capsys, tmp_path):
    code, _, err = run_cli(capsys, "sample", str(tmp_path))
    assert code == 2 and "not a run directory" in err


def test_list_shows_components(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for name in ("dpm_solver_pp", "heun", "ddim", "ddpm", "euler", "flow_euler", "vp", "rectified_flow", "karras",
                 "mlp", "toy2d", "denoising", "flow_matching"):
        assert f"  {name} " in out


def test_train_sample_and_exact_resume(capsys, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", str(CONFIG), *TINY, "--out", str(run), "--quiet")
    assert code == 0, err
    assert (run / "samples.png").stat().st_size > 10_000 and (run / "samples.json").is_file()
    assert "sliced Wasserstein-2 to held-out data" in out
    final = load_weights(latest_checkpoint(run) / "model.safetensors")
    # a run killed after its step-20 checkpoint and resumed ends with the same weights
    shutil.rmtree(run / "checkpoints" / "step_0000040")
    code, out, err = run_cli(capsys, "train", str(CONFIG), *TINY, "--out", str(run), "--resume", "--quiet")
    assert code == 0 and "resuming" in out, err
    resumed = load_weights(latest_checkpoint(run) / "model.safetensors")
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    code, out, err = run_cli(capsys, "sample", str(run), "sampler.type=heun", "sampler.steps=4",
                             "--out", str(tmp_path / "s"))
    assert code == 0 and (tmp_path / "s" / "samples-heun-4steps-seed1234.png").is_file(), err
    # sampled from an earlier checkpoint, the report names that checkpoint's step (not the config's end)
    code, out, err = run_cli(capsys, "sample", str(run / "checkpoints" / "step_0000020"), "--out", str(tmp_path / "e"))
    reports = list((tmp_path / "e").glob("samples-*.json"))
    assert code == 0 and len(reports) == 1 and json.loads(reports[0].read_text())["step"] == 20, err


def test_train_on_a_rank_that_is_not_the_main_one_reports_nothing(capsys, tmp_path, monkeypatch):
    """Under DDP only the main process samples: ``evaluate`` returns {} on the others, and ``genlab
    train`` there ends with exit code 0 and no report (it failed with KeyError 'image')."""
    from genlab.training import Trainer

    monkeypatch.setattr(Trainer, "evaluate", lambda self, *a, **k: {})
    code, out, err = run_cli(capsys, "train", str(CONFIG), *TINY, "train.steps=2", "--out", str(tmp_path),
                             "--quiet")
    assert code == 0, err
    assert "samples:" not in out and latest_checkpoint(tmp_path).name == "step_0000002"


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("genlab")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "genlab.cli"]
    res = subprocess.run([*cmd, "train", str(CONFIG), "model.chanels=3"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == "genlab: error: toy2d.yaml: model.chanels: unknown key"
