"""Errors genlab raises for bad input. The CLI prints them in one or two lines and exits with 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GenlabError(Exception):
    """Base class of errors caused by the user's input (config, arguments, files)."""


class ConfigError(GenlabError, ValueError):
    """A config names an unknown key or component, has a value of the wrong type, or a file is missing."""


class ShapeError(GenlabError, ValueError):
    """A tensor has the wrong shape; the message says what was expected and what was given."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return "; did you mean 'x'?" for the closest of ``choices`` to ``name``, or "" if none is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class NonFiniteError(GenlabError, FloatingPointError):
    """A loss, a weight or a sample is NaN or infinite where genlab's policy stops: sampling that ends
    with non-finite values, a run whose losses stay non-finite, weights that would be checkpointed."""


class CheckpointError(GenlabError):
    """A checkpoint is damaged (truncated, corrupt, failing its checksum) or does not fit the model."""


class RunDirError(GenlabError):
    """A run directory cannot be used: it holds another run, is locked by a live process, is a file
    or is not writable, or has nothing to resume from."""


class WriteError(GenlabError, OSError):
    """Writing a file failed (a full disk, a read-only or missing directory); names the file."""
