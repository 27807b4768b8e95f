"""Runs that never lose work: run directories owned by one run, kills during checkpoint and sample
writes, damaged checkpoints, a second run on a locked directory, stale locks, divergence, full disks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import snapshot_files
from safetensors.torch import load_file

from genlab.cli import main
from genlab.core import io
from genlab.core.checkpoint import latest_checkpoint, load_state, load_weights, save_checkpoint
from genlab.core.config import load_config
from genlab.core.errors import NonFiniteError
from genlab.core.rundir import RunLock

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy2d.yaml"
TINY = ["train.steps=4", "train.checkpoint_every=2", "train.eval_samples=100", "train.batch_size=32",
        "train.warmup_steps=1", "model.hidden=16", "model.depth=1", "data.n=500", "sampler.steps=3"]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train(capsys, out: Path, *extra: str) -> tuple[int, str, str]:
    return cli(capsys, "train", CONFIG, *TINY, *extra, "--out", out, "--quiet")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run (checkpoints at steps 2 and 4); tests copy it before changing anything."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", str(CONFIG), *TINY, "--out", str(run), "--quiet"]) == 0
    return run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("genlab: warning:")]
    assert len(lines) == 1 and lines[0].startswith("genlab: error: ") and "Traceback" not in err, err
    assert fragment in lines[0], err


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_weights(latest_checkpoint(run) / "model.safetensors")


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- one run per directory -------------------------------------------------------------------------------

def test_a_fresh_run_refuses_a_directory_holding_a_run(capsys, run):
    before = snapshot_files(run)
    code, _, err = train(capsys, run)
    one_line_error(code, err, "holds a run with checkpoints; continue it with --resume")
    assert snapshot_files(run) == before


def test_a_fresh_run_refuses_a_non_empty_directory(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = train(capsys, tmp_path)
    one_line_error(code, err, "not empty (notes.txt)")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_without_out_a_fresh_run_takes_the_next_free_name(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "toy2d").mkdir(parents=True)
    (tmp_path / "runs" / "toy2d" / "x").write_text("taken")
    code, out, err = cli(capsys, "train", CONFIG, *TINY, "--quiet")
    assert code == 0, err
    assert "-> runs/toy2d-2" in out and latest_checkpoint(tmp_path / "runs" / "toy2d-2") is not None


@pytest.mark.parametrize("make, fragment", [
    (lambda d: None, "no such run directory to resume"),
    (lambda d: d.mkdir(), "holds no checkpoint to resume from"),
])
def test_resume_needs_a_checkpoint(capsys, tmp_path, make, fragment):
    make(tmp_path / "r")
    code, _, err = train(capsys, tmp_path / "r", "--resume")
    one_line_error(code, err, fragment)


@pytest.mark.parametrize("override, fragment", [
    ("train.lr=abc", "train.lr: expected float > 0, got str 'abc'"),
    ("model.hidden=24", "--resume: model.hidden is 16 in the run"),
    ("train.lr=1e-2", "--resume: train.lr is 0.002 in the run"),
    ("data.name=moons", "--resume: data.name is 'eight_gaussians' in the run"),
    ("objective.prediction=x0", "--resume: objective.prediction is 'eps' in the run"),
])
def test_a_failed_resume_writes_nothing(capsys, run, override, fragment):
    before = snapshot_files(run)
    code, _, err = train(capsys, run, override, "--resume")
    one_line_error(code, err, fragment)
    assert snapshot_files(run) == before


def test_resume_may_extend_a_run_and_change_what_it_logs(capsys, run):
    code, out, err = train(capsys, run, "train.steps=6", "train.log_every=3", "sampler.steps=2", "--resume")
    assert code == 0, err
    assert "resuming" in out and latest_checkpoint(run).name == "step_0000006"


def test_a_second_run_is_refused_and_the_lock_of_a_killed_run_is_stale(capsys, tmp_path):
    """A real run holds its directory: a second run (fresh or --resume) and sampling into it are refused;
    once the first is killed with SIGKILL, --resume takes the directory over."""
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "genlab.cli", "train", str(CONFIG), *TINY, "train.steps=100000",
                              "train.checkpoint_every=5", "--out", str(run), "--quiet"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while latest_checkpoint(run) is None:
            assert first.poll() is None and time.time() < deadline, "the first run ended or never checkpointed"
            time.sleep(0.05)
        code, _, err = train(capsys, run)
        one_line_error(code, err, "holds a run with checkpoints")  # a fresh run: refused before the lock
        code, _, err = train(capsys, run, "--resume")
        one_line_error(code, err, f"in use by another genlab process (pid {first.pid}")
        code, _, err = cli(capsys, "sample", run)  # sampling into the run's directory waits its turn too
        one_line_error(code, err, f"in use by another genlab process (pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed run's lock is stale: --resume takes the directory over (and, at its step count, only evaluates)
    code, out, err = train(capsys, run, "train.steps=5", "train.checkpoint_every=5", "--resume")
    assert code == 0 and "resuming" in out, err


def test_the_lock_is_held_for_the_trainer_lifetime(tmp_path):
    with RunLock(tmp_path / "r") as lock:
        assert lock.held
        with pytest.raises(Exception, match="in use by another genlab process"):
            RunLock(tmp_path / "r")
    assert not lock.held
    RunLock(tmp_path / "r").release()


# ---- kills during writes ---------------------------------------------------------------------------------

KILLER = textwrap.dedent("""
    import os, signal, sys
    from contextlib import contextmanager
    import torch
    import genlab.core.io as io
    torch.set_num_threads(1)  # as the tests in this process: the same reductions, bit for bit
    real = io.atomic_open
    marker = sys.argv[1]

    @contextmanager
    def dying(path):
        with real(path) as f:
            yield f
            if all(part in str(path) for part in marker.split("+")):
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)  # the data is written, the file not yet renamed

    io.atomic_open = dying
    from genlab.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def killed(marker: str, *argv: object) -> None:
    res = subprocess.run([sys.executable, "-c", KILLER, marker, *map(str, argv)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr


def test_kill_during_a_checkpoint_write_then_resume_is_exact(capsys, finished, tmp_path):
    run = tmp_path / "killed"
    killed("step_0000004+optimizer.pt", "train", CONFIG, *TINY, "--out", run, "--quiet")
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers and all(".step_0000004.tmp-" in n for n in leftovers)  # killed inside the write
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step_0000002"]
    code, out, err = train(capsys, run, "--resume")
    assert code == 0 and "from step_0000002" in out, err
    assert not [p for p in run.rglob(".*") if ".tmp" in p.name]  # the killed write's directory is gone
    assert same_weights(weights(run), weights(finished))


def test_kill_during_a_sample_write_keeps_the_earlier_file(capsys, run):
    code, _, err = cli(capsys, "sample", run, "sampler.steps=2")
    assert code == 0, err
    name = "samples-dpm_solver_pp-2steps-seed1234"
    first = (run / f"{name}.png").read_bytes()
    killed(f"{name}.png", "sample", run, "sampler.steps=2", "--seed", "1234", "--n", "50")
    assert (run / f"{name}.png").read_bytes() == first  # the old picture, whole
    assert [p.name for p in run.glob(f".{name}.png.*.tmp")]  # the killed write's temporary file
    code, _, err = cli(capsys, "sample", run, "sampler.steps=3")
    assert code == 0, err
    assert not list(run.glob(".*.tmp"))  # whoever takes the run's lock next cleans it


# ---- damaged checkpoints ---------------------------------------------------------------------------------

def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file, fragment", [
    (truncate, "model.safetensors", "written (truncated?)"),
    (flip_bit, "ema.safetensors", "checksum mismatch"),
    (flip_bit, "optimizer.pt", "checksum mismatch"),
    (lambda p: p.write_text("{"), "state.json", "unreadable"),
])
def test_a_damaged_newest_checkpoint_falls_back_or_fails_clearly(capsys, run, damage, file, fragment):
    newest = run / "checkpoints" / "step_0000004"
    damage(newest / file)
    code, out, err = cli(capsys, "sample", run, "--out", run.parent / "s")
    assert code == 0, err
    assert "genlab: warning: damaged checkpoint passed over" in err and fragment in err and "step_0000002" in err
    code, _, err = cli(capsys, "sample", newest, "--out", run.parent / "s")  # named directly: no fall-back
    one_line_error(code, err, fragment)
    assert str(newest / file) in err


