"""DP with the default DP settings on SST-2: accuracy per round, epsilon per client, audit, wall time.

    python bench/dp_defaults.py --out bench/results/dp-review --setting review
    python bench/dp_defaults.py --out bench/results/dp-table --setting table
    python bench/dp_defaults.py --out bench/results/dp-headline --setting headline

review: 4 IID clients on 8,000 training examples, 3 rounds, epsilon 8 (the reviewer's check;
  `-c` overrides are appended, e.g. `-c dp-batch-size=16` for the old batch).
table: 10 IID clients on a 20,000-example subset, 3 rounds: no DP, epsilon 1 / 3 / 8, and
  epsilon 3 with FFA-LoRA (`lora-freeze-a`). With `-c dp-audit-canaries=1000 --only eps1,eps3,eps8`:
  the canary audit (issue 43), its bound in the audit column.
headline: 10 IID clients on all of SST-2 train (67,349), epsilon 3, 5 rounds.
distributed: the headline's data and clients under distributed DP (issue 38): one DP-SGD step a
  round over the federation, expected batch 1,024, 198 rounds (3 epochs of 67,349: the clients
  keep no local validation slice, as the central anchor used all of train), epsilon 3 and 1.
distributed-table: the table's 20,000 examples under distributed DP, 53 rounds (3 epochs of the
  18,000 the clients train on), epsilon 1 / 3 / 8.

Each run is `fedtune simulate` (round-timeout 3600 s: a DP round on 2 busy cores can outlast the
default 600 s) in its own run directory under --out, with its own privacy store (so no earlier
run's spend is charged), followed by `fedtune audit`; the peak resident memory of the whole
process tree is sampled every second. Writes results.json and results.md.
Needs ../shared/data/sst2 (or FEDTUNE_SHARED_DATA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SST2 = Path(os.environ.get("FEDTUNE_SHARED_DATA", REPO.parent / "shared" / "data")) / "sst2"
DP = ["dp-sample=true"]
DISTRIBUTED = [*DP, "dp-mode=distributed", "secure-aggregation=true", "validate-updates=false", "fraction-evaluate=0.0"]
SETTINGS = {
    "review": (4, 3, ["max-train-examples=8000"], {"eps8": [*DP, "dp-target-epsilon=8"]}),
    "table": (10, 3, ["max-train-examples=20000"], {
        "nodp": [], "eps1": [*DP, "dp-target-epsilon=1"], "eps3": [*DP, "dp-target-epsilon=3"],
        "eps8": [*DP, "dp-target-epsilon=8"], "eps3-ffa": [*DP, "dp-target-epsilon=3", "lora-freeze-a=true"]}),
    "headline": (10, 5, [], {"eps3": [*DP, "dp-target-epsilon=3"]}),
    "distributed": (10, 198, ["local-val-fraction=0.0"], {
        "eps3": [*DISTRIBUTED, "dp-target-epsilon=3"], "eps1": [*DISTRIBUTED, "dp-target-epsilon=1"]}),
    "distributed-table": (10, 53, ["max-train-examples=20000"], {
        "eps1": [*DISTRIBUTED, "dp-target-epsilon=1"], "eps3": [*DISTRIBUTED, "dp-target-epsilon=3"],
        "eps8": [*DISTRIBUTED, "dp-target-epsilon=8"]}),
}


def peak_rss(proc: subprocess.Popen, out: dict) -> None:
    """Largest summed RSS of the process and its children, and of one child alone (a client actor)."""
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            sizes = [p.memory_info().rss for p in procs if p.is_running()]
        except psutil.Error:
            continue
        out["tree_gb"] = max(out.get("tree_gb", 0.0), sum(sizes) / 1e9)
        out["largest_process_gb"] = max(out.get("largest_process_gb", 0.0), max(sizes) / 1e9)
        time.sleep(1.0)


def run_one(name: str, clients: int, rounds: int, config: list[str], out: Path) -> dict:
    run_dir = out / name
    args = [sys.executable, "-m", "simulation.cli", "simulate", "--quiet", "--num-clients", str(clients)]
    for item in [f'data="{SST2 / "train.tsv"}"', f'heldout-data="{SST2 / "dev.tsv"}"', "text-column=sentence",
                 "partitioner=iid", f"num-server-rounds={rounds}", "round-timeout=3600", *config,
                 f'run-dir="{run_dir}"']:
        args += ["-c", item]
    env = {**os.environ, "FEDTUNE_PRIVACY_DIR": str(out / f"privacy-{name}")}
    start, memory = time.perf_counter(), {}
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        watcher = threading.Thread(target=peak_rss, args=(proc, memory), daemon=True)
        watcher.start()
        code = proc.wait()
        watcher.join(timeout=5)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {"name": name, "config": config, "exit": code, "wall_s": round(wall), "memory": memory,
              "accuracy": [round(r["heldout_accuracy"], 4) for r in rows],
              "macro_f1": [round(r["heldout_macro_f1"], 4) for r in rows]}
    ledger = run_dir / "privacy-ledger.jsonl"
    if ledger.exists():
        entries = [json.loads(line) for line in ledger.read_text().splitlines()]
        result["epsilon_client_max"] = [round(max(e["epsilon"] for e in entries if e["round"] == r["round"]), 3)
                                        for r in rows if r["round"] > 0]
        audit = subprocess.run([sys.executable, "-m", "simulation.cli", "audit", str(run_dir)], cwd=REPO,
                               capture_output=True, text=True)
        result["audit"] = "passed" if audit.returncode == 0 else f"failed: {audit.stdout[-500:]}"
        report = json.loads((run_dir / "audit.json").read_text()) if (run_dir / "audit.json").exists() else {}
        bound = report.get("empirical_epsilon_lower_bound")
        if bound:  # dp-audit-canaries (issue 43): the pooled bound and each client's
            result["canaries"] = {k: bound[k] for k in ("epsilon", "canaries", "recorded_epsilon", "score", "guesses",
                                                        "correct")}
            result["canaries"]["per_client_max"] = max(v["epsilon"] for v in bound["per_client"].values())
            result["audit"] += (f" (canary bound {bound['epsilon']:.3f} over {bound['canaries']} canaries, "
                                f"per client up to {result['canaries']['per_client_max']:.3f}; recorded "
                                f"{bound['recorded_epsilon']:.3f})")
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="", help="comma-separated run names of the setting (default all)")
    parser.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if not (SST2 / "train.tsv").exists():
        parser.error(f"SST-2 not found at {SST2} (set FEDTUNE_SHARED_DATA)")
    clients, rounds, common, runs = SETTINGS[args.setting]
    chosen = [n for n in runs if not args.only or n in args.only.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_one(n, clients, rounds, [*common, *runs[n], *args.run_config], out) for n in chosen]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    ran = max((len(r.get("accuracy", [])) - 1 for r in results), default=rounds)  # -c num-server-rounds wins
    lines = [f"# SST-2 dev, {clients} IID clients, {ran} rounds ({args.setting})", "",
             "| run | accuracy per round (0 = before training) | macro-F1 last | client epsilon max per round | "
             "audit | wall | peak memory (tree / one process) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        eps = ", ".join(f"{e:g}" for e in r.get("epsilon_client_max", [])) or "-"
        mem = r["memory"]
        lines.append(f"| {r['name']} {' '.join(r['config'])} | {', '.join(f'{a:.3f}' for a in r['accuracy'])} | "
                     f"{r['macro_f1'][-1]:.3f} | {eps} | {r.get('audit', '-')} | {r['wall_s'] / 60:.1f} min | "
                     f"{mem.get('tree_gb', 0):.2f} / {mem.get('largest_process_gb', 0):.2f} GB |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
