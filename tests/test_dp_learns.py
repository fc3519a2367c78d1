"""A DP run with the default DP settings learns: it does not collapse to the majority class.

The reviewer's check of the DP-defaults issue, end to end through `fedtune simulate`: 4 IID
clients on 8,000 SST-2 training examples (1,800 to train and 200 to validate on each), 3 rounds,
`dp-sample = true`, `dp-target-epsilon = 8` and nothing else set, held out on SST-2 dev (872,
majority class 0.509). With the defaults (expected Poisson batch 225, 8 steps a round, noise
multiplier 0.762, mean pooling) round 3 reached 0.758. The same run with the old settings
(batch 16: 113 steps a round, noise multiplier 0.507, noise/signal 8.7 per client, and the
[CLS]-pooler head) stayed at 0.509 in every round, so this test fails on them (bench/README.md).

RELIABILITY privacy checks: the calibrated target is never overshot (every client's epsilon
<= 8), and `fedtune audit` passes on the run. Invariants I1, I2, I4, I5.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from common.ledger import Ledger
from tests.conftest import require_shared
from tests.invariants import check_run_invariants
from tests.procs import run_cli

# A 7-minute accuracy measurement (400 s of the suite's 1,294 s on a fresh clone, its longest test): longer
# measurements stay out of the default suite, which is to take about 15 minutes on 2 cores. The settings
# that made the difference (auto batch, noise/signal verdicts, mean pooling) are pinned by quick tests in
# test_privacy.py and test_model.py; this end-to-end check runs on request (bench/README.md says how).
LONG = os.environ.get("FEDTUNE_LONG_TESTS") == "1"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.minutes(6),
    pytest.mark.skipif(not LONG, reason="a 7-minute accuracy measurement outside the default suite: "
                       "FEDTUNE_LONG_TESTS=1 .venv/bin/python -m pytest tests/test_dp_learns.py"),
]

MAJORITY = 0.509  # SST-2 dev: 444 of 872 positive


def test_default_dp_settings_beat_the_majority_class_by_a_clear_margin(tmp_path):
    sst2 = require_shared("sst2")
    run = tmp_path / "run"
    args = [sys.executable, "-m", "simulation.cli", "simulate", "--num-clients", "4"]
    for item in [f'data="{sst2 / "train.tsv"}"', f'heldout-data="{sst2 / "dev.tsv"}"', "text-column=sentence",
                 "max-train-examples=8000", "partitioner=iid", "dp-sample=true", "dp-target-epsilon=8",
                 f'run-dir="{run}"']:
        args += ["-c", item]
    done = run_cli(args, timeout=1200, env={"FEDTUNE_PRIVACY_DIR": str(tmp_path / "privacy")})
    assert done.returncode == 0, done.stdout[-4000:]
    assert "DP-SGD on the smallest client (1800 examples): expected batch 225" in done.stdout
    assert "DP-SGD settings:" not in done.stdout  # the defaults draw no warning
    rows = check_run_invariants(run, 3)
    accuracy = [row["heldout_accuracy"] for row in rows]
    assert accuracy[3] >= 0.65 and accuracy[3] >= MAJORITY + 0.1, accuracy
    ledger = Ledger.read(run / "privacy-ledger.jsonl").entries
    assert len(ledger) == 12 and max(e["epsilon"] for e in ledger) <= 8.0
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    audit = run_cli([sys.executable, "-m", "simulation.cli", "audit", str(run)], timeout=300)
    assert audit.returncode == 0 and "audit passed" in audit.stdout, audit.stdout[-3000:]
