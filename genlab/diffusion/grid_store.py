"""Storing learned time grids with the model, and the registered grid ``learned`` that reads them.

A run's checkpoint directory holds ``grids.json`` (written atomically), a list of records keyed by
the sampler's configuration (:func:`sampler_spec`) and the number of steps; ``genlab learn-grid``
writes it (see :mod:`genlab.diffusion.learned_grid`) and ``grid: {type: learned, path: RUN}`` (or
``sampler.grid=learned`` with ``genlab sample``) reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.bounds import NonNegativeFloat
from ..core.checkpoint import GRIDS_FILE, resolve_checkpoint
from ..core.io import write_json_atomic
from ..core.errors import ConfigError, GenlabError
from ..core.registry import name_of, register
from .grids import TimeGrid, check_decreasing, check_times
from .processes import Process
from .samplers.base import Sampler

FORMAT = "genlab.learned_grids"
RECORD_KEYS = ("sampler", "steps", "times", "process")  # what every stored grid holds (GridFit.entry)


def sampler_spec(sampler: Sampler) -> dict[str, Any]:
    """The sampler's registered type and its :meth:`~genlab.diffusion.Sampler.options`: the key a
    learned grid is stored under."""
    return {"type": name_of("sampler", type(sampler)) or type(sampler).__name__, **sampler.options()}


def grids_path(path: str | os.PathLike) -> Path:
    """The grids file of a run directory, a checkpoint directory or the file itself."""
    p = Path(path)
    if p.suffix == ".json" or p.is_file():
        return p
    return resolve_checkpoint(p) / GRIDS_FILE


def load_grids(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The stored grid records of ``path`` (see :func:`grids_path`); [] when there is no file.
    GenlabError naming the file if it cannot be read, is not JSON, or is not a learned-grids file
    (a mapping with ``format`` and a list ``grids`` of records with :data:`RECORD_KEYS`)."""
    file = grids_path(path)
    if not file.is_file():
        return []
    fix = "delete it, or learn the grids again with `genlab learn-grid`"
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GenlabError(f"{file}: cannot read the learned grids ({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else f"a JSON {type(data).__name__}, not a mapping"
        raise GenlabError(f"{file}: not a learned-grids file (format {found!r}, expected {FORMAT!r}); {fix}")
    grids = data.get("grids")
    if not isinstance(grids, list):
        raise GenlabError(f"{file}: 'grids' must be a list of grid records, got {type(grids).__name__}; {fix}")
    for i, g in enumerate(grids):
        missing = [k for k in RECORD_KEYS if not isinstance(g, dict) or k not in g]
        if missing:
            raise GenlabError(f"{file}: grids[{i}] lacks {', '.join(map(repr, missing))} (a record holds "
                              f"{', '.join(RECORD_KEYS)}); {fix}")
    return grids


def save_grid(path: str | os.PathLike, entry: dict[str, Any]) -> Path:
    """Add ``entry`` (:meth:`GridFit.entry`) to the grids file of ``path``, replacing one with the
    same sampler and steps; written atomically."""
    file = grids_path(path)
    kept = [g for g in load_grids(file) if (g["sampler"], g["steps"]) != (entry["sampler"], entry["steps"])]
    grids = sorted([*kept, entry], key=lambda g: (json.dumps(g["sampler"], sort_keys=True), g["steps"]))
    write_json_atomic(file, {"format": FORMAT, "version": 1, "grids": grids})
    return file


def want_of(entry: dict[str, Any]) -> str:
    """A stored record's key in words: ``{sampler spec} steps=N``."""
    return f"{entry['sampler']} steps={entry['steps']}"


def _describe(entries: list[dict[str, Any]]) -> str:
    return "; ".join(map(want_of, entries)) or "none"


@register("grid", "learned")
class LearnedGrid(TimeGrid):
    """A grid learned for one model and sampler (``genlab learn-grid``): given ``times``, or found
    in ``path`` (a run directory, a checkpoint directory or its grids.json) by the sampler's
    configuration and the number of steps."""

    def __init__(self, times: list[NonNegativeFloat] | None = None, path: str | None = None) -> None:
        if (times is None) == (path is None):
            raise ConfigError("grid learned: give exactly one of times (a list) or path (a run or checkpoint "
                              "directory holding grids.json, written by `genlab learn-grid`)")
        self.times = None if times is None else check_decreasing(type(self).__name__, times)
        self.path = path

    def for_sampler(self, sampler: Sampler) -> TimeGrid:
        """This grid restricted to the records stored for ``sampler`` (what Sampler.timesteps calls)."""
        return _Bound(self, sampler)

    def lookup(self, process: Process, steps: int, sampler: Sampler | None = None) -> Tensor:
        if self.times is not None:
            if len(self.times) - 1 != steps:
                raise ConfigError(f"grid learned: the times have {len(self.times) - 1} steps, the sampler asks "
                                  f"for {steps}; set sampler.steps={len(self.times) - 1}")
            return check_times(type(self).__name__, self.times.clone(), process)
        entries = load_grids(self.path)
        if sampler is not None:
            spec = sampler_spec(sampler)
            entries_s = [g for g in entries if g["sampler"] == spec]
        else:
            spec, entries_s = None, entries
        found = [g for g in entries_s if g["steps"] == steps]
        if len(found) != 1:
            want = f"{spec} steps={steps}" if spec else f"steps={steps}"
            why = "none" if not found else "several"
            raise ConfigError(f"grid learned: {why} stored in {grids_path(self.path)} for {want} (stored: "
                              f"{_describe(entries)}); learn one with `genlab learn-grid RUN --nfe N` "
                              "and the same sampler overrides")
        if found[0]["process"] != repr(process):
            raise ConfigError(f"grid learned: the grid in {grids_path(self.path)} was learned on "
                              f"{found[0]['process']}, not {process!r}")
        try:
            return check_times(type(self).__name__, torch.tensor(found[0]["times"], dtype=torch.float64), process)
        except (TypeError, ValueError) as e:
            raise GenlabError(f"{grids_path(self.path)}: the grid stored for {want_of(found[0])} is not a grid: "
                              f"{e}") from e

    def __call__(self, process: Process, steps: int) -> Tensor:
        return self.lookup(process, steps)


class _Bound(TimeGrid):
    def __init__(self, grid: LearnedGrid, sampler: Sampler) -> None:
        self.grid, self.sampler = grid, sampler

    def __call__(self, process: Process, steps: int) -> Tensor:
        return self.grid.lookup(process, steps, self.sampler)
