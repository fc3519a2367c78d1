"""What the ClientApp's handlers share: the run config and round a message carries, this node's
data, and the record that says who replies (client/app.py and client/training.py use them)."""

from __future__ import annotations

import functools
import math
import os

from flwr.app import ConfigRecord, Context, Message

from common.config import DEVICE_SPEC, FedtuneConfig, parse_run_config
from common.data import forget_read_files
from common.errors import ConfigError
from common.federation_data import ClientData, deployed_client_data, simulated_client_data
from common.fields import as_int
from common.flower import KEY_CLIPPING_NORM
from common.records import FROZEN_KEY
from common.task import DATA_KEYS

# Set by `fedtune simulate` for its client processes: a folder for the live progress display
# (simulation/progress.py) to read, or "1" to keep per-step lines out of the log (--quiet).
PROGRESS_DIR_ENV, QUIET_ENV = "FEDTUNE_PROGRESS_DIR", "FEDTUNE_QUIET"
TRANSPORT_KEYS = ("server-round", KEY_CLIPPING_NORM, FROZEN_KEY)  # added by Flower, its DP wrappers and the server


def message_config(msg: Message) -> tuple[FedtuneConfig, int]:
    """The run config and round the server sent with this message."""
    raw = dict(msg.content.config_records["config"])
    return parse_run_config(raw, ignore=TRANSPORT_KEYS), as_int(raw, "server-round") if "server-round" in raw else 0


# What a node config may hold, with the check of each value. A key the node does not know is
# refused by name: a typo (epsilon_budget for epsilon-budget) must not switch a budget off.
def _int_at_least(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low, f"an integer >= {low}"


def _text(v) -> bool:
    return isinstance(v, str) and v.strip() != ""


NODE_KEYS = {
    "partition-id": _int_at_least(0),
    "num-partitions": _int_at_least(1),
    "data-path": (_text, "a file path"),
    "client-id": (_text, "a non-empty name"),
    "privacy-dir": (_text, "a folder path"),
    "num-threads": _int_at_least(0),
    "epsilon-budget": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
        "a finite number >= 0 (0: no budget of the node's own)",
    ),
    "device": (lambda v: isinstance(v, str) and DEVICE_SPEC.match(v) is not None, "auto, cpu, cuda or cuda:N"),
    **{key: (lambda v: isinstance(v, str), "a string") for keys in DATA_KEYS.values() for key in keys},
}


def check_node_config(node) -> dict:
    """Refuse a node config with a key fedtune does not know, or a value of the wrong kind, naming both."""
    unknown = sorted(k for k in node if k not in NODE_KEYS)
    if unknown:
        raise ConfigError(f"node config: unknown key(s) {unknown}; expected some of: {', '.join(NODE_KEYS)}")
    for key, value in node.items():
        ok, expected = NODE_KEYS[key]
        if not ok(value):
            raise ConfigError(f"{key} (node config): expected {expected}, got {value!r}")
    return dict(node)


def node_data(cfg: FedtuneConfig, context: Context) -> ClientData:
    node = check_node_config(context.node_config)
    if "data-path" in node:
        try:
            info = os.stat(str(node["data-path"]))
        except OSError:  # gone or unreadable: the reader's own error names what was expected
            forget_read_files()
            return deployed_client_data(cfg, node)
        stamp = (info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)  # a changed file is read again
        return _deployed(cfg, tuple(sorted(node.items())), stamp)
    if "partition-id" in node and "num-partitions" in node:
        return simulated_client_data(cfg, int(node["partition-id"]), int(node["num-partitions"]))
    raise ConfigError(
        f"node config: expected 'data-path' (deployment) or 'partition-id' and 'num-partitions' "
        f"(simulation), got keys {sorted(node)}"
    )


@functools.lru_cache(maxsize=1)
def _deployed(cfg: FedtuneConfig, node: tuple, stamp: tuple) -> ClientData:
    """The node's file read and split once per run config and file version: a warm worker (client/warm.py)
    serves every message of a run from it; a cold ClientApp process reads it once anyway."""
    del stamp  # only keys the cache
    forget_read_files()  # the file may have changed since a read cached by its path alone
    return deployed_client_data(cfg, dict(node))


def node_data_cache_clear() -> None:
    _deployed.cache_clear()


def node_threads(node_config) -> int:
    """The node config's num-threads (0 when absent): torch threads for this node's training."""
    value = node_config.get("num-threads", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"num-threads (node config): expected an integer >= 0, got {value!r}")
    return value


def client_record(data: ClientData, server_round: int = 0) -> ConfigRecord:
    """Who replies, and to which round (the server rejects replies tagged with another round)."""
    return ConfigRecord({"client-id": data.client_id, "round": server_round})
