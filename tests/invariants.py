"""Per-round invariants from RELIABILITY.md, checked on a finished run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from server.checkpoint import load_checkpoint
from tests.reliability import count


def check_run_invariants(run_dir: Path, rounds: int) -> list[dict]:
    """I1 finite, I2 schema, I4 ledger closes, I5 durable for rounds 0..rounds; returns the metrics rows."""
    ckpts = {r: load_checkpoint(run_dir / "checkpoints" / f"round-{r:04d}.safetensors") for r in range(rounds + 1)}
    schema = {k: (v.shape, v.dtype) for k, v in ckpts[0].adapter.items()}
    for r, ck in ckpts.items():
        assert ck.server_round == r  # I5: exists, loads, hash matches (load_checkpoint checks it)
        assert all(np.isfinite(v).all() for v in ck.adapter.values()), f"I1 round {r}"
        assert {k: (v.shape, v.dtype) for k, v in ck.adapter.items()} == schema, f"I2 round {r}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == list(range(rounds + 1))
    ledger = run_dir / "rounds.jsonl"
    closes = 0
    for r in (json.loads(line) for line in ledger.read_text().splitlines()) if ledger.exists() else []:
        parts = r["aggregated"] + r["failed"] + r["refused"] + r["timed_out"] + [x["client"] for x in r["rejected"]]
        parts += r.get("discarded", [])  # a secure round that was not applied: clients whose vectors it dropped
        assert sorted(parts) == sorted(r["sampled"]), f"I4 round {r['round']}"
        closes += 1
    count("invariant_checks_passed", "I1-finite", rounds + 1)
    count("invariant_checks_passed", "I2-schema", rounds + 1)
    count("invariant_checks_passed", "I5-durable", rounds + 1)
    count("invariant_checks_passed", "I4-ledger-closes", closes)
    return rows
