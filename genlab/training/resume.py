"""What a resumed run and a sampling command read back from a checkpoint: which config keys may change on
``--resume`` (:data:`RESUMABLE`), the checkpoint file of each trained module, and the modules with the weights
a checkpoint samples with."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..core.checkpoint import checkpoints, load_weights, verify_checkpoint
from ..core.config import load_config
from ..core.errors import CheckpointError, ConfigError
from .experiment import Experiment, TrainConfig


# keys a resumed run may change: how long it runs and what it logs, samples and keeps, never what it learns
RESUMABLE = ("name", "sampler", "guidance", "train.steps", "train.log_every", "train.checkpoint_every",
             "train.sample_every", "train.eval_samples", "train.eval_steps", "train.tensorboard", "train.max_bad_steps",
             "train.compile", "train.num_workers")


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(cfg, dict):
        return {prefix: cfg}
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_resume_config(ckpt: Path, config: dict[str, Any]) -> None:
    """ConfigError naming the first key where ``config`` differs from the checkpoint's ``config.yaml``,
    except the :data:`RESUMABLE` keys: a resumed run learns exactly what the interrupted one did."""
    saved, now = _flat(load_config(ckpt / "config.yaml")), _flat(config)
    defaults = _flat({"train": asdict(TrainConfig())})  # a train key newer than the run: its default is what it ran
    for key in sorted(saved.keys() | now.keys()):
        resumable = any(key == r or key.startswith(r + ".") for r in RESUMABLE)
        if resumable or (key in saved and key in now and saved[key] == now[key]):
            continue
        if key not in saved and key in defaults and now.get(key) == defaults[key]:
            continue
        before = repr(saved[key]) if key in saved else "not set"
        after = repr(now[key]) if key in now else "not set"
        raise ConfigError(f"--resume: {key} is {before} in the run ({ckpt / 'config.yaml'}) and {after} now; a "
                          f"resumed run keeps its config except {', '.join(RESUMABLE)} (start a new run to change it)")


def with_stored_pins(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``config`` for resuming the run in ``run_dir``: with the ``pinned:`` section of the checkpoint it
    resumes from (see :class:`~genlab.core.checkpoint.Pins`), so that a teacher or autoencoder run that went on
    training since is loaded from the same checkpoint as before; ``config`` itself if it pins its own or
    the run has none."""
    ckpt = _newest_intact_config(run_dir) if run_dir.is_dir() else None
    pinned = load_config(ckpt / "config.yaml").get("pinned") if ckpt is not None else None
    if not pinned or "pinned" in config:
        return config
    config["pinned"] = pinned
    return config


def _newest_intact_config(run_dir: Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` whose config.yaml passes its checksum (the weights are not
    hashed here: the Trainer verifies the checkpoint it resumes from, and its config check refuses pins
    that are not that checkpoint's)."""
    for ckpt in checkpoints(run_dir):
        try:
            verify_checkpoint(ckpt, only=("config.yaml",))
        except CheckpointError:
            continue
        return ckpt
    return None


def weights_file(name: str, ema: bool = False) -> str:
    """The checkpoint file of trained module ``name`` (``model.safetensors`` / ``ema.safetensors`` for
    the sampled model, ``NAME.safetensors`` / ``ema_NAME.safetensors`` for others)."""
    if name == "model":
        return "ema.safetensors" if ema else "model.safetensors"
    return f"ema_{name}.safetensors" if ema else f"{name}.safetensors"


def load_sampling_weights(exp: Experiment, ckpt: Path) -> dict[str, torch.nn.Module]:
    """The objective's modules with the weights a checkpoint ``ckpt`` samples with, each file checked to fit
    its module first: the EMA copy of every module that has one, the trained weights of the other trained
    modules, frozen ones as built; all in eval mode. What :meth:`Trainer.sampling_modules` holds in a run."""
    obj = exp.objective
    modules, ema = obj.modules(), obj.ema_modules()
    for name, module in modules.items():
        if name not in obj.frozen:
            module.load_state_dict(load_weights(ckpt / weights_file(name, ema=name in ema), module))
        module.eval()
    return modules
