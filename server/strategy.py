"""Build the configured Flower strategy; fedtune drives its configure/aggregate hooks."""

from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as fl

from common.config import FedtuneConfig
from server.validation import WEIGHT_KEY  # the averaging weight the validation wrapper has checked


def robust_capacity_problem(cfg: FedtuneConfig, sampled: int) -> str | None:
    """Why the robust strategy cannot tolerate num-malicious-clients among `sampled` updates a round
    (Krum and Multi-Krum need n >= 2f + 3, Blanchard et al. 2017; Bulyan n >= 4f + 3, El Mhamdi et
    al. 2018), or None."""
    f = cfg.num_malicious_clients
    need = {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(cfg.strategy)
    if need is None or sampled >= need:
        return None
    return (
        f"strategy {cfg.strategy} with num-malicious-clients = {f}: expected at least {need} clients sampled a "
        f"round, got {sampled}; lower num-malicious-clients or sample more clients"
    )


def build_strategy(cfg: FedtuneConfig) -> fl.FedAvg:
    common: dict[str, Any] = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_clients,
        min_evaluate_nodes=cfg.min_evaluate_clients if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_available_clients,
        weighted_by_key=WEIGHT_KEY,
    )
    opt: dict[str, Any] = dict(eta=cfg.server_learning_rate, eta_l=cfg.learning_rate, tau=cfg.tau)
    if cfg.strategy == "fedavg":
        return fl.FedAvg(**common)
    if cfg.strategy == "fedprox":
        return fl.FedProx(**common, proximal_mu=cfg.proximal_mu)
    if cfg.strategy == "fedavgm":
        return fl.FedAvgM(**common, server_learning_rate=cfg.fedavgm_learning_rate, server_momentum=cfg.server_momentum)
    if cfg.strategy == "fedadam":
        return fl.FedAdam(**common, **opt, beta_1=cfg.beta_1, beta_2=cfg.beta_2)
    if cfg.strategy == "fedyogi":
        return fl.FedYogi(**common, **opt, beta_1=cfg.beta_1, beta_2=cfg.beta_2)
    if cfg.strategy == "fedadagrad":
        return fl.FedAdagrad(**common, **opt)
    if cfg.strategy == "krum":
        return fl.Krum(**common, num_malicious_nodes=cfg.num_malicious_clients)
    if cfg.strategy == "multikrum":
        return fl.MultiKrum(
            **common, num_malicious_nodes=cfg.num_malicious_clients, num_nodes_to_select=cfg.multikrum_select
        )
    if cfg.strategy == "bulyan":
        return fl.Bulyan(**common, num_malicious_nodes=cfg.num_malicious_clients)
    if cfg.strategy == "fedmedian":
        return fl.FedMedian(**common)
    if cfg.strategy == "fedtrimmedavg":
        return fl.FedTrimmedAvg(**common, beta=cfg.trimmed_beta)
    raise ValueError(f"strategy: unexpected {cfg.strategy!r}")  # parse_run_config prevents this
