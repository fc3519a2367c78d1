"""Hardening class 10: tests that would notice a privacy or safety bug in fedtune's own code paths.

The older privacy tests build their own Opacus optimizer and use a clipping norm of 1, where
sigma and sigma*C cannot be told apart; the validation tests' global adapter is all zeros and
never moves. These drive fedtune's real paths with inputs that separate the right answer from
the plausible wrong ones: a clipping norm of 0.3, a global adapter that has moved, two budgets,
a real client's FedProx loss, and each robust aggregator against an attacker.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MessageType
from opacus.optimizers import DPOptimizer

from client.app import train_handler
from common.config import FedtuneConfig
from common.ledger import Ledger, verify_chain
from common.records import record_to_state, state_to_record
from server.strategy import build_strategy
from server.validation import Policy, ValidatedStrategy
from tests.flower_messages import train_reply
from tests.reliability import count
from tests.test_client_app import context, message, setup  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.minutes(2), pytest.mark.usefixtures("task_identity")]  # Flower stamps messages with it


class OpacusSpy:
    """Watches the DPOptimizer that fedtune's own dp_train builds: recomputes every clipped sum
    from the per-sample gradients with the *configured* clipping norm, and collects the noise
    Opacus adds and the divisor it scales by."""

    def __init__(self, monkeypatch, clipping_norm: float) -> None:
        self.clip, self.noise, self.divisors, self.clipped_sums = clipping_norm, [], [], 0
        real_clip, real_noise, real_scale = DPOptimizer.clip_and_accumulate, DPOptimizer.add_noise, DPOptimizer.scale_grad
        spy = self

        def clip_and_accumulate(opt):
            before = [p.summed_grad.clone() if getattr(p, "summed_grad", None) is not None else 0 for p in opt.params]
            samples = [p.grad_sample.flatten(start_dim=1) for p in opt.params]  # (0, n) for the release step
            norms = torch.cat(samples, dim=1).norm(dim=1)
            factor = (spy.clip / (norms + 1e-6)).clamp(max=1.0)
            real_clip(opt)
            for p, b, g in zip(opt.params, before, samples):
                expected = (factor[:, None] * g).sum(0).view_as(p)
                torch.testing.assert_close(p.summed_grad - b, expected, rtol=1e-4, atol=1e-6)
            spy.clipped_sums += 1

        def add_noise(opt):
            summed = [p.summed_grad.clone() for p in opt.params]
            real_noise(opt)
            spy.noise.append(torch.cat([(p.grad - s).flatten() for p, s in zip(opt.params, summed)]))
            spy.noised = [p.grad.clone() for p in opt.params]

        def scale_grad(opt):
            real_scale(opt)
            spy.divisors.append(float(torch.median(torch.cat(
                [(n / p.grad).flatten() for n, p in zip(spy.noised, opt.params) if p.grad.abs().min() > 0]))))

        monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", clip_and_accumulate)
        monkeypatch.setattr(DPOptimizer, "add_noise", add_noise)
        monkeypatch.setattr(DPOptimizer, "scale_grad", scale_grad)


def test_dp_training_clips_and_noises_as_the_ledger_records_at_a_clipping_norm_other_than_1(setup, tmp_path,
                                                                                           monkeypatch):
    """The noise Opacus adds inside fedtune's DP training (the client's train handler) has std
    noise-multiplier x clipping-norm as the reply for the ledger records them; every per-sample
    gradient is clipped to the configured norm; the sum is divided by the expected batch."""
    cfg, initial = setup
    private = cfg.replace(dp_sample=True, dp_noise_multiplier=0.7, dp_clipping_norm=0.3, dp_batch_size=16,
                          dp_physical_batch_size=8)
    spy = OpacusSpy(monkeypatch, clipping_norm=0.3)
    node = context({"partition-id": 0, "num-partitions": 3, "privacy-dir": str(tmp_path), "epsilon-budget": 1e6})
    reply = train_handler(message(MessageType.TRAIN, private, initial), node)
    privacy = dict(reply.content["privacy"])
    assert privacy["status"] == "trained" and privacy["clipping-norm"] == 0.3 and privacy["noise-multiplier"] == 0.7
    noise = torch.cat(spy.noise)
    assert len(spy.noise) == privacy["steps"] and spy.clipped_sums >= privacy["steps"]
    assert noise.numel() > 100_000
    assert float(noise.std()) == pytest.approx(privacy["noise-multiplier"] * privacy["clipping-norm"], rel=0.02)
    assert abs(float(noise.mean())) < 0.01
    examples = int(reply.content["metrics"]["num-examples"])
    assert spy.divisors == [pytest.approx(round(privacy["sample-rate"] * examples), rel=1e-3)] * privacy["steps"]
    count("invariant_checks_passed", "class 10: DP noise std = recorded sigma x C (C = 0.3) in fedtune's path")
    count("invariant_checks_passed", "class 10: per-sample clipping to the configured C in fedtune's path")


def test_every_field_of_a_ledger_entry_is_covered_by_its_hash():
    """Editing any field of an entry, its chain fields (seq, prev_hash) included, breaks the
    chain at that entry; the ledger's own hash field is the only one left out."""
    ledger = Ledger()
    for r in (1, 2):
        ledger.append({"round": r, "scope": "client", "client": "site-1", "epsilon": 0.5 * r, "delta": 1e-5,
                       "noise_multiplier": 1.1, "sample_rate": 0.1, "steps": 9, "history": [[1.1, 0.1, 9]]})
    assert verify_chain(ledger.entries) == []
    edits = {int: lambda v: v + 1, float: lambda v: v * 1.5, str: lambda v: v + "0", list: lambda v: v + [[0]]}
    for field in (k for k in ledger.entries[1] if k != "hash"):
        entries = [dict(e) for e in ledger.entries]
        entries[1][field] = edits[type(entries[1][field])](entries[1][field])
        assert "entry 1: hash does not match its content (edited)" in verify_chain(entries), field
    count("invariant_checks_passed", "class 10: each ledger field is covered by the entry hash")


