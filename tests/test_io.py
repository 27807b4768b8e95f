from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from genlab.core import io
from genlab.core.checkpoint import load_optimizer, load_state, load_weights, save_checkpoint
from genlab.core.io import atomic_open, atomic_write, write_json_atomic


def test_atomic_write_writes_text_and_bytes(tmp_path: Path) -> None:
    assert atomic_write(tmp_path / "a.txt", "héllo\n") == tmp_path / "a.txt"
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write(tmp_path / "a.txt", b"\x00\x01")  # replaces the old file
    assert (tmp_path / "a.txt").read_bytes() == b"\x00\x01"
    write_json_atomic(tmp_path / "b.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]  # no temp file left


def test_atomic_write_fsyncs_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    atomic_write(tmp_path / "a.txt", "x")
    assert len(synced) == (1 if os.name == "nt" else 2)  # the file, then its directory after the rename


def test_failed_replace_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_text("old")

    def fail(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a.txt", "new")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "old"


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="serialiser"):
        with atomic_open(tmp_path / "a.bin") as f:
            f.write(b"half")
            raise RuntimeError("serialiser failed")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_files_are_serialised_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file is serialised, written and hashed before the next is serialised: the checkpoint's files
    are never all in memory at once; the recorded checksums are the written files'."""
    from genlab.core import checkpoint

    events: list[str] = []
    real_save, real_write = checkpoint.save, checkpoint.atomic_write
    monkeypatch.setattr(checkpoint, "save", lambda tensors: events.append("serialise") or real_save(tensors))
    monkeypatch.setattr(checkpoint, "_torch_bytes", lambda obj, real=checkpoint._torch_bytes:
                        events.append("serialise") or real(obj))
    monkeypatch.setattr(checkpoint, "atomic_write", lambda path, data: events.append(f"write {path.name}")
                        or real_write(path, data))
    model = {"w": torch.arange(6.0)}
    path = save_checkpoint(tmp_path / "step_1", model=model, ema=model, optimizer={"state": {}},
                           extra={"score.safetensors": model}, config={"a": 1})
    assert events == ["serialise", "write model.safetensors", "serialise", "write ema.safetensors",
                      "serialise", "write score.safetensors", "serialise", "write optimizer.pt"]
    checkpoint.verify_checkpoint(path)


def test_checkpoint_files_round_trip(tmp_path: Path) -> None:
    model = {"w": torch.arange(6.0).reshape(2, 3)}
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    path = save_checkpoint(tmp_path / "step_3", model=model, ema=model, optimizer=optimizer,
                           config={"a": 1}, state={"step": 3})
    assert sorted(p.name for p in path.iterdir()) == [
        "config.yaml", "ema.safetensors", "model.safetensors", "optimizer.pt", "state.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_3"]  # no temp dir left
    assert torch.equal(load_weights(path / "ema.safetensors")["w"], model["w"])
    assert load_optimizer(path)["param_groups"] == optimizer["param_groups"]
    state = load_state(path)
    assert state["step"] == 3 and sorted(state["files"]) == [
        "config.yaml", "ema.safetensors", "model.safetensors", "optimizer.pt"]
    assert state["files"]["model.safetensors"]["bytes"] == (path / "model.safetensors").stat().st_size
