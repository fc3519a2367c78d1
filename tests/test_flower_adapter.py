"""Each of fedtune's reaches into Flower's internals (common/flower.py), checked against the
installed Flower: an upgrade that changes one fails here, by name.

RELIABILITY invariants: I2 (the global adapter's state survives a restart: every attribute a
round changes in a strategy is checkpointed), I6 (determinism: seeded sampling and DP noise).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import strategy as fl

from common.config import FedtuneConfig
from common.flower import (
    KEY_CLIPPING_NORM, STATEFUL_ATTRS, OrderedGrid, dp_clipping_norm, federation_epsilon, find_strategy,
    load_strategy_state, seed_sampling_and_noise, set_dp_sample_size, strategy_chain, strategy_state,
)
from common.records import state_to_record
from server.privacy import wrap_client_dp
from server.strategy import build_strategy
from server.validation import Policy, ValidatedStrategy
from tests.flower_messages import train_reply
from tests.reliability import count

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower stamps messages with it

SHAPE = (40, 50)


class NodesOnly:
    """A Grid as Flower's strategies use it in configure_*: only the connected node ids."""

    def __init__(self, nodes) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def start(strategy, server_round: int, arrays: dict, nodes=range(1, 5)) -> list:
    return list(strategy.configure_train(server_round, state_to_record(arrays), ConfigRecord({}), NodesOnly(nodes)))


def public_state(strategy) -> dict:
    return {level: {k: copy.deepcopy(v) for k, v in vars(s).items() if k != "strategy"}
            for level, s in strategy_chain(strategy)}


def changed_attributes(before: dict, after: dict) -> set[str]:
    def same(a, b) -> bool:
        if isinstance(a, ArrayRecord) or isinstance(b, ArrayRecord):
            return isinstance(a, ArrayRecord) and isinstance(b, ArrayRecord) and a.keys() == b.keys() and all(
                np.array_equal(a[k].numpy(), b[k].numpy()) for k in a.keys())
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return np.array_equal(a, b)
        return a == b

    return {attr for level in after for attr in after[level]
            if attr not in before[level] or not same(before[level][attr], after[level][attr])}


STRATEGIES = ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "krum", "multikrum", "bulyan",
              "fedmedian", "fedtrimmedavg"]


