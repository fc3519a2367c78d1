"""Who sees which data: the server's held-out set and each client's train/validation slices.

In simulation every client process rebuilds the same deterministic partitioning from the
shared source and keeps only its own slice; in deployment a client reads only its own
file. The server never sees client data, only the held-out set.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.config import FedtuneConfig
from common.data import LabelMap, TextDataset, label_histogram, stratified_split, subsample
from common.errors import DataError
from common.partition import partition
from common.task import task_for


@dataclass
class ClientData:
    train: TextDataset
    val: TextDataset
    client_id: str

    def summary(self) -> dict:
        return {
            "client_id": self.client_id,
            "train_examples": len(self.train),
            "val_examples": len(self.val),
            "label_histogram": label_histogram(self.train.labels + self.val.labels),
        }


def _load(cfg: FedtuneConfig, source: str, overrides: Mapping | None = None) -> TextDataset:
    """Read one source for the run's task; a deployed node's config may rename its columns."""
    return task_for(cfg).read_source(source, overrides)


@functools.lru_cache(maxsize=4)
def train_and_heldout(cfg: FedtuneConfig) -> tuple[TextDataset, TextDataset]:
    """The federation's training pool and the server's held-out set (deterministic)."""
    pool = subsample(_load(cfg, cfg.data), cfg.max_train_examples, cfg.seed)
    if cfg.heldout_data:
        heldout = _load(cfg, cfg.heldout_data)
    else:
        keep, held = stratified_split(pool.labels, cfg.heldout_fraction, cfg.seed)
        pool, heldout = pool.subset(keep), pool.subset(held)
    heldout = subsample(heldout, cfg.max_heldout_examples, cfg.seed + 1)
    if len(heldout) == 0:
        raise DataError(f"held-out set: expected at least one example, got none from {cfg.heldout_data or cfg.data!r}")
    return pool, heldout


def data_fingerprint(cfg: FedtuneConfig) -> str:
    """SHA-256 (16 hex digits) of the training pool and held-out set as this run reads them
    (texts, labels and other columns, after sampling): a resumed run must read the data it was
    trained on."""
    digest = hashlib.sha256()
    for part in train_and_heldout(cfg):
        digest.update(json.dumps([part.texts, part.labels, part.columns], ensure_ascii=False, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def federation_labels(cfg: FedtuneConfig) -> LabelMap:
    """cfg.labels when given, else the sorted labels of the training pool and held-out set; the
    task refuses labels it cannot learn."""
    task = task_for(cfg)
    if cfg.labels:
        labels = LabelMap.parse(cfg.labels)
        task.check_labels(labels)
        return labels
    pool, heldout = train_and_heldout(cfg)
    labels = LabelMap.from_labels(pool.labels + heldout.labels)
    task.check_labels(labels, pool, heldout)
    return labels


def heldout_set(cfg: FedtuneConfig) -> TextDataset:
    return train_and_heldout(cfg)[1]


@functools.lru_cache(maxsize=128)
def simulated_client_data(cfg: FedtuneConfig, partition_id: int, num_partitions: int) -> ClientData:
    """Client `partition_id`'s slice of the training pool, split into train and validation."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id: expected 0..{num_partitions - 1}, got {partition_id}")
    pool = train_and_heldout(cfg)[0]
    parts = _partitions(cfg, num_partitions)
    return _split_local(cfg, pool.subset(parts[partition_id]), client_id=f"partition-{partition_id}")


@functools.lru_cache(maxsize=8)
def _partitions(cfg: FedtuneConfig, num_partitions: int) -> list[np.ndarray]:
    pool = train_and_heldout(cfg)[0]
    labels = federation_labels(cfg).encode(pool.labels, where=f"data {cfg.data!r}")
    groups = None
    if cfg.partitioner == "natural":
        if cfg.partition_column not in pool.columns:
            raise DataError(f"partition-column: expected one of {sorted(pool.columns)}, got {cfg.partition_column!r}")
        groups = pool.columns[cfg.partition_column]
    return partition(
        labels,
        num_partitions,
        method=cfg.partitioner,
        seed=cfg.seed,
        alpha=cfg.dirichlet_alpha,
        shards_per_client=cfg.shards_per_client,
        groups=groups,
    )


def partition_summaries(cfg: FedtuneConfig, num_partitions: int) -> list[dict]:
    return [simulated_client_data(cfg, p, num_partitions).summary() for p in range(num_partitions)]


def deployed_client_data(cfg: FedtuneConfig, node_config: Mapping) -> ClientData:
    """A deployed client's own file, named in its node config (`data-path`)."""
    path = str(node_config["data-path"])
    local = _load(cfg, path, {"data-format": "auto", "column-names": "", **node_config})
    client_id = str(node_config.get("client-id", path))
    return _split_local(cfg, local, client_id=client_id)


def _split_local(cfg: FedtuneConfig, data: TextDataset, *, client_id: str) -> ClientData:
    task_for(cfg).check_client_labels(data, lambda: federation_labels(cfg), where=f"client {client_id}")  # fail early
    if cfg.local_val_fraction == 0.0 or len(data) < 4:
        return ClientData(train=data, val=data.subset([]), client_id=client_id)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(data))
    n_val = max(1, int(round(len(data) * cfg.local_val_fraction)))
    return ClientData(
        train=data.subset(np.sort(order[n_val:])), val=data.subset(np.sort(order[:n_val])), client_id=client_id
    )
