"""The `device` setting on a machine without a GPU: its rules, its refusals, the node's own
setting, and CPU numpy on the wire whatever the device (issue 31's CPU-testable part).

RELIABILITY bad inputs: device strings that name no device, a GPU this machine lacks (run config,
node config), refused before the engine starts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import FedtuneConfig, parse_run_config
from common.device import resolve_device
from common.errors import ConfigError
from tests.reliability import count

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without a GPU")


def test_auto_and_cpu_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:", "cuda:x", "cpu:0", "", "mps"])
def test_a_device_string_that_names_no_device_is_refused_by_the_config(spec):
    with pytest.raises(ConfigError, match=rf"device: expected auto, cpu, cuda or cuda:N, got {spec!r}"):
        parse_run_config({"device": spec})
    count("bad_inputs_rejected", f"device {spec!r}")


@NO_GPU
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_a_gpu_this_machine_lacks_is_refused_with_what_to_use_instead(spec):
    with pytest.raises(ConfigError, match=rf"device = {spec!r}: expected a CUDA GPU, but torch sees none .* use "
                                          r"device = 'auto' or 'cpu'"):
        resolve_device(spec)
    count("bad_inputs_rejected", f"device {spec} without a GPU")


@NO_GPU
def test_the_simulation_refuses_cuda_before_its_engine_starts_and_plans_no_gpu_for_auto():
    from simulation.run import backend_config, prepare

    with pytest.raises(ConfigError, match="device = 'cuda': expected a CUDA GPU"):
        prepare({"device": "cuda"}, 3)
    assert backend_config(prepare({}, 3), 3)["client_resources"]["num_gpus"] == 0.0
    count("bad_inputs_rejected", "simulation with device cuda without a GPU")


def test_a_nodes_own_device_wins_over_the_runs():
    from common.task import task_for

    assert task_for(FedtuneConfig(device="cuda:1")).device("cpu") == torch.device("cpu")
    assert task_for(FedtuneConfig(device="cpu")).device() == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device \(node config\): expected auto, cpu, cuda or cuda:N, got 'tpu'"):
        task_for(FedtuneConfig()).device("tpu", where="device (node config)")
    count("bad_inputs_rejected", "node config device 'tpu'")


def test_fedtune_supernode_refuses_a_bad_device_before_flower_starts(tmp_path):
    from client.node import check_node

    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello,a\nbye,b\n")
    with pytest.raises(ConfigError, match=r"device \(node config\): expected auto, cpu, cuda or cuda:N, got 'gpu0'"):
        check_node(["--node-config", f'data-path="{data}" device="gpu0"'])
    assert check_node(["--node-config", f'data-path="{data}" device="cpu"'])["device"] == "cpu"
    count("bad_inputs_rejected", "supernode device 'gpu0'")


def test_the_adapter_leaves_a_process_as_cpu_float32_numpy_whatever_the_device():
    """What travels (and is checkpointed) is the same format from any device: get_adapter_state
    copies to CPU numpy, set_adapter_state copies onto the model's own device."""
    from common.task import task_for
    from common.model import get_adapter_state, set_adapter_state

    cfg = FedtuneConfig(device="cpu")
    model = task_for(cfg).model(3).to(resolve_device(cfg.device))
    state = get_adapter_state(model)
    assert state and all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state.values())
    moved = {k: v + 1.0 for k, v in state.items()}
    set_adapter_state(model, moved)
    assert all(np.array_equal(get_adapter_state(model)[k], moved[k]) for k in moved)
    set_adapter_state(model, state)


def test_fedtune_config_lists_the_device_key():
    import contextlib
    import io

    from simulation.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["config"]) == 0
    line = next(x for x in out.getvalue().splitlines() if x.startswith("device "))
    assert '"auto"' in line and "cuda:N" in line


@NO_GPU
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_is_refused_where_training_runs_on_a_cpu(dtype):
    from common.device import check_precision
    from simulation.run import prepare

    with pytest.raises(ConfigError, match=rf"compute-dtype = '{dtype}': expected a CUDA device for mixed precision"):
        check_precision(resolve_device("auto"), dtype)
    with pytest.raises(ConfigError, match="expected a CUDA device for mixed precision"):
        prepare({"compute-dtype": dtype}, 3)  # before the engine starts
    count("bad_inputs_rejected", f"compute-dtype {dtype} on a CPU")


