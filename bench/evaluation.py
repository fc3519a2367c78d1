"""`fedtune evaluate`, the best round, early stopping and TensorBoard on real runs.

    python bench/evaluation.py --out bench/results/evaluation

default: the default main job (`fedtune simulate`), then `fedtune evaluate` of its final adapter
  on its own held-out set written as a CSV, with --perturb typo,case,punct --rate 0.1.
sst2-iid: 4 IID clients on 4,000 SST-2 training sentences, 3 rounds; then `fedtune evaluate` of
  dev.tsv with the best and the final adapter, with the same perturbations.
sst2-skew: the same with a strong label skew (Dirichlet alpha 0.3), 6 rounds, early-stopping-rounds
  2: a run whose rounds get worse, so early stopping ends it and its best round is not its last.
For each run: best.json, status.json and the TensorBoard scalar tags with their steps, read
back from the event files. Writes results.json and results.md. About 15 minutes on 2 cores.
Needs ../shared/data/sst2 (or FEDTUNE_SHARED_DATA) for the second part.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SST2 = Path(os.environ.get("FEDTUNE_SHARED_DATA", REPO.parent / "shared" / "data")) / "sst2"
PERTURB = ["--perturb", "typo,case,punct", "--rate", "0.1"]
SST2_DATA = [f"data={json.dumps(str(SST2 / 'train.tsv'))}", f"heldout-data={json.dumps(str(SST2 / 'dev.tsv'))}",
             'text-column="sentence"', "max-train-examples=4000", "fraction-evaluate=0.0"]
SST2_RUNS = {"sst2-iid": [*SST2_DATA, 'partitioner="iid"', "num-server-rounds=3"],
             "sst2-skew": [*SST2_DATA, "dirichlet-alpha=0.3", "num-server-rounds=6", "early-stopping-rounds=2"]}


def fedtune(*args: str) -> str:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "simulation.cli", *args], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fedtune {args[:2]} failed:\n{(out.stdout + out.stderr)[-3000:]}")
    print(f"fedtune {' '.join(args[:2])}: {time.perf_counter() - start:.0f}s", flush=True)
    return out.stdout


def scalars(run: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, round(e.value, 4)) for e in events.Scalars(tag)] for tag in sorted(events.Tags()["scalars"])}


def run_summary(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"status": json.loads((run / "status.json").read_text()), "best": json.loads((run / "best.json").read_text()),
            "rounds": [{k: r.get(k) for k in ("round", "heldout_accuracy", "heldout_macro_f1", "heldout_loss")}
                       for r in rows], "tensorboard": scalars(run)}


def evaluation(run: Path, data: Path, which: str, out: Path, *extra: str) -> dict:
    fedtune("evaluate", str(run), "--data", str(data), "--round", which, "--out", str(out), *PERTURB, *extra)
    report = json.loads((out / "evaluation.json").read_text())
    return {k: report[k] for k in ("round", "examples", "accuracy", "macro_f1", "loss", "per_class", "perturbations")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-default", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    if not args.skip_default:
        run = args.out / "default-run"
        fedtune("simulate", "-c", f"run-dir={json.dumps(str(run))}")
        sys.path.insert(0, str(REPO))
        from common.config import parse_run_config
        from common.federation_data import heldout_set

        heldout = heldout_set(parse_run_config(json.loads((run / "config.json").read_text())))
        data = args.out / "chatterbot-heldout.csv"
        with open(data, "w", newline="") as handle:
            csv.writer(handle).writerows([("text", "label"), *zip(heldout.texts, heldout.labels)])
        results["default"] = {**run_summary(run), "evaluate_final": evaluation(run, data, "final", args.out / "default-eval")}
    if SST2.is_dir():
        for name, settings in SST2_RUNS.items():
            run = args.out / f"{name}-run"
            fedtune("simulate", "--num-clients", "4",
                    *sum([["-c", c] for c in [*settings, f"run-dir={json.dumps(str(run))}"]], []))
            dev = SST2 / "dev.tsv"
            results[name] = {**run_summary(run), "evaluate_best": evaluation(run, dev, "best", args.out / f"{name}-eval-best"),
                             "evaluate_final": evaluation(run, dev, "final", args.out / f"{name}-eval-final")}
    else:
        print(f"skipping SST-2: {SST2} not found", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = []
    for name, r in results.items():
        lines.append(f"## {name}\n")
        lines.append("| round | held-out accuracy | macro-F1 | loss |\n|---|---|---|---|")
        lines += [f"| {x['round']} | {x['heldout_accuracy']:.4f} | {x['heldout_macro_f1']:.4f} | {x['heldout_loss']:.4f} |"
                  for x in r["rounds"]]
        lines.append(f"\nstatus: {r['status']}; best: {r['best']}\n")
        lines.append("TensorBoard scalars: " + ", ".join(f"`{t}` ({len(v)} steps)" for t, v in r["tensorboard"].items()))
        for key in ("evaluate_best", "evaluate_final"):
            if key not in r:
                continue
            e = r[key]
            lines.append(f"\n`fedtune evaluate --round {key.split('_')[1]}` (round {e['round']}, {e['examples']} examples): "
                         f"accuracy {e['accuracy']:.4f}, macro-F1 {e['macro_f1']:.4f}\n")
            lines.append("| input | accuracy | change | macro-F1 | change |\n|---|---|---|---|---|")
            lines.append(f"| clean | {e['accuracy']:.4f} | | {e['macro_f1']:.4f} | |")
            for kind in ("typo", "case", "punct"):
                p = e["perturbations"][kind]
                lines.append(f"| {kind} 0.1 | {p['accuracy']:.4f} | {p['accuracy_change']:+.4f} | {p['macro_f1']:.4f} "
                             f"| {p['macro_f1_change']:+.4f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
