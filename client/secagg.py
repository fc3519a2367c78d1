"""The client's side of secure aggregation: the four SecAgg+ stages as ClientApp train actions.

A round's secrets live in the node's Context state between its four messages (in deployment the
SuperNode keeps it on the node). The third stage trains: without DP or with local DP it uploads
its examples-weighted update (common/quantize.py); under distributed DP one Poisson sample's
clipped gradient sum, rounded, plus this client's share of the Skellam noise. Nothing else that
depends on the data leaves the node: no loss, no count, no norm.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.messages import client_record, message_config, node_data
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
        run=str(spec["run"]),
        server_round=server_round,
        threshold=int(spec["threshold"]),
        clients=int(spec["clients"]),
    )
    save_state(context, state)
    reply = ConfigRecord({"mask-public": state.mask_public, "seal-public": state.seal_public})
    return Message(content=RecordDict({"secagg": reply, "client": client_record(data, server_round)}), reply_to=msg)


def shares_reply(msg: Message, context: Context) -> Message:
    """Stage 2: Shamir-share this round's self-mask seed and mask key among the announced peers."""
    state = load_state(context, msg)
    spec = msg.content["secagg"]
    peers = dict(
        zip((int(n) for n in spec["nodes"]), zip(spec["mask-publics"], spec["seal-publics"], strict=True), strict=True)
    )
    sealed = client_shares(state, peers)
    save_state(context, state)
    reply = ConfigRecord({"destinations": [d for d, _ in sealed], "ciphertexts": [c for _, c in sealed]})
    return Message(content=RecordDict({"secagg": reply}), reply_to=msg)


def masked_reply(msg: Message, context: Context) -> Message:
    """Stage 3: train (or take the distributed DP step), encode as integers, mask, upload."""
    from client.contribution import contribute

    state = load_state(context, msg)
    spec = msg.content["secagg"]
    received = list(zip((int(n) for n in spec.get("sources", [])), spec.get("ciphertexts", []), strict=True))
    vector, extra = contribute(msg, context, state)
    masked = client_mask(state, received, to_field(vector))
    save_state(context, state)
    content = RecordDict({"arrays": ArrayRecord({MASKED_KEY: Array(masked)}), **extra})
    return Message(content=content, reply_to=msg)


def unmask_reply(msg: Message, context: Context) -> Message:
    """Stage 4: the shares that let the server remove every mask, once."""
    state = load_state(context, msg)
    spec = msg.content["secagg"]
    shares = client_unmask(
        state, active=[int(n) for n in spec.get("active", [])], dropped=[int(n) for n in spec.get("dropped", [])]
    )
    save_state(context, state)
    reply = ConfigRecord({"owners": [n for n, _ in shares], "shares": [s for _, s in shares]})
    return Message(content=RecordDict({"secagg": reply}), reply_to=msg)


# --- the round's state in the node's Context ------------------------------------------------------


def save_state(context: Context, state: ClientRound) -> None:
    record = {
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
    if r is None or int(r["round"]) != server_round or str(r["run"]) != str(msg.content["secagg"]["run"]):
        raise SecAggError(
            f"secure aggregation: a {msg.metadata.message_type} message for round {server_round}, but "
            f"this node holds no keys of that round"
        )
    return ClientRound(
        node=int(r["node"]),
        run=str(r["run"]),
        server_round=int(r["round"]),
        threshold=int(r["threshold"]),
        mask_key=r["mask-key"],
        mask_public=r["mask-public"],
        seal_key=r["seal-key"],
        seal_public=r["seal-public"],
        stage=str(r["stage"]),
        seed=r["seed"],
        peers=dict(
            zip(r.get("peer-nodes", []), zip(r.get("peer-mask", []), r.get("peer-seal", []), strict=True), strict=True)
        ),
        seed_shares=dict(zip(r.get("seed-share-nodes", []), r.get("seed-shares", []), strict=True)),
        key_shares=dict(zip(r.get("key-share-nodes", []), r.get("key-shares", []), strict=True)),
        masked_with=list(r.get("masked-with", [])),
    )
