"""Build the configured Flower strategy; fedtune drives its configure/aggregate hooks."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import strategy as fl

from common.config import FedtuneConfig
from common.records import state_to_record
from server.validation import WEIGHT_KEY  # the averaging weight the validation wrapper has checked
# Attributes of Flower's strategies that carry state from one round to the next.
STATEFUL_ATTRS = ("current_arrays", "momentum_vector", "m_t", "v_t", "clipping_norm")


def robust_capacity_problem(cfg: FedtuneConfig, sampled: int) -> str | None:
    """Why the robust strategy cannot tolerate num-malicious-clients among `sampled` updates a round
    (Krum and Multi-Krum need n >= 2f + 3, Blanchard et al. 2017; Bulyan n >= 4f + 3, El Mhamdi et
    al. 2018), or None."""
    f = cfg.num_malicious_clients
    need = {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(cfg.strategy)
    if need is None or sampled >= need:
        return None
    return (f"strategy {cfg.strategy} with num-malicious-clients = {f}: expected at least {need} clients sampled a "
            f"round, got {sampled}; lower num-malicious-clients or sample more clients")


def build_strategy(cfg: FedtuneConfig) -> fl.FedAvg:
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_clients,
        min_evaluate_nodes=cfg.min_evaluate_clients if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_available_clients,
        weighted_by_key=WEIGHT_KEY,
    )
    opt = dict(eta=cfg.server_learning_rate, eta_l=cfg.learning_rate, tau=cfg.tau)
    if cfg.strategy == "fedavg":
        return fl.FedAvg(**common)
    if cfg.strategy == "fedprox":
        return fl.FedProx(**common, proximal_mu=cfg.proximal_mu)
    if cfg.strategy == "fedavgm":
        return fl.FedAvgM(**common, server_learning_rate=cfg.fedavgm_learning_rate,
                           server_momentum=cfg.server_momentum)
    if cfg.strategy == "fedadam":
        return fl.FedAdam(**common, **opt, beta_1=cfg.beta_1, beta_2=cfg.beta_2)
    if cfg.strategy == "fedyogi":
        return fl.FedYogi(**common, **opt, beta_1=cfg.beta_1, beta_2=cfg.beta_2)
    if cfg.strategy == "fedadagrad":
        return fl.FedAdagrad(**common, **opt)
    if cfg.strategy == "krum":
        return fl.Krum(**common, num_malicious_nodes=cfg.num_malicious_clients)
    if cfg.strategy == "multikrum":
        return fl.MultiKrum(**common, num_malicious_nodes=cfg.num_malicious_clients,
                            num_nodes_to_select=cfg.multikrum_select)
    if cfg.strategy == "bulyan":
        return fl.Bulyan(**common, num_malicious_nodes=cfg.num_malicious_clients)
    if cfg.strategy == "fedmedian":
        return fl.FedMedian(**common)
    if cfg.strategy == "fedtrimmedavg":
        return fl.FedTrimmedAvg(**common, beta=cfg.trimmed_beta)
    raise ValueError(f"strategy: unexpected {cfg.strategy!r}")  # parse_run_config prevents this


def _chain(strategy):
    """The strategy and the ones it wraps (Flower's DP wrappers keep theirs in `.strategy`)."""
    depth = 0
    while strategy is not None:
        yield f"s{depth}", strategy
        strategy, depth = getattr(strategy, "strategy", None), depth + 1


def strategy_state(strategy) -> dict[str, np.ndarray]:
    """Flatten the round-to-round state of the strategy chain into named arrays for a checkpoint."""
    out: dict[str, np.ndarray] = {}
    for level, s in _chain(strategy):
        for attr in STATEFUL_ATTRS:
            value = getattr(s, attr, None)
            if value is None:
                continue
            if isinstance(value, ArrayRecord):
                value, kind = {k: v.numpy() for k, v in value.items()}, "record"
            elif isinstance(value, dict):
                kind = "dict"
            elif isinstance(value, (int, float)):
                value, kind = {"value": np.float64(value)}, "scalar"
            else:
                value, kind = {str(i): v for i, v in enumerate(value)}, "list"
            for key, array in value.items():
                out[f"{level}|{attr}|{kind}|{key}"] = np.asarray(array)
    return out


def load_strategy_state(strategy, arrays: dict[str, np.ndarray]) -> None:
    """Inverse of `strategy_state`."""
    levels = dict(_chain(strategy))
    grouped: dict[tuple[str, str, str], dict[str, np.ndarray]] = {}
    for name, array in arrays.items():
        level, attr, kind, key = name.split("|", 3)
        grouped.setdefault((level, attr, kind), {})[key] = array
    for (level, attr, kind), values in grouped.items():
        target = levels[level]
        if kind == "record":
            setattr(target, attr, state_to_record(values))
        elif kind == "dict":
            setattr(target, attr, values)
        elif kind == "scalar":
            setattr(target, attr, float(values["value"]))
        else:
            setattr(target, attr, [values[str(i)] for i in range(len(values))])
