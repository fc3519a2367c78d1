"""Shared fixtures. `SHARED_DATA` is the benchmark data folder beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))


def require_shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"benchmark data not found at {path} (set FEDTUNE_SHARED_DATA to its folder)")
    return path


@pytest.fixture(autouse=True)
def _quiet_threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
