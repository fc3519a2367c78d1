"""Privacy accounting checks of RELIABILITY.md, each a named test.

golden values; accountants agree within their known slack; composition across rounds;
state round trip; no overshoot of a calibrated target; sample rate equal to the loader's;
per-sample gradients on a LoRA model against a micro-batch reference; clipping bound;
noise level; a DP step changes the LoRA weights and leaves them finite.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from client.privacy import planned_mechanism
from common.budget import PrivacyRecord, data_fingerprint
from common.config import FedtuneConfig
from common.data import TextDataset
from common.dp_train import DPTrainingError, dp_train, poisson_loader
from common.errors import ConfigError, PrivacyBudgetError
from common.federation_data import federation_labels, simulated_client_data
from common.model import get_adapter_state, load_tokenizer, set_adapter_state
from common.task import task_for
from tests.reliability import count
from common.privacy import (
    PLD_DISCRETIZATION, RDP_ORDERS, WITHOUT_REPLACEMENT, Mechanism, calibrate_noise, composed_event, epsilon_pld,
    epsilon_rdp, grouped, smallest_noise,
)
from common.privacy_plan import (
    calibrate_client_noise, dp_batch_size, make_plan, poisson_rate, sample_level_plan, steps_per_round,
)
from common.train import EncodedData, encode
from server.tools.audit import opacus_epsilons

pytestmark = pytest.mark.minutes(2)  # calibration properties; see tests/conftest.py

DELTA = 1e-5
GOLDEN = Mechanism(noise_multiplier=1.5, sample_rate=0.04, steps=2250)


def test_golden_value_opacus_rdp():
    _, rdp = opacus_epsilons([GOLDEN.to_dict()], DELTA)
    assert rdp == pytest.approx(7.32911117143, abs=1e-9)


def test_our_rdp_matches_the_golden_value_within_order_grid_slack():
    assert epsilon_rdp([GOLDEN], delta=DELTA) == pytest.approx(7.32911117143, rel=1e-3)


@pytest.mark.parametrize("sigma, q, steps", [(1.5, 0.04, 2250), (1.0, 0.01, 1000), (0.8, 0.1, 300), (3.0, 0.2, 50)])
def test_independent_accountants_agree_within_known_slack(sigma, q, steps):
    m = [Mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps)]
    pld = epsilon_pld(m, delta=DELTA)
    prv, rdp_opacus = opacus_epsilons([m[0].to_dict()], DELTA)
    assert prv == pytest.approx(pld, rel=0.02)  # PLD and PRV agree closely
    assert 1.0 <= epsilon_rdp(m, delta=DELTA) / pld <= 1.35  # RDP overstates, never understates
    assert rdp_opacus == pytest.approx(epsilon_rdp(m, delta=DELTA), rel=0.01)


def test_composition_across_rounds_equals_one_accountant_fed_all_rounds():
    rounds = [Mechanism(noise_multiplier=1.1, sample_rate=0.05, steps=40) for _ in range(5)]
    together = Mechanism(noise_multiplier=1.1, sample_rate=0.05, steps=200)
    composed = epsilon_pld(rounds, delta=DELTA)
    assert composed == pytest.approx(epsilon_pld([together], delta=DELTA), rel=1e-6)
    assert composed > max(epsilon_pld([r], delta=DELTA) for r in rounds)
    assert epsilon_rdp(rounds, delta=DELTA) == pytest.approx(epsilon_rdp([together], delta=DELTA), rel=1e-9)


def test_identical_rounds_are_accounted_once_with_their_steps_added():
    """A client's record grows a round at a time; the accountants get one event per distinct
    mechanism (counts, not timings: the cost of an epsilon does not grow with the rounds), and
    the epsilon is the round-by-round composition's, fed to dp-accounting directly."""
    import dp_accounting as dpa
    from dp_accounting import pld, rdp

    a = Mechanism(noise_multiplier=1.0, sample_rate=0.14, steps=3)
    b = Mechanism(noise_multiplier=1.3, sample_rate=0.14, steps=5)
    history = [a, b, a, a, Mechanism(noise_multiplier=1.0, sample_rate=0.14, steps=0)]
    assert grouped(history) == [replace(a, steps=9), b]
    assert grouped([a] * 50) == [replace(a, steps=150)]
    assert len(composed_event(history).events) == 2 and len(composed_event([a] * 50).events) == 1
    one_by_one = dpa.ComposedDpEvent([m.event() for m in history if m.steps])
    tight = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    tight.compose(one_by_one)
    assert epsilon_pld(history, delta=DELTA) == pytest.approx(tight.get_epsilon(DELTA), rel=1e-6)
    loose = rdp.RdpAccountant(orders=RDP_ORDERS)
    loose.compose(one_by_one)
    assert epsilon_rdp(history, delta=DELTA) == pytest.approx(loose.get_epsilon(DELTA), rel=1e-9)


