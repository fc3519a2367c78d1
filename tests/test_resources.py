"""The simulation sizes its parallel clients and torch threads by the clients sampled a round.

With K of N clients sampled, only K train at once: sizing threads by N left cores idle
(1 of 10 sampled on 2 cores ran 1 thread). RELIABILITY bad inputs: num-threads in the run config (moved to the node config) and bad node values.
"""

from __future__ import annotations

import os

import pytest

from simulation.run import backend_config, plan_resources, prepare
from tests.reliability import count


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


def test_the_engine_gives_each_client_its_share_of_the_cores():
    cpus = len(os.sched_getaffinity(0))
    one_a_round = backend_config(prepare({"fraction-train": 0.1, "min-train-clients": 1}, 10), 10)
    all_a_round = backend_config(prepare({}, 10), 10)
    assert one_a_round["client_resources"]["num_cpus"] == cpus
    assert all_a_round["client_resources"]["num_cpus"] == max(1, cpus // min(10, cpus))
    assert all_a_round["init_args"]["num_cpus"] <= cpus


def test_on_a_gpu_the_clients_that_train_at_once_share_it(monkeypatch):
    """device auto on a machine with a GPU (torch's answer patched): each of the clients that
    train at once asks Ray for an equal share of one GPU, so they fit on it together; one client
    a round gets the whole GPU. (On the H200 the share's memory cap is enforced: tests/test_gpu.py.)"""
    import torch

    import common.device

    monkeypatch.setattr(common.device, "resolve_device", lambda spec, **where: torch.device("cuda:0"))
    cpus = len(os.sched_getaffinity(0))
    for clients, overrides in [(10, {}), (3, {}), (10, {"fraction-train": 0.1, "min-train-clients": 1})]:
        cfg = prepare(overrides, clients)
        parallel, _ = plan_resources(cfg.train_sample_size(clients), cpus=cpus)
        share = backend_config(cfg, clients)["client_resources"]["num_gpus"]
        assert share == 1.0 / parallel and parallel * share <= 1.0
    assert backend_config(prepare({"fraction-train": 0.1, "min-train-clients": 1}, 10), 10)[
        "client_resources"]["num_gpus"] == 1.0


def test_a_clients_threads_come_from_its_node_config_else_omp_num_threads(monkeypatch):
    """num-threads is a node's setting (node config); the engine sets OMP_NUM_THREADS per client."""
    import torch

    from client.training import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        set_threads({})
        assert torch.get_num_threads() == 1
        set_threads({"num-threads": 2})
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", [-1, 1.5, "4", True])
def test_a_bad_num_threads_in_the_node_config_is_refused(value):
    from client.messages import node_threads
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"num-threads \(node config\): expected an integer >= 0, got"):
        node_threads({"num-threads": value})
    count("bad_inputs_rejected", f"node config num-threads={value!r}")


def test_num_threads_in_the_run_config_is_refused_with_where_it_moved():
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"num-threads: expected no such run-config key, got 1: .*--node-config"):
        prepare({"num-threads": 1}, 3)
    count("bad_inputs_rejected", "run config num-threads")
