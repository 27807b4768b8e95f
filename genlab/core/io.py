"""Atomic file writes: a temporary file in the target's directory, flushed and fsynced, then renamed
over the target with ``os.replace``, and the directory fsynced so that the rename itself is durable.
A reader sees the old file or the new one, never half of one; a failed write leaves no temporary file.
Every file genlab writes goes through :func:`atomic_open`; an ``OSError`` on the way (a full disk, a
read-only or missing directory) becomes a :class:`~genlab.core.errors.WriteError` naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import WriteError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once: os.umask can only be read by setting it


def new_file_mode(path: Path, directory: bool = False) -> int:
    """The mode ``open`` would give a new file (``mkdir`` a new directory) under the umask, or the
    mode ``path`` has already (temporary files are created 0600 and renamed over it)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return (0o777 if directory else 0o666) & ~_UMASK


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
    directory is fsynced); on an exception it is removed and the exception re-raised (an OSError as a
    :class:`~genlab.core.errors.WriteError` naming ``path``)."""
    path = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        if os.name != "nt":
            os.fchmod(fd, new_file_mode(path))
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_directory(path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _write_error(path: Path, e: OSError) -> WriteError:
    if isinstance(e, WriteError):
        return e
    err = WriteError(f"cannot write {path}: {e.strerror or e}")
    err.errno = e.errno
    return err


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (``str`` as UTF-8) to ``path`` atomically (see :func:`atomic_open`); returns ``path``."""
    with atomic_open(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON (indent 1) to ``path`` atomically; returns ``path``."""
    return atomic_write(path, json.dumps(data, indent=1))
