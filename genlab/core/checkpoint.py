"""Checkpoints: directories that are never half-written, verified when they are read.

Layout: ``model.safetensors``, ``ema.safetensors``, ``optimizer.pt`` (loaded with
``weights_only=True``), the resolved ``config.yaml`` and ``state.json`` (step, seed, RNG states, and
``files``: the size and SHA-256 of every other file). Grids learned for the model later
(``genlab learn-grid``) are kept beside them in ``grids.json``.

Writing (:func:`save_checkpoint`): every tensor is checked to be finite first (a diverged model is
never checkpointed); the files are written atomically into a temporary directory, which is renamed
into place and its parent fsynced. Reading (:func:`verify_checkpoint`, :func:`intact_checkpoint`):
sizes and checksums are compared; a damaged newest checkpoint of a run gives way to the newest intact
one, with a warning; :func:`check_fits` compares the tensors' names and shapes with a module's.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from .config import save_config
from .errors import CheckpointError, ConfigError, GenlabError, NonFiniteError, WriteError
from .io import atomic_write, fsync_directory, new_file_mode, write_json_atomic

__all__ = ["GRIDS_FILE", "Pins", "check_fits", "intact_checkpoint", "latest_checkpoint", "load_optimizer", "load_run_weights",
           "load_state", "load_weights", "resolve_checkpoint", "save_checkpoint", "verify_checkpoint", "write_json_atomic"]

STEP_DIR = re.compile(r"^step_(\d+)$")
GRIDS_FILE = "grids.json"
STATE_FILE = "state.json"


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def non_finite_names(tensors: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in ``tensors`` (nested mappings and lists, as in an
    optimizer's state dict) holding NaN or infinity."""
    bad = []
    for key, value in tensors.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(name)
        elif isinstance(value, Mapping):
            bad += non_finite_names(value, f"{name}.")
        elif isinstance(value, (list, tuple)):
            bad += non_finite_names(dict(enumerate(value)), f"{name}.")
    return bad


