"""Distributed DP under secure aggregation end to end on the simulation engine (real Ray actors,
real model), audited from the run directory. (Secure aggregation's mean against FedAvg's and the
recovery of a lost client: tests/test_secure_rounds.py in process, tests/test_deployment.py on
SuperNodes.)

RELIABILITY secure aggregation: S3 and S4 (every released sum carried its target noise; the ledger
passes the audit, and the federation's epsilon is each client's own record's). Faults: the server
killed after round 1 and restarted: the run resumes to the same adapter bit for bit (the server's
AdamW state, the clients' seeds), the privacy not counted twice. Invariants I1, I2, I4, I5.
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

pytestmark = [pytest.mark.slow, pytest.mark.minutes(3)]

SMALL = ["max-train-examples=360", "max-heldout-examples=120", "local-steps=3", "batch-size=16", "max-length=32",
         "partitioner=iid", "fraction-evaluate=0.0"]
DISTRIBUTED = ["secure-aggregation=true", "validate-updates=false", "dp-sample=true", "dp-mode=distributed", "dp-target-epsilon=6", "dp-batch-size=120",
               "dp-clipping-norm=0.7", "local-steps=0"]
CANARIES = "dp-audit-canaries=200"


def simulate_args(run_dir, *config: str) -> list[str]:
    args = [sys.executable, "-m", "simulation.cli", "simulate"]
    for item in [*SMALL, *config, f'run-dir="{run_dir}"']:
        args += ["-c", item]
    return args


def simulate(run_dir, *config: str, privacy):
    out = run_cli(simulate_args(run_dir, *config), timeout=400, env={"FEDTUNE_PRIVACY_DIR": str(privacy)})
    assert out.returncode == 0, out.stdout[-4000:]
    return out.stdout


def adapter(run_dir, server_round: int) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / f"round-{server_round:04d}.safetensors").adapter


def test_a_distributed_dp_run_is_audited_and_resumes_bit_for_bit_without_counting_twice(tmp_path):
    full = tmp_path / "full"
    out = simulate(full, *DISTRIBUTED, "num-server-rounds=3", CANARIES, privacy=tmp_path / "priv-full")
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
    bound = json.loads((full / "audit.json").read_text())["empirical_epsilon_lower_bound"]
    assert bound["canaries"] == 600 and bound["epsilon"] <= bound["recorded_epsilon"] <= 6.0  # issue 43
    assert set(bound["per_client"]) == {"partition-0", "partition-1", "partition-2"}
    records = list((tmp_path / "priv-full").glob("*.json"))
    assert len(records) == 3 and (tmp_path / "priv-full" / "node-secret").stat().st_mode & 0o077 == 0

    cut = tmp_path / "cut"
    # The same node secret as the first run's: the clients' samples, rounding and noise repeat for the
    # same inputs (a node resuming its own run keeps its secret).
    (tmp_path / "priv-cut").mkdir()
    (tmp_path / "priv-cut" / "node-secret").write_bytes((tmp_path / "priv-full" / "node-secret").read_bytes())
    args = simulate_args(cut, *DISTRIBUTED, "num-server-rounds=3", CANARIES)
    killed = run_until(args, condition=lambda: (cut / "checkpoints" / "round-0001.safetensors").exists(), timeout=300,
                       env={"FEDTUNE_PRIVACY_DIR": str(tmp_path / "priv-cut")})
    assert killed and not (cut / "checkpoints" / "round-0002.safetensors").exists()
    simulate(cut, *DISTRIBUTED, "num-server-rounds=3", CANARIES, "resume=true", privacy=tmp_path / "priv-cut")
    final_full, final_cut = adapter(full, 3), adapter(cut, 3)
    assert all(np.array_equal(final_full[k], final_cut[k]) for k in final_full)
    # The resumed run kept its canaries (seeds from the node secret and the run config less `resume`).
    assert (json.loads((cut / "canaries.json").read_text())["clients"]
            == json.loads((full / "canaries.json").read_text())["clients"])
    again = [e["epsilon"] for e in Ledger.read(cut / "privacy-ledger.jsonl").entries if e["kind"] == "federation"]
    assert again == [e["epsilon"] for e in federation]
    for record in (tmp_path / "priv-cut").glob("*.json"):
        assert [e["round"] for e in json.loads(record.read_text())["entries"]] == [1, 2, 3]
    count("faults_survived", "server killed after a distributed DP round and restarted: same adapter, no double count")
