"""Differential privacy end to end on the simulation engine, audited from the run directory.

RELIABILITY privacy checks: resume without double counting; audit detects an edited
ledger; a client whose budget would be exceeded does not train (the run ends with a named
status); client-level accounting uses the real client sampling; a DP round with failed or
rejected clients follows the stated policy recorded in the ledger. Invariants I1, I2, I5.
"""

from __future__ import annotations

import json
import sys

import pytest

from common.ledger import Ledger, verify_chain
from tests.invariants import check_run_invariants
from tests.procs import run_cli, run_until
from tests.reliability import count

pytestmark = [pytest.mark.slow, pytest.mark.minutes(7)]

SMALL = ["max-train-examples=360", "max-heldout-examples=120", "local-steps=5", "batch-size=16", "max-length=32",
         "partitioner=iid", "fraction-evaluate=0.0"]
DP = ["dp-sample=true", "dp-target-epsilon=4.0", "dp-clipping-norm=1.0"]


def fedtune(*args: str, privacy_dir, timeout: float = 300):
    return run_cli([sys.executable, "-m", "simulation.cli", *args], timeout=timeout,
                   env={"FEDTUNE_PRIVACY_DIR": str(privacy_dir)})


def simulate(run_dir, privacy_dir, *extra):
    args = ["simulate"]
    for item in [*SMALL, *DP, f'run-dir="{run_dir}"', *extra]:
        args += ["-c", item]
    result = fedtune(*args, privacy_dir=privacy_dir)
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def epsilons(run_dir) -> list[tuple]:
    return [(e["round"], e["client_id"], e["status"], round(e["epsilon"], 9))
            for e in Ledger.read(run_dir / "privacy-ledger.jsonl").entries]


