"""What the ClientApp's handlers share: the run config and round a message carries, this node's
data, and the record that says who replies (client/app.py and client/training.py use them)."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message

from common.config import FedtuneConfig, parse_run_config
from common.errors import ConfigError
from common.federation_data import ClientData, deployed_client_data, simulated_client_data
from common.flower import KEY_CLIPPING_NORM
from common.records import FROZEN_KEY

# Set by `fedtune simulate` for its client processes: a folder for the live progress display
# (simulation/progress.py) to read, or "1" to keep per-step lines out of the log (--quiet).
PROGRESS_DIR_ENV, QUIET_ENV = "FEDTUNE_PROGRESS_DIR", "FEDTUNE_QUIET"
TRANSPORT_KEYS = ("server-round", KEY_CLIPPING_NORM, FROZEN_KEY)  # added by Flower, its DP wrappers and the server


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


def node_threads(node_config) -> int:
    """The node config's num-threads (0 when absent): torch threads for this node's training."""
    value = node_config.get("num-threads", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"num-threads (node config): expected an integer >= 0, got {value!r}")
    return value


def node_device(node_config, cfg: FedtuneConfig):
    """This node's torch device: its node config's `device`, else the run's (common/device.py)."""
    from common.device import resolve_device  # torch: only the train and evaluate handlers call this

    if "device" in node_config:
        return resolve_device(str(node_config["device"]), where="device (node config)")
    return resolve_device(cfg.device)


def client_record(data: ClientData, server_round: int = 0) -> ConfigRecord:
    """Who replies, and to which round (the server rejects replies tagged with another round)."""
    return ConfigRecord({"client-id": data.client_id, "round": server_round})
