"""Local training and evaluation on this node's data: what the ClientApp's train and evaluate
handlers (client/app.py) run. Imported with the first such message, so that torch,
transformers and PEFT load only in a ClientApp process that trains or evaluates.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from client.messages import PROGRESS_DIR_ENV, QUIET_ENV, client_record, message_config, node_data, node_threads
from client.privacy import decide, dp_seed, run_canaries, train_private
from common.config import FedtuneConfig
from common.data import LabelMap, TextDataset
from common.device import bound_memory
from common.errors import ConfigError
from common.federation_data import ClientData
from common.model import frozen_fingerprint, get_adapter_state, set_adapter_state
from common.records import FROZEN_KEY, TRAIN_METRICS, record_to_state, state_to_record
from common.task import Task, task_for
from common.train import TrainResult, round_schedule, train

PROGRESS_EVERY = 10


def progress_reporter(server_round: int, client_id: str):
    """Local steps as a log line every PROGRESS_EVERY steps; under `fedtune simulate` on a
    terminal, as a small file the driver's progress display reads instead; with --quiet, not at all."""
    folder = os.environ.get(PROGRESS_DIR_ENV)
    quiet = os.environ.get(QUIET_ENV) == "1"

    def progress(step: int, total: int, loss: float) -> None:
        if folder:
            state = {"round": server_round, "client": client_id, "step": step, "total": total, "loss": loss}
            path = Path(folder) / f"{client_id}.json"
            path.with_suffix(".tmp").write_text(json.dumps(state))
            os.replace(path.with_suffix(".tmp"), path)  # the display reads a whole file, never a part
        elif not quiet and (step % PROGRESS_EVERY == 0 or step == total):
            log(INFO, "fedtune: [round %d] %s step %d/%d loss %.4f", server_round, client_id, step, total, loss)

    return progress


def set_threads(node_config) -> None:
    """The node's num-threads, else OMP_NUM_THREADS (the simulation engine sets it to the cores it
    gives each client), else torch's default."""
    threads = node_threads(node_config) or int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@dataclass
class Session:
    """What both handlers need: the config and its task, this node's data, and the model holding the
    global adapter."""

    cfg: FedtuneConfig
    task: Task
    server_round: int
    data: ClientData
    labels: LabelMap
    model: torch.nn.Module
    tokenizer: Any  # the model's Hugging Face tokenizer

    def encode(self, split: TextDataset):
        return self.task.encode(split, self.tokenizer, self.labels, where=f"client {self.data.client_id}")


def open_session(msg: Message, context: Context) -> Session:
    cfg, server_round = message_config(msg)
    task = task_for(cfg)
    set_threads(context.node_config)
    labels = LabelMap.parse(cfg.labels)
    node_spec = context.node_config.get("device")  # a node's own device wins over the run's
    device = task.device(
        None if node_spec is None else str(node_spec),
        where="device (node config)" if node_spec is not None else "device",
    )
    bound_memory(device)
    model = task.model(len(labels), device=device)
    if cfg.lora_freeze_a:
        check_frozen(str(msg.content.config_records["config"].get(FROZEN_KEY, "")), frozen_fingerprint(model))
    set_adapter_state(model, record_to_state(msg.content.array_records["arrays"]))
    return Session(
        cfg=cfg,
        task=task,
        server_round=server_round,
        data=node_data(cfg, context),
        labels=labels,
        model=model,
        tokenizer=task.tokenizer(),
    )


def check_frozen(server: str, mine: str) -> None:
    """lora-freeze-a: this node's A matrices must be the server's, or its B would not fit them."""
    if server != mine:
        raise ConfigError(
            f"lora-freeze-a: expected the frozen LoRA A matrices of the server (fingerprint {server or 'missing'}), "
            f"got {mine} here; server and clients need the same model, lora settings, seed and torch build"
        )


