"""The best round by the held-out `best-metric`, its adapter in adapters/best, and early stopping.

Everything here follows from the metrics history, which every checkpoint holds: a resumed run
finds the same best round and the same count of rounds without improvement, and restores
adapters/best from that round's adapter if a crash left it behind. Ties keep the earlier round;
round 0 (the adapter before training) competes like any other.
"""

from __future__ import annotations

import json
import math
import shutil

from server.state import ServerState


def best_row(state: ServerState) -> dict:
    column, higher = state.cfg.best_column
    scored = [r for r in state.history if math.isfinite(r.get(column, math.nan))]
    if not scored:
        return state.history[0]
    sign = 1 if higher else -1
    return max(scored, key=lambda r: (sign * r[column], -r["round"]))


def keep_best(state: ServerState) -> dict:
    """Write best.json and make adapters/best a copy of the best round's adapter; returns best.json."""
    column, higher = state.cfg.best_column
    row = best_row(state)
    best = {"round": row["round"], "metric": column, "higher_is_better": higher, "value": row.get(column)}
    adapters, marker = state.run.adapters, state.run.path / "best.json"
    current = adapters / "best"
    written = json.loads(marker.read_text()) if marker.exists() else None
    if written != best or not current.is_dir():
        source = adapters / f"round-{row['round']:04d}"
        staging, old = adapters / "best.tmp", adapters / "best.old"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)  # a full disk fails here, with adapters/best as it was
        shutil.rmtree(old, ignore_errors=True)
        if current.exists():
            current.rename(old)
        staging.rename(current)  # two renames: adapters/best is the old copy or the new one, never half of one
        shutil.rmtree(old, ignore_errors=True)
        state.run.write_json("best.json", best)
    return best


def rounds_without_improvement(state: ServerState) -> int:
    return state.history[-1]["round"] - best_row(state)["round"]


def should_stop_early(state: ServerState) -> bool:
    patience = state.cfg.early_stopping_rounds
    return patience > 0 and rounds_without_improvement(state) >= patience
