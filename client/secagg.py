"""The client's side of secure aggregation: the four SecAgg+ stages as ClientApp train actions.

A round's secrets live in the node's Context state between its four messages (in deployment the
SuperNode keeps it on the node). The third stage trains: without DP or with local DP it uploads
its examples-weighted update (common/quantize.py); under distributed DP one Poisson sample's
clipped gradient sum, rounded, plus this client's share of the Skellam noise. Nothing else that
depends on the data leaves the node: no loss, no count, no norm.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.messages import client_record, message_config, node_data
from common.fields import as_bytes, as_int, as_list, as_str
from common.secagg import (
    ClientRound,
    SecAggError,
    client_keys,
    client_mask,
    client_shares,
    client_unmask,
    to_field,
)

STATE_KEY = "secagg"
MASKED_KEY = "masked"  # the ArrayRecord key of the masked vector


def keys_reply(msg: Message, context: Context) -> Message:
    """Stage 1: check this round against the node's privacy budget, then make fresh keys."""
    cfg, server_round = message_config(msg)
    spec = msg.content["secagg"]
    data = node_data(cfg, context)
    if cfg.dp_sample:
        from client.privacy import decide, distributed_mechanism

        planned = distributed_mechanism(cfg, msg.content["dp"], data) if cfg.dp_mode == "distributed" else None
        decision = decide(cfg, data.train, dict(context.node_config), planned=planned)
        if not decision.allowed:
            return Message(
                content=RecordDict({"privacy": decision.refusal(), "client": client_record(data, server_round)}),
                reply_to=msg,
            )
    state = client_keys(
        node=msg.metadata.dst_node_id,
        run=as_str(spec, "run"),
        server_round=server_round,
        threshold=as_int(spec, "threshold"),
        clients=as_int(spec, "clients"),
    )
    save_state(context, state)
    reply = ConfigRecord({"mask-public": state.mask_public, "seal-public": state.seal_public})
    return Message(content=RecordDict({"secagg": reply, "client": client_record(data, server_round)}), reply_to=msg)


def shares_reply(msg: Message, context: Context) -> Message:
    """Stage 2: Shamir-share this round's self-mask seed and mask key among the announced peers."""
    state = load_state(context, msg)
    spec = msg.content.config_records["secagg"]
    publics = zip(as_list(spec, "mask-publics", bytes), as_list(spec, "seal-publics", bytes), strict=True)
    peers = dict(zip(as_list(spec, "nodes", int), publics, strict=True))
    sealed = client_shares(state, peers)
    save_state(context, state)
    reply = ConfigRecord({"destinations": [d for d, _ in sealed], "ciphertexts": [c for _, c in sealed]})
    return Message(content=RecordDict({"secagg": reply}), reply_to=msg)


def masked_reply(msg: Message, context: Context) -> Message:
    """Stage 3: train (or take the distributed DP step), encode as integers, mask, upload."""
    from client.contribution import contribute

    state = load_state(context, msg)
    spec = msg.content.config_records["secagg"]
    received = list(
        zip(
            as_list(spec, "sources", int, empty_if_absent=True),
            as_list(spec, "ciphertexts", bytes, empty_if_absent=True),
            strict=True,
        )
    )
    vector, extra = contribute(msg, context, state)
    masked = client_mask(state, received, to_field(vector))
    save_state(context, state)
    content = RecordDict({"arrays": ArrayRecord({MASKED_KEY: Array(masked)}), **extra})
    return Message(content=content, reply_to=msg)


def unmask_reply(msg: Message, context: Context) -> Message:
    """Stage 4: the shares that let the server remove every mask, once."""
    state = load_state(context, msg)
    spec = msg.content.config_records["secagg"]
    shares = client_unmask(
        state,
        active=as_list(spec, "active", int, empty_if_absent=True),
        dropped=as_list(spec, "dropped", int, empty_if_absent=True),
    )
    save_state(context, state)
    reply = ConfigRecord({"owners": [n for n, _ in shares], "shares": [s for _, s in shares]})
    return Message(content=RecordDict({"secagg": reply}), reply_to=msg)


# --- the round's state in the node's Context ------------------------------------------------------


def save_state(context: Context, state: ClientRound) -> None:
    record: dict[str, Any] = {
        "node": state.node,
        "run": state.run,
        "round": state.server_round,
        "threshold": state.threshold,
        "stage": state.stage,
        "mask-key": state.mask_key,
        "mask-public": state.mask_public,
        "seal-key": state.seal_key,
        "seal-public": state.seal_public,
        "seed": state.seed,
    }
    lists = {
        "peer-nodes": list(state.peers),
        "peer-mask": [m for m, _ in state.peers.values()],
        "peer-seal": [s for _, s in state.peers.values()],
        "seed-share-nodes": list(state.seed_shares),
        "seed-shares": list(state.seed_shares.values()),
        "key-share-nodes": list(state.key_shares),
        "key-shares": list(state.key_shares.values()),
        "masked-with": state.masked_with,
    }
    record.update({k: v for k, v in lists.items() if v})  # an empty list has no type on the wire
    context.state.config_records[STATE_KEY] = ConfigRecord(record)


def load_state(context: Context, msg: Message) -> ClientRound:
    """This node's state for the round the message belongs to; a message of another round (or of a
    round this node never started) is refused, as is one that repeats or skips a stage."""
    _, server_round = message_config(msg)
    r = context.state.config_records.get(STATE_KEY)
    if r is None or r["round"] != server_round or r["run"] != msg.content.config_records["secagg"].get("run"):
        raise SecAggError(
            f"secure aggregation: a {msg.metadata.message_type} message for round {server_round}, but "
            f"this node holds no keys of that round"
        )
    return ClientRound(
        node=as_int(r, "node"),
        run=as_str(r, "run"),
        server_round=as_int(r, "round"),
        threshold=as_int(r, "threshold"),
        mask_key=as_bytes(r, "mask-key"),
        mask_public=as_bytes(r, "mask-public"),
        seal_key=as_bytes(r, "seal-key"),
        seal_public=as_bytes(r, "seal-public"),
        stage=as_str(r, "stage"),
        seed=as_bytes(r, "seed"),
        peers=dict(
            zip(ints(r, "peer-nodes"), zip(blobs(r, "peer-mask"), blobs(r, "peer-seal"), strict=True), strict=True)
        ),
        seed_shares=dict(zip(ints(r, "seed-share-nodes"), blobs(r, "seed-shares"), strict=True)),
        key_shares=dict(zip(ints(r, "key-share-nodes"), blobs(r, "key-shares"), strict=True)),
        masked_with=ints(r, "masked-with"),
    )


def ints(record: ConfigRecord, key: str) -> list[int]:
    return as_list(record, key, int, empty_if_absent=True)


def blobs(record: ConfigRecord, key: str) -> list[bytes]:
    return as_list(record, key, bytes, empty_if_absent=True)


def pairs(first: list[bytes], second: list[bytes]) -> list[tuple[bytes, bytes]]:
    return list(zip(first, second, strict=True))
