"""The canary audit (common/canaries.py, server/canaries.py): the one-run bound itself, DP-SGD with
gradient canaries, and the audit of a run's canaries.json.

RELIABILITY: S4 (accounted as run: the canaries check that the mechanism that ran is no leakier
than the one recorded, and catch noise 16x too small, noise reused across rounds and skipped
clipping); evidence that survives tampering (edited bits or scores in canaries.json are problems).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from common.canaries import (
    CANARY_NORM,
    Canaries,
    CanaryError,
    Layout,
    canary_scores,
    epsilon_lower_bound,
    guess_counts,
    largest_rejected_epsilon,
    p_value,
)
from common.config import FedtuneConfig
from common.errors import ConfigError
from tests.reliability import count


def closed_form(guesses: int, significance: float) -> float:
    """delta = 0 and every guess right: P = p^k <= significance gives p = significance^(1/k), eps = logit p."""
    p = significance ** (1 / guesses)
    return math.log(p / (1 - p))


@pytest.mark.parametrize("guesses", [1, 20, 100, 1000])
def test_the_bound_of_perfect_guesses_without_delta_is_the_binomial_closed_form(guesses):
    """One right guess rejects nothing at 95% (its closed form is negative); the bound is never below 0."""
    assert largest_rejected_epsilon(guesses, guesses, guesses, 0.0, 0.05) == pytest.approx(
        max(0.0, closed_form(guesses, 0.05)), abs=1e-5
    )


def test_the_ceiling_of_a_perfect_attack_and_the_delta_term():
    """The issue's figure: 1,000 canaries, every guess right, 95%: about 5.8 without delta (the closed
    form), a little less with the delta term of Steinke et al.'s Theorem 5.2, which grows with m delta;
    through the guess counts and Bonferroni of epsilon_lower_bound, a perfect score on 1,000 canaries
    shows ~4.4 at delta 1e-5, and more canaries do not lift it past ~5."""
    assert largest_rejected_epsilon(1000, 1000, 1000, 0.0, 0.05) == pytest.approx(5.809, abs=1e-3)
    with_delta = largest_rejected_epsilon(1000, 1000, 1000, 1e-5, 0.05)
    assert 5.0 < with_delta < 5.809
    assert p_value(1000, 100, 80, 1.0, 1e-5) > p_value(1000, 100, 80, 1.0, 0.0)
    assert p_value(1000, 100, 80, 1.0, 1e-3) > p_value(1000, 100, 80, 1.0, 1e-5)
    # Half right is what epsilon 0 predicts: nothing is rejected.
    assert largest_rejected_epsilon(1000, 500, 250, 1e-5, 0.05) == 0.0
    for m, ceiling in ((1000, 4.39), (3000, 4.88), (30000, 4.45)):
        perfect = {"alignment": np.arange(float(m))}  # the upper half is included: all right
        assert epsilon_lower_bound(perfect, np.arange(m) >= m // 2, delta=1e-5).epsilon == pytest.approx(
            ceiling, abs=0.01
        )


def randomized_response(eps: float, m: int, rng) -> tuple[dict, np.ndarray]:
    """An exactly eps-DP view of each inclusion bit: kept with probability e^eps / (1 + e^eps)."""
    bits = rng.random(m) < 0.5
    kept = rng.random(m) < 1 / (1 + math.exp(-eps))
    view = np.where(kept, bits, ~bits).astype(float)
    return {"alignment": view + 1e-3 * rng.random(m)}, bits


def test_randomized_response_is_bounded_below_its_epsilon_and_close_to_it_with_many_canaries():
    rng = np.random.default_rng(0)
    above = 0
    for _ in range(40):
        scores, bits = randomized_response(2.0, 1000, rng)
        above += epsilon_lower_bound(scores, bits, delta=0.0).epsilon > 2.0
    assert above <= 4  # at most 5% expected at 95% confidence; 4 of 40 is far in the tail
    scores, bits = randomized_response(2.0, 20_000, rng)
    bound = epsilon_lower_bound(scores, bits, delta=1e-5)
    assert 1.7 < bound.epsilon <= 2.0
    assert bound.score == "alignment" and bound.guesses in guess_counts(20_000)
    scores, bits = randomized_response(0.0, 2000, rng)
    assert epsilon_lower_bound(scores, bits, delta=1e-5).epsilon < 0.3


def test_bad_scores_and_settings_are_clear_errors():
    bits = np.array([True, False, True])
    with pytest.raises(CanaryError, match="expected 3 finite alignment scores"):
        epsilon_lower_bound({"alignment": np.array([1.0, np.nan, 0.0])}, bits, delta=0.0)
    with pytest.raises(CanaryError, match="expected a confidence in"):
        epsilon_lower_bound({"alignment": np.zeros(3)}, bits, delta=0.0, confidence=1.0)
    with pytest.raises(ConfigError, match="dp-audit-canaries: set to 100, but dp-sample = false"):
        FedtuneConfig(dp_audit_canaries=100)
    with pytest.raises(ConfigError, match="dp-audit-canaries: expected a value in"):
        FedtuneConfig(dp_sample=True, dp_target_epsilon=3.0, dp_audit_canaries=-1)
    count("bad_inputs_rejected", "canary scores not finite")
    count("bad_inputs_rejected", "dp-audit-canaries without dp-sample")


def test_canaries_are_half_included_and_drawn_only_when_included_at_the_rate():
    canaries = Canaries(seed=7, count=4000)
    assert abs(canaries.included.mean() - 0.5) < 0.03
    drawn = np.concatenate([canaries.drawn(0.05, 1, step) for step in range(50)])
    assert canaries.included[drawn].all()
    assert len(drawn) / 50 == pytest.approx(0.05 * canaries.included.sum(), rel=0.1)
    assert not np.array_equal(canaries.drawn(0.05, 1, 0), canaries.drawn(0.05, 2, 0))  # rounds differ
    assert np.array_equal(Canaries(seed=7, count=4000).included, canaries.included)  # the seed is all it takes
    u = canaries.direction(3, 1000)
    assert np.linalg.norm(u) == pytest.approx(1.0)
    assert abs(u @ canaries.direction(4, 1000)) < 0.15


# --- DP-SGD with canaries, and the planted bugs --------------------------------------------------

ROUNDS, STEPS, BATCH, TARGET = 4, 25, 16, 2.0


@pytest.fixture(scope="module")
def client_setup():
    from common.federation_data import federation_labels, simulated_client_data
    from common.model import load_tokenizer
    from common.privacy import calibrate_noise
    from common.task import task_for
    from common.train import encode
    from tests.test_client_app import CFG

    cfg = CFG.replace(labels=federation_labels(CFG).to_spec())
    tokenizer = load_tokenizer(cfg.model)
    data = simulated_client_data(cfg, 0, 1).train
    encoded = encode(data, tokenizer, federation_labels(cfg), max_length=32, where="test")
    rate = BATCH / len(encoded)
    sigma = calibrate_noise(target_epsilon=TARGET, delta=1e-5, sample_rate=rate, steps=ROUNDS * STEPS)
    return cfg, tokenizer, encoded, sigma


def train_with_canaries(client_setup, monkeypatch, bug: str = ""):
    """ROUNDS rounds of STEPS DP-SGD steps on one client, 1,000 canaries; `bug` plants a fault in the
    mechanism while the recorded one stays (noise 16x too small, noise reused each round, no clipping)."""
    import common.dp_train as dp_train_module
    from common.federation_data import federation_labels
    from common.model import get_adapter_state
    from common.opacus import DPOptimizer
    from common.privacy import Mechanism, epsilon
    from common.task import task_for

    cfg, tokenizer, encoded, sigma = client_setup
    if bug == "noise-16x-too-small":
        real = dp_train_module.DPOptimizer
        monkeypatch.setattr(
            dp_train_module,
            "DPOptimizer",
            lambda *a, noise_multiplier, **k: real(*a, noise_multiplier=noise_multiplier / 16, **k),
        )
    if bug == "clipping-skipped":
        clip = DPOptimizer.clip_and_accumulate

        def unclipped(self):
            self.max_grad_norm, norm = 1e12, self.max_grad_norm
            try:
                clip(self)
            finally:
                self.max_grad_norm = norm

        monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", unclipped)
    torch.manual_seed(0)
    model = task_for(cfg).model(len(federation_labels(cfg)))
    canaries = Canaries(seed=12345, count=1000)
    rounds = [get_adapter_state(model)]
    for r in range(1, ROUNDS + 1):
        dp_train_module.dp_train(
            model, encoded, pad_id=tokenizer.pad_token_id, steps=STEPS, batch_size=BATCH, learning_rate=5e-3,
            weight_decay=0.0, noise_multiplier=sigma, clipping_norm=1.0,
            seed=7 if bug == "noise-reused-across-rounds" else 100 + r, canaries=canaries, server_round=r,
        )  # fmt: skip
        rounds.append(get_adapter_state(model))
    recorded, _ = epsilon([Mechanism(noise_multiplier=sigma, steps=ROUNDS * STEPS, sample_rate=BATCH / len(encoded))],
                          delta=1e-5)  # fmt: skip
    bound = epsilon_lower_bound(canary_scores(canaries, rounds), canaries.included, delta=1e-5)
    return recorded, bound


@pytest.mark.minutes(1)
def test_a_correct_dp_sgd_run_is_bounded_below_its_recorded_epsilon(client_setup, monkeypatch):
    recorded, bound = train_with_canaries(client_setup, monkeypatch)
    assert recorded == pytest.approx(TARGET, abs=0.01)
    assert bound.epsilon < 0.5 * recorded, bound
    count("invariant_checks_passed", "canary bound at or below the recorded epsilon")


@pytest.mark.minutes(2)
@pytest.mark.parametrize("bug", ["noise-16x-too-small", "clipping-skipped", "noise-reused-across-rounds"])
def test_a_planted_bug_in_dp_sgd_gives_a_bound_above_the_recorded_epsilon(client_setup, monkeypatch, bug):
    recorded, bound = train_with_canaries(client_setup, monkeypatch, bug)
    assert bound.epsilon > recorded, bound
    if bug == "noise-reused-across-rounds":  # the noise that repeats cancels between rounds' moves
        assert bound.score == "repetition"
    count("invariant_checks_passed", f"canary audit catches {bug}")


def test_a_canary_joins_the_clipped_sum_clipped_like_an_example(client_setup):
    """Distributed DP's client step at rate 1: every included canary is drawn once and adds exactly its
    direction times the clipping norm (its gradient of CANARY_NORM norms, clipped)."""
    from common.dp_train import clipped_gradient_sum
    from common.federation_data import federation_labels
    from common.task import task_for
    from common.train import EncodedData

    cfg, tokenizer, encoded, _ = client_setup
    model = task_for(cfg).model(len(federation_labels(cfg)))
    few = EncodedData(input_ids=encoded.input_ids[:4], labels=encoded.labels[:4])
    common = dict(pad_id=tokenizer.pad_token_id, sample_rate=1.0, clipping_norm=0.5, seed=3, physical_batch_size=4)
    canaries = Canaries(seed=5, count=6)
    plain, _ = clipped_gradient_sum(model, few, **common)
    with_canaries, sampled = clipped_gradient_sum(model, few, **common, canaries=canaries, server_round=1)
    assert sampled == len(few)  # canaries are not counted as examples
    layout = Layout.of({k: v.shape for k, v in plain.items()})
    added = layout.flatten(with_canaries) - layout.flatten(plain)
    expected = sum(canaries.direction(int(i), layout.dimension) for i in np.flatnonzero(canaries.included)) * 0.5
    assert CANARY_NORM > 1
    assert np.allclose(added, expected, atol=2e-5)


# --- the audit of a run folder ------------------------------------------------------------------


def written_run(tmp_path, *, moved_along: np.ndarray | None = None):
    """A run folder with checkpoints of 3 rounds, a client's canaries.json and its ledger entry."""
    from server.canaries import FILE, score_clients
    from server.checkpoint import Checkpoint, save_checkpoint

    rng = np.random.default_rng(1)
    canaries = Canaries(seed=99, count=400)
    state = {"a": rng.standard_normal((40, 50)), "b": rng.standard_normal(3000)}
    layout = Layout.of({k: v.shape for k, v in state.items()})
    rounds = [state]
    for _ in range(3):
        step = rng.standard_normal(layout.dimension) * 0.01
        if moved_along is not None:
            step -= moved_along
        split = layout.split(step[None])
        rounds.append({k: rounds[-1][k] + split[k][0] for k in state})
    for r, adapter in enumerate(rounds):
        save_checkpoint(tmp_path / "checkpoints", Checkpoint(server_round=r, adapter=adapter, strategy={}, meta={}))
    clients = score_clients(rounds, [("c0", canaries)])
    (tmp_path / FILE).write_text(json.dumps({"rounds": 3, "scores": ["alignment", "repetition"], "clients": clients}))
    entries = [{"kind": "client", "status": "trained", "client_id": "c0", "epsilon": 1.0, "delta": 1e-5}]
    return canaries, layout, entries


