"""Hardening class 11: tests written against plausible wrong implementations of what no test checked
closely enough (each has a planted mutant in bench/mutants.py that it kills).

- FedProx's term at a realistic mu (0.01), to the digit: a term 3,000x too weak still "regularises".
- Early stopping: an improvement resets the patience.
- `fedtune evaluate --round best` scores the best round, not the last.
- The resume fingerprint covers the held-out set, not only the training data.
- Clients draw new batches every round (a seed without the round repeats them).
- The latest checkpoint is the highest round number, not the last name in sort order.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from client.app import train_handler
from common.records import record_to_state
from common.train import proximal_term
from server.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from tests.reliability import count
from tests.test_client_app import context, message, setup  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.minutes(1), pytest.mark.usefixtures("task_identity")]  # Flower stamps messages with it


def test_the_proximal_term_at_a_realistic_mu_is_mu_over_2_times_the_squared_distance():
    params = [torch.full((3, 4), 1.25), torch.full((5,), -0.5)]
    anchor = [torch.zeros(3, 4), torch.zeros(5)]
    squared = 12 * 1.25**2 + 5 * 0.5**2
    assert float(proximal_term(params, anchor, mu=0.01)) == pytest.approx(0.005 * squared, rel=1e-6)
    gradient = torch.autograd.grad(proximal_term([p.requires_grad_() for p in params], anchor, mu=0.01), params)
    assert torch.allclose(gradient[0], torch.full((3, 4), 0.0125)) and torch.allclose(gradient[1], torch.full((5,), -0.005))
    count("invariant_checks_passed", "FedProx's term mu/2 ||w - w0||^2 at mu 0.01")


def history_state(values: list[float], patience: int):
    from types import SimpleNamespace

    from common.config import FedtuneConfig

    cfg = FedtuneConfig(early_stopping_rounds=patience, best_metric="accuracy")
    return SimpleNamespace(cfg=cfg, history=[{"round": r, "heldout_accuracy": v} for r, v in enumerate(values)])


def test_an_improvement_resets_the_early_stopping_patience():
    from server.best import rounds_without_improvement, should_stop_early

    # rounds 0-4: better at 1, worse at 2, better again at 3, worse at 4: one round without improvement
    improving = history_state([0.5, 0.6, 0.55, 0.7, 0.65], patience=2)
    assert rounds_without_improvement(improving) == 1 and not should_stop_early(improving)
    stalled = history_state([0.5, 0.6, 0.55, 0.58, 0.59], patience=3)
    assert rounds_without_improvement(stalled) == 3 and should_stop_early(stalled)
    tie = history_state([0.5, 0.6, 0.6], patience=1)  # a tie is no improvement: the earlier round stays best
    assert rounds_without_improvement(tie) == 1 and should_stop_early(tie)


def test_evaluate_round_best_scores_the_best_round_not_the_last(tmp_path):
    from common.config import FedtuneConfig
    from server.tools.scoring import checkpoint_for

    config = FedtuneConfig().to_run_config()
    for r in range(4):
        save_checkpoint(tmp_path / "checkpoints", Checkpoint(server_round=r, adapter={}, strategy={},
                                                             meta={"config": config}))
    (tmp_path / "best.json").write_text(json.dumps({"round": 1, "metric": "heldout_macro_f1", "value": 0.7}))
    assert checkpoint_for(tmp_path, "best").name == "round-0001.safetensors"
    assert checkpoint_for(tmp_path, "final").name == "round-0003.safetensors"
    assert checkpoint_for(tmp_path, "2").name == "round-0002.safetensors"


def test_the_resume_fingerprint_covers_the_held_out_set():
    from common.config import FedtuneConfig
    from common.federation_data import data_fingerprint

    base = FedtuneConfig(max_train_examples=200)
    assert data_fingerprint(base) == data_fingerprint(base.replace(num_server_rounds=9))
    assert data_fingerprint(base) != data_fingerprint(base.replace(max_heldout_examples=30))  # same training pool
    assert data_fingerprint(base) != data_fingerprint(base.replace(max_train_examples=210))


def test_a_client_draws_new_batches_in_every_round(setup):
    """The same global adapter sent in rounds 1 and 2: the local updates differ (other batches, other
    dropout), and each round repeats itself exactly."""
    cfg, initial = setup
    node = context({"partition-id": 0, "num-partitions": 3})
    updates = {}
    for server_round in (1, 2, 1):
        msg = message(MessageType.TRAIN, cfg, initial)
        msg.content["config"]["server-round"] = server_round
        arrays = record_to_state(train_handler(msg, node).content["arrays"])
        again = updates.setdefault(server_round, arrays)
        assert all(np.array_equal(again[k], arrays[k]) for k in arrays)
    assert any(not np.array_equal(updates[1][k], updates[2][k]) for k in updates[1])
    count("invariant_checks_passed", "clients draw new batches every round")


def test_the_latest_checkpoint_is_the_highest_round(tmp_path):
    folder = tmp_path / "checkpoints"
    for r in (9, 10, 100, 2):
        save_checkpoint(folder, Checkpoint(server_round=r, adapter={}, strategy={}, meta={}))
    (folder / "round-0500.safetensors.tmp").write_bytes(b"half")  # a write a kill interrupted
    (folder / "notes-9999.safetensors").write_bytes(b"")
    assert latest_checkpoint(folder).name == "round-0100.safetensors"
