"""Config parsing and validation (RELIABILITY: bad inputs - run config with nan, inf or negatives)."""

from __future__ import annotations

import math
import re
import tomllib

import pytest

from common.config import FedtuneConfig, config_keys, parse_run_config
from common.errors import ConfigError
from tests.conftest import REPO
from tests.reliability import count


def test_defaults_parse_to_the_dataclass_defaults():
    assert parse_run_config({}) == FedtuneConfig()


def test_pyproject_defaults_equal_dataclass_defaults():
    app_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert sorted(app_cfg) == sorted(config_keys())
    assert parse_run_config(app_cfg) == FedtuneConfig()


def test_pyproject_defaults_and_the_docs_key_reference_are_generated_from_the_config():
    """Help text lives in common/config.py only; pyproject.toml's defaults (with each key's help as
    a comment) and docs/configuration.md's table are generated from it and must not drift."""
    from common.config_reference import generated_files

    for path, (now, generated) in generated_files(REPO).items():
        assert now == generated, f"{path.name} is stale: run `python -m common.config_reference --write`"
    text = (REPO / "pyproject.toml").read_text().split("[tool.flwr.app.config]")[1].split("\n[")[0]
    for key in config_keys():
        line = next(l for l in text.splitlines() if l.startswith(f"{key} ="))
        assert re.search(r"#\s*\S", line), f"{key} has no help comment in pyproject.toml"
        assert f"| `{key}` |" in (REPO / "docs" / "configuration.md").read_text()


SECURE = {"secure-aggregation": True, "validate-updates": False}
DISTRIBUTED = {"dp-sample": True, "dp-target-epsilon": 3.0, "dp-mode": "distributed"}


@pytest.mark.parametrize("raw, expected", [
    ({"num-server-rounds": 5}, {"num_server_rounds": 5}),
    ({**SECURE, "strategy": "fedadam"}, {"secure_aggregation": True}),
    ({**SECURE, **DISTRIBUTED}, {"dp_mode": "distributed"}),
    ({"num_server_rounds": "7"}, {"num_server_rounds": 7}),
    ({"learning-rate": 1}, {"learning_rate": 1.0}),
    ({"resume": "true", "run-dir": "/tmp/x"}, {"resume": True}),
    ({"strategy": "fedadam"}, {"strategy": "fedadam"}),
    ({"partitioner": "natural", "partition-column": "category"}, {"partitioner": "natural"}),
])
def test_good_values_are_accepted(raw, expected):
    cfg = parse_run_config(raw)
    for name, value in expected.items():
        assert getattr(cfg, name) == value


