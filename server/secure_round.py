"""A training round under secure aggregation: SecAgg+'s four stages over the Grid (common/secagg.py).

The server samples the round's clients as for any round (the strategy's configure_train), then:

1. keys    - each sampled client checks the round against its privacy budget and sends fresh
             public keys (a client whose budget refuses sends its refusal instead);
2. shares  - the keys go to everyone who sent them; each sends its encrypted Shamir shares;
3. masked  - each gets the shares sealed for it and the round's training content, trains (or
             takes its distributed DP step) and uploads its masked integer vector;
4. unmask  - the clients whose vectors arrived send the shares that remove every mask.

A client that fails, times out or sends a malformed message at any stage drops out; up to
`secagg-max-dropouts` of the sampled clients may, and the rest is recovered from the shares.
When fewer than the threshold remain at a stage the round ends there unapplied: before stage 4
the server cannot unmask anything, so nothing is learnt. Every sampled client's fate goes into
the round ledger; a public key seen in an earlier round (a reused mask key) is rejected.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.errors import FieldError
from common.fields import as_bytes, as_list
from common.secagg import ACTIONS, SecAggError, ServerRound, from_field, threshold_for
from server.replies import node_of, sent_to
from server.state import ServerState

MASKED_KEY = "masked"


@dataclass
class SecureRound:
    """What a secure round produced: the signed sum (None when the round was not applied), whose
    vectors it holds, the replies that carry privacy records, and every sampled client's fate."""

    nodes: list[int]
    threshold: int
    total: np.ndarray | None = None
    fates: dict[int, str] = field(default_factory=dict)  # node -> failed / timed_out / refused / rejected:<why>
    refusals: dict[int, Message] = field(default_factory=dict)
    spent: dict[int, Message] = field(default_factory=dict)  # stage-3 replies with a privacy record
    stages: dict[str, int] = field(default_factory=dict)  # clients still in after each stage
    seconds: dict[str, float] = field(default_factory=dict)
    summed: list[int] = field(default_factory=list)
    stopped: str = ""  # why the round was not applied

    def drop(self, node: int, fate: str) -> None:
        self.fates.setdefault(node, fate)


def run_secure_round(
    grid: Grid,
    state: ServerState,
    server_round: int,
    messages: list[Message],
    *,
    length: int,
    extra: dict[str, ConfigRecord],
) -> SecureRound:
    """Run the four stages for the clients the strategy sampled (its train `messages`); `length` is
    the integer vector each uploads, `extra` the records every stage carries beside the run config
    (the distributed DP announcement) and `extra["masked"]` what only stage 3 adds."""
    stages = _Stages(grid, state, server_round, messages, length, extra)
    for stage in (stages.keys, stages.shares, stages.masked, stages.unmask):
        if not stage():
            break
    return stages.out


