"""The global adapter evaluated every round: on the server's held-out set, and by the clients
on their local validation slices."""

from __future__ import annotations

import math
from logging import INFO

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.federation_data import heldout_set
from common.model import set_adapter_state
from common.records import state_to_record
from server.replies import sent_to, sort_replies
from server.state import ServerState


def evaluation_row(state: ServerState, server_round: int) -> dict:
    """Evaluate the global adapter on the server's held-out set; the task writes its round's report."""
    cfg, task = state.cfg, state.task
    model = task.model(len(state.labels), device=task.device())
    tokenizer = task.tokenizer()
    set_adapter_state(model, state.arrays)
    data = heldout_set(cfg)
    res = task.score(
        model,
        task.encode(data, tokenizer, state.labels, where="held-out set"),
        pad_id=tokenizer.pad_token_id,
        num_labels=len(state.labels),
    )
    row = {"round": server_round, **{f"heldout_{n}": res[n] for n in task.metrics}, "heldout_examples": res["examples"]}
    task.report(state.run.path, server_round, res, model=model, tokenizer=tokenizer, labels=state.labels, heldout=data)
    if server_round == 0:
        log(
            INFO,
            "fedtune: round 0 (before training): held-out %s",
            " ".join(f"{n.replace('macro_f1', 'macro-F1')} {res[n]:.4f}" for n in task.metrics),
        )
    return row


def federated_evaluation(grid: Grid, state: ServerState, strategy, server_round: int, ordered) -> dict:
    """Clients evaluate the new global adapter on their local validation slices."""
    if state.cfg.fraction_evaluate == 0.0:
        return {}
    messages = list(
        strategy.configure_evaluate(server_round, state_to_record(state.arrays), state.message_config(), ordered)
    )
    replies = grid.send_and_receive(messages, timeout=state.cfg.round_timeout)
    replies = sort_replies(replies, state.clients, sent_to(messages))
    ok = [r for r in replies if evaluated(r)]
    metrics = strategy.aggregate_evaluate(server_round, ok) if ok else None
    if metrics is None:
        return {}
    return {f"clients_{k.replace('-', '_')}": float(v) for k, v in metrics.items() if k != "num-examples"}


def evaluated(reply: Message) -> bool:
    """Whether a client's evaluation reply counts: no error, and a metrics record with a positive,
    finite num-examples (a client without validation data sends 0; anything else is ignored)."""
    if reply.has_error() or "metrics" not in reply.content.metric_records:
        return False
    examples = reply.content.metric_records["metrics"].get("num-examples")
    return isinstance(examples, (int, float)) and math.isfinite(examples) and examples > 0
