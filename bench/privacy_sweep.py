"""Held-out accuracy on SST-2 at epsilon 1, 3, 8 and without DP, same data and rounds per row.

    python bench/privacy_sweep.py [--rounds 3] [--local-steps 20] [--out bench/results/privacy]

Each row is a full `fedtune simulate` run (10 IID clients, sample-level DP-SGD with the noise
calibrated for the target over the planned rounds); every DP run is then audited.
Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"


def run(row: str, extra: list[str], args, out: Path) -> dict:
    run_dir = out / row
    config = [f"data={SST2 / 'train.tsv'}", f"heldout-data={SST2 / 'dev.tsv'}", "text-column=sentence",
              "partitioner=iid", f"max-train-examples={args.train_examples}", f"num-server-rounds={args.rounds}",
              f"local-steps={args.local_steps}", "batch-size=32", "fraction-evaluate=0.0",
              "min-available-clients=10", f'run-dir="{run_dir}"', *extra]
    cmd = [sys.executable, "-m", "simulation.cli", "simulate", "--num-clients", "10"]
    for item in config:
        cmd += ["-c", item]
    start = time.perf_counter()
    env_priv = {"FEDTUNE_PRIVACY_DIR": str(out / "privacy-records" / row)}
    done = subprocess.run(cmd, cwd=REPO, env={**__import__("os").environ, **env_priv},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{row} failed:\n{done.stdout[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {"row": row, "accuracy": [r["heldout_accuracy"] for r in rows],
              "macro_f1": rows[-1]["heldout_macro_f1"], "epsilon": rows[-1].get("epsilon_client_max"),
              "wall_s": round(wall, 1)}
    if extra:
        audit = subprocess.run([sys.executable, "-m", "simulation.cli", "audit", str(run_dir)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        result["audit_ok"] = audit.returncode == 0
        (out / f"audit-{row}.txt").write_text(audit.stdout)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--train-examples", type=int, default=20000)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "privacy"))
    args = parser.parse_args()
    if not SST2.exists():
        raise SystemExit(f"SST-2 not found at {SST2}: the sweep needs ../shared/data")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run("no-dp", [], args, out)]
    for eps in (8, 3, 1):
        rows.append(run(f"eps-{eps}", ["dp-sample=true", f"dp-target-epsilon={eps}"], args, out))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = ["| setting | epsilon (max client) | dev accuracy per round | final macro-F1 | audit | wall s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        lines.append(f"| {r['row']} | {eps} | {' / '.join(f'{a:.3f}' for a in r['accuracy'])} | "
                     f"{r['macro_f1']:.3f} | {r.get('audit_ok', '-')} | {r['wall_s']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