class _Stages:
    """One secure round's state between its stages; each stage returns whether the round goes on."""

    def __init__(
        self,
        grid: Grid,
        state: ServerState,
        server_round: int,
        messages: list[Message],
        length: int,
        extra: dict[str, ConfigRecord],
    ):
        self.grid, self.state, self.server_round = grid, state, server_round
        self.train = {m.metadata.dst_node_id: m.content for m in messages}
        nodes = sorted(self.train)
        threshold = threshold_for(len(nodes), state.cfg.secagg_max_dropouts)
        self.out = SecureRound(nodes=nodes, threshold=threshold)
        self.config = next(iter(self.train.values()))["config"]
        self.tag = str(state.run.path)
        self.base = {"config": self.config, **{k: v for k, v in extra.items() if k != "masked"}}
        self.masked_extra = extra.get("masked")
        self.protocol = ServerRound(
            run=self.tag, server_round=server_round, sampled=nodes, threshold=threshold, length=length
        )
        self.inbox: dict[int, list] = {}

    def spec(self, stage: str, **values) -> ConfigRecord:
        return ConfigRecord({"stage": stage, "run": self.tag, **{k: v for k, v in values.items() if v != []}})

    def exchange(self, stage: str, contents: dict[int, RecordDict]) -> dict[int, Message]:
        return _exchange(self.grid, self.state.cfg.round_timeout, self.out, stage, self.server_round, contents)

    def keys(self) -> bool:
        """Stage 1: fresh public keys, or a privacy refusal."""
        out, protocol, nodes = self.out, self.protocol, self.out.nodes
        replies = self.exchange(
            "keys",
            {
                n: RecordDict({**self.base, "secagg": self.spec("keys", threshold=out.threshold, clients=len(nodes))})
                for n in nodes
            },
        )
        for node, reply in replies.items():
            if "privacy" in reply.content.config_records and "secagg" not in reply.content.config_records:
                out.refusals[node] = reply
                out.drop(node, "refused")
                continue
            try:
                secagg = reply.content.config_records.get("secagg")
                mask_public, seal_public = as_bytes(secagg, "mask-public"), as_bytes(secagg, "seal-public")
            except FieldError:
                out.drop(node, "rejected:malformed-keys")
                continue
            if _seen(self.state, mask_public) or _seen(self.state, seal_public) or mask_public == seal_public:
                out.drop(node, "rejected:reused-key")
            else:
                protocol.add_keys(node, mask_public, seal_public)
        self.state.secagg_keys.extend(_digest(k) for pair in protocol.keys.values() for k in pair)
        return _still_enough(out, protocol, list(protocol.keys), "keys")

    def shares(self) -> bool:
        """Stage 2: every public key to everyone who sent keys; their sealed shares back."""
        out, protocol = self.out, self.protocol
        peers = sorted(protocol.keys)
        announce = self.spec(
            "shares",
            nodes=peers,
            **{
                "mask-publics": [protocol.keys[n][0] for n in peers],
                "seal-publics": [protocol.keys[n][1] for n in peers],
            },
        )
        replies = self.exchange("shares", {n: RecordDict({**self.base, "secagg": announce}) for n in peers})
        sealed = {}
        for node, reply in replies.items():
            pairs = _pairs(reply, ("destinations", int), ("ciphertexts", bytes))
            if pairs is None or sorted(d for d, _ in pairs) != [p for p in peers if p != node]:
                out.drop(node, "rejected:malformed-shares")
                continue
            sealed[node] = pairs
        self.inbox = protocol.route(sealed)
        return _still_enough(out, protocol, list(sealed), "shares")

    def masked(self) -> bool:
        """Stage 3: each client gets the shares sealed for it, trains, masks and uploads."""
        out, protocol = self.out, self.protocol
        messages = {}
        for node, items in self.inbox.items():
            record = self.spec(
                "masked",
                sources=[s for s, _ in items],
                ciphertexts=[c for _, c in items],
                **(dict(self.masked_extra) if self.masked_extra is not None else {}),
            )
            messages[node] = RecordDict({**self.base, **dict(self.train[node].items()), "secagg": record})
        for node, reply in self.exchange("masked", messages).items():
            if "privacy" in reply.content.config_records:
                out.spent[node] = reply  # it recorded the spend before uploading, whatever happens next
            try:
                protocol.add_masked(node, _masked_vector(reply))
            except (SecAggError, TypeError, ValueError):
                out.drop(node, "rejected:malformed-masked-vector")
        return _still_enough(out, protocol, protocol.masked, "masked")

    def unmask(self) -> bool:
        """Stage 4: the shares that remove the masks, then the sum."""
        out, protocol = self.out, self.protocol
        replies = self.exchange(
            "unmask",
            {
                n: RecordDict(
                    {
                        "config": self.config,
                        "secagg": self.spec("unmask", active=protocol.masked, dropped=protocol.dropped()),
                    }
                )
                for n in protocol.masked
            },
        )
        shares = {}
        for node, reply in replies.items():
            pairs = _pairs(reply, ("owners", int), ("shares", bytes))
            if pairs is None:
                out.drop(node, "rejected:malformed-unmask-shares")
                continue
            shares[node] = pairs
        for node in protocol.masked:  # a client that fails now is still in the sum: its fate is its vector's
            out.fates.pop(node, None)
        try:
            out.total = from_field(protocol.unmask(shares))
        except SecAggError as err:
            out.stopped = f"unmask: {err}"
            log(WARNING, "fedtune: secure round %d not applied: %s", self.server_round, err)
            return False
        out.summed = list(protocol.masked)
        out.stages["unmask"] = len(shares)
        log(
            INFO,
            "fedtune: secure round %d: sum of %d clients unmasked (threshold %d; stages %s)",
            self.server_round,
            len(out.summed),
            out.threshold,
            out.stages,
        )
        return True


