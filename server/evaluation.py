"""The global adapter evaluated every round: on the server's held-out set, and by the clients
on their local validation slices."""

from __future__ import annotations

import json
from logging import INFO

import numpy as np

from flwr.common.logger import log
from flwr.serverapp import Grid

from common.device import resolve_device
from common.federation_data import heldout_set
from common.lm import encode_for_task, generate, model_for_config, sample_prompts
from common.metrics import class_report, plot_confusion, write_confusion_csv
from common.model import load_tokenizer, set_adapter_state
from common.records import state_to_record
from common.train import evaluate
from server.replies import sent_to, sort_replies
from server.state import ServerState


def evaluation_row(state: ServerState, server_round: int) -> dict:
    """Evaluate the global adapter on the server's held-out set."""
    cfg = state.cfg
    model = model_for_config(cfg, len(state.labels), device=resolve_device(cfg.device))
    tokenizer = load_tokenizer(cfg.model)
    set_adapter_state(model, state.arrays)
    heldout = encode_for_task(cfg, heldout_set(cfg), tokenizer, state.labels, where="held-out set")
    res = evaluate(model, heldout, pad_id=tokenizer.pad_token_id, batch_size=cfg.eval_batch_size,
                   num_labels=len(state.labels), compute_dtype=cfg.compute_dtype)
    names = ("loss", "perplexity") if cfg.task == "causal-lm" else ("loss", "accuracy", "macro_f1")
    row = {"round": server_round, **{f"heldout_{n}": res[n] for n in names}, "heldout_examples": res["examples"]}
    if cfg.task == "causal-lm":
        write_samples(state, model, tokenizer, server_round)
    else:
        write_class_report(state, server_round, res)
    if server_round == 0:
        log(INFO, "fedtune: round 0 (before training): held-out %s",
            " ".join(f"{n.replace('macro_f1', 'macro-F1')} {res[n]:.4f}" for n in names))
    return row


def write_class_report(state: ServerState, server_round: int, res: dict) -> None:
    """heldout/round-NNNN.json (per-class precision, recall, F1, support; the confusion matrix) and
    heldout/round-NNNN-confusion.csv."""
    names = list(state.labels.names)
    folder = state.run.path / "heldout"
    folder.mkdir(exist_ok=True)
    (folder / f"round-{server_round:04d}.json").write_text(
        json.dumps({"round": server_round, **class_report(res, names)}, indent=1) + "\n")
    write_confusion_csv(folder / f"round-{server_round:04d}-confusion.csv", res["confusion"], names)


def plot_final_confusion(state: ServerState) -> None:
    """heldout/confusion.png of the last round, for a look at which classes fail."""
    if state.cfg.task == "causal-lm":
        return
    last = state.history[-1]["round"]
    report = json.loads((state.run.path / "heldout" / f"round-{last:04d}.json").read_text())
    plot_confusion(state.run.path / "heldout" / "confusion.png", np.array(report["confusion"]["counts"]),
                   report["confusion"]["labels"], f"held-out set, round {last}: accuracy {report['accuracy']:.3f}, "
                   f"macro-F1 {report['macro_f1']:.3f}")


def write_samples(state: ServerState, model, tokenizer, server_round: int) -> None:
    """Generate from the fixed sample prompts with the global adapter; append to samples.jsonl."""
    cfg = state.cfg
    prompts = sample_prompts(cfg.sample_prompts, heldout_set(cfg))
    outputs = generate(model, tokenizer, prompts, template=cfg.prompt_template, max_new_tokens=cfg.max_new_tokens,
                       max_length=cfg.max_length)
    path = state.run.path / "samples.jsonl"
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["round"] < server_round] \
        if path.exists() else []  # a resumed run rewrites the rounds after its checkpoint
    rows = [json.dumps({"round": server_round, "prompt": p, "response": o}) for p, o in zip(prompts, outputs)]
    path.write_text("".join(line + "\n" for line in kept + rows))


def federated_evaluation(grid: Grid, state: ServerState, strategy, server_round: int, ordered) -> dict:
    """Clients evaluate the new global adapter on their local validation slices."""
    if state.cfg.fraction_evaluate == 0.0:
        return {}
    messages = list(strategy.configure_evaluate(
        server_round, state_to_record(state.arrays), state.message_config(), ordered
    ))
    replies = grid.send_and_receive(messages, timeout=state.cfg.round_timeout)
    replies = sort_replies(replies, state.clients, sent_to(messages))
    ok = [r for r in replies if not r.has_error() and r.content["metrics"]["num-examples"] > 0]
    metrics = strategy.aggregate_evaluate(server_round, ok) if ok else None
    if metrics is None:
        return {}
    return {f"clients_{k.replace('-', '_')}": float(v) for k, v in metrics.items() if k != "num-examples"}
