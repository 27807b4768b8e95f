"""Checkpoints: a directory written to a temporary name and renamed, so none is ever half-written.

Layout: ``model.safetensors``, ``ema.safetensors``, ``optimizer.pt`` (loaded with
``weights_only=True``), the resolved ``config.yaml`` and ``state.json`` (step, seed, RNG states).
Grids learned for the model later (``genlab learn-grid``) are kept beside them in ``grids.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from .config import save_config
from .errors import GenlabError
from .io import atomic_open, atomic_write, fsync_directory, write_json_atomic

__all__ = ["GRIDS_FILE", "latest_checkpoint", "load_optimizer", "load_state", "load_weights", "resolve_checkpoint",
           "save_checkpoint", "write_json_atomic"]

STEP_DIR = re.compile(r"^step_(\d+)$")
GRIDS_FILE = "grids.json"


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(directory: str | os.PathLike, *, model: Mapping[str, torch.Tensor],
                    ema: Mapping[str, torch.Tensor] | None = None, optimizer: Mapping[str, Any] | None = None,
                    config: Mapping[str, Any] | None = None, state: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically: every file written atomically (fsynced) into a temp dir
    in the same parent, the temp dir renamed to ``directory``, then the parent fsynced."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        atomic_write(tmp / "model.safetensors", save(_contiguous(model)))
        if ema is not None:
            atomic_write(tmp / "ema.safetensors", save(_contiguous(ema)))
        if optimizer is not None:
            with atomic_open(tmp / "optimizer.pt") as f:
                torch.save(optimizer, f)
        if config is not None:
            save_config(config, tmp / "config.yaml")
        atomic_write(tmp / "state.json", json.dumps(dict(state or {}), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(final.parent)
    return final


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file."""
    return load_file(str(path))


def load_state(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / "state.json").read_text())


def load_optimizer(directory: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(directory) / "optimizer.pt", weights_only=True, map_location="cpu")


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoints/step_N`` directory of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    steps = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a run directory or a checkpoint directory; clear error otherwise."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p
    found = latest_checkpoint(p) if p.is_dir() else None
    if found is None:
        raise GenlabError(f"{path}: not a run directory with checkpoints/step_N, nor a checkpoint directory "
                          "(expected model.safetensors inside)")
    return found