def _exchange(
    grid: Grid, timeout: float, out: SecureRound, stage: str, server_round: int, contents: dict[int, RecordDict]
) -> dict[int, Message]:
    """Send one stage's messages and return the good replies by node; the rest get their fate."""
    start = time.perf_counter()
    messages = [
        Message(content=c, dst_node_id=n, message_type=f"train.{ACTIONS[stage]}", group_id=str(server_round))
        for n, c in contents.items()
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    sent = sent_to(messages)
    good: dict[int, Message] = {}
    for reply in replies:
        node = node_of(reply, sent)
        if node not in contents or node in good or node in out.fates:
            continue  # not asked this stage, or a second reply: the first one counts
        if reply.has_error():
            log(
                WARNING,
                "fedtune: secure round %d, stage %s: node %d failed: %s",
                server_round,
                stage,
                node,
                reply.error.reason,
            )
            out.drop(node, "failed")
        else:
            good[node] = reply
    for node in contents:
        if node not in good:
            out.drop(node, "timed_out")
    out.seconds[stage] = round(time.perf_counter() - start, 3)
    return good


def _still_enough(out: SecureRound, protocol: ServerRound, survivors: list[int], stage: str) -> bool:
    out.stages[stage] = len(survivors)
    if protocol.enough(survivors):
        return True
    out.stopped = (
        f"{stage}: {len(survivors)} of {len(out.nodes)} sampled clients left, below the threshold "
        f"{out.threshold} (secagg-max-dropouts = {len(out.nodes) - out.threshold})"
    )
    log(WARNING, "fedtune: secure round not applied: %s", out.stopped)
    return False


def _pairs(reply: Message, first: tuple[str, type[int]], second: tuple[str, type[bytes]]):
    """The reply's secagg record as (int, bytes) pairs from two lists of one length, or None when
    either is missing, holds another type, or the lengths differ."""
    record = reply.content.config_records.get("secagg")
    try:
        ints, blobs = as_list(record, *first), as_list(record, *second)
    except FieldError:
        return None
    return list(zip(ints, blobs, strict=True)) if len(ints) == len(blobs) else None


def _masked_vector(reply: Message):
    arrays = reply.content.array_records.get("arrays")
    if arrays is None or list(arrays.keys()) != [MASKED_KEY]:
        return None
    return arrays[MASKED_KEY].numpy()


def _digest(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:32]


def _seen(state: ServerState, key: bytes) -> bool:
    return _digest(key) in state.secagg_keys


def round_entry(server_round: int, result: SecureRound, clients: dict[int, str]) -> dict:
    """The round ledger entry of a secure round: every sampled client in exactly one category (I4)."""
    name = {n: clients.get(n, f"node-{n}") for n in result.nodes}
    fates = result.fates
    entry: dict[str, Any] = {
        "round": server_round,
        "sampled": sorted(name.values()),
        "failed": sorted(name[n] for n, f in fates.items() if f == "failed"),
        "refused": sorted(name[n] for n, f in fates.items() if f == "refused"),
        "timed_out": sorted(name[n] for n, f in fates.items() if f == "timed_out"),
        "rejected": [
            {"client": name[n], "reason": f.split(":", 1)[1]}
            for n, f in sorted(fates.items())
            if f.startswith("rejected:")
        ],
        "aggregated": sorted(name[n] for n in result.summed),
        "discarded": sorted(name[n] for n in result.nodes if n not in fates and n not in result.summed),
        "secure_aggregation": {
            "threshold": result.threshold,
            "stages": result.stages,
            "seconds": result.seconds,
            "applied": result.total is not None,
            **({"reason": result.stopped} if result.stopped else {}),
        },
    }
    parts = [
        entry["aggregated"],
        entry["failed"],
        entry["refused"],
        entry["timed_out"],
        entry["discarded"],
        [r["client"] for r in entry["rejected"]],
    ]
    if sorted(c for part in parts for c in part) != entry["sampled"]:
        raise AssertionError(f"round ledger does not close in secure round {server_round}: {entry}")
    return entry
