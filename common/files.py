"""Durable file writes shared by the checkpoint, the privacy ledger and each client's privacy record."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a restart after a kill) sees the old file or the
    new one, never a part: a temporary file is written and fsync'ed, renamed over `path`, and the
    folder fsync'ed so the rename itself survives a power loss."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
