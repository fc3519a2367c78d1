"""Secure aggregation and distributed DP end to end on the simulation engine (real Ray actors,
real model, the fault-injecting ClientApp for the faults), audited from the run directory.

RELIABILITY secure aggregation: S1 (the first secure round's adapter equals plain FedAvg's to
quantization error; a client that fails after sharing its keys is recovered), S4 (the ledger of a
distributed DP run passes the audit, and the audit agrees with the clients' own records). Faults:
a ClientApp raising in the stage that trains; the server killed after round 1 and restarted: the
run resumes to the same adapter bit for bit (the server's AdamW state, the clients' seeds), the
privacy not counted twice. Invariants I1, I2, I4, I5.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from common.ledger import Ledger
from server.checkpoint import load_checkpoint
from tests.invariants import check_run_invariants
from tests.procs import run_cli, run_until
from tests.reliability import count

pytestmark = [pytest.mark.slow, pytest.mark.minutes(6)]

SMALL = ["max-train-examples=360", "max-heldout-examples=120", "local-steps=3", "batch-size=16", "max-length=32",
         "partitioner=iid", "fraction-evaluate=0.0"]
SECURE = ["secure-aggregation=true", "validate-updates=false"]
DISTRIBUTED = [*SECURE, "dp-sample=true", "dp-mode=distributed", "dp-target-epsilon=6", "dp-batch-size=120",
               "dp-clipping-norm=0.7", "local-steps=0"]


def simulate_args(run_dir, *config: str, faults: bool = False) -> list[str]:
    args = [sys.executable, "-m", "simulation.cli", "simulate"]
    if faults:
        args += ["--client-app", "simulation.faults:app"]
    for item in [*SMALL, *config, f'run-dir="{run_dir}"']:
        args += ["-c", item]
    return args


def simulate(run_dir, *config: str, privacy=None, faults: dict | None = None):
    env = {"FEDTUNE_FAULTS": json.dumps(faults or {})}
    if privacy is not None:
        env["FEDTUNE_PRIVACY_DIR"] = str(privacy)
    out = run_cli(simulate_args(run_dir, *config, faults=faults is not None), timeout=400, env=env)
    assert out.returncode == 0, out.stdout[-4000:]
    return out.stdout


def rounds_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def adapter(run_dir, server_round: int) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / f"round-{server_round:04d}.safetensors").adapter


def test_secure_aggregation_gives_fedavgs_adapter_and_recovers_a_client_that_fails_mid_round(tmp_path):
    simulate(tmp_path / "plain", "num-server-rounds=1")
    faults = {"partition-1": {"kind": "raise", "rounds": [2], "stage": "masked"}}
    out = simulate(tmp_path / "secure", *SECURE, "num-server-rounds=2", faults=faults)
    assert "secure aggregation" in out
    plain, secure = adapter(tmp_path / "plain", 1), adapter(tmp_path / "secure", 1)
    worst = max(float(np.abs(plain[k] - secure[k]).max()) for k in plain)
    assert worst < 1e-6, worst
    rows = check_run_invariants(tmp_path / "secure", 2)
    plain_rows = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["heldout_accuracy"] == plain_rows[1]["heldout_accuracy"]
    first, second = rounds_of(tmp_path / "secure")
    assert first["aggregated"] == ["partition-0", "partition-1", "partition-2"]
    assert second["failed"] == ["partition-1"] and second["aggregated"] == ["partition-0", "partition-2"]
    assert second["secure_aggregation"]["applied"] and second["secure_aggregation"]["stages"]["masked"] == 2
    count("invariant_checks_passed", "S1 secure aggregation equals FedAvg end to end")
    count("faults_survived", "a client raising in a secure round's training stage, recovered from the shares")


def test_a_distributed_dp_run_is_audited_and_resumes_bit_for_bit_without_counting_twice(tmp_path):
    full = tmp_path / "full"
    out = simulate(full, *DISTRIBUTED, "num-server-rounds=3", privacy=tmp_path / "priv-full")
    assert "distributed DP-SGD over" in out and "federation eps" in out
    check_run_invariants(full, 3)
    entries = Ledger.read(full / "privacy-ledger.jsonl").entries
    federation = [e for e in entries if e["kind"] == "federation"]
    assert [e["round"] for e in federation] == [1, 2, 3] and federation[-1]["epsilon"] <= 6.0
    assert all(e["summed"] == 3 and e["noise_variance_summed"] >= e["noise_variance_target"] for e in federation)
    clients = [e for e in entries if e["kind"] == "client"]
    assert len(clients) == 9 and {e["noise"] for e in clients} == {"skellam"}
    for e in clients:  # every client was in every released sum: its own record says what the federation's does
        assert e["epsilon"] == pytest.approx(federation[e["round"] - 1]["epsilon"], rel=1e-9)
    audit = run_cli([sys.executable, "-m", "simulation.cli", "audit", str(full)], timeout=300)
    assert audit.returncode == 0 and "audit passed" in audit.stdout, audit.stdout[-3000:]
    records = list((tmp_path / "priv-full").glob("*.json"))
    assert len(records) == 3 and (tmp_path / "priv-full" / "node-secret").stat().st_mode & 0o077 == 0

    cut = tmp_path / "cut"
    # The same node secret as the first run's: the clients' samples, rounding and noise repeat for the
    # same inputs (a node resuming its own run keeps its secret).
    (tmp_path / "priv-cut").mkdir()
    (tmp_path / "priv-cut" / "node-secret").write_bytes((tmp_path / "priv-full" / "node-secret").read_bytes())
    args = simulate_args(cut, *DISTRIBUTED, "num-server-rounds=3")
    killed = run_until(args, condition=lambda: (cut / "checkpoints" / "round-0001.safetensors").exists(), timeout=300,
                       env={"FEDTUNE_PRIVACY_DIR": str(tmp_path / "priv-cut")})
    assert killed and not (cut / "checkpoints" / "round-0002.safetensors").exists()
    simulate(cut, *DISTRIBUTED, "num-server-rounds=3", "resume=true", privacy=tmp_path / "priv-cut")
    final_full, final_cut = adapter(full, 3), adapter(cut, 3)
    assert all(np.array_equal(final_full[k], final_cut[k]) for k in final_full)
    again = [e["epsilon"] for e in Ledger.read(cut / "privacy-ledger.jsonl").entries if e["kind"] == "federation"]
    assert again == [e["epsilon"] for e in federation]
    for record in (tmp_path / "priv-cut").glob("*.json"):
        assert [e["round"] for e in json.loads(record.read_text())["entries"]] == [1, 2, 3]
    count("faults_survived", "server killed after a distributed DP round and restarted: same adapter, no double count")