def test_the_rdp_cross_check_keeps_dp_accountings_convergence_warnings_out_of_the_logs(caplog):
    """These parameters make dp-accounting warn (through absl) for fractional orders; a client
    printed dozens of such lines a round, and every Flower line twice after the first."""
    m = Mechanism(noise_multiplier=1.041016, sample_rate=1 / 6, steps=5)
    with caplog.at_level(logging.WARNING):
        eps = epsilon_rdp([m], delta=DELTA)
    assert math.isfinite(eps) and eps > epsilon_pld([m], delta=DELTA)
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]
    saved = logging.root.handlers[:]
    logging.root.handlers[:] = []  # as in a ClientApp process, where nothing configured the root logger
    try:
        epsilon_rdp([replace(m, steps=6)], delta=DELTA)
        assert logging.root.handlers == []  # absl would have called logging.basicConfig()
    finally:
        logging.root.handlers[:] = saved


def test_privacy_record_state_survives_save_and_load(tmp_path):
    data = TextDataset(texts=["a", "b"], labels=["x", "y"])
    record = PrivacyRecord.open(tmp_path, data_fingerprint(data), delta=DELTA)
    for r in range(1, 4):
        record.append(run="1", server_round=r, mechanism=Mechanism(noise_multiplier=1.0, sample_rate=0.1, steps=10),
                      clipping_norm=1.0)
    reopened = PrivacyRecord.open(tmp_path, data_fingerprint(data), delta=DELTA)
    assert reopened.mechanisms() == record.mechanisms()
    assert reopened.spent() == pytest.approx(record.spent())
    assert reopened.spent() == pytest.approx(record.entries[-1]["epsilon"])


def test_privacy_record_refuses_a_corrupt_file_or_another_delta(tmp_path):
    fp = "f" * 64
    (tmp_path / f"{fp}.json").write_text("{broken")
    with pytest.raises(PrivacyBudgetError, match="refusing to train"):
        PrivacyRecord.open(tmp_path, fp, delta=DELTA)
    (tmp_path / f"{fp}.json").write_text('{"delta": 1e-6, "entries": []}')
    with pytest.raises(PrivacyBudgetError, match="expected delta 1e-06"):
        PrivacyRecord.open(tmp_path, fp, delta=DELTA)


def test_fingerprint_depends_on_texts_and_labels():
    a = TextDataset(texts=["a", "b"], labels=["x", "y"])
    assert data_fingerprint(a) == data_fingerprint(TextDataset(texts=["a", "b"], labels=["x", "y"]))
    assert data_fingerprint(a) != data_fingerprint(TextDataset(texts=["a", "b"], labels=["x", "x"]))
    assert data_fingerprint(a) != data_fingerprint(TextDataset(texts=["ab", ""], labels=["x", "y"]))


