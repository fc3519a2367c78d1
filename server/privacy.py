"""The server's side of privacy: client-level DP wrappers and the run's privacy ledger.

Sample-level DP runs on the clients; each trained reply describes its mechanism and its
client's cumulative epsilon, and the server appends that to the ledger. Client-level DP
wraps the configured strategy in Flower's DP wrappers; the federation's epsilon is
accounted here for the sampling that really happens (a fixed number of clients drawn
without replacement: RDP with replace-one neighbours).

Failed-client policy for client-level DP (recorded in every federation entry): the
wrappers average the k' accepted, clipped updates and add noise of std z*C/k for the k
sampled clients, so the noise multiplier that protects the release is z*k'/k; that
effective value is what is accounted.
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import strategy as fl

from common.config import FedtuneConfig
from common.fields import as_int, as_list, as_str
from common.ledger import Ledger
from common.privacy import SKELLAM, WITHOUT_REPLACEMENT, Mechanism, epsilon_rdp
from common.privacy_plan import batch_alternatives, plan_for_config, suggested

FAILED_CLIENT_POLICY = "effective noise multiplier z*k'/k for k' accepted of k sampled"
ADAPTIVE_QUANTILE = 0.5


def wrap_client_dp(cfg: FedtuneConfig, strategy, num_sampled: int):
    """Flower's client-level DP wrapper around the strategy, or the strategy itself when off."""
    if cfg.dp_client == "off":
        return strategy
    args: dict[str, Any] = dict(noise_multiplier=cfg.dp_client_noise_multiplier, num_sampled_clients=num_sampled)
    if cfg.dp_client == "server-fixed":
        return fl.DifferentialPrivacyServerSideFixedClipping(
            strategy, clipping_norm=cfg.dp_client_clipping_norm, **args
        )
    if cfg.dp_client == "client-fixed":
        return fl.DifferentialPrivacyClientSideFixedClipping(
            strategy, clipping_norm=cfg.dp_client_clipping_norm, **args
        )
    # Andrew et al. 2021 (https://arxiv.org/abs/1905.03871): the clipped-count noise must exceed
    # z/2 for the update noise to stay real; their default k/20 is too small for few clients.
    return fl.DifferentialPrivacyServerSideAdaptiveClipping(
        strategy,
        initial_clipping_norm=cfg.dp_client_clipping_norm,
        target_clipped_quantile=ADAPTIVE_QUANTILE,
        clipped_count_stddev=max(num_sampled / 20, cfg.dp_client_noise_multiplier),
        **args,
    )


def check_sample_level_plan(
    cfg: FedtuneConfig, declared: dict[int, int], *, trainable: int, connected: int
) -> list[str]:
    """Before round 1: log the DP-SGD plan of the smallest client (the noisiest: its batch is the
    smallest), and warn, without refusing, when it cannot learn or wastes budget, with a batch
    size that fixes it. Returns the problems found."""
    sizes = [n for n in declared.values() if n > 0]  # a node without training data trains nothing
    if not cfg.dp_sample or cfg.dp_mode != "local" or not sizes:
        return []
    examples = min(sizes)
    plan = plan_for_config(cfg, examples, trainable=trainable, clients_per_round=cfg.train_sample_size(connected))
    log(
        INFO,
        "fedtune: DP-SGD on the smallest client (%d examples): expected batch %.0f, rate %.4f, %d steps a "
        "round, noise multiplier %.3f, noise per coordinate %.2g, noise/signal %.2f (%.2f averaged over %d clients)",
        examples,
        plan.expected_batch,
        plan.sample_rate,
        plan.steps_per_round,
        plan.noise_multiplier,
        plan.noise_std,
        plan.noise_to_signal,
        plan.averaged_noise_to_signal,
        plan.clients_per_round,
    )
    problems = plan.problems()
    if problems and cfg.dp_noise_multiplier == 0:
        better = suggested(
            batch_alternatives(
                plan,
                target_epsilon=cfg.dp_target_epsilon,
                delta=cfg.dp_delta,
                local_epochs=cfg.local_epochs,
                local_steps=cfg.local_steps,
            )
        )
        hint = (
            f"try dp-batch-size = {better.batch_size} (noise multiplier {better.noise_multiplier:.3f}, "
            f"noise/signal {better.averaged_noise_to_signal:.2f} averaged)"
            if better
            else "no batch size fixes it at this target: raise dp-target-epsilon, add clients or data, "
            "or train fewer rounds"
        )
        problems = [*problems, hint]
    for problem in problems:
        log(WARNING, "fedtune: DP-SGD settings: %s", problem)
    return problems


