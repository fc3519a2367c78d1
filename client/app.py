"""fedtune ClientApp: train and evaluate the LoRA adapter on this node's private data.

The run's settings arrive with every message (the server parses the run config once);
where this node's data lives comes from its node config: `partition-id` and
`num-partitions` in simulation, `data-path` (and optional column settings) in deployment.
Only the adapter and aggregate metrics leave the node.

The server's first message to a node is a query (who are you, how much data); it is
answered without loading the model. Train and evaluate messages run client/training.py,
which loads torch, transformers and PEFT: in deployment a SuperNode starts a ClientApp
process for every message, and those libraries cost several seconds of CPU to import.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.config import FedtuneConfig, parse_run_config
from common.errors import ConfigError
from common.federation_data import ClientData, deployed_client_data, simulated_client_data
from common.records import FROZEN_KEY

TRANSPORT_KEYS = ("server-round", KEY_CLIPPING_NORM, FROZEN_KEY)  # added by Flower, its DP wrappers and the server
OPTIMIZER_KEY = "fedtune.optimizer"  # keep-optimizer-state: this node's AdamW moments, in its Context state


def client_side_clipping(msg: Message, context: Context, call_next) -> Message:
    """Flower's fixedclipping_mod, on train messages of a run with dp-client = client-fixed.

    Its wrapper sends a clipping norm; the mod clips this client's update to it before the
    reply leaves the node. Other messages carry no norm and pass untouched.
    """
    if msg.metadata.message_type == MessageType.TRAIN and KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[client_side_clipping])


def message_config(msg: Message) -> tuple[FedtuneConfig, int]:
    """The run config and round the server sent with this message."""
    raw = dict(msg.content["config"])
    return parse_run_config(raw, ignore=TRANSPORT_KEYS), int(raw.get("server-round", 0))


def node_data(cfg: FedtuneConfig, context: Context) -> ClientData:
    node = context.node_config
    if "data-path" in node:
        return deployed_client_data(cfg, node)
    if "partition-id" in node and "num-partitions" in node:
        return simulated_client_data(cfg, int(node["partition-id"]), int(node["num-partitions"]))
    raise ConfigError(
        f"node config: expected 'data-path' (deployment) or 'partition-id' and 'num-partitions' "
        f"(simulation), got keys {sorted(node)}"
    )


def client_record(data: ClientData, server_round: int = 0) -> ConfigRecord:
    """Who replies, and to which round (the server rejects replies tagged with another round)."""
    return ConfigRecord({"client-id": data.client_id, "round": server_round})


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say who this client is and what its data looks like (sizes and label counts only)."""
    cfg, _ = message_config(msg)
    data = node_data(cfg, context)
    summary = data.summary()
    record = ConfigRecord({
        "client-id": data.client_id,
        "train-examples": summary["train_examples"],
        "val-examples": summary["val_examples"],
        "label-names": list(summary["label_histogram"].keys()) or [""],
        "label-counts": list(summary["label_histogram"].values()) or [0],
    })
    return Message(content=RecordDict({"client": record}), reply_to=msg)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    from client.training import train_reply

    return train_reply(msg, context)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    from client.training import evaluate_reply

    return evaluate_reply(msg, context)
