"""Partitioners that split one labelled data set across simulated clients.

Each returns one index array per client; together they are disjoint and cover every
example, and the same seed gives the same split.
"""

from __future__ import annotations

import numpy as np

from common.errors import DataError

MIN_PARTITION_SIZE = 2
DIRICHLET_MAX_TRIES = 100


def iid(num_examples: int, num_partitions: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle, then cut into near-equal parts."""
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_partitions)]


def dirichlet(labels: np.ndarray, num_partitions: int, *, alpha: float, seed: int) -> list[np.ndarray]:
    """Label skew: each label's examples are spread by proportions ~ Dir(alpha).

    Hsu et al. 2019, https://arxiv.org/abs/1909.06335. Redraws until every client
    gets at least MIN_PARTITION_SIZE examples.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(DIRICHLET_MAX_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= MIN_PARTITION_SIZE:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise DataError(
        f"dirichlet partitioner: expected every one of {num_partitions} clients to get at least "
        f"{MIN_PARTITION_SIZE} of {len(labels)} examples with alpha={alpha}, "
        f"failed after {DIRICHLET_MAX_TRIES} draws; use fewer clients or a larger alpha"
    )


def shards(labels: np.ndarray, num_partitions: int, *, shards_per_client: int, seed: int) -> list[np.ndarray]:
    """Sort by label, cut into equal shards, deal `shards_per_client` to each client.

    McMahan et al. 2017, https://arxiv.org/abs/1602.05629 (pathological non-IID).
    """
    rng = np.random.default_rng(seed)
    num_shards = num_partitions * shards_per_client
    # Label-sorted order with a random order inside each label.
    order = np.lexsort((rng.random(len(labels)), labels))
    pieces = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_partitions, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in dealt]


def natural(groups: list[str], num_partitions: int, *, seed: int) -> list[np.ndarray]:
    """Keep each group (e.g. a category or a user id) whole; balance groups over clients.

    Groups are dealt largest first to the currently smallest client (ties by seed).
    """
    values, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    if len(values) < num_partitions:
        raise DataError(
            f"natural partitioner: expected at least {num_partitions} distinct groups "
            f"(one per client), found {len(values)}"
        )
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(values)), -counts))
    sizes = np.zeros(num_partitions, dtype=np.int64)
    owner = np.empty(len(values), dtype=np.int64)
    for g in order:
        target = int(np.argmin(sizes))
        owner[g] = target
        sizes[target] += counts[g]
    return [np.flatnonzero(owner[inverse] == p) for p in range(num_partitions)]


def partition(
    labels: np.ndarray,
    num_partitions: int,
    *,
    method: str,
    seed: int,
    alpha: float = 1.0,
    shards_per_client: int = 2,
    groups: list[str] | None = None,
) -> list[np.ndarray]:
    """Dispatch to one partitioner and refuse empty or too-small partitions."""
    if num_partitions < 1:
        raise DataError(f"num-partitions: expected at least 1 client, got {num_partitions}")
    if len(labels) < num_partitions * MIN_PARTITION_SIZE:
        raise DataError(
            f"partitioner: expected at least {MIN_PARTITION_SIZE} examples per client, "
            f"got {len(labels)} examples for {num_partitions} clients"
        )
    if method == "iid":
        parts = iid(len(labels), num_partitions, seed=seed)
    elif method == "dirichlet":
        parts = dirichlet(labels, num_partitions, alpha=alpha, seed=seed)
    elif method == "shards":
        if shards_per_client < 1:
            raise DataError(f"shards-per-client: expected at least 1, got {shards_per_client}")
        parts = shards(labels, num_partitions, shards_per_client=shards_per_client, seed=seed)
    elif method == "natural":
        if groups is None:
            raise DataError("natural partitioner: expected a partition column, got none")
        parts = natural(groups, num_partitions, seed=seed)
    else:
        raise DataError(f"partitioner: expected iid, dirichlet, shards or natural, got {method!r}")
    for i, part in enumerate(parts):
        if len(part) == 0:
            raise DataError(f"partition {i} is empty: {len(labels)} examples over {num_partitions} clients ({method})")
    return parts