def test_resume_from_a_run_with_a_damaged_newest_checkpoint_is_exact(capsys, run, finished):
    flip_bit(run / "checkpoints" / "step_0000004" / "model.safetensors")
    code, out, err = train(capsys, run, "--resume")
    assert code == 0 and "from step_0000002" in out, err
    assert same_weights(weights(run), weights(finished))


def test_every_checkpoint_damaged_is_an_error_naming_the_newest(capsys, run):
    for ckpt in (run / "checkpoints").iterdir():
        truncate(ckpt / "model.safetensors")
    before = snapshot_files(run)
    code, _, err = train(capsys, run, "--resume")
    one_line_error(code, err, "every checkpoint is damaged; the newest: ")
    assert "step_0000004/model.safetensors" in err and snapshot_files(run) == before


def test_a_checkpoint_written_before_checksums_still_loads(capsys, run):
    state_file = run / "checkpoints" / "step_0000004" / "state.json"
    state = json.loads(state_file.read_text())
    del state["files"]
    state_file.write_text(json.dumps(state))
    code, _, err = cli(capsys, "sample", run, "--out", run.parent / "s")
    assert code == 0 and "warning" not in err, err


def test_a_state_dict_that_does_not_fit_the_model_names_the_tensor(capsys, run):
    code, _, err = cli(capsys, "sample", run, "model.hidden=24", "--out", run.parent / "s")
    one_line_error(code, err, "in the file and [24, 128] in the model")
    assert "ema.safetensors" in err and "in the file and" in err