def test_instruction_data_with_one_instruction_is_told_apart_by_input_and_response():
    """Issue 41's finding: four AG News clients share one instruction and the group 'all'; their records
    must differ, or each client is charged the others' rounds. Classification fingerprints are unchanged
    (a deployed node's existing record keeps its name): the value below is the one before the change."""
    def instructions(inputs, responses):
        return TextDataset(texts=["Topic?"] * len(inputs), labels=["all"] * len(inputs),
                           columns={"input": inputs, "response": responses})

    a = instructions(["rates rise", "team wins"], ["business", "sports"])
    assert data_fingerprint(a) == data_fingerprint(instructions(["rates rise", "team wins"], ["business", "sports"]))
    assert data_fingerprint(a) != data_fingerprint(instructions(["rates fall", "team wins"], ["business", "sports"]))
    assert data_fingerprint(a) != data_fingerprint(instructions(["rates rise", "team wins"], ["business", "world"]))
    plain = TextDataset(texts=["a", "b"], labels=["x", "y"], columns={"category": ["x", "y"]})
    assert data_fingerprint(plain) == "3367b0b4b3298c24ab01b9e04082a4b49f9e19fda633f0dadfba3dcfb83cc6ee"


@settings(max_examples=15, deadline=None)
@given(target=st.floats(0.5, 10.0), q=st.floats(0.005, 0.3), steps=st.integers(10, 500))
def test_calibrated_noise_never_overshoots_its_target(target, q, steps):
    sigma = calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps)
    eps = epsilon_pld([Mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps)], delta=DELTA)
    assert eps <= target
    assert eps >= 0.97 * target or sigma <= 0.06  # and it is not needlessly noisy


def test_a_cheap_search_estimate_never_decides_the_answer():
    """calibrate_noise bisects on a coarse PLD grid and checks the answer on the ledger's grid.
    An estimate 20% optimistic steers the search low: the bisection goes on with eps_of until it
    passes. An exact estimate costs eps_of one call (the point of the cheap search)."""
    calls = []

    def eps_of(z):
        calls.append(z)
        return 2.0 / z

    z = smallest_noise(eps_of, 1.0, search=lambda z: 0.8 * 2.0 / z)
    assert eps_of(z) <= 1.0 and z <= 2.0 / (1 - 1e-3)  # passes, and is not needlessly noisy
    calls.clear()
    assert smallest_noise(eps_of, 1.0, search=lambda z: 2.0 / z) == pytest.approx(2.0, rel=1e-3)
    assert len(calls) == 1
    calls.clear()
    assert smallest_noise(eps_of, 1.0) == pytest.approx(2.0, rel=1e-3) and len(calls) > 10


def test_client_level_calibration_and_plan_never_overshoot():
    z = calibrate_client_noise(target_epsilon=3.0, delta=DELTA, rounds=20, population=50, sample_size=10)
    m = [Mechanism(noise_multiplier=z, steps=20, sampling=WITHOUT_REPLACEMENT, population=50, sample_size=10)]
    assert epsilon_rdp(m, delta=DELTA) <= 3.0
    plan = make_plan(target_epsilon=2.0, delta=DELTA, rounds=4, num_clients=10, clients_per_round=4,
                     local_examples=300, batch_size=16, trainable=74_498, alternatives=False)
    assert plan.sample_epsilons[-1] <= 2.0 and plan.client_epsilons[-1] <= 2.0
    assert plan.sample_epsilons == sorted(plan.sample_epsilons)


@pytest.mark.parametrize("bad", [dict(noise_multiplier=float("nan"), steps=1), dict(noise_multiplier=-1.0, steps=1),
                                 dict(noise_multiplier=1.0, steps=1, sample_rate=1.5),
                                 dict(noise_multiplier=1.0, steps=1, sampling=WITHOUT_REPLACEMENT, population=3,
                                      sample_size=5)])
def test_bad_mechanism_parameters_are_refused(bad):
    with pytest.raises(ConfigError):
        Mechanism(**bad)


@pytest.mark.parametrize("raw", [{"dp-noise-multiplier": -1.0}, {"dp-delta": 0.0}, {"dp-delta": float("nan")},
                                 {"dp-target-epsilon": float("inf")}, {"dp-clipping-norm": 0.0},
                                 {"dp-sample": True}])
