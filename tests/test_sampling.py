"""Balanced client participation (`client-sampling = balanced`): who trains each round.

RELIABILITY: I4 (every sampled client is accounted for: the counts come from the round
ledger's `sampled` lists); fault - a restart resumes the same participation (the ledger is in
every checkpoint; end to end in tests/test_simulation.py); bad input - a strategy that
addresses different content to different clients is refused rather than silently re-addressed.
"""

from __future__ import annotations

from collections import Counter

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from server.sampling import least_sampled, participation, send_to
from tests.reliability import count

NODES = [101, 102, 103, 104, 105, 106, 107, 108, 109, 110]
CLIENTS = {n: f"partition-{i}" for i, n in enumerate(NODES)}


def simulate_rounds(rounds: int, k: int, nodes=NODES, clients=CLIENTS, ledger=None) -> list[dict]:
    ledger = [] if ledger is None else ledger
    for r in range(len(ledger) + 1, len(ledger) + rounds + 1):
        chosen = least_sampled(nodes, clients, participation(ledger), k, seed=r)
        ledger.append({"round": r, "sampled": sorted(clients[n] for n in chosen)})
    return ledger


def test_every_client_trains_once_in_each_block_of_n_over_k_rounds():
    ledger = simulate_rounds(20, 2)
    for block in range(4):
        seen = [c for entry in ledger[5 * block : 5 * block + 5] for c in entry["sampled"]]
        assert sorted(seen) == sorted(CLIENTS.values())  # each of the 10 exactly once
    assert set(participation(ledger).values()) == {4}
    orders = [tuple(tuple(e["sampled"]) for e in ledger[5 * b : 5 * b + 5]) for b in range(4)]
    assert len(set(orders)) > 1  # the order within a block is reshuffled, not a fixed cycle


def test_counts_stay_within_one_when_k_does_not_divide_n():
    counts = participation(simulate_rounds(7, 3))
    assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == 21


def test_the_choice_is_seeded_and_follows_only_the_ledger():
    """The same ledger and seed choose the same clients (a resumed server repeats the
    uninterrupted one); another seed may break the ties differently."""
    ledger = simulate_rounds(3, 2)
    again = simulate_rounds(3, 2)
    assert ledger == again
    picks = {tuple(least_sampled(NODES, CLIENTS, participation(ledger), 2, seed=s)) for s in range(20)}
    assert len(picks) > 1
    resumed = simulate_rounds(4, 2, ledger=[dict(e) for e in ledger])
    uninterrupted = simulate_rounds(7, 2)
    assert resumed == uninterrupted


def test_a_late_joiner_is_preferred_until_it_has_caught_up():
    ledger = simulate_rounds(5, 2, nodes=NODES[:8])  # partition-8 and -9 not yet connected
    late = least_sampled(NODES, CLIENTS, participation(ledger), 2, seed=6)
    assert sorted(CLIENTS[n] for n in late) == ["partition-8", "partition-9"]
    unknown = least_sampled([*NODES[:8], 999], CLIENTS, participation(ledger), 1, seed=6)
    assert unknown == [999]  # a node that has not said who it is yet counts as never sampled


@pytest.fixture
def server_process():
    """Flower stamps new messages with the run of the ServerApp process; stand in for one."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_the_strategy_still_decides_how_many_and_what(server_process):
    record = RecordDict({"config": ConfigRecord({"server-round": 3})})
    drawn = [Message(content=record, dst_node_id=n, message_type="train") for n in (101, 105)]
    moved = send_to(drawn, [107, 102])
    assert [m.metadata.dst_node_id for m in moved] == [107, 102]
    assert all(m.content is record and m.metadata.message_type == "train" and m.metadata.run_id == 1 for m in moved)
    with pytest.raises(ValueError, match="one node per message"):
        send_to(drawn, [107])
    with pytest.raises(ValueError, match="0..10 clients"):
        least_sampled(NODES, CLIENTS, Counter(), 11, seed=1)


def test_per_client_content_is_refused_not_re_addressed(server_process):
    count("bad_inputs_rejected", "balanced-sampling-per-client-content")
    drawn = [Message(content=RecordDict({"config": ConfigRecord({"who": n})}), dst_node_id=n, message_type="train")
             for n in (101, 105)]
    with pytest.raises(ValueError, match="same content"):
        send_to(drawn, [102, 103])
