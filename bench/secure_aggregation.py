"""Secure aggregation's cost on the default job: the same adapter, time and traffic per round.

    python bench/secure_aggregation.py --out bench/results/secagg

1. `fedtune simulate` on the default job (3 clients, 3 rounds) twice, plain FedAvg and with
   `secure-aggregation = true`: held-out accuracy and macro-F1 per round, seconds per round,
   and the largest difference between the two runs' round-1 adapters (quantization error).
2. One round of each in this process, the real ClientApp called through an in-process transport
   (tests/inprocess_grid.py), counting the payload bytes of every message each way per client:
   arrays and config values (Flower's protobuf framing adds a little on top).
Writes results.json and results.md under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def simulate(run_dir: Path, *config: str) -> list[dict]:
    args = [sys.executable, "-m", "simulation.cli", "simulate", "--quiet", "-c", f'run-dir="{run_dir}"']
    for item in config:
        args += ["-c", item]
    subprocess.run(args, cwd=REPO, check=True, capture_output=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def payload_bytes(content) -> int:
    """Arrays' bytes and config values' sizes of a RecordDict (numbers as 8 bytes)."""
    total = sum(a.numpy().nbytes for record in content.array_records.values() for a in record.values())
    for record in [*content.config_records.values(), *content.metric_records.values()]:
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            total += len(key) + sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in values)
    return total


def traffic(secure: bool, tmp: Path) -> dict:
    """Payload bytes down (server to client) and up per client for one training round."""
    from client.app import app
    from common.config import FedtuneConfig
    from common.federation_data import federation_labels, simulated_client_data
    from common.flower import OrderedGrid, seed_sampling_and_noise
    from common.records import state_to_record
    from server.loop import plain_train
    from server.rundir import RunDir
    from server.secure_train import secure_train
    from server.state import initial_state
    from server.strategy import build_strategy
    from flwr.supercore.task_identity import TaskIdentity

    from tests.inprocess_grid import InProcessGrid

    cfg = FedtuneConfig(run_dir=str(tmp / ("secure" if secure else "plain")), secure_aggregation=secure,
                        validate_updates=not secure)
    cfg = cfg.replace(labels=federation_labels(cfg).to_spec())
    _, state = initial_state(cfg, federation_labels(cfg), RunDir.for_config(cfg))
    nodes = {10 + i: {"partition-id": i, "num-partitions": 3, "privacy-dir": str(tmp / "privacy")} for i in range(3)}
    grid = InProcessGrid(app, nodes)
    state.clients = {n: f"partition-{i}" for i, n in enumerate(nodes)}
    state.declared = {n: len(simulated_client_data(cfg, i, 3).train) for i, n in enumerate(nodes)}
    strategy = build_strategy(cfg)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Flower stamps messages with it
    seed_sampling_and_noise(1)
    messages = list(strategy.configure_train(1, state_to_record(state.arrays), state.message_config(),
                                             OrderedGrid(grid, state.clients)))
    replies = []
    real = grid.send_and_receive

    def counting(msgs, *, timeout=None):
        out = real(msgs, timeout=timeout)
        replies.extend(out)
        return out

    grid.send_and_receive = counting
    start = time.perf_counter()
    (secure_train if secure else plain_train)(grid, state, strategy, 1, messages)
    seconds = time.perf_counter() - start
    down = sum(payload_bytes(m.content) for m in grid.sent) / len(nodes)
    up = sum(payload_bytes(r.content) for r in replies if not r.has_error()) / len(nodes)
    adapter = sum(v.nbytes for v in state.arrays.values())
    return {"down_bytes_per_client": round(down), "up_bytes_per_client": round(up), "messages": len(grid.sent),
            "adapter_bytes": adapter, "in_process_round_s": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plain = simulate(out / "plain")
    secure = simulate(out / "secure", "secure-aggregation=true", "validate-updates=false")
    from server.checkpoint import load_checkpoint

    first = [load_checkpoint(out / name / "checkpoints" / "round-0001.safetensors").adapter for name in ("plain", "secure")]
    worst = max(float(np.abs(first[0][k] - first[1][k]).max()) for k in first[0])
    results = {"round1_max_abs_diff": worst,
               "plain": {"accuracy": [r["heldout_accuracy"] for r in plain], "macro_f1": [r["heldout_macro_f1"] for r in plain],
                         "seconds": [r.get("seconds") for r in plain[1:]], "traffic": traffic(False, out / "tmp")},
               "secure": {"accuracy": [r["heldout_accuracy"] for r in secure], "macro_f1": [r["heldout_macro_f1"] for r in secure],
                          "seconds": [r.get("seconds") for r in secure[1:]], "traffic": traffic(True, out / "tmp")}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| run | held-out accuracy / macro-F1, rounds 1-3 | seconds per round | bytes down / up per client a round | messages a round |",
             "|---|---|---|---|---|"]
    for name in ("plain", "secure"):
        r = results[name]
        figures = ", ".join(f"{a:.4f} / {f:.4f}" for a, f in zip(r["accuracy"][1:], r["macro_f1"][1:]))
        t = r["traffic"]
        lines.append(f"| {name} | {figures} | {', '.join(f'{s:.1f}' for s in r['seconds'])} | "
                     f"{t['down_bytes_per_client']:,} / {t['up_bytes_per_client']:,} | {t['messages']} |")
    lines.append(f"\nround-1 adapters, largest difference: {worst:.2e}; adapter {results['plain']['traffic']['adapter_bytes']:,} bytes")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
