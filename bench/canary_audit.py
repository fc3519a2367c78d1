"""Planted DP-SGD bugs against the canary audit (issue 43), through `fedtune simulate` and `fedtune audit`.

    python bench/canary_audit.py --out bench/results/canary-bugs [--only correct,noise-16x-too-small]

Each case applies one realistic bug to a scratch copy of HEAD (a `git worktree`), which still
records the mechanism it was asked to run, then runs a small DP federation there with 1,000
canaries a client and audits it: the packaged corpus over 2 IID clients, both in every round,
4 rounds of 50 DP-SGD steps (expected batch 16), target epsilon 2. `correct` is HEAD unchanged.
Writes results.json and results.md (the bound, the recorded epsilon, the audit's verdict).

    python bench/canary_audit.py --cost

The option's cost, in CPU seconds of this process (robust to other work on the machine): 40 DP-SGD
steps of one client (the packaged corpus, expected batch 16, max-length 32) without and with
1,000 canaries, alternating, three times; and scoring 1,000 canaries against 4 rounds of the
81,813-value MiniLM adapter (what the server and the audit do per client).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = ["num-server-rounds=4", "partitioner=iid", "max-length=32", "fraction-evaluate=0.0", "dp-sample=true",
          "dp-target-epsilon=2", "dp-batch-size=16", "local-steps=50", "dp-audit-canaries=1000"]

# name -> (file, exact text, replacement)
BUGS = {
    "correct": None,
    "noise-16x-too-small": (
        "common/dp_train.py",
        "noise_multiplier=noise_multiplier,\n            max_grad_norm=clipping_norm,",
        "noise_multiplier=noise_multiplier / 16,\n            max_grad_norm=clipping_norm,",
    ),
    "clipping-skipped": (  # clip to a norm nothing reaches; the noise stays sigma * C
        "common/dp_train.py",
        "        _check_same_parameters(gsm, optimizer)\n\n        chunking",
        "        _check_same_parameters(gsm, optimizer)\n"
        "        _clip = optimizer.clip_and_accumulate\n\n"
        "        def unclipped():\n"
        "            optimizer.max_grad_norm = 1e12\n"
        "            _clip()\n"
        "            optimizer.max_grad_norm = clipping_norm\n\n"
        "        optimizer.clip_and_accumulate = unclipped\n\n        chunking",
    ),
    "noise-reused-across-rounds": (  # the DP seed forgets the round and the global adapter
        "client/privacy.py",
        'return private_seed(node_secret(privacy_dir(node_config)), "dp", server_round, client_id, digest.hexdigest())',
        'return private_seed(node_secret(privacy_dir(node_config)), "dp", client_id)',
    ),
}


def run_case(name: str, out: Path) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), "HEAD"], cwd=REPO, check=True,
                       capture_output=True)
        try:
            if BUGS[name]:
                path, text, replacement = BUGS[name]
                source = (tree / path).read_text()
                if source.count(text) != 1:
                    raise SystemExit(f"{name}: expected the text once in {path}, found it {source.count(text)} times")
                (tree / path).write_text(source.replace(text, replacement))
            run_dir = out / name
            args = [sys.executable, "-m", "simulation.cli", "simulate", "--quiet", "--num-clients", "2"]
            for item in [*CONFIG, f'run-dir="{run_dir}"']:
                args += ["-c", item]
            # PYTHONPATH: the simulation's client processes import the scratch copy, not the installed tree
            env = {**os.environ, "PYTHONPATH": str(tree), "FEDTUNE_PRIVACY_DIR": str(out / f"privacy-{name}")}
            start = time.perf_counter()
            sim = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            (out / f"{name}.log").write_text(sim.stdout + sim.stderr)
            if sim.returncode != 0:
                return {"name": name, "exit": sim.returncode, "wall_s": round(wall)}
            audit = subprocess.run([sys.executable, "-m", "simulation.cli", "audit", str(run_dir)], cwd=REPO,
                                   capture_output=True, text=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
    report = json.loads((run_dir / "audit.json").read_text())
    bound = report["empirical_epsilon_lower_bound"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {"name": name, "exit": 0, "wall_s": round(wall), "audit_exit": audit.returncode,
              "bound": bound["epsilon"], "recorded": bound["recorded_epsilon"], "score": bound["score"],
              "guesses": bound["guesses"], "correct": bound["correct"],
              "per_client": {c: round(v["epsilon"], 3) for c, v in bound["per_client"].items()},
              "problems": [p for p in report["problems"] if "canaries" in p],
              "accuracy": [round(r["heldout_accuracy"], 4) for r in rows]}
    print(json.dumps(result), flush=True)
    return result


def cost() -> None:
    import numpy as np
    import torch

    from common.canaries import Canaries, canary_scores
    from common.config import FedtuneConfig
    from common.dp_train import dp_train
    from common.federation_data import federation_labels, simulated_client_data
    from common.model import get_adapter_state, load_tokenizer
    from common.task import task_for
    from common.train import encode

    torch.set_num_threads(1)
    cfg = FedtuneConfig(partitioner="iid", max_length=32)
    cfg = cfg.replace(labels=federation_labels(cfg).to_spec())
    model = task_for(cfg).model(len(federation_labels(cfg)))
    tokenizer = load_tokenizer(cfg.model)
    encoded = encode(simulated_client_data(cfg, 0, 1).train, tokenizer, federation_labels(cfg), max_length=32,
                     where="bench")
    canaries = Canaries(seed=1, count=1000)
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    wall: dict[str, list[float]] = {"without": [], "with": []}
    for trial in range(3):
        for name, c in (("without", None), ("with", canaries)):
            start, start_wall = time.process_time(), time.perf_counter()
            dp_train(model, encoded, pad_id=tokenizer.pad_token_id, steps=40, batch_size=16, learning_rate=1e-3,
                     weight_decay=0.0, noise_multiplier=1.0, clipping_norm=1.0, seed=trial, canaries=c,
                     server_round=trial + 1)
            seconds[name].append(time.process_time() - start)
            wall[name].append(time.perf_counter() - start_wall)
    state = get_adapter_state(model)
    rng = np.random.default_rng(0)
    rounds = [{k: v + 0.01 * r * rng.standard_normal(v.shape) for k, v in state.items()} for r in range(5)]
    start = time.process_time()
    canary_scores(canaries, rounds)
    scoring = time.process_time() - start
    result = {"cpu_s_40_steps": {k: [round(v, 2) for v in vs] for k, vs in seconds.items()},
              "wall_s_40_steps": {k: [round(v, 2) for v in vs] for k, vs in wall.items()},
              "added_per_step_s": round((sum(seconds["with"]) - sum(seconds["without"])) / 120, 4),
              "scoring_1000_canaries_4_rounds_cpu_s": round(scoring, 2), "sample_rate": 16 / len(encoded),
              "adapter_values": sum(v.size for v in state.values())}
    print(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--only", default="", help="comma-separated cases (default all)")
    parser.add_argument("--cost", action="store_true", help="measure the option's cost instead")
    args = parser.parse_args()
    if args.cost:
        return cost()
    if not args.out:
        parser.error("--out is required (or --cost)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = [run_case(n, out) for n in BUGS if not args.only or n in args.only.split(",")]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| case | recorded epsilon | canary lower bound (95%) | test that gave it | audit | wall |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if r["exit"]:
            lines.append(f"| {r['name']} | run failed (exit {r['exit']}) | | | | {r['wall_s']} s |")
            continue
        verdict = "passed" if r["audit_exit"] == 0 else "**failed**"
        lines.append(f"| {r['name']} | {r['recorded']:.3f} | {r['bound']:.3f} | {r['correct']} of the "
                     f"{r['guesses']} highest {r['score']} | {verdict} | {r['wall_s']} s |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
