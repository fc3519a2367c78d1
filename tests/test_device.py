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
    from client.messages import node_device

    assert node_device({"device": "cpu"}, FedtuneConfig(device="cuda:1")) == torch.device("cpu")
    assert node_device({}, FedtuneConfig(device="cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device \(node config\): expected auto, cpu, cuda or cuda:N, got 'tpu'"):
        node_device({"device": "tpu"}, FedtuneConfig())
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
    from common.lm import model_for_config
    from common.model import get_adapter_state, set_adapter_state

    cfg = FedtuneConfig(device="cpu")
    model = model_for_config(cfg, 3).to(resolve_device(cfg.device))
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