def tensorboard_epsilons(run_dir) -> list[tuple]:
    """(round, client, epsilon) of the per-client epsilon scalars in the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    prefix = "privacy/epsilon_client/"
    return sorted((e.step, tag[len(prefix):], round(e.value, 5)) for tag in events.Tags()["scalars"]
                  if tag.startswith(prefix) for e in events.Scalars(tag))


def test_dp_run_is_audited_and_resume_neither_forgets_nor_double_counts(tmp_path):
    out = simulate(tmp_path / "full", tmp_path / "priv-full", "num-server-rounds=2", "dp-audit-canaries=200")
    assert "client eps max" in out
    # ~97 examples a client at epsilon 4: said before round 1, with the numbers, without refusing
    assert "DP-SGD settings: the noise drowns the signal: noise/signal" in out
    check_run_invariants(tmp_path / "full", 2)
    full = epsilons(tmp_path / "full")
    assert [r for r, *_ in full] == [1, 1, 1, 2, 2, 2]
    assert max(eps for *_, eps in full) <= 4.0  # the calibrated target is never overshot
    assert tensorboard_epsilons(tmp_path / "full") == sorted((r, c, round(e, 5)) for r, c, _, e in full)
    audit = fedtune("audit", str(tmp_path / "full"), "--records", str(tmp_path / "priv-full"), privacy_dir=tmp_path)
    assert audit.returncode == 0, audit.stdout  # the ledger agrees with the clients' own records too
    assert "audit passed" in audit.stdout
    bound = json.loads((tmp_path / "full" / "audit.json").read_text())["empirical_epsilon_lower_bound"]
    assert bound["canaries"] == 600 and bound["epsilon"] <= bound["recorded_epsilon"] <= 4.0  # issue 43

    # The same data again with the same privacy records: every client refuses round 1, and the run
    # fails (non-zero) naming where the records are, rather than "completing" untrained (hardening class 4).
    again = [sys.executable, "-m", "simulation.cli", "simulate"]
    for item in [*SMALL, *DP, f'run-dir="{tmp_path / "again"}"', "num-server-rounds=2"]:
        again += ["-c", item]
    rerun = run_cli(again, timeout=300, env={"FEDTUNE_PRIVACY_DIR": str(tmp_path / "priv-full")})
    assert rerun.returncode != 0, rerun.stdout[-3000:]
    assert "already spent on this data by earlier rounds or runs, recorded in " + str(tmp_path / "priv-full") \
        in rerun.stdout
    assert "client-privacy-budgets-exhausted: no client trained in any round" in rerun.stdout
    assert f"here {tmp_path / 'priv-full'}" in rerun.stdout
    assert json.loads((tmp_path / "again" / "status.json").read_text())["status"] == "client-privacy-budgets-exhausted"
    count("bad_inputs_rejected", "a DP re-run on data whose privacy records are at their budget")

    # Kill the server (whole process group) as soon as round 1 is checkpointed, then resume.
    cut = tmp_path / "cut"
    args = [sys.executable, "-m", "simulation.cli", "simulate"]
    for item in [*SMALL, *DP, f'run-dir="{cut}"', "num-server-rounds=2"]:
        args += ["-c", item]
    killed = run_until(args, condition=lambda: (cut / "checkpoints" / "round-0001.safetensors").exists(), timeout=300,
                       env={"FEDTUNE_PRIVACY_DIR": str(tmp_path / "priv-cut")})
    assert killed and not (cut / "checkpoints" / "round-0002.safetensors").exists()
    simulate(cut, tmp_path / "priv-cut", "num-server-rounds=2", "resume=true")
    assert epsilons(tmp_path / "cut") == full  # same entries, each round once
    assert tensorboard_epsilons(cut) == tensorboard_epsilons(tmp_path / "full")  # the resume purged, no step twice
    assert verify_chain(Ledger.read(tmp_path / "cut" / "privacy-ledger.jsonl").entries) == []
    records = list((tmp_path / "priv-cut").glob("*.json"))
    assert len(records) == 3
    for record in records:
        assert [e["round"] for e in json.loads(record.read_text())["entries"]] == [1, 2]
    count("faults_survived", "server-killed-mid-round-and-restarted")

    ledger = tmp_path / "full" / "privacy-ledger.jsonl"
    lines = ledger.read_text().splitlines()
    entry = json.loads(lines[4])
    entry["epsilon"] = entry["epsilon"] / 3
    lines[4] = json.dumps(entry, sort_keys=True)
    ledger.write_text("\n".join(lines) + "\n")
    tampered = fedtune("audit", str(tmp_path / "full"), privacy_dir=tmp_path)
    assert tampered.returncode == 1
    assert "hash does not match its content" in tampered.stdout


def test_client_level_dp_and_client_budgets_end_the_run_with_a_named_status(tmp_path):
    run = tmp_path / "run"
    simulate(run, tmp_path / "priv", "num-server-rounds=3", 'dp-client="server-fixed"', "dp-client-noise-multiplier=0.8",
             "dp-client-clipping-norm=0.5", "dp-epsilon-budget=3.2")
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "client-privacy-budgets-exhausted"
    entries = Ledger.read(run / "privacy-ledger.jsonl").entries
    federation = [e for e in entries if e["kind"] == "federation"]
    assert [e["sampled"] for e in federation] == [3] * len(federation)
    assert federation[0]["sampling"] == "without-replacement"
    assert federation[-1]["accepted"] == 0 and federation[-1]["mechanism"] is None  # no release, no spend
    assert federation[-1]["epsilon"] == federation[-2]["epsilon"]
    refused = [e for e in entries if e["kind"] == "client" and e["status"] == "refused"]
    assert refused and all(e["epsilon_projected"] > e["epsilon_budget"] for e in refused)
    audit = fedtune("audit", str(run), privacy_dir=tmp_path)
    assert audit.returncode == 0, audit.stdout
    rows = check_run_invariants(run, status["rounds_completed"])
    assert "epsilon_federation" in rows[1]


@pytest.mark.parametrize("mode", ["client-fixed", "server-adaptive"])
def test_other_client_level_dp_modes_run_and_pass_the_audit(tmp_path, mode):
    run = tmp_path / "run"
    simulate(run, tmp_path / "priv", "num-server-rounds=2", "dp-sample=false", "dp-target-epsilon=0", f'dp-client="{mode}"',
             "dp-client-noise-multiplier=0.8", "dp-client-clipping-norm=0.2")
    federation = [e for e in Ledger.read(run / "privacy-ledger.jsonl").entries if e["kind"] == "federation"]
    assert [e["accepted"] for e in federation] == [3, 3]
    assert federation[1]["epsilon"] > federation[0]["epsilon"] > 0
    if mode == "server-adaptive":
        assert federation[1]["clipping_norm"] != 0.2  # the norm adapted and was checkpointed
    audit = fedtune("audit", str(run), privacy_dir=tmp_path)
    assert audit.returncode == 0, audit.stdout
    check_run_invariants(run, 2)
