"""The benchmark suite's own arithmetic: the centralized - federated IID gap it reports, per
seed and on the means, and its refusal of malformed --seeds (the measurements themselves run
in bench/, not here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import suite  # noqa: E402


def _row(setting: str, accuracy: float, seed: int | None = None, data: str = "ag_news") -> dict:
    row = {"data": data, "setting": setting, "passes": 4, "accuracy": accuracy, "macro_f1": accuracy,
           "learning_rate": 3e-3, "clients": 10, "run_dir": "/nonexistent"}
    return row if seed is None else {**row, "seed": seed}


def test_gap_is_per_seed_and_on_the_means():
    runs = [_row("centralized", 0.948, 42), _row("centralized", 0.946, 1),
            _row("iid:2", 0.934, 42), _row("iid:2", 0.940, 1), _row("dirichlet-0.5", 0.80, 42),
            _row("iid", 0.90, 42, data="sst2")]  # no centralized sst2 row: no gap
    (gap,) = suite.iid_gaps(runs)
    assert gap["setting"] == "iid:2" and gap["seeds"] == (2, 2)
    assert gap["per_seed"] == {1: pytest.approx(0.6), 42: pytest.approx(1.4)}
    assert gap["gap_points"] == pytest.approx(1.0)  # 0.947 - 0.937
    table = suite.markdown({"suite": "full", "started": "t", "accuracy": {"runs": runs},
                            "machine": {"platform": "p", "affinity": 2, "memory_gb": 1, "gpu": None, "versions": {}}})
    line = next(x for x in table.splitlines() if "centralized - federated IID, 2 clients a round" in x)
    assert "means over 2 / 2 seeds" in line and "1.00 (per seed: 1 0.60, 42 1.40)" in line and "| met |" in line
    assert "seed 42)" in table  # several seeds: every accuracy row names its own


def test_a_missing_seed_on_one_side_still_gives_the_gap_on_the_means():
    runs = [_row("centralized", 0.95, 42), _row("iid", 0.93, 42), _row("iid", 0.91, 1)]
    (gap,) = suite.iid_gaps(runs)
    assert gap["per_seed"] == {42: pytest.approx(2.0)} and gap["gap_points"] == pytest.approx(3.0)
    assert gap["seeds"] == (1, 2)


def test_rows_written_before_seeds_were_recorded_count_as_one_seed():
    (gap,) = suite.iid_gaps([_row("centralized", 0.89), _row("iid", 0.875)])
    assert gap["gap_points"] == pytest.approx(1.5) and gap["seeds"] == (1, 1)


@pytest.mark.parametrize("seeds", ["1,x", "1,1", "-3", ""])
def test_malformed_seeds_are_refused_naming_what_arrived(seeds):
    """Bad input: --seeds says what it expected and what arrived."""
    with pytest.raises(ValueError, match="--seeds: expected") as err:
        suite.parse_seeds(seeds)
    assert repr(seeds) in str(err.value)
    assert suite.parse_seeds("42,1,2") == [42, 1, 2]


def test_the_command_line_refuses_them_before_anything_runs(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "bench/suite.py", "--only", "accuracy", "--seeds", "1,1",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--seeds: expected distinct seeds >= 0, got '1,1'" in done.stderr
    assert not out.exists()


def test_federated_rounds_keep_the_passes_whatever_the_local_epochs():
    """Equal passes on both sides: more local epochs a round means proportionally fewer rounds."""
    assert suite.federated_rounds(4, 10, 2, 1) == 20
    assert suite.federated_rounds(4, 10, 2, 2) == 10
    assert suite.federated_rounds(3, 10, 10, 1) == 3
    for bad in [dict(local_epochs=3), dict(local_epochs=0), dict(local_epochs=1, local_steps=50)]:
        with pytest.raises(ValueError, match="local work: expected local-steps 0 and local-epochs dividing"):
            suite.federated_rounds(4, 10, 2, **bad)