def test_privacy_config_with_nan_inf_or_negative_values_is_refused(raw):
    from common.config import parse_run_config

    with pytest.raises(ConfigError):
        parse_run_config(raw)


# ---- DP-SGD on the real LoRA model -------------------------------------------------------

@pytest.fixture(scope="module")
def lora():
    cfg = FedtuneConfig(partitioner="iid", max_length=32)
    labels = federation_labels(cfg)
    cfg = cfg.replace(labels=labels.to_spec())
    model = task_for(cfg).model(len(labels))
    tok = load_tokenizer(cfg.model)
    data = encode(simulated_client_data(cfg, 0, 3).train, tok, labels, max_length=32, where="t")
    return cfg, model, tok, data


def test_sample_rate_used_in_accounting_equals_the_loaders(lora):
    cfg, model, tok, data = lora
    loader = poisson_loader(data, batch_size=cfg.batch_size, pad_id=tok.pad_token_id, seed=0)
    assert loader.sample_rate == pytest.approx(poisson_rate(cfg.batch_size, len(data)))
    assert loader.batch_sampler.sample_rate == loader.sample_rate
    initial = get_adapter_state(model)
    _, mech = dp_train(model, data, pad_id=tok.pad_token_id, steps=2, batch_size=cfg.batch_size,
                       learning_rate=1e-3, weight_decay=0.0, noise_multiplier=1.0, clipping_norm=1.0, seed=0)
    set_adapter_state(model, initial)
    assert mech.sample_rate == loader.sample_rate and mech.steps == 2
    assert steps_per_round(batch_size=cfg.batch_size, examples=len(data), local_epochs=2,
                           local_steps=0) == round(2 / loader.sample_rate)
    planned = planned_mechanism(cfg.replace(dp_sample=True, dp_target_epsilon=8.0, dp_batch_size=cfg.batch_size),
                                len(data))  # the client plans with the same rate its loader will use
    assert planned.sample_rate == loader.sample_rate


def test_per_sample_gradients_on_lora_match_a_micro_batch_reference(lora):
    from opacus import GradSampleModule

    _, model, tok, data = lora
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    saved_p = [m.p for m in dropouts]
    for m in dropouts:  # Opacus hooks need train mode; zero dropout makes both passes the same function
        m.p = 0.0
    model.train()
    batch = tok(["reset my password", "what is AI", "tell me a joke about dogs"], return_tensors="pt", padding=True)
    labels = torch.tensor([0, 1, 2])
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    reference = []
    for i in range(3):
        model.zero_grad()
        out = model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1])
        F.cross_entropy(out.logits, labels[i:i + 1], reduction="sum").backward()
        reference.append({n: p.grad.clone() for n, p in params})
    gsm = GradSampleModule(model, loss_reduction="sum")
    try:
        model.zero_grad()
        F.cross_entropy(gsm(**batch).logits, labels, reduction="sum").backward()
        for n, p in params:
            for i in range(3):
                torch.testing.assert_close(p.grad_sample[i], reference[i][n], atol=2e-5, rtol=1e-3)
    finally:
        gsm._close()
        model.zero_grad()
        for m, p in zip(dropouts, saved_p):
            m.p = p


def _dp_optimizer(param, *, noise, clip, batch):
    from opacus.optimizers import DPOptimizer

    return DPOptimizer(torch.optim.SGD([param], lr=0.0), noise_multiplier=noise, max_grad_norm=clip,
                       expected_batch_size=batch, generator=torch.Generator().manual_seed(0))


def test_every_clipped_per_sample_gradient_is_within_the_bound():
    param = torch.nn.Parameter(torch.zeros(50))
    opt = _dp_optimizer(param, noise=0.0, clip=0.7, batch=8)
    param.grad_sample = torch.randn(8, 50) * torch.tensor([0.01, 0.1, 1, 10, 100, 0, 0.5, 3.0])[:, None]
    opt.clip_and_accumulate()
    norms = param.grad_sample.flatten(1).norm(dim=1)
    factors = (0.7 / (norms + 1e-6)).clamp(max=1.0)
    assert ((norms * factors) <= 0.7 + 1e-6).all()
    assert param.summed_grad.norm() <= 8 * 0.7 + 1e-5


