"""Shared test settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Run the tests on one torch thread: the small models and mixtures here run fastest that way,
    and are not slowed by other processes' load on a 2-core machine. Session-scoped, so module-scoped
    fixtures (set up before function-scoped ones) run on one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot_files(root) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (hidden ones too): what "nothing in the
    run changed" compares."""
    import hashlib
    from pathlib import Path

    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def snapshot():
    return snapshot_files
