"""The GPU path on a CUDA machine (issue 31): training, DP-SGD, mixed precision and QLoRA on the
GPU, the adapter leaving as CPU float32 and loading on a CPU model, the memory bound of a shared
GPU, and what repeats bit for bit. Skipped on a machine without a CUDA GPU (tests/test_device.py
checks that machine's rules); no Flower here, so it runs where only torch, transformers, PEFT,
Opacus and bitsandbytes are installed:

    python -m pytest -n 0 tests/test_gpu.py

With FEDTUNE_GPU_REPORT=FILE the measured figures (determinism, CPU/GPU agreement) are written
to FILE as JSON. RELIABILITY invariants: the adapter format and the accounting do not depend on
the device; a client's memory share of a shared GPU is enforced.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from common.config import FedtuneConfig
from common.errors import ConfigError
from tests.conftest import save_tiny_llama
from tests.reliability import count

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch sees none); tests/test_device.py covers a CPU machine")
GPU = torch.device("cuda:0")


def report(name: str, value) -> None:
    path = os.environ.get("FEDTUNE_GPU_REPORT")
    if path:
        figures = json.loads(open(path).read()) if os.path.exists(path) else {}
        figures[name] = value
        with open(path, "w") as f:
            json.dump(figures, f, indent=1)


def max_difference(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def small():
    """The packaged MiniLM classifier on the GPU, a fresh copy of it on the CPU, and some data."""
    from common.federation_data import federation_labels, train_and_heldout
    from common.task import task_for
    from common.model import get_adapter_state, load_lora_model, load_tokenizer
    from common.train import encode

    cfg = FedtuneConfig(max_train_examples=256, max_length=32, device="cuda")
    labels = federation_labels(cfg)
    cfg = cfg.replace(labels=labels.to_spec())
    model, tok = task_for(cfg).model(len(labels), device=GPU), load_tokenizer(cfg.model)
    cpu = load_lora_model.__wrapped__(cfg.model, len(labels), r=cfg.lora_r, alpha=cfg.lora_alpha,
                                      dropout=cfg.lora_dropout, target_modules=tuple(cfg.target_modules), seed=cfg.seed)
    data = encode(train_and_heldout(cfg)[0], tok, labels, max_length=32, where="test")
    return model, cpu, tok, data, get_adapter_state(model), len(labels)


def fit(model, tok, data, initial, *, steps=8, dp=False, compute_dtype="float32"):
    from common.dp_train import dp_train
    from common.model import get_adapter_state, set_adapter_state
    from common.train import train

    set_adapter_state(model, initial)
    common = dict(pad_id=tok.pad_token_id, steps=steps, learning_rate=1e-3, weight_decay=0.0, seed=0,
                  compute_dtype=compute_dtype)
    if dp:
        result, _ = dp_train(model, data, batch_size=64, noise_multiplier=1.0, clipping_norm=1.0,
                             physical_batch_size=16, **common)
    else:
        result = train(model, data, epochs=1, batch_size=32, max_grad_norm=1.0, **common)
    return result, get_adapter_state(model)


def test_the_device_rules_on_a_gpu_machine():
    from common.device import check_precision, resolve_device

    assert resolve_device("auto") == GPU and resolve_device("cuda") == GPU
    n = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"device = 'cuda:{n}': expected a GPU index below {n}"):
        resolve_device(f"cuda:{n}")
    for dtype in ("bfloat16", "float16"):
        check_precision(GPU, dtype)  # allowed here
    count("bad_inputs_rejected", "a GPU index beyond those torch sees")


def test_a_gpu_trained_adapter_is_cpu_float32_and_scores_the_same_on_a_cpu_model(small):
    from common.device import model_device
    from common.model import set_adapter_state
    from common.train import evaluate

    model, cpu, tok, data, initial, k = small
    assert model_device(model) == GPU
    result, state = fit(model, tok, data, initial)
    assert state.keys() == initial.keys() and result.steps == 8
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == initial[n].shape
               for n, v in state.items())
    assert max_difference(state, initial) > 0
    set_adapter_state(cpu, state)
    on_gpu = evaluate(model, data, pad_id=tok.pad_token_id, batch_size=64, num_labels=k)
    on_cpu = evaluate(cpu, data, pad_id=tok.pad_token_id, batch_size=64, num_labels=k)
    report("gpu_vs_cpu_eval", {"loss_gpu": on_gpu["loss"], "loss_cpu": on_cpu["loss"],
                               "accuracy_gpu": on_gpu["accuracy"], "accuracy_cpu": on_cpu["accuracy"]})
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=1e-4)
    assert abs(on_gpu["accuracy"] - on_cpu["accuracy"]) <= 1 / len(data)
    count("invariant_checks_passed", "a GPU-trained adapter is CPU float32 and scores the same on a CPU model")


def test_what_repeats_bit_for_bit_on_the_gpu(small):
    """Measured, for docs/configuration.md#device: the same training twice on the GPU (plain and
    DP-SGD, whose noise comes from a seeded CUDA generator), and the GPU against the CPU (not the
    same computation: dropout masks come from the CPU's and the GPU's own generators)."""
    model, cpu, tok, data, initial, _ = small
    gpu_run, first = fit(model, tok, data, initial)
    _, second = fit(model, tok, data, initial)
    _, dp_first = fit(model, tok, data, initial, dp=True, steps=4)
    _, dp_second = fit(model, tok, data, initial, dp=True, steps=4)
    cpu_run, on_cpu = fit(cpu, tok, data, initial)
    figures = {"train_twice_max_abs_diff": max_difference(first, second),
               "dp_train_twice_max_abs_diff": max_difference(dp_first, dp_second),
               "gpu_vs_cpu_train_max_abs_diff": max_difference(first, on_cpu),
               "update_max_abs": max_difference(first, initial),
               "train_loss_gpu": gpu_run.loss, "train_loss_cpu": cpu_run.loss}
    report("determinism", figures)
    print(figures)
    # Same device, same seed: equal to far below the update's own size; a CPU run learns alike.
    assert figures["train_twice_max_abs_diff"] <= 1e-4 * figures["update_max_abs"]
    assert figures["dp_train_twice_max_abs_diff"] <= 1e-3 * figures["update_max_abs"]
    assert gpu_run.loss == pytest.approx(cpu_run.loss, rel=0.1)
    count("invariant_checks_passed", "seeded GPU training repeats (plain and DP)")


def test_auto_dp_chunks_compute_the_whole_poisson_batch_on_the_gpu_and_release_the_same_update(small):
    """dp-physical-batch-size auto is one piece on a GPU; the update equals the chunked one up to
    float rounding (dropout off: its masks depend on how a batch is cut)."""
    from common.dp_train import AUTO_CHUNK, dp_train
    from common.model import get_adapter_state, set_adapter_state

    model, _, tok, data, initial, _ = small
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in dropouts]
    for m in dropouts:
        m.p = 0.0
    updates, results = [], []
    try:
        for physical in (AUTO_CHUNK, 16):
            set_adapter_state(model, initial)
            result, _ = dp_train(model, data, pad_id=tok.pad_token_id, steps=3, batch_size=64, learning_rate=1e-3,
                                 weight_decay=0.0, noise_multiplier=1.0, clipping_norm=0.5, seed=3,
                                 physical_batch_size=physical)
            results.append(result)
            state = get_adapter_state(model)
            updates.append(np.concatenate([(state[k] - initial[k]).ravel() for k in initial]))
    finally:
        for m, rate in zip(dropouts, rates):
            m.p = rate
    assert np.linalg.norm(updates[0] - updates[1]) <= 1e-4 * np.linalg.norm(updates[0])
    assert results[0].padding_efficiency < results[1].padding_efficiency  # one piece: padded to the longest
    count("invariant_checks_passed", "auto DP chunks on the GPU release the chunked update")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_on_cuda_keeps_the_adapter_in_float32(small, dtype):
    model, _, tok, data, initial, _ = small
    base, _ = fit(model, tok, data, initial)
    mixed, state = fit(model, tok, data, initial, compute_dtype=dtype)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in state.values())
    assert max_difference(state, initial) > 0
    assert mixed.loss == pytest.approx(base.loss, rel=0.1)
    if dtype == "bfloat16":  # DP-SGD: per-sample gradients cast to float32 before clipping
        dp, dp_state = fit(model, tok, data, initial, dp=True, steps=3, compute_dtype=dtype)
        assert np.isfinite(dp.loss) and all(np.isfinite(v).all() for v in dp_state.values())
    count("invariant_checks_passed", f"{dtype} autocast on CUDA trains a float32 adapter")


def test_a_clients_share_of_a_shared_gpu_is_enforced(monkeypatch):
    from common.device import MEMORY_FRACTION_ENV, bound_memory

    total = torch.cuda.get_device_properties(GPU).total_memory
    monkeypatch.setenv(MEMORY_FRACTION_ENV, "0.05")
    try:
        assert bound_memory(GPU) == 0.05
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(int(total * 0.1), dtype=torch.uint8, device=GPU)
        torch.empty(int(total * 0.01), dtype=torch.uint8, device=GPU)  # within the share
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, GPU)
        torch.cuda.empty_cache()
    count("faults_survived", "a client allocating beyond its share of a shared GPU")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden=128)


@pytest.mark.parametrize("load_in,compute_dtype", [("4bit", "bfloat16"), ("4bit", "float32"), ("8bit", "float32")])
def test_qlora_trains_on_a_quantized_base_and_its_adapter_fits_the_full_precision_model(
        tiny_llama, load_in, compute_dtype):
    """load-in quantizes the frozen base with bitsandbytes on the GPU; LoRA trains (plain and
    DP-SGD), and the adapter has the names, shapes and dtype of the full-precision model's, so
    export (which loads the full-precision base on the CPU) and a CPU server can use it; the frozen
    A matrices (lora-freeze-a) are the same however the base was loaded."""
    import bitsandbytes as bnb

    from common.data import load_instructions
    from common.dp_train import dp_train
    from common.lm import build_lora_causal_lm, encode_lm
    from common.model import frozen_fingerprint, get_adapter_state, load_tokenizer, set_adapter_state
    from common.train import evaluate_lm, train

    cfg = FedtuneConfig(task="causal-lm", model=tiny_llama, max_length=48, load_in=load_in, device="cuda",
                        compute_dtype=compute_dtype)
    model = task_for(cfg).model(0)
    quantized = bnb.nn.Linear4bit if load_in == "4bit" else bnb.nn.Linear8bitLt
    layers = [m for n, m in model.named_modules() if n.endswith("q_proj.base_layer")]
    assert layers and all(isinstance(m, quantized) for m in layers)
    lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=tuple(cfg.target_modules),
                seed=cfg.seed)
    full = build_lora_causal_lm(tiny_llama, **lora, load_in="none")
    initial = get_adapter_state(model)
    reference = get_adapter_state(full)
    assert {k: (v.shape, v.dtype) for k, v in initial.items()} == {k: (v.shape, v.dtype) for k, v in reference.items()}

    tok = load_tokenizer(tiny_llama)
    data = encode_lm(load_instructions("packaged:chatterbot").subset(range(32)), tok, template="alpaca",
                     max_length=48, packing=False)
    before = evaluate_lm(model, data, pad_id=tok.pad_token_id, batch_size=16, compute_dtype=compute_dtype)
    train(model, data, pad_id=tok.pad_token_id, epochs=1, steps=30, batch_size=16, learning_rate=3e-3,
          weight_decay=0.0, max_grad_norm=1.0, seed=0, compute_dtype=compute_dtype)
    after = evaluate_lm(model, data, pad_id=tok.pad_token_id, batch_size=16, compute_dtype=compute_dtype)
    assert after["loss"] < before["loss"]
    state = get_adapter_state(model)
    set_adapter_state(full, state)  # what export and a CPU server do
    on_cpu = evaluate_lm(full, data, pad_id=tok.pad_token_id, batch_size=16)
    report(f"qlora_{load_in}_{compute_dtype}", {"loss_before": before["loss"], "loss_after": after["loss"],
                                                "loss_full_precision_cpu": on_cpu["loss"]})
    assert on_cpu["loss"] == pytest.approx(after["loss"], rel=0.02)  # H200: 10.027 against 10.026

    set_adapter_state(model, initial)
    result, mechanism = dp_train(model, data, pad_id=tok.pad_token_id, steps=3, batch_size=16, learning_rate=1e-3,
                                 weight_decay=0.0, noise_multiplier=1.0, clipping_norm=1.0, seed=0,
                                 physical_batch_size=8, compute_dtype=compute_dtype)
    assert mechanism.steps == 3 and np.isfinite(result.loss)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in get_adapter_state(model).values())

    frozen = cfg.replace(lora_freeze_a=True)
    fingerprint = frozen_fingerprint(task_for(frozen).model(0))
    assert fingerprint and fingerprint == frozen_fingerprint(
        build_lora_causal_lm(tiny_llama, **lora, load_in="none", freeze_a=True))
    count("invariant_checks_passed", f"QLoRA {load_in} adapter fits the full-precision model")