def test_noise_standard_deviation_matches_its_formula():
    param = torch.nn.Parameter(torch.zeros(200_000))
    opt = _dp_optimizer(param, noise=1.3, clip=0.5, batch=10)
    param.grad_sample = torch.zeros(10, 200_000)
    opt.pre_step()
    expected = 1.3 * 0.5 / 10  # noise multiplier x clipping norm, over the expected batch
    assert param.grad.std().item() == pytest.approx(expected, rel=0.01)


def test_a_dp_step_changes_the_lora_weights_and_leaves_them_finite(lora):
    cfg, model, tok, data = lora
    initial = get_adapter_state(model)
    dp_train(model, data, pad_id=tok.pad_token_id, steps=2, batch_size=16, learning_rate=1e-3, weight_decay=0.0,
             noise_multiplier=1.0, clipping_norm=1.0, seed=1)
    after = get_adapter_state(model)
    assert any(not np.array_equal(after[k], initial[k]) for k in initial)
    assert all(np.isfinite(v).all() for v in after.values())
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    set_adapter_state(model, initial)


def test_dp_sgd_with_frozen_a_trains_b_and_leaves_a_untouched(lora):
    """lora-freeze-a under DP-SGD: the private steps move B and the head (the released
    weights) and leave A exactly the seeded matrix."""
    from common.model import load_lora_model

    cfg, _, tok, data = lora
    model = load_lora_model.__wrapped__(cfg.model, len(cfg.labels.split(",")), r=4, alpha=8.0, dropout=0.0,
                                        target_modules=(), seed=cfg.seed, freeze_a=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    initial = get_adapter_state(model)
    assert frozen and not any("lora_A" in k for k in initial)
    _, mech = dp_train(model, data, pad_id=tok.pad_token_id, steps=2, batch_size=16, learning_rate=1e-2,
                       weight_decay=0.0, noise_multiplier=1.0, clipping_norm=1.0, seed=1)
    after = get_adapter_state(model)
    assert mech.steps == 2 and all(np.isfinite(v).all() for v in after.values())
    assert any(not np.array_equal(after[k], initial[k]) for k in initial)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "lora_A" in n)


def test_a_dp_step_that_changes_nothing_is_an_error(lora):
    cfg, model, tok, data = lora
    initial = get_adapter_state(model)
    with pytest.raises(DPTrainingError, match="expected the adapter weights to change"):
        dp_train(model, data, pad_id=tok.pad_token_id, steps=1, batch_size=16, learning_rate=0.0,
                 weight_decay=0.0, noise_multiplier=1.0, clipping_norm=1.0, seed=1)
    set_adapter_state(model, initial)


def test_dp_steps_follow_the_learning_rate_schedule(lora):
    """The schedule reaches DP-SGD's optimizer: the same seed with a zero rate after the first
    step moves the weights exactly as one step does (the noise draws are the same)."""
    cfg, model, tok, data = lora
    initial = get_adapter_state(model)
    states = {}
    for name, steps, lr_at in (("one step", 1, None), ("then zero", 3, lambda f: 1e-3 if f == 0 else 0.0)):
        set_adapter_state(model, initial)
        dp_train(model, data, pad_id=tok.pad_token_id, steps=steps, batch_size=16, learning_rate=1e-3,
                 weight_decay=0.0, noise_multiplier=1.0, clipping_norm=1.0, seed=1, lr_at=lr_at)
        states[name] = get_adapter_state(model)
    set_adapter_state(model, initial)
    assert all(np.allclose(states["one step"][k], states["then zero"][k], atol=1e-7) for k in initial)


