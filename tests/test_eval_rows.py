"""The final evaluation's rows: the objective's references (a distillation's teacher, drawn with its own
sampler and steps) and the model in each of ``train.eval_steps`` steps, in samples.json and as a table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from genlab.cli import main
from genlab.core.config import load_config
from genlab.training import Experiment
from genlab.training.distill import plan_rounds
from genlab.training.evaluation import table

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "toy2d.yaml")
TINY = ["model.hidden=16", "model.depth=1", "data.n=300", "train.batch_size=16", "train.eval_samples=50",
        "train.warmup_steps=1"]
METRICS = ("sliced_wasserstein", "wasserstein2", "sampling_seconds")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["train", CONFIG, *TINY, "train.steps=2", "--out", str(run), "--quiet"]) == 0
    return run


def test_a_distilled_run_reports_its_teacher_and_each_step_count(teacher, tmp_path, capsys):
    """Consistency distillation with ``train.eval_steps=[1, 2, 4]``: a teacher row equal to the teacher
    run's own evaluation (same sampler, steps, seed and weights), one row per step count, the row at the
    sampler's own steps equal to the main evaluation, every value finite; the printed table has one
    line per row."""
    out = tmp_path / "cd"
    cd = [*TINY, "objective.type=consistency_distillation", f"objective.teacher={teacher}", "objective.steps=6",
          "sampler.type=consistency", "sampler.steps=2", "train.steps=2", "train.eval_steps=[1,2,4]"]
    capsys.readouterr()
    assert main(["train", CONFIG, *cd, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    banner = next(line for line in printed.splitlines() if line.startswith("training "))
    assert " on VP(" in banner  # the process a diffusion family trains on
    metrics = json.loads((out / "samples.json").read_text())
    rows = metrics["rows"]
    assert [(r["label"], r["steps"]) for r in rows] == [("teacher", 20), ("model", 1), ("model", 2), ("model", 4)]
    own = json.loads((teacher / "samples.json").read_text())
    assert rows[0]["sampler"] == own["sampler"] and rows[0]["sampler"].startswith("DPMSolverPP(steps=20")
    assert rows[0]["wasserstein2"] == own["wasserstein2"]
    assert rows[0]["sliced_wasserstein"] == own["sliced_wasserstein"]
    assert rows[2]["wasserstein2"] == metrics["wasserstein2"]  # 2 steps: the sampler's own
    assert rows[1]["wasserstein2"] != rows[3]["wasserstein2"]
    assert rows[3]["sampler"].startswith("ConsistencySampler(steps=4")
    for r in rows:
        assert all(math.isfinite(r[k]) for k in METRICS), r
        assert (out / r["image"]).stat().st_size > 10_000
    lines = printed[printed.index("next to the references"):].splitlines()[1:]
    assert lines[0].split() == ["steps", "sliced", "W2", "W2", "sampler"]
    assert [line.split()[:2] for line in lines[1:5]] == [["teacher", "20"], ["model", "1"], ["model", "2"],
                                                         ["model", "4"]]


def test_without_eval_steps_or_a_teacher_there_are_no_rows(teacher):
    assert "rows" not in json.loads((teacher / "samples.json").read_text())


def test_eval_steps_need_a_family_that_samples_in_steps(tmp_path, capsys):
    import genlab.testing.toy_objectives  # noqa: F401  (registers toy_gan, whose sample takes no steps)

    code = main(["train", CONFIG, *TINY, "objective.type=toy_gan", "train.eval_steps=[1]", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "train.eval_steps: objective ToyGAN samples in no number of steps" in err, err
    assert not (tmp_path / "r").exists()


def test_the_table():
    rows = [{"label": "teacher", "steps": 25, "sampler": "DDPM(steps=25)", "classifier_accuracy": 0.98,
             "frechet_distance": 9.834, "confident_fraction": 0.955},
            {"label": "model", "steps": 1, "sampler": "ConsistencySampler(steps=1)", "classifier_accuracy": 0.5,
             "frechet_distance": 120.0, "confident_fraction": 0.25}]
    assert table(rows) == [
        "         steps    accuracy          FD   confident  sampler",
        "teacher     25       98.0%       9.834       95.5%  DDPM(steps=25)",
        "model        1       50.0%     120.000       25.0%  ConsistencySampler(steps=1)",
    ]
    assert table([{"label": "a", "steps": 2, "sampler": "s", "sliced_wasserstein": 0.5}])[1] == (
        "a          2      0.5000  s")


def test_the_few_step_digits_configs_run_from_a_digits_teacher(tmp_path, capsys):
    """``configs/consistency/cd_digits.yaml``, ``ect_digits.yaml`` and ``configs/distill/progressive_digits.yaml`` with a tiny
    teacher (the main job's architecture, 8 channels) and one training step: the table has the teacher
    at its 25 DDPM steps and the student at 1, 2 and 4 steps; the rounds halve 8 steps down to 1."""
    small = ["model.channels=8", "model.channel_mult=[1]", "model.attention_levels=[]", "train.eval_samples=20"]
    teacher = tmp_path / "teacher"
    assert main(["train", str(ROOT / "configs" / "digits.yaml"), *small, "train.steps=1", "--out", str(teacher),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", str(ROOT / "configs" / "consistency" / "cd_digits.yaml"), *small, "train.steps=1",
                 f"objective.teacher={teacher}", "--out", str(tmp_path / "cd"), "--quiet"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("next to the references"):].splitlines()[1:6]
    assert lines[0].split() == ["steps", "accuracy", "FD", "confident", "sampler"]
    assert [line.split()[:2] for line in lines[1:]] == [["teacher", "25"], ["model", "1"], ["model", "2"], ["model", "4"]]
    assert main(["train", str(ROOT / "configs" / "consistency" / "ect_digits.yaml"), *small, "train.steps=1",
                 f"objective.pretrained={teacher}", "--out", str(tmp_path / "ect"), "--quiet"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("sampler"):].splitlines()[1:4]
    assert [line.split()[:2] for line in lines] == [["model", "1"], ["model", "2"], ["model", "4"]]
    config = load_config(ROOT / "configs" / "distill" / "progressive_digits.yaml", [f"objective.teacher={teacher}"])
    plan = plan_rounds(config, tmp_path / "pd", config["distill"]["rounds"])
    assert [r.steps for r in plan] == [8, 4, 2, 1]
    assert Experiment.from_config(load_config(ROOT / "configs" / "distill" / "progressive_digits.yaml",
                                              [*small, f"objective.teacher={teacher}"])).objective.times.numel() == 17