@dataclass
class Trained:
    """One round of local training: the session it ran in, its result and privacy record; or, when
    this client's budget refused the round, only the refusal."""

    session: Session
    examples: int
    result: TrainResult | None = None
    privacy: ConfigRecord | None = None
    refusal: ConfigRecord | None = None

    def trained(self) -> TrainResult:
        """The training result, for a round the budget did not refuse."""
        if self.result is None:
            raise RuntimeError("a round the privacy budget refused has no training result")
        return self.result


def train_locally(msg: Message, context: Context) -> Trained:
    """Train the global adapter the message carries on this node's data (DP-SGD under dp-sample)."""
    s = open_session(msg, context)
    cfg, encoded = s.cfg, s.encode(s.data.train)
    progress = progress_reporter(s.server_round, s.data.client_id)
    if cfg.dp_sample:
        decision = decide(cfg, s.data.train, dict(context.node_config))
        if not decision.allowed:
            log_refusal(decision, s)
            return Trained(session=s, examples=len(encoded), refusal=decision.refusal())
        seed = dp_seed(
            dict(context.node_config), cfg, s.server_round, s.data.client_id, msg.content.array_records["arrays"]
        )
        result, privacy = train_private(
            decision,
            cfg,
            s.model,
            encoded,
            pad_id=s.tokenizer.pad_token_id,
            seed=seed,
            run=str(context.run_id),
            server_round=s.server_round,
            progress=progress,
            canaries=run_canaries(cfg, dict(context.node_config), s.data.client_id),
        )
        return Trained(session=s, examples=len(encoded), result=result, privacy=privacy)
    result = train(
        s.model,
        encoded,
        pad_id=s.tokenizer.pad_token_id,
        epochs=cfg.local_epochs,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=client_seed(cfg.seed, s.server_round, s.data.client_id),
        proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
        progress=progress,
        group_by_length=cfg.group_by_length,
        lr_at=round_schedule(cfg, s.server_round),
        compute_dtype=cfg.compute_dtype,
    )
    return Trained(session=s, examples=len(encoded), result=result)


def log_refusal(decision, s: Session) -> None:
    log(
        WARNING,
        "fedtune: %s refuses round %d: epsilon would reach %.3f, budget %.3f (%.3f already spent on "
        "this data by earlier rounds or runs, recorded in %s; set privacy-dir in the node config or "
        "FEDTUNE_PRIVACY_DIR to keep another record)",
        s.data.client_id,
        s.server_round,
        decision.projected,
        decision.budget,
        decision.record.spent(),
        decision.record.path,
    )


def train_reply(msg: Message, context: Context) -> Message:
    t = train_locally(msg, context)
    s = t.session
    if t.refusal is not None:
        content = RecordDict({"privacy": t.refusal, "client": client_record(s.data, s.server_round)})
        return Message(content=content, reply_to=msg)
    result = t.trained()
    metrics = MetricRecord(
        dict(zip(TRAIN_METRICS, (t.examples, result.loss, result.steps, result.seconds), strict=True))
    )
    content = RecordDict(
        {
            "arrays": state_to_record(get_adapter_state(s.model)),
            "metrics": metrics,
            "client": client_record(s.data, s.server_round),
        }
    )
    if t.privacy is not None:
        content["privacy"] = t.privacy
    return Message(content=content, reply_to=msg)


def evaluate_reply(msg: Message, context: Context) -> Message:
    s = open_session(msg, context)
    result = s.task.score(s.model, s.encode(s.data.val), pad_id=s.tokenizer.pad_token_id, num_labels=len(s.labels))
    has_data = result["examples"] > 0  # NaN metrics would poison the weighted average
    metrics = MetricRecord(
        {
            "num-examples": result["examples"],
            **{f"val-{n.replace('_', '-')}": result[n] if has_data else 0.0 for n in s.task.metrics},
        }
    )
    return Message(
        content=RecordDict({"metrics": metrics, "client": client_record(s.data, s.server_round)}), reply_to=msg
    )


def client_seed(seed: int, server_round: int, client_id: str) -> int:
    """A per-(round, client) seed that is stable across processes and restarts."""
    return (seed * 1_000_003 + server_round * 7919 + zlib.crc32(client_id.encode())) % (2**31 - 1)