def client_entries(
    server_round: int, trained: list[tuple[str, Message]], refused: list[tuple[str, Message]], failed: list[str]
) -> list[dict]:
    """One ledger entry per sampled client under sample-level DP."""
    entries = []
    for client_id, reply in trained:  # records checked by server/replies.privacy_problem
        p = reply.content.config_records["privacy"]
        kinds = as_list(p, "history-kind", str, empty_if_absent=True)
        history: list[dict] = [
            {"noise_multiplier": z, "sample_rate": q, "steps": s}
            for z, q, s in zip(
                as_list(p, "history-noise", float),
                as_list(p, "history-rate", float),
                as_list(p, "history-steps", int),
                strict=True,
            )
        ]
        if SKELLAM in kinds:  # distributed DP steps in the history: their noise and sensitivity
            l2s, l1s = as_list(p, "history-l2", float), as_list(p, "history-l1", float)
            for h, kind, l2, l1 in zip(history, kinds, l2s, l1s, strict=True):
                if kind == SKELLAM:
                    h.update(noise=kind, l2_sensitivity=l2, l1_sensitivity=l1)
        skellam = p.get("noise") == SKELLAM
        entries.append(
            {
                "round": server_round,
                "kind": "client",
                "client_id": client_id,
                "status": "trained",
                "fingerprint": p["fingerprint"],
                "noise_multiplier": p["noise-multiplier"],
                "clipping_norm": p["clipping-norm"],
                "sample_rate": p["sample-rate"],
                "steps": as_int(p, "steps"),
                **(
                    {"noise": SKELLAM, "l2_sensitivity": p["l2-sensitivity"], "l1_sensitivity": p["l1-sensitivity"]}
                    if skellam
                    else {}
                ),
                "epsilon": p["epsilon"],
                "epsilon_rdp": p["epsilon-rdp"],
                "delta": p["delta"],
                "accountant": p["accountant"],
                "epsilon_budget": p["epsilon-budget"],
                "history": history,
            }
        )
    for client_id, reply in refused:
        p = reply.content.config_records["privacy"]
        entries.append(
            {
                "round": server_round,
                "kind": "client",
                "client_id": client_id,
                "status": "refused",
                "reason": as_str(p, "status"),
                "fingerprint": p["fingerprint"],
                "epsilon": p["epsilon-spent"],
                "epsilon_projected": p["epsilon-projected"],
                "epsilon_budget": p["epsilon-budget"],
                "delta": p["delta"],
            }
        )
    for client_id in failed:
        entries.append(
            {
                "round": server_round,
                "kind": "client",
                "client_id": client_id,
                "status": "failed",
                "reason": "no reply, an error reply or an unreadable privacy record; spend unknown to the server",
            }
        )
    return entries


def federation_entry(
    ledger: Ledger,
    cfg: FedtuneConfig,
    *,
    server_round: int,
    population: int,
    sampled: int,
    accepted: int,
    clipping_norm: float,
    noise_denominator: int,
) -> dict:
    """Account one client-level DP release (or none, when nothing was aggregated).

    The wrappers add noise of std z*C/noise_denominator to the mean of `accepted` clipped
    updates (sensitivity C/accepted): the effective multiplier is z*accepted/noise_denominator.
    """
    z_eff = cfg.dp_client_noise_multiplier * accepted / noise_denominator
    history = [
        Mechanism.from_dict(e["mechanism"])
        for e in ledger.entries
        if e.get("kind") == "federation" and e.get("mechanism")
    ]
    mechanism = None
    if accepted > 0:
        mechanism = Mechanism(
            noise_multiplier=z_eff, steps=1, sampling=WITHOUT_REPLACEMENT, population=population, sample_size=sampled
        )
        history.append(mechanism)
    eps = epsilon_rdp(history, delta=cfg.dp_delta)
    return {
        "round": server_round,
        "kind": "federation",
        "mode": cfg.dp_client,
        "noise_multiplier": cfg.dp_client_noise_multiplier,
        "effective_noise_multiplier": z_eff,
        "clipping_norm": clipping_norm,
        "population": population,
        "sampled": sampled,
        "accepted": accepted,
        "sampling": WITHOUT_REPLACEMENT,
        "mechanism": mechanism.to_dict() if mechanism else None,
        "epsilon": eps,
        "delta": cfg.dp_delta,
        "accountant": "rdp",
        "neighbouring": "replace-one client",
        "epsilon_budget": cfg.dp_client_epsilon_budget,
        "failed_client_policy": FAILED_CLIENT_POLICY,
    }


def federation_would_exceed(ledger: Ledger, cfg: FedtuneConfig, *, population: int, sampled: int) -> float | None:
    """The projected federation epsilon if the next full release would exceed the budget, else None."""
    if cfg.dp_client == "off" or cfg.dp_client_epsilon_budget <= 0 or sampled == 0:
        return None
    history = [
        Mechanism.from_dict(e["mechanism"])
        for e in ledger.entries
        if e.get("kind") == "federation" and e.get("mechanism")
    ]
    history.append(
        Mechanism(
            noise_multiplier=cfg.dp_client_noise_multiplier,
            steps=1,
            sampling=WITHOUT_REPLACEMENT,
            population=population,
            sample_size=sampled,
        )
    )
    projected = epsilon_rdp(history, delta=cfg.dp_delta)
    return projected if projected > cfg.dp_client_epsilon_budget else None
