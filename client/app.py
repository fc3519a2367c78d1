"""fedtune ClientApp: train and evaluate the LoRA adapter on this node's private data.

The run's settings arrive with every message (the server parses the run config once);
where this node's data lives comes from its node config: `partition-id` and
`num-partitions` in simulation, `data-path` (and optional column settings) in deployment.
Only the adapter and aggregate metrics leave the node; with secure aggregation, only a masked
vector (client/secagg.py).

The server's first message to a node is a query (who are you, how much data); it is
answered without loading the model. Train and evaluate messages run client/training.py,
which loads torch, transformers and PEFT: in deployment a SuperNode starts a ClientApp
process for every message, and those libraries cost several seconds of CPU to import. A node
started by `fedtune supernode` therefore runs every message in its warm worker (client/warm.py),
which keeps them imported and the model and data loaded: the `warm_path` mod hands it the message.
"""

from __future__ import annotations

import os

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from client import warm
from client.messages import message_config, node_data
from common.flower import KEY_CLIPPING_NORM
from common.records import REVEAL_CANARIES
from common.secagg import ACTIONS


def warm_path(msg: Message, context: Context, call_next) -> Message:
    """On a node started by `fedtune supernode`, run the message in the node's warm worker; elsewhere
    (simulation, `--cold`, inside the worker itself) run it here."""
    path = os.environ.get(warm.WARM_SOCKET_ENV)
    if not path or warm.IN_WORKER:
        return call_next(msg, context)
    return warm.forward(path, msg, context, call_next)


def client_side_clipping(msg: Message, context: Context, call_next) -> Message:
    """Flower's fixedclipping_mod, on train messages of a run with dp-client = client-fixed.

    Its wrapper sends a clipping norm; the mod clips this client's update to it before the
    reply leaves the node. Other messages carry no norm and pass untouched.
    """
    if msg.metadata.message_type == MessageType.TRAIN and KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[warm_path, client_side_clipping])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say who this client is and what its data looks like (sizes and label counts only); after the
    last round, asked to, reveal its canaries' seed (dp-audit-canaries, common/canaries.py)."""
    cfg, _ = message_config(msg)
    data = node_data(cfg, context)
    if REVEAL_CANARIES in msg.content.config_records:
        return Message(content=RecordDict({REVEAL_CANARIES: revealed(cfg, context, data.client_id)}), reply_to=msg)
    summary = data.summary()
    record = ConfigRecord(
        {
            "client-id": data.client_id,
            "train-examples": summary["train_examples"],
            "val-examples": summary["val_examples"],
            "label-names": list(summary["label_histogram"].keys()) or [""],
            "label-counts": list(summary["label_histogram"].values()) or [0],
        }
    )
    return Message(content=RecordDict({"client": record}), reply_to=msg)


def revealed(cfg, context: Context, client_id: str) -> ConfigRecord:
    from client.privacy import run_canaries

    canaries = run_canaries(cfg, dict(context.node_config), client_id)
    if canaries is None:
        return ConfigRecord({"client-id": client_id, "count": 0})
    return ConfigRecord({"client-id": client_id, "seed": canaries.seed, "count": canaries.count})


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    from client.training import train_reply

    return train_reply(msg, context)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    from client.training import evaluate_reply

    return evaluate_reply(msg, context)


# Secure aggregation (common/secagg.py): one train action per SecAgg+ stage.
@app.train(ACTIONS["keys"])
def secagg_keys(msg: Message, context: Context) -> Message:
    from client.secagg import keys_reply

    return keys_reply(msg, context)


@app.train(ACTIONS["shares"])
def secagg_shares(msg: Message, context: Context) -> Message:
    from client.secagg import shares_reply

    return shares_reply(msg, context)


@app.train(ACTIONS["masked"])
def secagg_masked(msg: Message, context: Context) -> Message:
    from client.secagg import masked_reply

    return masked_reply(msg, context)


@app.train(ACTIONS["unmask"])
def secagg_unmask(msg: Message, context: Context) -> Message:
    from client.secagg import unmask_reply

    return unmask_reply(msg, context)