def moved_wrapper(policy: Policy):
    initial = {"lora_A.weight": np.zeros((4, 6), np.float32), "lora_B.weight": np.zeros((6, 4), np.float32)}
    moved = {k: np.full_like(v, 0.5) for k, v in initial.items()}
    wrapper = ValidatedStrategy(build_strategy(FedtuneConfig(min_train_clients=1, min_available_clients=1)),
                                initial=initial, policy=policy, clients={}, declared={n: 500 for n in range(1, 9)})
    wrapper.current = moved  # what configure_train sets from the round's arrays
    return wrapper, initial, moved


def test_update_norms_are_measured_against_the_current_global_adapter_not_the_initial_one():
    """After rounds have moved the global adapter, a reply that moved a little from it passes
    the norm bound and a reply that is back at the initial adapter does not."""
    wrapper, initial, moved = moved_wrapper(Policy(max_update_norm=1.0, max_norm_factor=0.0))
    rng = np.random.default_rng(0)
    near = {k: v + rng.normal(scale=0.01, size=v.shape).astype(np.float32) for k, v in moved.items()}
    verdicts = wrapper.validate(1, [train_reply(1, near), train_reply(2, initial)])
    assert verdicts[0].reason is None and verdicts[0].norm < 0.2
    assert verdicts[1].reason is not None and verdicts[1].norm == pytest.approx(0.5 * np.sqrt(48), rel=1e-6)
    count("bad_inputs_rejected", "class 10: an update measured against the moved global adapter")


def test_configure_train_takes_the_rounds_global_adapter_as_the_reference():
    """The reference for the norms is the adapter the round sends out, set by configure_train."""
    _, initial, moved = moved_wrapper(Policy())

    class Inner:  # the wrapped strategy's sampling is Flower's business, not under test here
        def configure_train(self, server_round, arrays, config, grid):
            return []

    wrapper = ValidatedStrategy(Inner(), initial=initial, policy=Policy(), clients={}, declared={})
    wrapper.configure_train(3, state_to_record(moved), ConfigRecord({}), grid=None)
    assert wrapper.current.keys() == moved.keys()
    assert all(np.array_equal(wrapper.current[k], moved[k]) for k in moved)