def test_an_empty_poisson_batch_still_takes_a_noisy_step():
    from opacus.optimizers import DPOptimizer

    from common.dp_train import _release

    param = torch.nn.Parameter(torch.zeros(1000))
    opt = DPOptimizer(torch.optim.SGD([param], lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=4)
    _release(opt)
    assert param.abs().sum() > 0 and torch.isfinite(param).all()


def test_dp_training_whose_first_poisson_batch_is_empty_takes_its_steps(lora, caplog):
    """A small client with a small expected batch: the first Poisson batch drew no example.
    Opacus then hands over one empty tensor rather than the usual (ids, mask, labels); DP-SGD
    crashed unpacking it. Now that step releases noise like any empty batch and the run goes on."""
    cfg, model, tok, data = lora
    small = EncodedData(input_ids=data.input_ids[:20], labels=data.labels[:20])
    seed = next(s for s in range(100) if len(next(iter(poisson_loader(small, batch_size=1, pad_id=tok.pad_token_id,
                                                                       seed=s)))[-1]) == 0)
    initial = get_adapter_state(model)
    caplog.set_level(logging.WARNING)
    try:
        result, mechanism = dp_train(model, small, pad_id=tok.pad_token_id, steps=4, batch_size=1,
                                     learning_rate=1e-3, weight_decay=0.0, noise_multiplier=1.0, clipping_norm=1.0,
                                     seed=seed)
    finally:
        set_adapter_state(model, initial)
    assert result.steps == 4 and mechanism.steps == 4 and mechanism.sample_rate == 1 / 20
    assert "First batch is empty" not in caplog.text  # Opacus' warning about its stand-in, handled here
    count("faults_survived", "a Poisson batch empty before any example was drawn")


def test_tiny_dataset_rejects_dp_without_examples():
    empty = EncodedData(input_ids=[], labels=np.array([], dtype=np.int64))
    with pytest.raises(DPTrainingError, match="at least one example"):
        dp_train(torch.nn.Linear(2, 2), empty, pad_id=0, steps=1, batch_size=4, learning_rate=0.1,
                 weight_decay=0.0, noise_multiplier=1.0, clipping_norm=1.0, seed=0)


def test_length_sorted_physical_chunks_release_the_same_dp_update(lora):
    """A Poisson batch computed in length-sorted chunks (less padding) is clipped per sample,
    summed and noised once: the adapter after two steps equals the one-piece computation
    (same seed, hence same batches and noise), and less padding is processed."""
    cfg, model, tok, data = lora
    initial = get_adapter_state(model)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in dropouts]
    for m in dropouts:  # dropout masks depend on how the batch is cut; the arithmetic must not
        m.p = 0.0
    results, states = [], []
    for physical in (0, 4):
        set_adapter_state(model, initial)
        result, _ = dp_train(model, data, pad_id=tok.pad_token_id, steps=2, batch_size=16, learning_rate=1e-2,
                             weight_decay=0.0, noise_multiplier=1.0, clipping_norm=0.5, seed=5,
                             physical_batch_size=physical)
        results.append(result)
        states.append(get_adapter_state(model))
    set_adapter_state(model, initial)
    for m, rate in zip(dropouts, rates):
        m.p = rate
    whole = np.concatenate([(states[0][k] - initial[k]).ravel() for k in initial])
    chunked = np.concatenate([(states[1][k] - initial[k]).ravel() for k in initial])
    assert np.linalg.norm(whole - chunked) <= 1e-4 * np.linalg.norm(whole)  # equal up to float rounding
    assert results[1].padding_efficiency > results[0].padding_efficiency
    assert results[0].examples == results[1].examples and results[0].loss == pytest.approx(results[1].loss, rel=1e-5)


