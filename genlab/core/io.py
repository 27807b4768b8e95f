"""Atomic file writes: a temporary file in the target's directory, flushed and fsynced, then renamed
over the target with ``os.replace``, and the directory fsynced so that the rename itself is durable.
A reader sees the old file or the new one, never half of one; a failed write leaves no temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush ``directory``'s entries (a rename or a new file in it) to disk; a no-op on Windows, where a
    directory cannot be opened."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """``with atomic_open(path) as f: f.write(...)``: ``f`` is a binary file under a temporary name in
    ``path``'s directory; on a normal exit it is flushed, fsynced and renamed to ``path`` (then the
    directory is fsynced); on an exception it is removed and the exception re-raised."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (``str`` as UTF-8) to ``path`` atomically (see :func:`atomic_open`); returns ``path``."""
    with atomic_open(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON (indent 1) to ``path`` atomically; returns ``path``."""
    return atomic_write(path, json.dumps(data, indent=1))