def test_the_audit_passes_honest_canaries_and_catches_edits_and_leaks(tmp_path):
    from server.canaries import FILE, audit_canaries

    _, _, entries = written_run(tmp_path / "honest")
    honest = audit_canaries(tmp_path / "honest", entries)
    assert honest.problems == [] and honest.summary is not None
    assert honest.summary["epsilon"] < 1.0 and honest.summary["per_client"]["c0"]["recorded_epsilon"] == 1.0
    assert honest.summary["family_confidence"] == 0.95 and honest.summary["canaries"] == 400

    recorded = json.loads((tmp_path / "honest" / FILE).read_text())
    bits = recorded["clients"][0]["included"]
    recorded["clients"][0]["included"] = ("0" if bits[0] == "1" else "1") + bits[1:]
    recorded["clients"][0]["scores"]["alignment"][5] += 1.0
    (tmp_path / "honest" / FILE).write_text(json.dumps(recorded))
    edited = audit_canaries(tmp_path / "honest", entries)
    assert any("inclusion bits are not the ones its seed gives" in p for p in edited.problems)
    assert any("alignment scores do not match the checkpoints" in p for p in edited.problems)
    (tmp_path / "honest" / FILE).write_text("{not json")
    assert "expected seeds, bits and scores" in audit_canaries(tmp_path / "honest", entries).problems[0]
    count("bad_inputs_rejected", "canaries.json edited bits")
    count("bad_inputs_rejected", "canaries.json edited scores")
    count("bad_inputs_rejected", "canaries.json not JSON")

    # A run whose adapter moved 0.05 against every included canary each round: far beyond epsilon 1.
    canaries = Canaries(seed=99, count=400)
    layout = Layout.of({"a": (40, 50), "b": (3000,)})
    leak = 0.05 * sum(canaries.direction(int(i), layout.dimension) for i in np.flatnonzero(canaries.included))
    _, _, entries = written_run(tmp_path / "leaky", moved_along=leak)
    leaky = audit_canaries(tmp_path / "leaky", entries)
    assert any("exceeds the recorded epsilon 1.000" in p for p in leaky.problems), leaky.problems
    assert leaky.summary is not None and leaky.summary["epsilon"] > 1.0


