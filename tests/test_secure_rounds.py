"""Secure rounds as the server runs them (server/secure_train.py), against the real ClientApp.

The transport is in-process (tests/inprocess_grid.py); the ClientApp, its handlers, the model, the
protocol and the server's aggregation are the real ones. RELIABILITY secure aggregation: S1 (the
secure mean equals FedAvg's mean of the same updates, to quantization error; a dropped client is
recovered), S2 (a reused public key is rejected), S3 (each client's noise share has the planned
variance and the sum carries at least the target, spied on the real code path at a clipping norm
of 0.5), S4 (the ledger's federation entry describes the mechanism that ran). Invariant I4: the
round ledger partitions the sampled clients, with `discarded` for a round that was not applied.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message, RecordDict

import common.dp_train
import common.skellam
import server.secure_train
from client.app import app as client_app
from client.app import train_handler
from common.config import FedtuneConfig
from common.federation_data import federation_labels
from common.flower import OrderedGrid, seed_sampling_and_noise
from common.quantize import flatten
from common.records import record_to_state, state_to_record
from server.distributed_dp import ServerAdamW, make_plan
from server.rundir import RunDir
from server.secure_train import secure_train
from server.state import initial_state
from server.strategy import build_strategy
from tests.inprocess_grid import InProcessGrid
from tests.reliability import count

pytestmark = [pytest.mark.minutes(3), pytest.mark.usefixtures("task_identity")]  # Flower stamps messages with it
BASE = FedtuneConfig(partitioner="iid", max_train_examples=240, max_heldout_examples=40, max_length=32, local_steps=2,
                     batch_size=8, secure_aggregation=True, validate_updates=False, fraction_evaluate=0.0)
NODES = [11, 22, 33]


def federation(cfg: FedtuneConfig, tmp_path, *, drop=None, app=client_app):
    """(server state, strategy, grid) of a 3-client federation whose clients run in this process."""
    cfg = cfg.replace(labels=federation_labels(cfg).to_spec(), run_dir=str(tmp_path / "run"))
    run = RunDir.for_config(cfg)
    _, state = initial_state(cfg, federation_labels(cfg), run)
    nodes = {n: {"partition-id": i, "num-partitions": 3, "privacy-dir": str(tmp_path / "privacy")}
             for i, n in enumerate(NODES)}
    grid = InProcessGrid(app, nodes, drop=drop)
    state.clients = {n: f"partition-{i}" for i, n in enumerate(NODES)}
    state.declared = {n: 0 for n in NODES}
    from common.federation_data import simulated_client_data

    for i, n in enumerate(NODES):
        state.declared[n] = len(simulated_client_data(cfg, i, 3).train)
    return state, build_strategy(cfg), grid


def train_messages(state, strategy, grid, server_round=1):
    seed_sampling_and_noise(server_round)
    return list(strategy.configure_train(server_round, state_to_record(state.arrays), state.message_config(),
                                         OrderedGrid(grid, state.clients)))


def test_the_secure_mean_is_fedavgs_mean_to_quantization_error(tmp_path):
    state, strategy, grid = federation(BASE, tmp_path)
    start = {k: v.copy() for k, v in state.arrays.items()}
    messages = train_messages(state, strategy, grid)
    outcome = secure_train(grid, state, strategy, 1, messages)
    assert outcome.entry["aggregated"] == ["partition-0", "partition-1", "partition-2"]
    assert outcome.entry["secure_aggregation"]["applied"] and outcome.entry["discarded"] == []
    # The same clients' plain replies to the same training message (training is seeded): FedAvg by hand.
    plain = [train_handler(Message(content=RecordDict({"arrays": m.content["arrays"], "config": m.content["config"]}),
                                   message_type="train", dst_node_id=m.metadata.dst_node_id), grid.contexts[n])
             for n, m in zip(NODES, sorted(messages, key=lambda m: m.metadata.dst_node_id))]
    weights = [r.content["metrics"]["num-examples"] for r in plain]
    expected = {k: sum(w * record_to_state(r.content["arrays"])[k] for w, r in zip(weights, plain)) / sum(weights)
                for k in start}
    worst = max(float(np.abs(state.arrays[k] - expected[k]).max()) for k in start)
    moved = max(float(np.abs(state.arrays[k] - start[k]).max()) for k in start)
    assert worst < 1e-6 < moved, (worst, moved)
    loss = sum(w * r.content["metrics"]["train-loss"] for w, r in zip(weights, plain)) / sum(weights)
    assert outcome.summary["train_loss"] == pytest.approx(loss, abs=1e-3)
    # What the server saw of each client: a masked vector, a client record and its training time; no loss, no count.
    masked = [m for m in grid.sent if m.metadata.message_type == "train.secagg_masked"]
    assert len(masked) == 3
    count("invariant_checks_passed", "S1 secure mean equals FedAvg's mean")


def test_a_client_lost_mid_round_is_recovered_and_two_lost_end_the_round_unapplied(tmp_path):
    lost = {NODES[1]}
    state, strategy, grid = federation(BASE, tmp_path, drop=lambda n, m: n in lost and m.metadata.message_type ==
                                       "train.secagg_masked")
    outcome = secure_train(grid, state, strategy, 1, train_messages(state, strategy, grid))
    entry = outcome.entry
    assert entry["aggregated"] == ["partition-0", "partition-2"] and entry["timed_out"] == ["partition-1"]
    assert entry["secure_aggregation"]["stages"] == {"keys": 3, "shares": 3, "masked": 2, "unmask": 2}
    count("faults_survived", "a client lost after sharing its keys: its masks removed from the secure sum")

    lost.update({NODES[0]})
    before = {k: v.copy() for k, v in state.arrays.items()}
    outcome = secure_train(grid, state, strategy, 2, train_messages(state, strategy, grid, 2))
    entry = outcome.entry
    assert not entry["secure_aggregation"]["applied"] and "below the threshold 2" in entry["secure_aggregation"]["reason"]
    assert entry["aggregated"] == [] and entry["discarded"] == ["partition-2"]
    assert sorted(entry["timed_out"]) == ["partition-0", "partition-1"]
    assert all(np.array_equal(before[k], state.arrays[k]) for k in before)  # nothing applied
    count("faults_survived", "more drop-outs than the threshold allows: the round ends unapplied")


def test_a_public_key_seen_in_an_earlier_round_is_rejected(tmp_path):
    replayed = {}

    def replay_keys(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train.secagg_keys" and context.node_id == NODES[2]:
            if "reply" in replayed:  # the node sends its first round's keys again
                reply.content["secagg"] = replayed["reply"]
            replayed.setdefault("reply", reply.content["secagg"])
        return reply

    from flwr.clientapp import ClientApp

    wrapped = ClientApp(mods=[replay_keys])
    for action in ("secagg_keys", "secagg_shares", "secagg_masked", "secagg_unmask"):
        wrapped.train(action)(client_app._registered_funcs[f"train.{action}"])
    state, strategy, grid = federation(BASE, tmp_path, app=wrapped)
    secure_train(grid, state, strategy, 1, train_messages(state, strategy, grid))
    outcome = secure_train(grid, state, strategy, 2, train_messages(state, strategy, grid, 2))
    assert outcome.entry["rejected"] == [{"client": "partition-2", "reason": "reused-key"}]
    assert outcome.entry["aggregated"] == ["partition-0", "partition-1"]
    count("bad_inputs_rejected", "a secure-aggregation public key reused across rounds")


def test_distributed_dp_noise_shares_and_the_released_sum_are_as_planned(tmp_path, monkeypatch):
    """S3 on the real path at clipping norm 0.5: every share has variance (z * l2)^2 / threshold with
    l2 = s * 0.5 + sqrt(d); the unmasked sum minus the shares is the rounded, scaled clipped sums;
    the server steps with sum / (s * q * N)."""
    cfg = BASE.replace(dp_sample=True, dp_mode="distributed", dp_noise_multiplier=0.9, dp_clipping_norm=0.5,
                       dp_batch_size=60, local_steps=0)
    state, strategy, grid = federation(cfg, tmp_path)
    dimension = sum(v.size for v in state.arrays.values())
    state.dp_plan = make_plan(cfg, state.declared, dimension=dimension)
    state.dp_optimizer = ServerAdamW(state.arrays, learning_rate=cfg.learning_rate, weight_decay=0.0)
    shares, sums = [], []
    real_noise = common.skellam.skellam_noise

    def noise_spy(variance, size, rng):
        drawn = real_noise(variance, size, rng)
        shares.append((variance, drawn))
        return drawn

    real_sum = common.dp_train.clipped_gradient_sum

    def sum_spy(*args, **kwargs):
        out = real_sum(*args, **kwargs)
        sums.append(out)
        return out

    monkeypatch.setattr(common.skellam, "skellam_noise", noise_spy)
    monkeypatch.setattr(common.dp_train, "clipped_gradient_sum", sum_spy)
    captured = {}
    real_step = server.secure_train.dp_step
    monkeypatch.setattr(server.secure_train, "dp_step", lambda s, total, records, r: captured.update(total=total, records=records)
                        or real_step(s, total, records, r))
    outcome = secure_train(grid, state, strategy, 1, train_messages(state, strategy, grid))

    plan = state.dp_plan
    threshold = outcome.entry["secure_aggregation"]["threshold"]
    l2 = plan.scale * 0.5 + np.sqrt(dimension)
    assert plan.sensitivities[0] == pytest.approx(l2)
    assert len(shares) == 3 and threshold == 2
    for variance, drawn in shares:
        assert variance == pytest.approx((0.9 * l2) ** 2 / threshold, rel=1e-12)
        assert np.var(drawn) == pytest.approx(variance, rel=0.03)  # d ~ 75k draws
    summed_noise = sum(drawn for _, drawn in shares)
    assert np.var(summed_noise) >= 0.95 * plan.variance * 3 / threshold >= 0.95 * plan.variance
    signal = sum(flatten(s, sorted(s)) for s, _ in sums) * plan.scale
    residual = captured["total"] - summed_noise - signal
    assert np.abs(residual).max() <= 3  # one unbiased rounding per client
    assert captured["records"] == sum(state.declared.values())
    count("invariant_checks_passed", "S3 noise shares have the planned variance and the sum at least the target")


def test_local_dp_under_secure_aggregation_records_each_clients_spend(tmp_path):
    """Local DP-SGD and secure aggregation together: each client noises its own update and the server
    sees only the sum; each client's privacy record still reaches the ledger, and a client whose own
    budget refuses the round says so at the first stage, before any key is made."""
    cfg = BASE.replace(dp_sample=True, dp_noise_multiplier=1.0, dp_batch_size=20, local_steps=2)
    state, strategy, grid = federation(cfg, tmp_path)
    grid.contexts[NODES[2]].node_config["epsilon-budget"] = 1e-3  # this node's own, tighter budget
    outcome = secure_train(grid, state, strategy, 1, train_messages(state, strategy, grid))
    assert outcome.entry["aggregated"] == ["partition-0", "partition-1"]
    assert outcome.entry["refused"] == ["partition-2"]
    assert [c for c, _ in outcome.trained] == ["partition-0", "partition-1"]
    assert all(r.content["privacy"]["status"] == "trained" for _, r in outcome.trained)
    assert [c for c, _ in outcome.refused] == ["partition-2"]
    keys = [m for m in grid.sent if m.metadata.message_type == "train.secagg_shares"]
    assert sorted(m.metadata.dst_node_id for m in keys) == NODES[:2]  # the refusing node got no further message
    count("bad_inputs_rejected", "a round over a node's own budget refused at the first secure stage")
