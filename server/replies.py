"""What nodes answer: who they are (discovery), who answered for whom in a fixed order, and
where every sampled client of a round ended up (the round ledger, I4)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.errors import FieldError
from common.fields import as_float, as_int, as_list, as_str
from common.privacy import SKELLAM
from server.state import ServerState


@dataclass
class RoundOutcome:
    """What a training round did, plain or secure: its round-ledger entry, the training figures, and
    the replies the privacy ledger needs (trained with a privacy record; refused; failed ids)."""

    entry: dict
    summary: dict
    trained: list[tuple[str, Message]] = field(default_factory=list)
    refused: list[tuple[str, Message]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def discover_clients(grid: Grid, state: ServerState) -> None:
    """Ask every node not yet known who it is; record the answers in clients.json."""
    cfg = state.cfg
    deadline = time.monotonic() + cfg.round_timeout
    while len(list(grid.get_node_ids())) < cfg.min_available_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"expected at least {cfg.min_available_clients} connected clients within "
                f"{cfg.round_timeout:.0f}s, got {len(list(grid.get_node_ids()))}"
            )
        time.sleep(0.5)
    new = [n for n in grid.get_node_ids() if n not in state.clients]
    if not new:
        return
    query = RecordDict({"config": ConfigRecord(cfg.to_run_config())})
    messages = [Message(content=query, message_type=MessageType.QUERY, dst_node_id=n) for n in new]
    summaries = []
    replies = grid.send_and_receive(messages, timeout=cfg.round_timeout)
    sent = sent_to(messages)
    for reply in replies:
        if reply.has_error():
            log(WARNING, "fedtune: node %d did not describe itself: %s", node_of(reply, sent), reply.error.reason)
            continue
        summary = describe(reply)
        if isinstance(summary, str):
            log(WARNING, "fedtune: node %d did not describe itself: %s", node_of(reply, sent), summary)
            continue
        state.clients[reply.metadata.src_node_id] = summary["client_id"]
        state.declared[reply.metadata.src_node_id] = summary["train_examples"]
        summaries.append(summary)
    known = state.run.path / "clients.json"  # a node that rejoins under a new node id replaces its entry
    earlier = {c["client_id"]: c for c in json.loads(known.read_text())} if known.exists() else {}
    everyone = {**earlier, **{c["client_id"]: c for c in summaries}}
    state.run.write_json("clients.json", [everyone[c] for c in sorted(everyone)])
    for s in summaries:
        top = sorted(s["label_histogram"].items(), key=lambda kv: -kv[1])[:4]
        log(
            INFO,
            "fedtune: client %-14s train %5d  val %4d  top labels %s",
            s["client_id"],
            s["train_examples"],
            s["val_examples"],
            ", ".join(f"{k}:{v}" for k, v in top),
        )


def describe(reply: Message) -> dict | str:
    """A node's answer to the query as its clients.json entry, or what is wrong with it."""
    info = reply.content.config_records.get("client")
    try:
        names, counts = as_list(info, "label-names", str), as_list(info, "label-counts", int)
        if len(names) != len(counts):
            raise FieldError(f"expected a count for each label, got {len(names)} names and {len(counts)} counts")
        summary: dict[str, Any] = {
            "client_id": as_str(info, "client-id"),
            "train_examples": as_int(info, "train-examples"),
            "val_examples": as_int(info, "val-examples"),
            "label_histogram": dict(zip(names, counts, strict=True)),
        }
    except FieldError as err:
        return f"{err} (a client record has client-id, train-examples, val-examples, label-names, label-counts)"
    if summary["train_examples"] < 0 or summary["val_examples"] < 0:
        return f"expected example counts >= 0, got {summary['train_examples']} and {summary['val_examples']}"
    return summary


# What a client's privacy record holds (client/privacy.py writes it), by its status: each field's reader.
PRIVACY_FIELDS: dict[str, dict[str, Callable[[ConfigRecord, str], object]]] = {
    "trained": {
        "fingerprint": as_str,
        "noise-multiplier": as_float,
        "sample-rate": as_float,
        "steps": as_int,
        "clipping-norm": as_float,
        "epsilon": as_float,
        "epsilon-rdp": as_float,
        "accountant": as_str,
        "delta": as_float,
        "epsilon-budget": as_float,
        "history-noise": lambda r, k: as_list(r, k, float),
        "history-rate": lambda r, k: as_list(r, k, float),
        "history-steps": lambda r, k: as_list(r, k, int),
        "history-kind": lambda r, k: as_list(r, k, str, empty_if_absent=True),
        "history-l2": lambda r, k: as_list(r, k, float, empty_if_absent=True),
        "history-l1": lambda r, k: as_list(r, k, float, empty_if_absent=True),
    },
    "refused": {
        "fingerprint": as_str,
        "epsilon-spent": as_float,
        "epsilon-projected": as_float,
        "epsilon-budget": as_float,
        "delta": as_float,
    },
}
HISTORY_LISTS = ("history-noise", "history-rate", "history-steps", "history-kind", "history-l2", "history-l1")


