"""``genlab distill``: progressive-distillation rounds (Salimans & Ho 2022), each round's teacher the
previous round's student, each round a run of its own; an interrupted distillation resumes exactly;
bad usage is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import snapshot_files

import genlab.testing.toy_objectives  # noqa: F401  (registers toy_gan)
from genlab.cli import main
from genlab.core.checkpoint import latest_checkpoint, load_weights
from genlab.core.config import load_config
from genlab.training import Experiment

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "toy2d.yaml")
TINY = ["model.hidden=16", "model.depth=1", "data.n=300", "train.batch_size=16", "train.eval_samples=50",
        "train.warmup_steps=1"]
ROUND = ["train.steps=4", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny v-prediction run sampled with 4 DDIM steps on the uniform grid."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["train", CONFIG, *TINY, "objective.prediction=v", "sampler.type=ddim", "sampler.steps=4",
                 "train.steps=2", "--out", str(run), "--quiet"]) == 0
    return run


@pytest.fixture(scope="module")
def rounds(teacher, tmp_path_factory) -> Path:
    """Two rounds from the run: 2-step then 1-step students."""
    out = tmp_path_factory.mktemp("distill") / "out"
    assert main(["distill", str(teacher), *TINY, *ROUND, "--rounds", "2", "--out", str(out), "--quiet"]) == 0
    return out


def ema(run: Path) -> dict[str, torch.Tensor]:
    return load_weights(latest_checkpoint(run) / "ema.safetensors")


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_rounds_teacher_is_the_previous_student(teacher, rounds):
    first, second = (load_config(rounds / f"round_{r}" / "config.yaml") for r in (1, 2))
    assert (first["objective"]["student_steps"], second["objective"]["student_steps"]) == (2, 1)
    assert first["objective"]["teacher"] == str(teacher)
    assert second["objective"]["teacher"] == str(rounds / "round_1")
    assert first["objective"]["grid"] == second["objective"]["grid"] == "uniform"  # the teacher's sampler's grid
    exp = Experiment.from_config(second)
    assert same(exp.objective.teacher_.module.state_dict(), ema(rounds / "round_1"))  # round 1's student
    assert not same(ema(rounds / "round_1"), ema(teacher))
    assert len(exp.objective.times) == 3 and exp.objective.sampling_steps() == 1
    metrics = json.loads((rounds / "round_2" / "samples.json").read_text())
    first_metrics = json.loads((rounds / "round_1" / "samples.json").read_text())
    assert metrics["steps"] == 1 and metrics["sampler"].startswith("DDIM(steps=1")
    (reference,) = metrics["rows"]  # the teacher: round 1's student in its 2 steps, as round 1 reported it
    assert reference["label"] == "teacher" and reference["steps"] == 2
    assert reference["wasserstein2"] == first_metrics["wasserstein2"]


def test_a_config_declares_its_rounds_and_the_summary_lists_them(teacher, tmp_path, capsys):
    config = tmp_path / "pd.yaml"
    config.write_text(f"base: {CONFIG}\nobjective: {{type: progressive_distillation, teacher: {teacher}, "
                      "student_steps: 2}\ndistill: {rounds: 2}\n")
    capsys.readouterr()
    assert main(["distill", str(config), *TINY, "train.steps=1", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == ["round_1", "round_2"]
    summary = out[out.index("the students next to the first teacher"):].splitlines()[2:]
    assert [line.split()[:2] for line in summary] == [["teacher", "4"], ["round", "1"], ["round", "2"]]
    assert [line.split()[2] for line in summary[1:]] == ["2", "1"]
    assert "distill" not in load_config(tmp_path / "out" / "round_1" / "config.yaml")


def test_an_interrupted_distillation_resumes_exactly(teacher, rounds, tmp_path, capsys):
    """Killed in round 1 after its first checkpoint, and in round 2 before any: ``--resume`` continues
    round 1 from step 2 and trains round 2 again; the weights equal the uninterrupted run's bit for bit.
    A finished round is skipped."""
    out = tmp_path / "out"
    shutil.copytree(rounds, out)
    shutil.rmtree(out / "round_1" / "checkpoints" / "step_0000004")
    for f in (out / "round_1").glob("samples*"):
        f.unlink()
    shutil.rmtree(out / "round_2")
    (out / "round_2").mkdir()
    shutil.copy(rounds / "round_2" / "config.yaml", out / "round_2" / "config.yaml")  # written before step 1
    capsys.readouterr()
    assert main(["distill", str(teacher), *TINY, *ROUND, "--rounds", "2", "--out", str(out), "--resume",
                 "--quiet"]) == 0
    assert "(resumed)" in capsys.readouterr().out
    for r in ("round_1", "round_2"):
        for file in ("model.safetensors", "ema.safetensors"):
            assert same(load_weights(latest_checkpoint(rounds / r) / file), load_weights(latest_checkpoint(out / r) / file))
    before = snapshot_files(out)
    assert main(["distill", str(teacher), *TINY, *ROUND, "--rounds", "2", "--out", str(out), "--resume",
                 "--quiet"]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    assert {k: v for k, v in snapshot_files(out).items() if ".genlab" not in k} == {
        k: v for k, v in before.items() if ".genlab" not in k}


@pytest.fixture(scope="module")
def gan(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("gan") / "run"
    assert main(["train", CONFIG, *TINY, "objective.type=toy_gan", "train.steps=2", "--out", str(run), "--quiet"]) == 0
    return run


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing"], "distill: {tmp}/missing: no such config file or run directory"),
    (["{tmp}/missing.yaml"], "missing.yaml: no such config file"),
    (["{teacher}", "--rounds", "0"], "argument --rounds: expected an integer >= 1, got 0"),
    (["{teacher}", "distill.rounds=0"], "distill.rounds: expected int >= 1, got int 0"),
    (["{teacher}", "distill=2"], "distill: expected a mapping of distillation settings, got int 2"),
    (["{teacher}", "--rounds", "3", "objective.student_steps=2"], "2 steps are not divisible by 4"),
    (["{gan}"], "was trained with objective ToyGAN, which trains no denoiser"),
    ([CONFIG], "objective: genlab distill needs objective type progressive_distillation, got 'denoising'"),
    (["{teacher}", "train.eval_steps=[0]"], "train.eval_steps[0]: expected int >= 1, got int 0"),
    (["{teacher}", "--resume"], "no such run directory to resume"),
])
def test_bad_usage_is_one_line_and_writes_nothing(teacher, gan, tmp_path, capsys, args, message):
    places = {"{teacher}": str(teacher), "{gan}": str(gan), "{tmp}": str(tmp_path)}
    args = [places.get(a, a.replace("{tmp}", str(tmp_path))) for a in args]
    runs = {run: snapshot_files(run) for run in (teacher, gan)}
    capsys.readouterr()
    assert main(["distill", *args, "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("genlab: error: ") and message.replace(
        "{tmp}", str(tmp_path)) in err, err
    assert not (tmp_path / "new").exists()
    assert all(snapshot_files(run) == files for run, files in runs.items())


def test_a_fresh_distillation_needs_an_empty_directory(teacher, rounds, capsys):
    before = snapshot_files(rounds)
    assert main(["distill", str(teacher), *TINY, *ROUND, "--rounds", "2", "--out", str(rounds)]) == 2
    assert "not empty (round_1, round_2)" in capsys.readouterr().err
    assert snapshot_files(rounds) == before
