"""shared-moments on the server: the moments clients send are taken off their replies before
the strategy sees them, validated, and averaged with the aggregation weights; a bad one is left
out with a reason while the rest still count; the average survives a checkpoint.

RELIABILITY bad inputs: a client reply with NaN, a negative second moment, a wrong shape or
dtype, missing or extra keys, an undecodable payload, or no moments at all. Invariant I5
(durable: the average is in the checkpoint and refused on resume when it does not fit).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from common.records import MOMENTS_KEY, state_to_record
from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server.moments import average_moments, check_moments, misfit, take_moments
from tests.flower_messages import train_reply
from tests.reliability import count

SHAPES = {"0.exp_avg": (2, 3), "0.exp_avg_sq": (2, 3), "1.exp_avg": (3,), "1.exp_avg_sq": (3,)}


def moments(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(shape, value, np.float32) for k, shape in SHAPES.items()}


def test_moments_are_taken_off_the_reply_before_the_strategy_sees_it():
    reply = train_reply(1, {"w": np.zeros(2, np.float32)})
    reply.content[MOMENTS_KEY] = state_to_record(moments(1.0))
    bare = train_reply(2, {"w": np.zeros(2, np.float32)})
    taken = take_moments([reply, bare])
    assert list(reply.content.array_records) == ["arrays"]  # what the validator and FedAvg expect
    assert set(taken) == {reply.metadata.message_id, bare.metadata.message_id}
    assert check_moments(taken[reply.metadata.message_id], SHAPES)[1] is None
    assert taken[bare.metadata.message_id] is None


def test_average_is_weighted_like_the_updates():
    sent = [("c1", state_to_record(moments(1.0)), 100), ("c2", state_to_record(moments(4.0)), 300)]
    averaged, used = average_moments(sent, SHAPES, server_round=1)
    assert used == 2 and set(averaged) == set(SHAPES)
    assert all(a.dtype == np.float32 and np.allclose(a, 3.25) for a in averaged.values())


def _bad(kind: str):
    good = moments(1.0)
    if kind == "none":
        return None
    if kind == "nan":
        good["0.exp_avg"][0, 0] = np.nan
    elif kind == "negative":
        good["1.exp_avg_sq"][1] = -1.0
    elif kind == "shape":
        good["0.exp_avg_sq"] = np.ones((3, 2), np.float32)
    elif kind == "dtype":
        good["1.exp_avg"] = good["1.exp_avg"].astype(np.float64)
    elif kind == "missing":
        del good["1.exp_avg_sq"]
    elif kind == "extra":
        good["2.exp_avg_sq"] = np.ones(1, np.float32)
    elif kind == "garbage":
        return ArrayRecord({k: Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"\x00not-npy")
                            for k in SHAPES})
    return state_to_record(good)


@pytest.mark.parametrize("kind, reason", [
    ("none", "moments-missing"), ("nan", "moments-non-finite"), ("negative", "moments-negative-second-moment"),
    ("shape", "moments-shape"), ("dtype", "moments-shape"), ("missing", "moments-keys"), ("extra", "moments-keys"),
    ("garbage", "moments-malformed"),
])
def test_bad_moments_are_left_out_with_a_reason_and_the_rest_still_count(kind, reason):
    assert check_moments(_bad(kind), SHAPES) == (None, reason)
    averaged, used = average_moments([("good", state_to_record(moments(2.0)), 50), ("bad", _bad(kind), 50)],
                                     SHAPES, server_round=3)
    assert used == 1 and all(np.allclose(a, 2.0) for a in averaged.values())
    assert average_moments([("bad", _bad(kind), 50)], SHAPES, server_round=3) == (None, 0)
    count("bad_inputs_rejected", f"client moments {kind}")


@pytest.mark.parametrize("weight", [0, -3, float("nan"), float("inf"), [100], True])
def test_moments_with_an_unusable_weight_are_left_out(weight):
    averaged, used = average_moments([("good", state_to_record(moments(2.0)), 50),
                                      ("odd", state_to_record(moments(9.0)), weight)], SHAPES, server_round=2)
    assert used == 1 and all(np.allclose(a, 2.0) for a in averaged.values())


def test_the_average_survives_a_checkpoint_and_one_that_does_not_fit_is_named(tmp_path):
    saved = moments(0.5)
    path = save_checkpoint(tmp_path, Checkpoint(server_round=2, adapter={"w": np.zeros(2, np.float32)}, strategy={},
                                                meta={"history": []}, moments=saved))
    back = load_checkpoint(path)
    assert set(back.moments) == set(SHAPES) and all(np.array_equal(back.moments[k], saved[k]) for k in SHAPES)
    assert misfit(back.moments, SHAPES) is None
    assert misfit({k: v for k, v in back.moments.items() if k != "0.exp_avg"}, SHAPES) == "moments-keys"
    assert load_checkpoint(save_checkpoint(tmp_path, Checkpoint(3, {"w": np.zeros(2, np.float32)}, {}, {}))).moments == {}
    count("invariant_checks_passed", "moments checkpointed")


def test_a_duplicate_reply_adds_nothing_to_the_average():
    """Bad input (RELIABILITY: two replies from one node): only a node's first reply, the one
    validation judged, contributes its moments."""
    from types import SimpleNamespace

    from server.loop import share_moments

    replies = []
    for node, value in ((1, 1.0), (1, 100.0), (2, 3.0)):
        reply = train_reply(node, {"w": np.zeros(2, np.float32)}, examples=10)
        reply.content[MOMENTS_KEY] = state_to_record(moments(value))
        replies.append(reply)
    taken = take_moments(replies)
    state = SimpleNamespace(clients={1: "c1", 2: "c2"}, moment_shapes=SHAPES, moments={})
    assert share_moments(state, 1, replies, taken, {"c1", "c2"}, sent={}) == 2
    assert all(np.allclose(a, 2.0) for a in state.moments.values())
    count("bad_inputs_rejected", "duplicate reply's moments")
