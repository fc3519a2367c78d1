"""One accuracy setting with any run-config overrides: the tuning probes behind the suite's settings.

    python bench/probe.py --data sst2 --setting centralized --passes 1 --eval-every 200 \
        -c max-train-examples=18000 -c batch-size=32 -c learning-rate=1e-3 \
        -c lora-target-modules=query,key,value,intermediate.dense,output.dense -c lora-r=2 -c lora-alpha=4
    python bench/probe.py --data ag_news --setting iid --passes 2 -c batch-size=8 -c lora-freeze-a=true

Centralized: `passes` epochs on the union of the 10 clients' training slices, held-out
accuracy every `--eval-every` steps and at the end. Federated (iid, dirichlet-0.5, ...): the
suite's federated run (every client, one local epoch per round, `passes` rounds; or
`--per-round K` clients sampled per round and passes * clients / K rounds, the same passes in
expectation; `-c local-epochs=E` divides the rounds by E), held-out accuracy per round. Prints one RESULT line; nothing is written outside --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402
from simulation.run import parse_overrides  # noqa: E402


def centralized_curve(overrides: dict, passes: int, clients: int, every: int) -> dict:
    from common.data import TextDataset
    from common.federation_data import federation_labels, heldout_set, simulated_client_data
    from common.model import load_tokenizer
    from common.task import task_for
    from common.train import encode, evaluate, round_schedule, train

    cfg = suite.config_from({**overrides, "partitioner": "iid"})
    labels = federation_labels(cfg)
    model, tok = task_for(cfg).model(len(labels)), load_tokenizer(cfg.model)
    parts = [simulated_client_data(cfg, i, clients).train for i in range(clients)]
    union = TextDataset(texts=[t for d in parts for t in d.texts], labels=[y for d in parts for y in d.labels])
    data = encode(union, tok, labels, max_length=cfg.max_length, where="union")
    heldout = encode(heldout_set(cfg), tok, labels, max_length=cfg.max_length, where="held-out")
    curve: list[tuple[int, float]] = []

    def score() -> dict:
        res = evaluate(model, heldout, pad_id=tok.pad_token_id, batch_size=64, num_labels=len(labels))
        model.train()
        return res

    def progress(step: int, total: int, loss: float) -> None:
        if every and step % every == 0 and step < total:
            acc = score()["accuracy"]
            curve.append((step, round(acc, 4)))
            print(f"probe: step {step}/{total} loss {loss:.3f} held-out accuracy {acc:.4f}", flush=True)

    train(model, data, pad_id=tok.pad_token_id, epochs=passes, steps=0, batch_size=cfg.batch_size,
          learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
          seed=cfg.seed, group_by_length=cfg.group_by_length,
          lr_at=round_schedule(cfg.replace(num_server_rounds=1), 1), progress=progress)
    res = score()
    return {"accuracy": res["accuracy"], "macro_f1": res["macro_f1"], "curve": curve,
            "adapter_over_full_model": suite.adapter_fraction(cfg)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["sst2", "ag_news"], default="sst2")
    parser.add_argument("--setting", default="centralized", help="centralized, iid or dirichlet-<alpha>")
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=0,
                        help="federated: clients sampled per round (default all); rounds = passes * clients / per-round")
    parser.add_argument("--eval-every", type=int, default=0, help="centralized: held-out accuracy every N steps")
    parser.add_argument("--out", default="", help="federated: run directory (default: a temporary one)")
    parser.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.per_round and not suite.per_round_fits(args.per_round, args.clients):
        parser.error(f"--per-round: expected a divisor of --clients {args.clients}, got {args.per_round}")

    data, _ = suite.data_overrides(args.data)
    overrides = {**data, "local-epochs": 1, "local-steps": 0, "fraction-evaluate": 0.0,
                 **parse_overrides(args.run_config)}
    start = time.perf_counter()
    if args.setting == "centralized":
        result = centralized_curve(overrides, args.passes, args.clients, args.eval_every)
    else:
        run_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedtune-probe-"))
        result = suite.federated(overrides, args.passes, args.clients, args.setting, run_dir, args.per_round)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        result["per_round"] = [round(r["heldout_accuracy"], 4) for r in rows if r["round"] > 0]
        if not args.out:
            shutil.rmtree(run_dir, ignore_errors=True)
    result["wall_s"] = round(time.perf_counter() - start)
    print("RESULT " + json.dumps({"data": args.data, "setting": args.setting, "passes": args.passes,
                                  "clients_per_round": args.per_round or args.clients,
                                  "overrides": args.run_config, **result}), flush=True)


if __name__ == "__main__":
    main()