@pytest.mark.parametrize("raw, message", [
    ({"no-such-key": 1}, "unknown config key"),
    ({"learning-rate": float("nan")}, "finite"),
    ({"learning-rate": float("inf")}, "finite"),
    ({"learning-rate": "nan"}, "finite"),
    ({"learning-rate": -1.0}, "> 0"),
    ({"learning-rate": True}, "expected a number"),
    ({"num-server-rounds": 0}, ">= 1"),
    ({"num-server-rounds": 2.5}, "integer"),
    ({"fraction-train": 1.5}, r"\[0.0, 1.0\]"),
    ({"lora-r": -4}, ">= 1"),
    ({"lora-dropout": 1.0}, r"1.0\)"),
    ({"strategy": "fedsgd"}, "expected one of"),
    ({"resume": "maybe"}, "true or false"),
    ({"resume": True}, "run-dir"),
    ({"partitioner": "natural"}, "partition-column"),
    ({"max-grad-norm": -0.1}, ">= 0"),
    ({"model": 3}, "expected a string"),
    ({"lr-schedule": "linear"}, "expected one of"),
    ({"min-learning-rate": 0.01, "learning-rate": 0.001}, "at most learning-rate"),
    ({"min-learning-rate": -1e-4}, ">= 0"),
    ({"seed": -1}, "seed: expected a value >= 0, got -1"),  # was a numpy traceback (hardening class 7)
    # Nonsense that used to "complete" (hardening class 5)
    ({"fraction-train": 0.0}, r"fraction-train: expected a value in \(0, 1\], got 0"),
    ({"labels": "neg,pos,neg"}, r"labels: expected each label once, got \['neg'\] more than once"),
    ({"text-column": "label"}, "text-column / label-column: expected two different columns, got 'label' for both"),
    # Privacy settings that would silently not apply (RELIABILITY: bad inputs; hardening class 4)
    ({"dp-target-epsilon": 8.0}, "dp-target-epsilon: set to 8.0, but dp-sample = false"),
    ({"dp-noise-multiplier": 1.1}, "dp-noise-multiplier: set to 1.1, but dp-sample = false"),
    ({"dp-epsilon-budget": 3.0}, "dp-epsilon-budget: set to 3.0, but dp-sample = false"),
    ({"dp-batch-size": 256}, "dp-batch-size: set to 256, but dp-sample = false"),
    ({"dp-client-epsilon-budget": 2.0}, "dp-client-epsilon-budget: set to 2.0, but dp-client = 'off'"),
    # Secure aggregation and distributed DP against what needs individual updates (issue 38)
    ({"secure-aggregation": True}, "validate-updates: set to True, but secure-aggregation = true and it checks each"),
    ({**SECURE, "strategy": "krum"}, "strategy: expected one of .* with secure-aggregation = true .* got 'krum'"),
    ({**SECURE, "dp-client": "server-fixed"}, "dp-client: set to 'server-fixed', but secure-aggregation = true"),
    ({**SECURE, "weight-policy": "uniform"}, "weight-policy: set to 'uniform', but secure-aggregation = true"),
    ({**SECURE, "secagg-max-dropouts": -1}, "secagg-max-dropouts: expected a value >= 0, got -1"),
    ({"dp-mode": "distributed"}, "dp-mode: set to 'distributed', but dp-sample = false"),
    ({"dp-sample": True, "dp-target-epsilon": 3.0, "dp-mode": "distributed"},
     "dp-mode: 'distributed' needs secure-aggregation = true"),
    ({**SECURE, **DISTRIBUTED, "strategy": "fedadam"}, "strategy: expected 'fedavg' with dp-mode = 'distributed'"),
    ({**SECURE, **DISTRIBUTED, "local-steps": 5}, "local-steps: expected 0 with dp-mode = 'distributed'"),
])
def test_bad_values_are_refused_with_expected_and_got(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config(raw)
    count("bad_inputs_rejected", f"config {raw}")


def test_run_config_round_trip():
    cfg = FedtuneConfig(strategy="fedprox", proximal_mu=0.1, labels="a,b")
    assert parse_run_config(cfg.to_run_config()) == cfg


def test_transport_keys_can_be_ignored():
    raw = {**FedtuneConfig().to_run_config(), "server-round": 3}
    with pytest.raises(ConfigError):
        parse_run_config(raw)
    assert parse_run_config(raw, ignore=("server-round",)) == FedtuneConfig()


def test_no_float_field_default_is_non_finite():
    for key, value in FedtuneConfig().to_run_config().items():
        if isinstance(value, float):
            assert math.isfinite(value), key


def test_an_older_runs_config_with_a_removed_option_at_its_neutral_value_still_parses():
    """client-sampling, local-warmup-fraction, keep-optimizer-state and shared-moments were removed (no measured gain): an older run's
    config.json or checkpoint that holds them at their neutral values still parses (export,
    audit, resume); set to anything else they are refused as unknown keys."""
    old = {**FedtuneConfig().to_run_config(), "client-sampling": "random", "local-warmup-fraction": 0.0,
           "keep-optimizer-state": False, "shared-moments": "none"}
    assert parse_run_config(old) == FedtuneConfig()
    for key, value in (("client-sampling", "balanced"), ("local-warmup-fraction", 0.1), ("keep-optimizer-state", True),
                       ("shared-moments", "second")):
        with pytest.raises(ConfigError, match=f"unknown config key\\(s\\) \\['{key}'\\]"):
            parse_run_config({key: value})


def test_fedtune_config_into_a_reader_that_leaves_early_ends_without_a_traceback():
    """`fedtune config | head -1`: the listing's reader has closed the pipe (here before the
    command starts, so its first write finds no reader); the command ends with status 1 and
    nothing on stderr (before: a BrokenPipeError traceback)."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "simulation.cli", "config"], cwd=REPO, stdout=write_end,
                              stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 1 and done.stderr == b"", done.stderr.decode()[-2000:]