# ---- non-finite values -----------------------------------------------------------------------------------

def test_a_diverging_run_stops_and_leaves_only_finite_checkpoints(capsys, tmp_path):
    code, _, err = train(capsys, tmp_path / "r", "train.lr=1e6", "train.steps=60", "train.checkpoint_every=3",
                         "train.max_bad_steps=4")
    one_line_error(code, err, "4 non-finite losses or gradients in a row")
    assert "the newest checkpoint is" in err
    ckpts = list((tmp_path / "r" / "checkpoints").iterdir())
    assert ckpts
    for ckpt in ckpts:
        for name in ("model.safetensors", "ema.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(ckpt / name).values())
    assert not (tmp_path / "r" / "samples.png").exists()


def test_a_non_finite_weight_is_never_checkpointed(tmp_path):
    with pytest.raises(NonFiniteError, match="model: w"):
        save_checkpoint(tmp_path / "step_1", model={"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(NonFiniteError, match="optimizer: state.0.exp_avg"):
        save_checkpoint(tmp_path / "step_1", model={"w": torch.ones(2)},
                        optimizer={"state": {0: {"exp_avg": torch.tensor([float("inf")])}}})
    assert list(tmp_path.iterdir()) == []


def test_sampling_that_ends_non_finite_exits_2_and_writes_nothing(capsys, run):
    ckpt = run / "checkpoints" / "step_0000004"
    ema = {k: v * 1e30 if v.ndim == 2 else v for k, v in load_weights(ckpt / "ema.safetensors").items()}
    save_checkpoint(run / "checkpoints" / "step_0000005", model=ema, ema=ema,  # huge, finite: overflows
                    config=load_config(ckpt / "config.yaml"), state=load_state(ckpt))
    code, _, err = cli(capsys, "sample", run / "checkpoints" / "step_0000005", "--out", run.parent / "s")
    one_line_error(code, err, "non-finite")
    assert not list((run.parent / "s").glob("*.png"))


# ---- full disk -------------------------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads the path of a descriptor from /proc")
def test_a_full_disk_is_one_line_and_keeps_the_old_file(capsys, run, monkeypatch):
    name = "samples-dpm_solver_pp-3steps-seed1234"
    assert cli(capsys, "sample", run)[0] == 0
    before = snapshot_files(run)

    fsync = os.fsync

    def full(fd: int) -> None:  # the disk fills while the samples are written
        if "samples" in os.readlink(f"/proc/self/fd/{fd}") or full.always:
            raise OSError(28, os.strerror(28))
        fsync(fd)

    full.always = False
    monkeypatch.setattr(io.os, "fsync", full)
    code, _, err = cli(capsys, "sample", run)
    one_line_error(code, err, f"cannot write {run / name}")
    assert "No space left on device" in err
    assert {k: v for k, v in snapshot_files(run).items() if k != ".genlab.owner"} == \
        {k: v for k, v in before.items() if k != ".genlab.owner"}
    full.always = True
    code, _, err = train(capsys, run.parent / "fresh")
    one_line_error(code, err, "No space left on device")


def test_resume_is_exact_with_dropout_drawn_from_the_global_generator(capsys, tmp_path):
    """Dropout and class dropout draw from torch's global generator; the trainer seeds it per step."""
    extra = ["model.dropout=0.3"]
    assert train(capsys, tmp_path / "whole", *extra)[0] == 0
    assert train(capsys, tmp_path / "split", *extra, "train.steps=2")[0] == 0
    torch.manual_seed(12345)  # whatever state the process is in
    code, _, err = train(capsys, tmp_path / "split", *extra, "--resume")
    assert code == 0, err
    assert same_weights(weights(tmp_path / "whole"), weights(tmp_path / "split"))
