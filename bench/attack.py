"""Held-out accuracy when one client of ten attacks: FedAvg alone, with validation, and each
robust aggregator with and without validation.

    python bench/attack.py [--rounds 3] [--out bench/results/attack]

The attacker (partition-3) sends its update scaled by 100, or sign-flipped and scaled by
100, every round (simulation.faults). Data: the packaged chatterbot corpus, 10 IID clients.
Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ATTACKS = {"none": None, "scale-100x": {"kind": "scale", "factor": 100.0}, "sign-flip": {"kind": "flip", "factor": 100.0}}
DEFENCES = {
    "fedavg (no validation)": ["strategy=fedavg", "validate-updates=false"],
    "fedavg + validation": ["strategy=fedavg"],
    "krum + validation": ["strategy=krum", "num-malicious-clients=1"],
    "multikrum + validation": ["strategy=multikrum", "num-malicious-clients=1", "multikrum-select=5"],
    "bulyan + validation": ["strategy=bulyan", "num-malicious-clients=1"],
    "fedmedian + validation": ["strategy=fedmedian"],
    "trimmed mean + validation": ["strategy=fedtrimmedavg", "trimmed-beta=0.2"],
    # The robust aggregators on their own: what they bound when nothing is rejected first.
    "krum (no validation)": ["strategy=krum", "num-malicious-clients=1", "validate-updates=false"],
    "multikrum (no validation)": ["strategy=multikrum", "num-malicious-clients=1", "multikrum-select=5",
                                  "validate-updates=false"],
    "bulyan (no validation)": ["strategy=bulyan", "num-malicious-clients=1", "validate-updates=false"],
    "fedmedian (no validation)": ["strategy=fedmedian", "validate-updates=false"],
    "trimmed mean (no validation)": ["strategy=fedtrimmedavg", "trimmed-beta=0.2", "validate-updates=false"],
}


def run(name: str, defence: list[str], attack: dict | None, args, out: Path) -> dict:
    run_dir = out / f"{name.split()[0]}-{'raw' if 'no validation' in name else 'val'}-{args.current}"
    config = ["partitioner=iid", f"num-server-rounds={args.rounds}", "local-steps=8", "fraction-evaluate=0.0",
              "min-available-clients=10", "min-train-clients=10", f'run-dir="{run_dir}"', *defence]
    cmd = [sys.executable, "-m", "simulation.cli", "simulate", "--num-clients", "10",
           "--client-app", "simulation.faults:app"]
    for item in config:
        cmd += ["-c", item]
    faults = {"partition-3": attack} if attack else {}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "FEDTUNE_FAULTS": json.dumps(faults)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        return {"defence": name, "attack": args.current, "error": done.stdout[-500:]}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    result = {"defence": name, "attack": args.current, "accuracy": rows[-1]["heldout_accuracy"],
              "macro_f1": rows[-1]["heldout_macro_f1"], "accuracy_round0": rows[0]["heldout_accuracy"],
              "rejections": sum(len(r["rejected"]) for r in rounds), "wall_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "attack"))
    parser.add_argument("--attacks", default="none,scale-100x,sign-flip")
    parser.add_argument("--only", default="", help="comma-separated words; run only defences whose name has one")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for attack in args.attacks.split(","):
        args.current = attack
        for name, defence in DEFENCES.items():
            if args.only and not any(word in name for word in args.only.split(",")):
                continue
            if attack == "none" and name != "fedavg (no validation)":
                continue
            results.append(run(name, defence, ATTACKS[attack], args, out))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| attack | defence | held-out accuracy | macro-F1 | updates rejected |", "|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['attack']} | {r['defence']} | error | | |")
        else:
            lines.append(f"| {r['attack']} | {r['defence']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['rejections']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