def privacy_problem(reply: Message) -> str | None:
    """What is wrong with a reply's privacy record (None when it has none or it is well formed): the
    ledger is written from it, so a record that cannot be read makes the reply count as failed."""
    record = reply.content.config_records.get("privacy")
    if record is None:
        return None
    status = record.get("status")
    if not isinstance(status, str):
        return f"privacy record: expected a status string, got {status!r}"
    try:
        for key, read in PRIVACY_FIELDS["trained" if status == "trained" else "refused"].items():
            read(record, key)
        if status == "trained" and record.get("noise") == SKELLAM:
            as_float(record, "l2-sensitivity"), as_float(record, "l1-sensitivity")
    except FieldError as err:
        return f"privacy record ({status}): {err}"
    lengths = {key: len(as_list(record, key, object)) for key in HISTORY_LISTS if key in record}
    if len(set(lengths.values())) > 1:
        return f"privacy record: expected history lists of one length, got lengths {lengths}"
    return None


def classify_replies(replies: list[Message], clients: dict[int, str], sent: dict[str, int]):
    """(failed client ids, refused (id, reply), trained replies) of one training round; a reply whose
    privacy record cannot be read counts as failed (its update is not aggregated)."""
    failed, refused, ok = [], [], []
    for reply in replies:
        client_id = client_of(reply, clients, sent)
        problem = None if reply.has_error() else privacy_problem(reply)
        if reply.has_error() or problem:
            log(WARNING, "fedtune: client %s failed: %s", client_id, problem or reply.error.reason)
            failed.append(client_id)
        elif "privacy" in reply.content.config_records and reply.content["privacy"]["status"] != "trained":
            log(WARNING, "fedtune: client %s did not train: %s", client_id, reply.content["privacy"]["status"])
            refused.append((client_id, reply))
        else:
            ok.append(reply)
    return failed, refused, ok


def round_entry(server_round: int, messages, replies, failed, refused, rejected, clients, sent) -> dict:
    """Where every sampled client ended up this round; the categories partition the sample (I4)."""
    name = {
        m.metadata.dst_node_id: clients.get(m.metadata.dst_node_id, f"node-{m.metadata.dst_node_id}") for m in messages
    }
    replied = {node_of(r, sent) for r in replies}
    rejected_first: dict[str, str] = {}
    for client_id, reason in rejected:  # a node's duplicate replies are extra; its first verdict counts
        rejected_first.setdefault(client_id, reason)
    refused_ids = {c for c, _ in refused}
    entry: dict[str, Any] = {
        "round": server_round,
        "sampled": sorted(name.values()),
        "failed": sorted(set(failed)),
        "refused": sorted(refused_ids),
        "timed_out": sorted(name[n] for n in name if n not in replied),
        "rejected": [{"client": c, "reason": r} for c, r in sorted(rejected_first.items())],
    }
    settled = set(entry["failed"]) | refused_ids | set(entry["timed_out"]) | set(rejected_first)
    entry["aggregated"] = sorted(c for c in name.values() if c not in settled)
    parts = [entry["aggregated"], entry["failed"], entry["refused"], entry["timed_out"], list(rejected_first)]
    if sorted(c for part in parts for c in part) != entry["sampled"]:
        raise AssertionError(f"round ledger does not close in round {server_round}: {entry}")
    return entry


def train_summary(replies: list[Message], *, sampled: int) -> dict:
    """Per-round training figures; computed before any weight policy rewrites num-examples."""
    if not replies:
        return {"clients_sampled": sampled, "clients_ok": 0}
    m = [r.content.metric_records["metrics"] for r in replies]
    n = sum(as_float(x, "num-examples") for x in m)
    return {
        "clients_sampled": sampled,
        "clients_ok": len(replies),
        "train_loss": sum(as_float(x, "train-loss") * as_float(x, "num-examples") for x in m) / n
        if n
        else float("nan"),
        "train_examples": int(n),
        "train_seconds_max": max(as_float(x, "train-seconds") for x in m),
    }


def sort_replies(replies: Iterable[Message], clients: dict[int, str], sent: dict[str, int]) -> list[Message]:
    """Replies in client-id order, so aggregation sums in the same order on every run."""
    return sorted(replies, key=lambda r: (client_of(r, clients, sent), r.metadata.src_node_id))


def sent_to(messages: Iterable[Message]) -> dict[str, int]:
    """Message id -> the node it was sent to (ids are set when the Grid pushes the messages)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages}


def node_of(reply: Message, sent: dict[str, int]) -> int:
    """The node a reply answers for. When a node is lost mid-round, the SuperLink itself replies
    with an error from its own node id, so the sender alone would misattribute the failure."""
    return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def client_of(reply: Message, clients: dict[int, str], sent: dict[str, int]) -> str:
    node = node_of(reply, sent)
    return clients.get(node, f"node-{node}")
