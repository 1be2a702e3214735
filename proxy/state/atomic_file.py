"""Replacing a file so that a reader (or a crash) sees the old content or the new one,
never a part: key files (`keys/keygen.py`) and the state file (`state/file.py`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`: a temporary file in the same directory (created with
    `mode` before any data is written), flushed to disk, `os.replace`, then the directory
    flushed too, so the rename survives a crash."""
    directory = path.parent
    fd, scratch = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(scratch, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