def _torch_bytes(obj: Any) -> bytes:
    """``obj`` as ``torch.save`` writes it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save_checkpoint(directory: str | os.PathLike, *, model: Mapping[str, torch.Tensor],
                    ema: Mapping[str, torch.Tensor] | None = None, optimizer: Mapping[str, Any] | None = None,
                    config: Mapping[str, Any] | None = None, state: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> Path:
    """Write a checkpoint directory atomically: every file written atomically (fsynced) into a temp dir
    in the same parent, ``state.json`` (with the files' sizes and checksums) last, the temp dir renamed
    to ``directory`` (an older one of that name replaced), then the parent fsynced. ``extra`` maps the
    names of further ``.safetensors`` files (other trained modules, their EMA) to their tensors.

    NonFiniteError, with nothing written, if a tensor of ``model``, ``ema`` or ``optimizer`` is not finite.
    """
    parts = {"model": model, "ema": ema or {}, "optimizer": optimizer or {}, **dict(extra or {})}
    bad = [f"{part}: {name}" for part, tensors in parts.items() for name in non_finite_names(tensors)]
    if bad:
        raise NonFiniteError(f"not checkpointed: non-finite values in {', '.join(bad[:3])}"
                             f"{' and more' if len(bad) > 3 else ''}")
    # serialised one file at a time, each written and hashed before the next: a checkpoint's files are
    # never all in memory at once (model, EMA and optimizer state are several times the model's size)
    files: dict[str, Callable[[], bytes]] = {"model.safetensors": lambda: save(_contiguous(model))}
    if ema is not None:
        files["ema.safetensors"] = lambda: save(_contiguous(ema))
    for name, tensors in (extra or {}).items():
        files[name] = lambda tensors=tensors: save(_contiguous(tensors))
    if optimizer is not None:
        files["optimizer.pt"] = lambda: _torch_bytes(optimizer)
    final = Path(directory)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(new_file_mode(final, directory=True))
    except OSError as e:
        raise WriteError(f"cannot write checkpoint {final}: {e.strerror}") from None
    old = final.with_name(f".{final.name}.tmp-replaced")
    try:
        digests = {}
        for name, serialised in files.items():
            data = serialised()
            atomic_write(tmp / name, data)
            digests[name] = _digest(data)
            del data
        if config is not None:
            save_config(config, tmp / "config.yaml")
            digests["config.yaml"] = _digest((tmp / "config.yaml").read_bytes())
        write_json_atomic(tmp / STATE_FILE, {**dict(state or {}), "files": digests})
        if final.exists():  # rename aside first: a kill here leaves a temporary, never a missing checkpoint
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_directory(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(f"cannot write checkpoint {final}: {e.strerror or e}") from e
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(directory: str | os.PathLike, only: Collection[str] | None = None) -> None:
    """CheckpointError naming the file and the fault if a checkpoint is damaged: ``state.json`` missing
    or unreadable, a listed file missing, of another size or failing its SHA-256. A checkpoint written
    before checksums were recorded is checked by reading its safetensors headers. ``only``: check these
    of the listed files alone (and state.json), e.g. ``("config.yaml",)`` to read a config cheaply."""
    d = Path(directory)
    try:
        state = json.loads((d / STATE_FILE).read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d / STATE_FILE}: unreadable ({e})") from None
    files = state.get("files")
    if not isinstance(files, dict):  # an older checkpoint: no checksums
        for name in ("model.safetensors", "ema.safetensors"):
            if only is None or name in only:
                _read_header(d / name)
        return
    for name, expected in files.items():
        if only is not None and name not in only:
            continue
        path = d / name
        try:
            size, digest = _size_and_sha256(path)
        except OSError as e:
            raise CheckpointError(f"{path}: {e.strerror}") from None
        if size != expected.get("bytes"):
            raise CheckpointError(f"{path}: {size} bytes, {expected.get('bytes')} written (truncated?)")
        if digest != expected.get("sha256"):
            raise CheckpointError(f"{path}: checksum mismatch (the file is corrupt)")


def _size_and_sha256(path: Path, chunk: int = 1 << 24) -> tuple[int, str]:
    """A file's size and SHA-256, read in 16 MiB chunks (a checkpoint of many GiB is never in memory whole)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _read_header(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from a safetensors header; CheckpointError if it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def check_fits(path: str | os.PathLike, module: nn.Module, keep: tuple[str, ...] = ()) -> None:
    """CheckpointError if the tensors in safetensors file ``path`` are not, by name and shape, those of
    ``module``'s state dict (read from the file's header; nothing is loaded); the module's tensors whose
    names start with one of ``keep`` may be absent from the file."""
    stored = _read_header(Path(path))
    wanted = {k: list(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(k for k in wanted.keys() - stored.keys() if not k.startswith(keep))
    extra = sorted(stored.keys() - wanted.keys())
    why = "it was written for another model; build the model with the run's config"
    if missing:
        raise CheckpointError(f"{path}: no tensor '{missing[0]}' of the model ({len(missing)} missing); {why}")
    if extra:
        raise CheckpointError(f"{path}: tensor '{extra[0]}' is not in the model ({len(extra)} more); {why}")
    for k, shape in wanted.items():
        if k in stored and stored[k] != shape:
            raise CheckpointError(f"{path}: '{k}' has shape {stored[k]} in the file and {shape} in the model; {why}")


def load_weights(path: str | os.PathLike, module: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file; with ``module``, checked to fit it first (:func:`check_fits`).
    CheckpointError if the file cannot be read or holds a non-finite tensor."""
    if module is not None:
        check_fits(path, module)
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    bad = non_finite_names(tensors)
    if bad:
        raise CheckpointError(f"{path}: non-finite values in '{bad[0]}'")
    return tensors


def load_run_weights(module: nn.Module, source: str | os.PathLike, keep: tuple[str, ...] = ()) -> Path:
    """Start ``module`` from the EMA weights of run or checkpoint directory ``source`` (resolved and
    verified by :func:`resolve_checkpoint`, checked to fit by :func:`check_fits`, read through
    safetensors); its tensors named with a prefix of ``keep`` that the run lacks keep their values.
    The one way genlab starts a model from a run (``load_pretrained``, ``adapters.base``, a teacher's
    student, ``finetune``'s and ``controlnet``'s ``base``). Returns the checkpoint directory;
    GenlabError (CheckpointError for weights of another model) naming what is wrong."""
    ckpt = resolve_checkpoint(source)
    weights = ckpt / "ema.safetensors"
    check_fits(weights, module, keep)
    module.load_state_dict({**module.state_dict(), **load_weights(weights)})
    return ckpt


def load_state(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / STATE_FILE).read_text())


def load_optimizer(directory: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(directory) / "optimizer.pt", weights_only=True, map_location="cpu")


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoints/step_N`` directories of a run, newest first."""
    root = Path(run_dir) / "checkpoints"
    steps = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(steps, reverse=True)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest ``checkpoints/step_N`` directory of a run (not verified), or None."""
    found = checkpoints(run_dir)
    return found[0] if found else None


def intact_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of a run that passes :func:`verify_checkpoint` (a warning names each newer,
    damaged one passed over); None if the run has none; CheckpointError if all are damaged."""
    damaged = []
    for ckpt in checkpoints(run_dir):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            damaged.append(str(e))
            continue
        for why in damaged:
            warnings.warn(f"damaged checkpoint passed over: {why}; using {ckpt}", stacklevel=2)
        return ckpt
    if damaged:
        raise CheckpointError(f"{run_dir}: every checkpoint is damaged; the newest: {damaged[0]}")
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory ``path`` names, verified: a checkpoint directory itself (an error if
    damaged), or a run directory's newest intact checkpoint (see :func:`intact_checkpoint`)."""
    p = Path(path)
    if (p / "model.safetensors").is_file() or (p / STATE_FILE).is_file():
        verify_checkpoint(p)
        return p
    found = intact_checkpoint(p) if p.is_dir() else None
    if found is None:
        raise GenlabError(f"{path}: not a run directory with checkpoints/step_N, nor a checkpoint directory "
                          "(expected model.safetensors inside)")
    return found


class Pins:
    """Which checkpoint each run a config names was loaded from, so that the run built on it (a student on its
    teacher, a latent model on its autoencoder) keeps loading exactly that one: ``{path: {"checkpoint": the
    directory's name, "state_sha256": the sha256 of its state.json}}`` (state.json lists every file's
    checksum, so the pin covers every file). A run directory names its newest intact checkpoint only while
    nothing is pinned; once a path is pinned (``stored``, the ``pinned:`` section of a run's own config),
    :meth:`resolve` returns the pinned checkpoint, verified, or raises GenlabError saying it is missing or has
    changed, never another one."""

    def __init__(self, stored: Mapping[str, Any] | None = None, source: str = "config") -> None:
        self.stored, self.source = dict(stored or {}), source
        self.used: dict[str, dict[str, str]] = {}
        for path, pin in self.stored.items():
            if not (isinstance(pin, Mapping) and isinstance(pin.get("checkpoint"), str)
                    and isinstance(pin.get("state_sha256"), str)):
                raise ConfigError(f"{source}: pinned.{path}: expected {{checkpoint: NAME, state_sha256: HEX}}, "
                                  f"got {pin!r}")

    def resolve(self, path: str | os.PathLike) -> Path:
        """The checkpoint directory ``path`` names (see the class docstring), recorded in :attr:`used`."""
        key, pin = str(path), self.stored.get(str(path))
        if pin is None:
            ckpt = resolve_checkpoint(path)
            digest = hashlib.sha256((ckpt / STATE_FILE).read_bytes()).hexdigest()
        else:
            p = Path(path)
            ckpt = p if (p / STATE_FILE).is_file() else p / "checkpoints" / pin["checkpoint"]
            state = ckpt / STATE_FILE
            digest = hashlib.sha256(state.read_bytes()).hexdigest() if state.is_file() else None
            if digest != pin["state_sha256"]:
                fault = "is missing" if digest is None else "has changed"
                raise GenlabError(
                    f"{self.source}: {path}: this run was built on its checkpoint {pin['checkpoint']} (state.json "
                    f"sha256 {pin['state_sha256'][:12]}...), which {fault}; the run cannot load the same component "
                    "again (start a new run to build on another)")
            verify_checkpoint(ckpt)
        self.used[key] = {"checkpoint": ckpt.name, "state_sha256": digest}
        return ckpt