def test_auto_chunks_are_8_examples_on_a_cpu_and_the_whole_batch_on_a_gpu():
    from common.dp_train import AUTO_CHUNK, Chunking

    assert FedtuneConfig().dp_physical_batch_size == AUTO_CHUNK
    assert Chunking.for_device(AUTO_CHUNK, torch.device("cpu")).size == 8
    assert Chunking.for_device(AUTO_CHUNK, torch.device("cuda:0")).size == 0
    assert Chunking.for_device(32, torch.device("cuda:0")).size == 32
    with pytest.raises(ConfigError, match="dp-physical-batch-size"):
        FedtuneConfig(dp_physical_batch_size=-2)
    count("bad_inputs_rejected", "dp-physical-batch-size -2")


class OutOfMemoryAt:
    """Fault injection: a late encoder layer raises CUDA's out-of-memory error for chunks of more
    than `fits` examples from its `after`-th call on (earlier layers have saved their activations
    for Opacus by then, and earlier chunks have had their clipped gradients accumulated)."""

    def __init__(self, model, *, fits: int, after: int = 1, error: type[Exception] = torch.cuda.OutOfMemoryError):
        layer = [m for m in model.modules() if type(m).__name__ == "BertLayer"][-1]
        self.fits, self.after, self.calls, self.error = fits, after, 0, error
        self.handle = layer.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls >= self.after and args[0].shape[0] > self.fits:
            raise self.error("CUDA out of memory (injected)")


def clipping_out_of_memory_at(monkeypatch, *, fits: int, after: int) -> None:
    """Fault injection: Opacus' clipping of per-sample gradients raises CUDA's out-of-memory error
    for chunks of more than `fits` examples from its `after`-th call on (the chunk's skip signal is
    then pending)."""
    from opacus.optimizers import DPOptimizer

    clip, calls = DPOptimizer.clip_and_accumulate, []

    def failing(self):
        calls.append(1)
        if len(calls) >= after and self.params[0].grad_sample.shape[0] > fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return clip(self)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", failing)


@pytest.mark.parametrize("where", ["forward", "clipping"])
def test_a_dp_chunk_that_runs_out_of_gpu_memory_is_halved_and_the_batch_computed_again(lora, caplog, monkeypatch,
                                                                                          where):
    """RELIABILITY fault: a GPU out-of-memory error part-way through a DP step, in a late layer's
    forward pass or in the clipping. The logical batch is computed again in half-size chunks, and
    nothing of the failed attempt (clipped sums, a pending skip, saved activations, forward counts)
    reaches the update: it equals a run that used the smaller chunks from the start, bit for bit.
    When one example does not fit, the step fails saying so; after any failure the cached model
    trains as if it had not happened."""
    cfg, model, tok, data = lora
    initial = get_adapter_state(model)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in dropouts]
    for m in dropouts:  # the failed attempt would otherwise have drawn dropout masks
        m.p = 0.0
    train = dict(pad_id=tok.pad_token_id, steps=2, batch_size=16, learning_rate=1e-2, weight_decay=0.0,
                 noise_multiplier=1.0, clipping_norm=0.5, seed=5)
    try:
        set_adapter_state(model, initial)
        with monkeypatch.context() as patch:  # the first chunk of 8 passes, the second fails
            fault = OutOfMemoryAt(model, fits=4 if where == "forward" else 8, after=2)
            if where == "clipping":
                clipping_out_of_memory_at(patch, fits=4, after=2)
            with caplog.at_level(logging.WARNING, logger="common.dp_train"):
                recovered, _ = dp_train(model, data, physical_batch_size=8, **train)
            fault.handle.remove()
        assert "out of GPU memory with chunks of 8 examples; computing the logical batch again in chunks of 4" \
            in caplog.text
        after_fault = get_adapter_state(model)
        set_adapter_state(model, initial)
        direct, _ = dp_train(model, data, physical_batch_size=4, **train)
        direct_state = get_adapter_state(model)
        assert all(np.array_equal(after_fault[k], v) for k, v in direct_state.items())
        assert recovered.loss == direct.loss and recovered.examples == direct.examples

        set_adapter_state(model, initial)
        fault = OutOfMemoryAt(model, fits=0)
        with pytest.raises(DPTrainingError, match="out of GPU memory with one example at a time"):
            dp_train(model, data, physical_batch_size=2, **train)
        fault.handle.remove()
        fault = OutOfMemoryAt(model, fits=0, after=2, error=KeyboardInterrupt)  # any other stop part-way
        with pytest.raises(KeyboardInterrupt):
            dp_train(model, data, physical_batch_size=8, **train)
        fault.handle.remove()
        set_adapter_state(model, initial)  # failed trainings leave the cached model as they found it
        dp_train(model, data, physical_batch_size=4, **train)
        assert all(np.array_equal(direct_state[k], v) for k, v in get_adapter_state(model).items())
    finally:
        set_adapter_state(model, initial)
        for m, rate in zip(dropouts, rates):
            m.p = rate
    count("faults_survived", "GPU out of memory part-way through a DP step")


