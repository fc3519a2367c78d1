"""Durable checkpoints: one safetensors file per round, written atomically, with a hash.

A checkpoint holds everything needed to resume: the round, the global adapter, the
strategy's state (and the server's AdamW under distributed DP) and the per-round history
(as JSON metadata). The write goes to a temporary file that is fsync'ed and renamed, so a
kill mid-write leaves the previous checkpoint intact; the SHA-256 beside it is checked on load.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from common.config import MOVED_KEYS, FedtuneConfig, parse_run_config
from common.errors import CheckpointError
from common.files import atomic_write

NAME = re.compile(r"round-(\d{4,})\.safetensors$")


@dataclass
class Checkpoint:
    server_round: int
    adapter: dict[str, np.ndarray]
    strategy: dict[str, np.ndarray]
    meta: dict
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)  # the server's AdamW (distributed DP)

    def run_config(self) -> FedtuneConfig:
        """The run config the checkpoint was written with, parsed as any config is: options since
        moved out of the run config (MOVED_KEYS, e.g. num-threads) are dropped, removed ones at
        their neutral values too; anything else that no longer parses raises ConfigError."""
        return parse_run_config(self.meta["config"], ignore=tuple(MOVED_KEYS))


def save_checkpoint(directory: Path, ckpt: Checkpoint) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"adapter/{k}": np.ascontiguousarray(v) for k, v in ckpt.adapter.items()}
    tensors.update({f"strategy/{k}": np.ascontiguousarray(v) for k, v in ckpt.strategy.items()})
    tensors.update({f"optimizer/{k}": np.ascontiguousarray(v) for k, v in ckpt.optimizer.items()})
    meta = {"round": str(ckpt.server_round), "meta": json.dumps(ckpt.meta)}
    blob = st_save(tensors, metadata=meta)
    path = directory / f"round-{ckpt.server_round:04d}.safetensors"
    # The hash goes first: a checkpoint without a matching hash is never trusted.
    atomic_write(path.with_suffix(".sha256"), hashlib.sha256(blob).hexdigest().encode())
    atomic_write(path, blob)
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    if not path.is_file():
        raise CheckpointError(f"checkpoint: expected a file at {path}, found none")
    blob = path.read_bytes()
    hash_file = path.with_suffix(".sha256")
    if not hash_file.is_file():
        raise CheckpointError(f"checkpoint {path}: expected its hash file {hash_file.name}, found none")
    expected = hash_file.read_text().strip()
    actual = hashlib.sha256(blob).hexdigest()
    if actual != expected:
        raise CheckpointError(f"checkpoint {path}: expected SHA-256 {expected}, file has {actual} (corrupt or edited)")
    try:
        # safetensors: raw tensors and string metadata only, no code can run on load.
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + header_len])
        meta = header.get("__metadata__", {})
        server_round, extra = int(meta["round"]), json.loads(meta["meta"])
    except (KeyError, ValueError, SafetensorError) as err:  # e.g. truncated, with its hash file rewritten to match
        raise CheckpointError(
            f"checkpoint {path}: expected fedtune checkpoint metadata, got an unreadable file ({err})"
        ) from None
    adapter = {k[len("adapter/") :]: v for k, v in tensors.items() if k.startswith("adapter/")}
    strategy = {k[len("strategy/") :]: v for k, v in tensors.items() if k.startswith("strategy/")}
    optimizer = {k[len("optimizer/") :]: v for k, v in tensors.items() if k.startswith("optimizer/")}
    return Checkpoint(server_round=server_round, adapter=adapter, strategy=strategy, meta=extra, optimizer=optimizer)


def checkpoints_by_round(directory: Path) -> dict[int, Path]:
    """round -> checkpoint file, in round order."""
    found = ((int(m.group(1)), p) for p in directory.glob("round-*.safetensors") if (m := NAME.search(p.name)))
    return dict(sorted(found))


def latest_checkpoint(directory: Path) -> Path | None:
    rounds = checkpoints_by_round(directory)
    return rounds[max(rounds)] if rounds else None