def test_distributed_dps_integer_scale_leaves_room_for_the_canaries_in_the_secure_sum():
    """Where the modulus bounds the scale (a large batch and adapter), the canaries drawn into the sum
    count as records: 5,000 included at rate 0.2048 add 1,024 to the expected 4,096."""
    from common.privacy_plan import distributed_plan
    from common.secagg import MODULUS

    settings = dict(examples=20_000, batch_size=4096, rounds=3, clipping_norm=0.7, dimension=10**8, delta=1e-5,
                    noise_multiplier=1.0)
    plain, with_canaries = distributed_plan(**settings), distributed_plan(**settings, canaries=5000)
    records = 4096 + 1024
    assert with_canaries.scale < plain.scale
    assert with_canaries.scale * 0.7 == pytest.approx(MODULUS / (8 * (records + 10 * math.sqrt(records) + 10)))


def test_a_clients_revealed_canaries_must_be_the_runs_count_and_a_usable_seed(tmp_path):
    """Bad client replies: a count other than the run's (a client could otherwise make the server score
    a billion canaries), a negative seed, a missing field; and the same in an edited canaries.json."""
    from flwr.app import ConfigRecord

    from common.errors import FieldError
    from server.canaries import FILE, audit_canaries, parse_reveal

    client, canaries = parse_reveal(ConfigRecord({"client-id": "c0", "count": 1000, "seed": 5}), 1000)
    assert client == "c0" and canaries == Canaries(seed=5, count=1000)
    with pytest.raises(CanaryError, match="client c0: expected 1000 canaries and a seed in .0, 2\\^63., got 10"):
        parse_reveal(ConfigRecord({"client-id": "c0", "count": 10**9, "seed": 5}), 1000)
    with pytest.raises(CanaryError, match="got 1000 and -1"):
        parse_reveal(ConfigRecord({"client-id": "c0", "count": 1000, "seed": -1}), 1000)
    with pytest.raises(FieldError, match="seed"):
        parse_reveal(ConfigRecord({"client-id": "c0", "count": 1000}), 1000)
    _, _, entries = written_run(tmp_path)
    recorded = json.loads((tmp_path / FILE).read_text())
    recorded["clients"][0]["count"] = 10**9
    (tmp_path / FILE).write_text(json.dumps(recorded))
    assert "expected 1 to 100000 canaries" in audit_canaries(tmp_path, entries).problems[0]
    count("bad_inputs_rejected", "revealed canary count other than the run's")
    count("bad_inputs_rejected", "revealed canary seed negative")
    count("bad_inputs_rejected", "revealed canaries without a seed")
    count("bad_inputs_rejected", "canaries.json with a huge canary count")