@NO_GPU
def test_qlora_is_refused_where_cuda_or_bitsandbytes_is_missing_saying_which():
    """load-in = 8bit / 4bit needs a CUDA device and the `qlora` extra: each missing one is named,
    before the engine starts and before a model loads."""
    from common.device import check_precision, quantization_problems
    from simulation.run import prepare

    cpu, gpu = torch.device("cpu"), torch.device("cuda:0")
    assert quantization_problems(cpu, "none") == [] and quantization_problems(gpu, "4bit", bitsandbytes=True) == []
    [no_cuda] = quantization_problems(cpu, "4bit", bitsandbytes=True)
    assert "expected a CUDA GPU for bitsandbytes' 8/4-bit kernels, but device resolves to cpu" in no_cuda
    [no_package] = quantization_problems(gpu, "8bit", bitsandbytes=False)
    assert "expected the bitsandbytes package" in no_package and "fedtune[qlora]" in no_package
    assert len(quantization_problems(cpu, "8bit", bitsandbytes=False)) == 2
    with pytest.raises(ConfigError, match=r"load-in = '4bit': expected a CUDA GPU .*; or use load-in = 'none'"):
        check_precision(resolve_device("auto"), "float32", "4bit")
    with pytest.raises(ConfigError, match="load-in = '8bit': expected a CUDA GPU"):
        prepare({"task": "causal-lm", "model": "packaged:all-MiniLM-L6-v2", "load-in": "8bit"}, 2)
    count("bad_inputs_rejected", "load-in 4bit / 8bit without CUDA or bitsandbytes", 2)


def test_float16_with_dp_sgd_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="compute-dtype: expected float32 or bfloat16 with dp-sample = true"):
        parse_run_config({"compute-dtype": "float16", "dp-sample": True, "dp-noise-multiplier": 1.0})
    count("bad_inputs_rejected", "compute-dtype float16 with dp-sample")


@pytest.fixture(scope="module")
def small():
    from common.federation_data import federation_labels, train_and_heldout
    from common.task import task_for
    from common.model import get_adapter_state, load_tokenizer
    from common.train import encode

    cfg = FedtuneConfig(max_train_examples=160, max_length=24)
    labels = federation_labels(cfg)
    cfg = cfg.replace(labels=labels.to_spec())
    model, tok = task_for(cfg).model(len(labels)), load_tokenizer(cfg.model)
    data = encode(train_and_heldout(cfg)[0], tok, labels, max_length=24, where="test")
    return model, tok, data, get_adapter_state(model), len(labels)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_training_keeps_the_adapter_and_optimizer_in_float32(small, dtype):
    """The autocast path, exercised on the CPU's own autocast (the config allows it on CUDA only):
    the forward runs in low precision, the adapter stays float32 and moves, and the loss stays
    close to the float32 run's."""
    from common.model import get_adapter_state, set_adapter_state
    from common.train import evaluate, train

    model, tok, data, initial, k = small
    losses = {}
    for compute in ("float32", dtype):
        set_adapter_state(model, initial)
        result = train(model, data, pad_id=tok.pad_token_id, epochs=1, steps=4, batch_size=16, learning_rate=1e-3,
                       weight_decay=0.0, max_grad_norm=1.0, seed=0, compute_dtype=compute)
        after = get_adapter_state(model)
        assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in after.values())
        assert any(not np.array_equal(after[n], initial[n]) for n in initial)
        losses[compute] = result.loss
        scored = evaluate(model, data, pad_id=tok.pad_token_id, batch_size=64, num_labels=k, compute_dtype=compute)
        assert np.isfinite(scored["loss"]) and scored["confusion"].sum() == len(data)
    assert losses[dtype] == pytest.approx(losses["float32"], rel=0.1)
    set_adapter_state(model, initial)


def test_dp_sgd_under_bfloat16_clips_and_noises_in_float32(small):
    """Opacus computes per-sample gradients in the activations' bfloat16 under autocast; fedtune
    casts them to float32 before clipping, so the DP step runs (it would fail assigning a
    bfloat16 gradient to a float32 weight) and the accounting is unchanged."""
    from common.dp_train import DPTrainingError, dp_train
    from common.model import get_adapter_state, set_adapter_state

    model, tok, data, initial, _ = small
    set_adapter_state(model, initial)
    result, mechanism = dp_train(model, data, pad_id=tok.pad_token_id, steps=3, batch_size=32, learning_rate=1e-3,
                                 weight_decay=0.0, noise_multiplier=1.0, clipping_norm=1.0, seed=0,
                                 physical_batch_size=8, compute_dtype="bfloat16")
    assert mechanism.steps == 3 and np.isfinite(result.loss)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in get_adapter_state(model).values())
    with pytest.raises(DPTrainingError, match="expected compute-dtype float32 or bfloat16, got float16"):
        dp_train(model, data, pad_id=tok.pad_token_id, steps=1, batch_size=32, learning_rate=1e-3, weight_decay=0.0,
                 noise_multiplier=1.0, clipping_norm=1.0, seed=0, compute_dtype="float16")
    set_adapter_state(model, initial)


def test_gpu_memory_is_bounded_only_for_a_shared_gpu(monkeypatch):
    from common.device import MEMORY_FRACTION_ENV, bound_memory

    monkeypatch.setenv(MEMORY_FRACTION_ENV, "0.45")
    assert bound_memory(torch.device("cpu")) is None  # nothing to bound on a CPU
    monkeypatch.delenv(MEMORY_FRACTION_ENV)
    assert bound_memory(torch.device("cpu")) is None