@pytest.mark.parametrize("server_budget, node_budget, binding", [(50.0, 0.05, 0.05), (0.05, 50.0, 0.05)])
def test_the_tighter_of_the_node_and_server_budgets_binds(setup, tmp_path, server_budget, node_budget, binding):
    """A client never accepts a looser limit from the server, and the server's tighter limit holds too."""
    cfg, initial = setup
    private = cfg.replace(dp_sample=True, dp_noise_multiplier=1.0, dp_epsilon_budget=server_budget)
    node = context({"partition-id": 0, "num-partitions": 3, "privacy-dir": str(tmp_path),
                    "epsilon-budget": node_budget})
    privacy = dict(train_handler(message(MessageType.TRAIN, private, initial), node).content["privacy"])
    assert privacy["status"] == "budget-exhausted" and privacy["epsilon-budget"] == binding
    assert privacy["epsilon-projected"] > binding and not list(tmp_path.glob("*.json"))
    count("bad_inputs_rejected", f"class 10: budget {binding} binds (server {server_budget}, node {node_budget})")


def update_norm_of(reply, initial) -> float:
    state = record_to_state(reply.content["arrays"])
    return float(np.sqrt(sum(np.sum((state[k] - initial[k]) ** 2) for k in initial)))


def test_fedprox_reaches_a_real_clients_loss(setup):
    """With strategy fedprox and a large mu, the client's update stays near the global adapter;
    the same client under fedavg (mu ignored) moves several times further."""
    cfg, initial = setup
    node = context({"partition-id": 0, "num-partitions": 3})
    runs = {}
    for strategy in ("fedavg", "fedprox"):
        c = cfg.replace(strategy=strategy, proximal_mu=1000.0, local_steps=6, learning_rate=5e-3)
        runs[strategy] = update_norm_of(train_handler(message(MessageType.TRAIN, c, initial), node), initial)
    assert runs["fedprox"] < 0.5 * runs["fedavg"], runs
    count("invariant_checks_passed", "class 10: FedProx's proximal term reaches the client's loss")


@pytest.mark.parametrize("strategy", ["krum", "multikrum", "bulyan", "fedmedian", "fedtrimmedavg"])
def test_each_robust_aggregator_keeps_an_attacker_out_of_the_global_adapter(strategy):
    """Seven honest updates near 0.1 and one attacker at 100 (within the validation bounds, so
    only the aggregator can stop it): the aggregate stays near the honest updates."""
    cfg = FedtuneConfig(strategy=strategy, num_malicious_clients=1, multikrum_select=3, trimmed_beta=0.2,
                        min_train_clients=1, min_available_clients=1, max_norm_factor=0.0)
    shape = {"lora_B.weight": (6, 4)}
    rng = np.random.default_rng(1)
    replies = [train_reply(n, {k: (0.1 + rng.normal(scale=0.01, size=s)).astype(np.float32) for k, s in shape.items()})
               for n in range(1, 8)]
    replies.append(train_reply(8, {k: np.full(s, 100.0, np.float32) for k, s in shape.items()}))
    initial = {k: np.zeros(s, np.float32) for k, s in shape.items()}
    wrapper = ValidatedStrategy(build_strategy(cfg), initial=initial, policy=Policy(max_norm_factor=0.0),
                                clients={}, declared={n: 500 for n in range(1, 9)})
    arrays, _ = wrapper.aggregate_train(1, replies)
    result = record_to_state(arrays)["lora_B.weight"]
    assert np.all(np.abs(result - 0.1) < 0.05), (strategy, float(np.abs(result - 0.1).max()))
    count("bad_inputs_rejected", f"class 10: {strategy} keeps an attacker out")
