"""The simulation sizes its parallel clients and torch threads by the clients sampled a round.

With K of N clients sampled, only K train at once: sizing threads by N left cores idle
(1 of 10 sampled on 2 cores ran 1 thread). RELIABILITY: none (a resource plan, not a fault).
"""

from __future__ import annotations

import os

import pytest

from simulation.run import plan_resources, prepare


@pytest.mark.parametrize("num_clients, overrides, expected", [
    (10, {}, 10),                                              # fraction-train 1.0: all
    (10, {"fraction-train": 0.2, "min-train-clients": 2}, 2),
    (10, {"fraction-train": 0.1, "min-train-clients": 1}, 1),
    (10, {"fraction-train": 0.1, "min-train-clients": 2}, 2),  # the minimum wins
    (100, {"fraction-train": 0.1, "min-train-clients": 2}, 10),
    (3, {"fraction-train": 0.5, "min-train-clients": 1}, 1),   # int(1.5), as Flower's FedAvg
])
def test_train_sample_size_follows_flowers_sampling_rule(num_clients, overrides, expected):
    cfg = prepare(overrides, num_clients)
    assert cfg.train_sample_size(num_clients) == expected


@pytest.mark.parametrize("training, cpus, expected", [
    (1, 2, (1, 2)),    # one client a round gets both cores
    (2, 2, (2, 1)),
    (10, 2, (2, 1)),
    (2, 8, (2, 4)),
    (3, 8, (3, 2)),
])
def test_plan_resources_gives_every_core_to_the_clients_that_train(training, cpus, expected):
    assert plan_resources(training, cpus=cpus) == expected


def test_prepare_fills_threads_from_the_sampled_clients_not_all_clients():
    cpus = len(os.sched_getaffinity(0))
    one_a_round = prepare({"fraction-train": 0.1, "min-train-clients": 1}, 10)
    all_a_round = prepare({}, 10)
    assert one_a_round.num_threads == cpus
    assert all_a_round.num_threads == max(1, cpus // min(10, cpus))
    assert prepare({"num-threads": 1, "fraction-train": 0.1, "min-train-clients": 1}, 10).num_threads == 1