@pytest.mark.parametrize("dp", ["off", "server-fixed", "client-fixed", "server-adaptive"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_attribute_a_round_changes_is_checkpointed(name, dp):
    """STATEFUL_ATTRS names every attribute Flower's strategies and DP wrappers change from one
    round to the next; the checkpoint restores a strategy that aggregates the next round exactly
    as the one that ran on (I2)."""
    cfg = FedtuneConfig(strategy=name, dp_client=dp, num_malicious_clients=0, min_available_clients=1,
                        min_train_clients=1, fraction_train=1.0)
    strategy = wrap_client_dp(cfg, build_strategy(cfg), num_sampled=4)
    rng = np.random.default_rng(0)
    arrays = {"w": np.zeros(SHAPE, np.float32)}
    for server_round in (1, 2):
        before = public_state(strategy)
        seed_sampling_and_noise(server_round)
        messages = start(strategy, server_round, arrays)
        replies = [train_reply(m.metadata.dst_node_id, {"w": rng.normal(0, 0.1, SHAPE).astype(np.float32)},
                               server_round=server_round) for m in messages]
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        arrays = {"w": aggregated["w"].numpy()}
        changed = changed_attributes(before, public_state(strategy)) - {"_pending_events"}
        unkept = sorted(changed - set(STATEFUL_ATTRS))
        assert not unkept, f"{name}/{dp}: round {server_round} changed {unkept}, which no checkpoint keeps"
    restored = wrap_client_dp(cfg, build_strategy(cfg), num_sampled=4)
    load_strategy_state(restored, strategy_state(strategy))
    replies = [train_reply(n, {"w": np.full(SHAPE, 0.05 * n, np.float32)}, server_round=3) for n in range(1, 5)]
    outcomes = []
    for s in (strategy, restored):
        seed_sampling_and_noise(3)
        start(s, 3, arrays)
        outcomes.append(s.aggregate_train(3, copy.deepcopy(replies))[0]["w"].numpy())
    assert np.array_equal(*outcomes), f"{name}/{dp}: the restored strategy aggregates differently"
    count("invariant_checks_passed", f"I2 strategy state restored: {name}/{dp}")


@pytest.mark.parametrize("sampled", [2, 4])
def test_dp_noise_std_follows_the_sample_size_set_each_round(sampled):
    """Flower's DP wrapper noises the average with std z*C/num_sampled_clients; set_dp_sample_size
    is how fedtune makes that the clients actually sampled this round."""
    cfg = FedtuneConfig(dp_client="server-fixed", dp_client_noise_multiplier=1.0, dp_client_clipping_norm=0.5)
    strategy = wrap_client_dp(cfg, build_strategy(cfg), num_sampled=10)
    zeros, tiny = {"w": np.zeros((200, 200), np.float32)}, {"w": np.full((200, 200), 1e-6, np.float32)}
    seed_sampling_and_noise(1)
    messages = start(strategy, 1, zeros, nodes=range(1, sampled + 1))
    set_dp_sample_size(strategy, len(messages))
    aggregated, _ = strategy.aggregate_train(1, [train_reply(m.metadata.dst_node_id, tiny) for m in messages])
    std = float(aggregated["w"].numpy().std())
    assert std == pytest.approx(1.0 * 0.5 / sampled, rel=0.03)
    count("invariant_checks_passed", f"DP noise std z*C/{sampled}")


def test_the_client_side_wrapper_sends_its_norm_under_the_key_the_client_reads():
    """dp-client = client-fixed: the client clips when its config carries KEY_CLIPPING_NORM (client/app.py)."""
    cfg = FedtuneConfig(dp_client="client-fixed", dp_client_clipping_norm=0.7)
    strategy = wrap_client_dp(cfg, build_strategy(cfg), num_sampled=4)
    messages = start(strategy, 1, {"w": np.zeros(SHAPE, np.float32)})
    assert messages and all(m.content["config"][KEY_CLIPPING_NORM] == 0.7 for m in messages)


def test_adaptive_clipping_norm_is_read_from_the_wrapper_as_it_moves():
    cfg = FedtuneConfig(dp_client="server-adaptive", dp_client_clipping_norm=1.0, dp_client_noise_multiplier=0.1)
    strategy = wrap_client_dp(cfg, build_strategy(cfg), num_sampled=4)
    assert dp_clipping_norm(strategy, default=9.0) == 1.0
    tiny = {"w": np.full(SHAPE, 1e-4, np.float32)}  # every update far below the norm: the norm adapts
    seed_sampling_and_noise(1)
    messages = start(strategy, 1, {"w": np.zeros(SHAPE, np.float32)})
    strategy.aggregate_train(1, [train_reply(m.metadata.dst_node_id, tiny) for m in messages])
    moved = dp_clipping_norm(strategy, default=9.0)
    assert moved != 1.0 and moved == strategy.clipping_norm
    assert dp_clipping_norm(build_strategy(cfg), default=9.0) == 9.0  # no wrapper: the configured norm


def test_seeded_sampling_repeats_whatever_order_the_grid_lists_its_nodes_in():
    """Flower samples with `random.sample` over grid.get_node_ids(): seeding `random` and ordering
    the nodes by client id (OrderedGrid) repeat the sample across restarts (I6)."""
    cfg = FedtuneConfig(fraction_train=0.3, min_train_clients=1, min_available_clients=1)
    clients = {n: f"client-{n:02d}" for n in range(10, 20)}

    def sample(seed: int, nodes) -> list[int]:
        seed_sampling_and_noise(seed)
        grid = OrderedGrid(NodesOnly(nodes), clients)
        messages = build_strategy(cfg).configure_train(1, state_to_record({"w": np.zeros(2, np.float32)}),
                                                       ConfigRecord({}), grid)
        return sorted(m.metadata.dst_node_id for m in messages)

    forwards, backwards = sample(7, range(10, 20)), sample(7, reversed(range(10, 20)))
    assert forwards == backwards and len(forwards) == 3
    assert any(sample(s, range(10, 20)) != forwards for s in range(8, 14))
    count("invariant_checks_passed", "I6 seeded sampling")


def test_seeded_noise_repeats():
    cfg = FedtuneConfig(dp_client="server-fixed", dp_client_noise_multiplier=1.0)
    zeros, tiny = {"w": np.zeros(SHAPE, np.float32)}, {"w": np.full(SHAPE, 1e-6, np.float32)}
    out = []
    for seed in (5, 5, 6):
        strategy = wrap_client_dp(cfg, build_strategy(cfg), num_sampled=4)
        seed_sampling_and_noise(seed)
        messages = start(strategy, 1, zeros)
        out.append(strategy.aggregate_train(1, [train_reply(m.metadata.dst_node_id, tiny) for m in messages])[0]["w"]
                   .numpy())
    assert np.array_equal(out[0], out[1]) and not np.array_equal(out[0], out[2])
    count("invariant_checks_passed", "I6 seeded DP noise")


def test_the_chain_reaches_through_validation_and_flowers_dp_wrapper():
    cfg = FedtuneConfig(strategy="fedadam", dp_client="server-fixed")
    inner = build_strategy(cfg)
    dp = wrap_client_dp(cfg, inner, num_sampled=2)
    outer = ValidatedStrategy(dp, initial={"w": np.zeros(2, np.float32)}, policy=Policy(), clients={}, declared={})
    assert [s for _, s in strategy_chain(outer)] == [outer, dp, inner]
    assert find_strategy(outer, ValidatedStrategy) is outer and find_strategy(outer, fl.FedAdam) is inner
    assert find_strategy(dp, ValidatedStrategy) is None


def test_flowers_accountant_agrees_with_fedtunes_for_the_federation():
    """The audit checks the ledger's federation epsilon with Flower's own accountant."""
    from common.privacy import WITHOUT_REPLACEMENT, Mechanism, epsilon_rdp

    rounds = [{"noise_multiplier": 1.1, "sample_size": 5, "population": 50}] * 20
    ours = epsilon_rdp([Mechanism(noise_multiplier=1.1, steps=20, sampling=WITHOUT_REPLACEMENT, population=50,
                                  sample_size=5)],
                       delta=1e-5)
    assert federation_epsilon(rounds, 1e-5) == pytest.approx(ours, rel=0.05)
    assert federation_epsilon([], 1e-5) == 0.0


def test_a_server_made_reply_reads_as_a_received_one_for_flowers_strategies():
    """The secure round's unmasked mean goes through the strategy as one reply the server built:
    it needs Message's internal metadata form, and FedAvg must aggregate it like a received reply."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from common.flower import server_made_reply

    arrays = {"w": np.arange(4, dtype=np.float32)}
    content = RecordDict({"arrays": ArrayRecord({"w": Array(arrays["w"])}), "metrics": MetricRecord({"num-examples": 3.0})})
    reply = server_made_reply(content, message_id="secure-sum-2", group_id="2")
    assert reply.metadata.message_id == "secure-sum-2" and reply.metadata.group_id == "2"
    assert not reply.has_error() and reply.metadata.message_type == "train"
    aggregated, _ = FedAvg().aggregate_train(2, [reply])
    np.testing.assert_array_equal(aggregated["w"].numpy(), arrays["w"])
