"""A run built on another run (a student on its teacher) pins the teacher's checkpoint: its config stores
``pinned:``, sampling it and resuming it load that checkpoint even after the teacher's run went on training,
and a pinned checkpoint that is gone or changed is refused with a clear error, never replaced."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from genlab.cli import main
from genlab.core.checkpoint import latest_checkpoint, load_weights
from genlab.core.config import load_config
from genlab.core.errors import ConfigError, GenlabError
from genlab.training import Experiment

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.hidden=16", "model.depth=1", "data.n=300", "train.batch_size=16", "train.eval_samples=50",
        "train.warmup_steps=1", "sampler.type=ddim", "sampler.steps=4", "sampler.grid=uniform"]


def test_a_student_keeps_the_teacher_checkpoint_it_was_built_on(tmp_path, capsys):
    config = str(ROOT / "configs" / "toy2d.yaml")
    teacher = tmp_path / "teacher"
    assert main(["train", config, *TINY, "objective.prediction=v", "train.steps=4", "train.checkpoint_every=2",
                 "--out", str(teacher), "--quiet"]) == 0
    first = latest_checkpoint(teacher)  # step_0000004
    distill = [*TINY, "objective.type=progressive_distillation", f"objective.teacher={teacher}",
               "objective.student_steps=2", "sampler.steps=2", "train.checkpoint_every=2"]
    student = tmp_path / "student"
    assert main(["train", config, *distill, "train.steps=2", "--out", str(student), "--quiet"]) == 0
    stored = load_config(latest_checkpoint(student) / "config.yaml")["pinned"]
    assert list(stored) == [str(teacher)] and stored[str(teacher)]["checkpoint"] == first.name

    # the teacher's run goes on: its newest checkpoint is now another one, with other weights
    assert main(["train", config, *TINY, "objective.prediction=v", "train.steps=8", "train.checkpoint_every=2",
                 "--out", str(teacher), "--resume", "--quiet"]) == 0
    newest = latest_checkpoint(teacher)
    assert newest != first
    first_ema, newest_ema = (load_weights(c / "ema.safetensors") for c in (first, newest))
    assert not all(torch.equal(first_ema[k], newest_ema[k]) for k in first_ema)

    # built from the student's stored config, the teacher is the pinned checkpoint, not the newest
    exp = Experiment.from_config(load_config(latest_checkpoint(student) / "config.yaml"))
    assert exp.pins.used[str(teacher)]["checkpoint"] == first.name
    teacher_model = exp.objective.modules()["teacher"]
    got = {k: v for k, v in teacher_model.state_dict().items()}
    assert all(torch.equal(got[k], first_ema[k]) for k in first_ema)
    student_init = exp.model.state_dict()  # a student starts from its teacher's (pinned) weights too
    assert all(torch.equal(student_init[k], first_ema[k]) for k in first_ema)
    # a fresh config (no pins) takes the newest, as before
    fresh = Experiment.from_config(load_config(config, distill))
    assert fresh.pins.used[str(teacher)]["checkpoint"] == newest.name

    # resuming the student keeps its pin (the newest teacher would have changed what it learns)
    code = main(["train", config, *distill, "train.steps=4", "--out", str(student), "--resume", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert load_config(latest_checkpoint(student) / "config.yaml")["pinned"] == stored
    capsys.readouterr()

    # a pinned checkpoint that changed or is gone: a clear error naming it, nothing else loaded
    state = first / "state.json"
    original = state.read_bytes()
    state.write_bytes(original.replace(b"{", b"{ ", 1))
    with pytest.raises(GenlabError, match=f"{first.name}.*has changed"):
        Experiment.from_config(load_config(latest_checkpoint(student) / "config.yaml"))
    shutil.rmtree(first)
    code = main(["sample", str(student), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and f"{first.name}" in err and "is missing" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_a_malformed_pinned_section_is_a_config_error():
    with pytest.raises(ConfigError, match=r"pinned\.runs/x: expected \{checkpoint: NAME, state_sha256: HEX\}"):
        Experiment.from_config(load_config(ROOT / "configs" / "toy2d.yaml", ["pinned={runs/x: step_1}"]))
