"""Run directories: one run owns one directory, from its checks to its last file.

- :func:`check_run_dir` decides, writing nothing, whether a directory may take a fresh run (it is new
  or empty) or a resumed one (it holds a checkpoint); a path that is a file, or lies under one, is refused.
- :class:`RunLock` is an exclusive lock on ``.genlab.lock`` in the directory, held for the run's
  lifetime (``flock``: the kernel drops it when the process ends, however it ends, so the lock of a
  killed run never blocks a later ``--resume``). Who holds it is written, atomically, beside it in
  ``.genlab.owner`` for the message the next process gets. Under ``accelerate launch`` the main
  process (``RANK`` 0) holds it for all ranks.
- :func:`clean_temporaries` removes what killed writes left: ``.NAME.*.tmp`` files of
  :func:`~genlab.core.io.atomic_open` and ``.step_N.tmp-*`` directories of checkpoint writes. The
  lock runs it once held, so it never touches a live run's files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

from .errors import RunDirError, WriteError
from .io import write_json_atomic

LOCK_FILE = ".genlab.lock"
OWNER_FILE = ".genlab.owner"
_BOOKKEEPING = {LOCK_FILE, OWNER_FILE}
_TEMPORARY = re.compile(r"^\..+(\.tmp|\.tmp-\w+)$")  # atomic_open's files, save_checkpoint's directories


def is_main_rank() -> bool:
    """Whether this process is the main one of a distributed launch (or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0


def _file_on_path(path: Path) -> Path | None:
    """The first component of ``path`` (or ``path`` itself) that exists and is not a directory."""
    for p in (*reversed(path.parents), path):
        if p.exists() and not p.is_dir():
            return p
    return None


def run_contents(path: Path) -> list[str]:
    """Names in a run directory, less the lock's bookkeeping and temporaries of killed writes."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.name not in _BOOKKEEPING and not _TEMPORARY.match(p.name))


def check_run_dir(path: str | os.PathLike, *, resume: bool, has_checkpoint: bool, flag: str = "--out") -> None:
    """Refuse (RunDirError) a directory that cannot take this run; writes nothing.

    Fresh (``resume=False``): ``path`` must not exist or be empty. Resumed: it must hold a checkpoint
    (``has_checkpoint``, decided by the caller). A file on the path is refused in both cases.
    """
    path = Path(path)
    blocker = _file_on_path(path)
    if blocker is not None:
        what = "is a file" if blocker == path else f"lies under {blocker}, which is a file"
        raise RunDirError(f"{flag} {path}: {what}; give a directory")
    if resume:
        if not path.is_dir():
            raise RunDirError(f"{flag} {path}: no such run directory to resume; start the run without --resume")
        if not has_checkpoint:
            raise RunDirError(f"{flag} {path}: holds no checkpoint to resume from (checkpoints/step_N); "
                              "start the run without --resume in a new directory")
        return
    contents = run_contents(path)
    if has_checkpoint:
        raise RunDirError(f"{flag} {path}: holds a run with checkpoints; continue it with --resume, "
                          "or choose another directory")
    if contents:
        shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
        raise RunDirError(f"{flag} {path}: not empty ({shown}); a fresh run needs a new or empty directory")


class RunLock:
    """An exclusive, non-blocking lock on a run directory (created if missing), released by
    :meth:`release`, at the end of a ``with`` block, or by the kernel when the process ends. Once held,
    the temporaries of killed writes in the directory are removed (``cleaned``)."""

    def __init__(self, path: str | os.PathLike, *, purpose: str = "run") -> None:
        self.path = Path(path)
        self._file: IO[bytes] | None = None
        self.cleaned: list[Path] = []
        if not is_main_rank():
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path / LOCK_FILE, "a+b")  # noqa: SIM115 - held for the run's lifetime
        except OSError as e:
            raise WriteError(f"{self.path}: cannot create the run directory or its lock: {e.strerror}") from None
        if not _try_lock(self._file):
            self._file.close()
            self._file = None
            raise RunDirError(f"{self.path}: in use by another genlab process ({_owner(self.path)}); wait for it "
                              "to end or choose another directory")
        write_json_atomic(self.path / OWNER_FILE, {"pid": os.getpid(), "host": socket.gethostname(),
                                                   "purpose": purpose, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                   "command": " ".join(sys.argv)})
        self.cleaned = clean_temporaries(self.path)

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        """Drop the lock (the owner file stays: it names the last owner)."""
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _try_lock(f: IO[bytes]) -> bool:
    if os.name == "nt":  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _owner(path: Path) -> str:
    try:
        o = json.loads((path / OWNER_FILE).read_text())
        return f"pid {o['pid']} on {o['host']}, {o['purpose']} started {o['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"


def clean_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and directories of killed writes under ``path``; returns them."""
    removed = []
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            if _TEMPORARY.match(name):
                p = Path(root) / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
        dirs[:] = [d for d in dirs if not _TEMPORARY.match(d)]
    return removed
