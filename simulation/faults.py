"""A fault-injecting ClientApp for robustness experiments: fedtune's ClientApp plus one mod.

    FEDTUNE_FAULTS='{"partition-1": {"kind": "raise", "rounds": [2]}}' \\
        fedtune simulate --client-app simulation.faults:app

Kinds, applied to training messages of the named clients in the listed rounds (all rounds
when "rounds" is absent; under secure aggregation, to the messages of the SecAgg+ stage named by
"stage", "masked" by default: the stage that trains):
- "raise": the ClientApp raises mid-training;
- "hang": it sleeps "seconds" before replying (past the round timeout);
- "nan": it replies with NaN arrays;
- "scale": it multiplies its update by "factor" (100 by default);
- "flip": it sends the sign-flipped update (global - factor * (local - global));
- "exit": the whole client process ends at once (os._exit), as a node that dies mid-round.
With "mark": PATH the fault first writes that file, so a test knows the moment it struck.
Never use it in production: it exists so tests and benchmarks can attack a real federation.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

from client.app import (
    client_side_clipping,
    evaluate_handler,
    query,
    secagg_keys,
    secagg_masked,
    secagg_shares,
    secagg_unmask,
    train_handler,
)
from common.records import record_to_state, state_to_record
from common.secagg import ACTIONS


def _fault_for(msg: Message, context: Context) -> dict | None:
    faults = json.loads(os.environ.get("FEDTUNE_FAULTS", "{}"))
    node = context.node_config
    client_id = f"partition-{node['partition-id']}" if "partition-id" in node else str(node.get("client-id", ""))
    fault = faults.get(client_id)
    server_round = msg.content.config_records["config"].get("server-round", 0)
    if fault and (not fault.get("rounds") or server_round in fault["rounds"]):
        return fault
    return None


def _applies(fault: dict, message_type: str) -> bool:
    if message_type.startswith(f"{MessageType.TRAIN}.secagg_"):  # a secure round's stage
        return message_type == f"{MessageType.TRAIN}.{ACTIONS[fault.get('stage', 'masked')]}"
    return message_type == MessageType.TRAIN


def inject_faults(msg: Message, context: Context, call_next) -> Message:
    fault = _fault_for(msg, context) if msg.metadata.message_type.startswith(MessageType.TRAIN) else None
    if fault is None or not _applies(fault, msg.metadata.message_type):
        return call_next(msg, context)
    kind = fault["kind"]
    if fault.get("mark"):
        Path(fault["mark"]).write_text(msg.metadata.message_type)
    if kind == "raise":
        raise RuntimeError("injected fault: ClientApp raised mid-training")
    if kind == "exit":
        os._exit(1)
    if kind == "hang":
        time.sleep(float(fault.get("seconds", 30)))
        return call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN:
        raise ValueError(f"FEDTUNE_FAULTS: {kind!r} changes an update; a secure round's stages take raise, exit, hang")
    global_state = record_to_state(msg.content.array_records["arrays"])
    reply = call_next(msg, context)
    local = record_to_state(reply.content.array_records["arrays"])
    factor = float(fault.get("factor", 100.0))
    if kind == "nan":
        bad = {k: np.full_like(v, np.nan) for k, v in local.items()}
    elif kind == "scale":
        bad = {k: (global_state[k] + factor * (v - global_state[k])).astype(v.dtype) for k, v in local.items()}
    elif kind == "flip":
        bad = {k: (global_state[k] - factor * (v - global_state[k])).astype(v.dtype) for k, v in local.items()}
    else:
        raise ValueError(f"FEDTUNE_FAULTS: unknown kind {kind!r}")
    reply.content["arrays"] = state_to_record(bad)
    return reply


app = ClientApp(mods=[inject_faults, client_side_clipping])
app.train()(train_handler)
app.evaluate()(evaluate_handler)
app.query()(query)
for _stage, _handler in zip(
    ("keys", "shares", "masked", "unmask"), (secagg_keys, secagg_shares, secagg_masked, secagg_unmask), strict=True
):
    app.train(ACTIONS[_stage])(_handler)
