"""Partitioner properties: disjoint, complete, deterministic; smaller alpha gives more skew."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import DataError
from common.partition import partition

LABELS = np.repeat(np.arange(5), [200, 120, 80, 60, 40])


def split(method, n=6, seed=0, labels=LABELS, **kw):
    groups = [f"g{i % 9}" for i in range(len(labels))] if method == "natural" else None
    return partition(labels, n, method=method, seed=seed, groups=groups, **kw)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards", "natural"])
def test_disjoint_complete_deterministic(method):
    parts = split(method)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS) == len(set(joined.tolist()))  # disjoint and complete
    again = split(method)
    assert all((a == b).all() for a, b in zip(parts, again))  # same seed, same split
    if method != "natural":  # natural splits depend on the groups, the seed only breaks ties
        other = split(method, seed=1)
        assert any(len(a) != len(b) or (a != b).any() for a, b in zip(parts, other))


def label_skew(parts) -> float:
    """Mean total-variation distance between each client's label mix and the global mix."""
    global_mix = np.bincount(LABELS, minlength=5) / len(LABELS)
    tv = [0.5 * np.abs(np.bincount(LABELS[p], minlength=5) / len(p) - global_mix).sum() for p in parts]
    return float(np.mean(tv))


def test_smaller_dirichlet_alpha_gives_more_skew():
    skews = {a: np.mean([label_skew(split("dirichlet", seed=s, alpha=a)) for s in range(5)]) for a in (0.1, 1.0, 100.0)}
    assert skews[0.1] > skews[1.0] > skews[100.0]
    assert label_skew(split("iid")) < skews[1.0]


def test_shards_give_each_client_few_labels():
    parts = split("shards", n=5, shards_per_client=1)
    assert max(len(np.unique(LABELS[p])) for p in parts) <= 2


def test_natural_keeps_groups_whole():
    groups = [f"g{i % 9}" for i in range(len(LABELS))]
    parts = split("natural")
    owners = {}
    for client, part in enumerate(parts):
        for i in part:
            assert owners.setdefault(groups[i], client) == client


@pytest.mark.parametrize("method, n, message", [
    ("iid", 400, "at least 2 examples per client"),
    ("natural", 12, "at least 12 distinct groups"),
    ("dirichlet", 0, "at least 1 client"),
])
def test_impossible_partitions_are_clear_errors(method, n, message):
    with pytest.raises(DataError, match=message):
        split(method, n=n)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 10_000), alpha=st.floats(0.2, 50.0))
def test_dirichlet_property_every_client_gets_data(n, seed, alpha):
    parts = partition(LABELS, n, method="dirichlet", seed=seed, alpha=alpha)
    assert min(len(p) for p in parts) >= 2
    assert sum(len(p) for p in parts) == len(LABELS)