def test_auto_dp_batch_is_an_eighth_of_the_data_up_to_1024_and_an_explicit_one_wins():
    assert [dp_batch_size(0, n) for n in (5, 8, 1800, 6062, 8192, 67_349)] == [1, 1, 225, 757, 1024, 1024]
    assert dp_batch_size(64, 1800) == 64
    assert poisson_rate(dp_batch_size(0, 1800), 1800) == 1 / 8  # 8 logical steps a local epoch
    cfg = FedtuneConfig(dp_sample=True, dp_target_epsilon=8.0)
    assert planned_mechanism(cfg, 1800).steps == 8 and planned_mechanism(cfg, 1800).sample_rate == 1 / 8


# Golden values of the DP-SGD plan (`fedtune plan`): the reviewer's check (4 clients of 1,800
# SST-2 examples, epsilon 8, 3 rounds) at the auto batch and at the old default batch 16, for the
# packaged model's adapter (d = 74,498). Sigma from the PLD calibration (1e-3 relative bisection).
@pytest.mark.parametrize("batch, sigma, ratio, averaged, verdicts", [
    (0, 0.7625, 0.9254, 0.4627, []),
    (16, 0.5069, 8.6858, 4.3429, ["noise drowns signal"]),  # expected batch 1800/113
])
def test_plan_golden_values_and_verdicts(batch, sigma, ratio, averaged, verdicts):
    plan = sample_level_plan(examples=1800, batch_size=batch, local_epochs=1, local_steps=0, rounds=3,
                             clipping_norm=1.0, trainable=74_498, clients_per_round=4, delta=DELTA, target_epsilon=8.0)
    assert plan.noise_multiplier == pytest.approx(sigma, abs=2e-3)
    assert plan.noise_to_signal == pytest.approx(ratio, rel=3e-3)
    assert plan.averaged_noise_to_signal == pytest.approx(averaged, rel=3e-3)
    assert plan.noise_std == pytest.approx(plan.noise_multiplier / plan.expected_batch)
    assert plan.noise_to_signal == pytest.approx(plan.noise_multiplier * math.sqrt(74_498) / plan.expected_batch)
    assert plan.verdicts() == verdicts and len(plan.problems()) == len(verdicts)


def test_plan_flags_weak_noise_and_suggests_a_batch_that_fixes_it():
    plan = make_plan(target_epsilon=8.0, delta=DELTA, rounds=3, num_clients=10, clients_per_round=10,
                     local_examples=1800, batch_size=16, trainable=74_498)
    assert plan.sample.verdicts() == ["noise drowns signal"]
    from common.privacy_plan import suggested
    better = suggested(plan.alternatives)
    assert better is not None and not better.problems() and better.batch_size == 128  # the smallest that is fine
    assert all(p.problems() for p in plan.alternatives if p.batch_size < better.batch_size)
    weak = sample_level_plan(examples=60_000, batch_size=32, local_epochs=1, local_steps=0, rounds=3,
                             clipping_norm=1.0, trainable=74_498, clients_per_round=100, delta=DELTA,
                             target_epsilon=8.0)
    assert "weak noise" in weak.verdicts()
