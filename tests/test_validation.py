"""Validated updates: every RELIABILITY bad input is rejected with a named reason while the
round completes, and the accepted replies are aggregated exactly (I3) by the real FedAvg.

Bad inputs covered (RELIABILITY.md): NaN and Inf update; wrong shape (bigger rank,
transposed, a broadcastable (1,), in both orders of arrival); wrong dtype; missing, extra,
renamed and base-model keys; num-examples 0, negative, NaN, 1e12, a list or a string; an
oversized message; a reply tagged with an old round; two replies from one node; an update
1000x the usual norm; a pickled payload or object array (no code may run); all weights zero;
NaN or unknown metrics.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from common.records import record_to_state
from server.validation import Policy, ValidatedStrategy
from tests.flower_messages import reply_from, train_reply
from tests.reliability import count

A, B = "lora_A.weight", "lora_B.weight"
GLOBAL = {A: np.zeros((4, 6), np.float32), B: np.zeros((6, 4), np.float32)}
DECLARED = {n: 500 for n in range(1, 10)}


def update(scale: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=v.shape) * 0.01 * scale).astype(np.float32) for k, v in GLOBAL.items()}


def honest(node: int, **kw):
    return train_reply(node, update(seed=node), examples=kw.pop("examples", 100 + node), **kw)


def wrapper(**policy) -> ValidatedStrategy:
    inner = FedAvg(min_available_nodes=1, min_train_nodes=1)
    w = ValidatedStrategy(inner, initial=GLOBAL, policy=Policy(**policy), clients={}, declared=DECLARED)
    w.current = GLOBAL
    return w


def with_arrays(node: int, arrays: dict[str, np.ndarray], **kw):
    return train_reply(node, arrays, examples=kw.pop("examples", 100), **kw)


def bad_metrics(node: int, metrics: dict):
    from common.records import state_to_record

    return reply_from(node, RecordDict({"arrays": state_to_record(update(seed=node)), "metrics": MetricRecord(metrics),
                                        "client": ConfigRecord({"client-id": f"c{node}", "round": 1})}))


def weight(node: int, value):
    base = {"train-loss": 1.0, "train-steps": 3, "train-seconds": 1.0}
    return bad_metrics(node, {"num-examples": value, **base})


def string_weight(node: int):
    """A client that sends num-examples as a string must use a ConfigRecord: a malformed reply."""
    from common.records import state_to_record

    return reply_from(node, RecordDict({"arrays": state_to_record(update(seed=node)),
                                        "metrics": ConfigRecord({"num-examples": "100"}),
                                        "client": ConfigRecord({"client-id": f"c{node}", "round": 1})}))


MARKER = "/tmp/fedtune-pickle-ran"


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def pickled(node: int):
    array = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=pickle.dumps(np.array([_Exploit()], object)))
    record = ArrayRecord({A: array, B: Array(GLOBAL[B])})
    return reply_from(node, RecordDict({"arrays": record, "metrics": MetricRecord(
        {"num-examples": 100, "train-loss": 1.0, "train-steps": 3, "train-seconds": 1.0}),
        "client": ConfigRecord({"client-id": f"c{node}", "round": 1})}))


def oversized(node: int):
    r = honest(node)
    r.content["extra"] = ArrayRecord({"junk": Array(np.zeros(5_000_000, np.float32))})
    return r


def renamed(node: int):
    arrays = update(seed=node)
    arrays["lora_Z.weight"] = arrays.pop(A)
    return with_arrays(node, arrays)


BAD = {
    "nan-update": (lambda n: with_arrays(n, {**update(seed=n), A: np.full((4, 6), np.nan, np.float32)}), "non-finite"),
    "inf-update": (lambda n: with_arrays(n, {**update(seed=n), B: np.full((6, 4), np.inf, np.float32)}), "non-finite"),
    # one NaN among finite values (a planted mutant that checked `.any()` survived the all-NaN cases)
    "one-nan-value": (lambda n: with_arrays(n, {**update(seed=n), A: np.where(np.eye(4, 6, dtype=bool), np.nan,
                                                                             update(seed=n)[A])}), "non-finite"),
    "bigger-rank": (lambda n: with_arrays(n, {**update(seed=n), A: np.zeros((8, 6), np.float32)}), "schema-shape"),
    "transposed": (lambda n: with_arrays(n, {**update(seed=n), A: np.zeros((6, 4), np.float32)}), "schema-shape"),
    "broadcastable": (lambda n: with_arrays(n, {**update(seed=n), A: np.zeros((1,), np.float32)}), "schema-shape"),
    "wrong-dtype": (lambda n: with_arrays(n, {**update(seed=n), A: np.zeros((4, 6), np.float64)}), "schema-dtype"),
    "missing-key": (lambda n: with_arrays(n, {B: update(seed=n)[B]}), "schema-keys"),
    "extra-key": (lambda n: with_arrays(n, {**update(seed=n), "x": np.zeros(3, np.float32)}), "schema-keys"),
    "renamed-key": (renamed, "schema-keys"),
    "base-model-key": (lambda n: with_arrays(n, {**update(seed=n), "bert.embeddings.word_embeddings.weight":
                                                 np.zeros((30, 4), np.float32)}), "schema-keys"),
    "weight-zero": (lambda n: weight(n, 0), "bad-weight"),
    "weight-negative": (lambda n: weight(n, -5), "bad-weight"),
    "weight-nan": (lambda n: weight(n, float("nan")), "bad-weight"),
    "weight-1e12": (lambda n: weight(n, 1e12), "bad-weight"),
    "weight-list": (lambda n: weight(n, [1, 2]), "bad-weight"),
    "weight-string": (string_weight, "malformed-reply"),
    "oversized-message": (oversized, "malformed-reply"),
    "old-round": (lambda n: honest(n, server_round=0), "stale-round"),
    "1000x-norm": (lambda n: with_arrays(n, update(scale=1000.0, seed=n)), "norm-outlier"),
    "pickled-payload": (pickled, "malformed-arrays"),
    "nan-metric": (lambda n: bad_metrics(n, {"num-examples": 100, "train-loss": float("nan"), "train-steps": 3,
                                             "train-seconds": 1.0}), "bad-metrics"),
    "unknown-metric": (lambda n: bad_metrics(n, {"num-examples": 100, "train-loss": 1.0, "train-steps": 3,
                                                 "train-seconds": 1.0, "secret": 4.0}), "bad-metrics"),
}


def expected_mean(replies) -> dict[str, np.ndarray]:
    """I3 computed independently: the example-weighted mean of the accepted replies, in float64."""
    total = sum(r.content["metrics"]["num-examples"] for r in replies)
    return {k: sum(record_to_state(r.content["arrays"])[k].astype(np.float64) * r.content["metrics"]["num-examples"]
                   for r in replies) / total for k in GLOBAL}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("bad_first", [True, False], ids=["bad-first", "bad-last"])
def test_bad_reply_is_rejected_with_its_reason_and_the_rest_aggregate_exactly(case, bad_first):
    make, reason = BAD[case]
    good = [honest(n) for n in (1, 2, 3)]
    expected = expected_mean(good)
    bad = make(4)
    replies = [bad, *good] if bad_first else [*good, bad]
    w = wrapper(max_norm_factor=10.0)
    arrays, _ = w.aggregate_train(1, replies)
    assert w.rejections == [("node-4", reason)]
    assert arrays is not None
    got = record_to_state(arrays)
    for k in GLOBAL:  # I1 finite, I2 schema, I3 exact
        assert np.isfinite(got[k]).all() and got[k].shape == GLOBAL[k].shape and got[k].dtype == GLOBAL[k].dtype
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-8)
    assert not os.path.exists(MARKER), "a pickled payload ran code"
    count("bad_inputs_rejected", case)  # one input in both orders of arrival is one case
    for invariant in ("I1-finite", "I2-schema", "I3-exact"):
        count("invariant_checks_passed", invariant)


def test_two_replies_from_one_node_count_once():
    first, second = honest(1), honest(1, examples=400)
    w = wrapper()
    arrays, _ = w.aggregate_train(1, [first, second, honest(2)])
    assert w.rejections == [("node-1", "duplicate-node")]
    np.testing.assert_allclose(record_to_state(arrays)[A], expected_mean([first, honest(2)])[A], rtol=1e-5, atol=1e-8)
    count("bad_inputs_rejected", "two-replies-one-node")


def test_all_weights_zero_skips_the_round_and_keeps_the_global_adapter():
    w = wrapper()
    arrays, metrics = w.aggregate_train(1, [weight(n, 0) for n in (1, 2, 3)])
    assert arrays is None and metrics is None  # the loop keeps the previous global adapter
    assert [r for _, r in w.rejections] == ["bad-weight"] * 3
    count("bad_inputs_rejected", "all-weights-zero")


def test_weight_above_the_declared_size_is_rejected_and_uniform_policy_ignores_claims():
    w = wrapper()
    w.aggregate_train(1, [honest(1), honest(2, examples=501)])
    assert w.rejections == [("node-2", "bad-weight")]
    count("bad_inputs_rejected", "weight-above-declared-size")
    u = wrapper(uniform_weights=True)
    replies = [honest(1, examples=10), honest(2, examples=490)]
    arrays, _ = u.aggregate_train(1, replies)
    plain = {k: (record_to_state(replies[0].content["arrays"])[k] + record_to_state(replies[1].content["arrays"])[k]) / 2
             for k in GLOBAL}
    np.testing.assert_allclose(record_to_state(arrays)[A], plain[A], rtol=1e-5, atol=1e-8)


def test_absolute_norm_bound():
    w = wrapper(max_update_norm=0.5, max_norm_factor=0.0)
    w.aggregate_train(1, [honest(1), with_arrays(2, update(scale=100.0, seed=2))])
    assert w.rejections == [("node-2", "norm-bound")]


def test_validation_passes_honest_replies_to_the_inner_strategy_unchanged():
    replies = [honest(n) for n in (1, 2, 3)]
    direct, _ = FedAvg(min_available_nodes=1).aggregate_train(1, [honest(n) for n in (1, 2, 3)])
    wrapped, _ = wrapper().aggregate_train(1, replies)
    for k in GLOBAL:
        np.testing.assert_array_equal(record_to_state(wrapped)[k], record_to_state(direct)[k])
