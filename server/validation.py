"""Validated updates: a wrapper that checks every training reply before any strategy sees it.

Flower's averaging trusts its clients: a malformed reply fails the whole run, shapes,
dtypes and finiteness are never checked, and the weight is whatever the client reports.
`ValidatedStrategy` wraps whichever strategy is configured (and Flower's DP wrappers,
so their clipping never meets a NaN or zero-norm update). Each failing reply is rejected
with a reason code and logged; the rest are passed on to be aggregated exactly as the inner
strategy would, with the weight set by the server's policy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.errors import AdapterMismatchError
from common.fields import as_float
from common.model import check_adapter_state
from common.records import TRAIN_METRICS, record_to_state

WEIGHT_KEY = "num-examples"


@dataclass
class Policy:
    """What the server accepts; built once from the run config."""

    max_update_norm: float = 0.0  # 0 = off
    max_norm_factor: float = 10.0  # x the round's median norm; 0 = off
    uniform_weights: bool = False
    max_client_weight: float = 0.0  # 0 = only the declared-size cap
    reject_zero_norm: bool = False  # needed before Flower's DP clipping


@dataclass
class Verdict:
    reply: Message
    client_id: str
    reason: str | None = None
    norm: float = 0.0
    weight: float = 0.0


# --- pure checks: each returns a reason code, or None when the reply passes -----------------


def check_structure(reply: Message) -> str | None:
    content = reply.content
    if list(content.array_records) != ["arrays"] or list(content.metric_records) != ["metrics"]:
        return "malformed-reply"
    return None


def check_round(reply: Message, server_round: int) -> str | None:
    tag = reply.content.config_records.get("client", ConfigRecord()).get("round")
    return None if tag == server_round else "stale-round"


def check_metrics(metrics: MetricRecord) -> str | None:
    """Exactly the known training metrics, each a finite number (Flower's averaging needs equal keys)."""
    if set(metrics.keys()) != set(TRAIN_METRICS):
        return "bad-metrics"
    values = [metrics[k] for k in TRAIN_METRICS if k != WEIGHT_KEY]
    if any(isinstance(v, (bool, list)) or not math.isfinite(v) for v in values):
        return "bad-metrics"
    return None


def check_weight(value, declared: int | None, cap: float) -> str | None:
    """num-examples must be a positive finite number, no larger than the client declared."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return "bad-weight"
    if declared is not None and value > declared:
        return "bad-weight"
    if cap > 0 and value > cap:
        return "bad-weight"
    return None


def check_arrays(record: ArrayRecord, expected: dict[str, np.ndarray]) -> tuple[dict | None, str | None]:
    """Decode without pickle and compare with the initial adapter's schema."""
    try:
        state = record_to_state(record)
    except Exception:  # noqa: BLE001 - any undecodable payload (object arrays, garbage bytes) is a rejection
        return None, "malformed-arrays"
    try:
        check_adapter_state(expected, state)
    except AdapterMismatchError as err:
        text = str(err)
        return None, "schema-keys" if "keys differ" in text else "schema-dtype" if "dtype" in text else "schema-shape"
    if not all(np.isfinite(a).all() for a in state.values()):
        return None, "non-finite"
    return state, None


def update_norm(state: dict[str, np.ndarray], current: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((state[k].astype(np.float64) - current[k]) ** 2)) for k in current))


def check_norm(norm: float, policy: Policy) -> str | None:
    if policy.max_update_norm > 0 and norm > policy.max_update_norm:
        return "norm-bound"
    if policy.reject_zero_norm and norm == 0.0:
        return "zero-norm-update"
    return None


def flag_outliers(verdicts: list[Verdict], factor: float) -> None:
    """Reject updates whose norm exceeds `factor` x the median of this round's passing updates."""
    passing = [v for v in verdicts if v.reason is None]
    if factor <= 0 or len(passing) < 3:
        return
    median = float(np.median([v.norm for v in passing]))
    for v in passing:
        if median > 0 and v.norm > factor * median:
            v.reason = "norm-outlier"


# --- the wrapper ---------------------------------------------------------------------------


class ValidatedStrategy(Strategy):
    """Validate training replies, then delegate everything to the wrapped strategy."""

    def __init__(
        self,
        strategy: Strategy,
        *,
        initial: dict[str, np.ndarray],
        policy: Policy,
        clients: dict[int, str],
        declared: dict[int, int],
    ) -> None:
        self.strategy = strategy
        self.initial = initial
        self.policy = policy
        self.clients = clients  # node id -> client id (shared with the loop)
        self.declared = declared  # node id -> training examples the client declared when it joined
        self.current: dict[str, np.ndarray] = initial
        self.rejections: list[tuple[str, str]] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.current = record_to_state(arrays)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        verdicts = self.validate(server_round, list(replies))
        self.rejections = [(v.client_id, v.reason) for v in verdicts if v.reason]
        for client_id, reason in self.rejections:
            log(WARNING, "fedtune: rejected the update of %s in round %d: %s", client_id, server_round, reason)
        accepted = [v for v in verdicts if v.reason is None]
        if not accepted:
            return None, None
        for v in accepted:
            v.reply.content.metric_records["metrics"][WEIGHT_KEY] = v.weight
        return self.strategy.aggregate_train(server_round, [v.reply for v in accepted])

    def validate(self, server_round: int, replies: list[Message]) -> list[Verdict]:
        verdicts, seen = [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            v = Verdict(reply=reply, client_id=self.clients.get(node, f"node-{node}"))
            v.reason = "duplicate-node" if node in seen else None
            seen.add(node)
            v.reason = v.reason or check_structure(reply) or check_round(reply, server_round)
            v.reason = v.reason or check_metrics(reply.content.metric_records["metrics"])
            if v.reason is None:
                metrics = reply.content.metric_records["metrics"]
                v.reason = check_weight(metrics.get(WEIGHT_KEY), self.declared.get(node), self.policy.max_client_weight)
            if v.reason is None:
                v.weight = 1.0 if self.policy.uniform_weights else as_float(metrics, WEIGHT_KEY)
            if v.reason is None:
                state, v.reason = check_arrays(reply.content.array_records["arrays"], self.initial)
                if state is not None:
                    v.norm = update_norm(state, self.current)
                    v.reason = check_norm(v.norm, self.policy)
            verdicts.append(v)
        flag_outliers(verdicts, self.policy.max_norm_factor)
        return verdicts

    # Everything else is the wrapped strategy's business.
    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
