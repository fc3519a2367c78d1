"""Client-side DP: plan this round's mechanism, enforce the client's own budget, run DP-SGD.

The noise multiplier is either given or calibrated once, up front, so that the planned
rounds (this client taking part in every one, the worst case) meet the target epsilon.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord

from common.budget import PrivacyRecord, data_fingerprint, node_secret, privacy_dir, private_seed
from common.canaries import Canaries
from common.config import FedtuneConfig
from common.errors import ConfigError
from common.privacy import Mechanism
from common.privacy_plan import dp_batch_size, plan_for_config

BUDGET_EXHAUSTED = "budget-exhausted"
TRAINED = "trained"

if TYPE_CHECKING:
    from common.train import TrainResult


@functools.lru_cache(maxsize=64)
def planned_mechanism(cfg: FedtuneConfig, num_examples: int) -> Mechanism:
    """This client's DP-SGD mechanism for one round, as `common.privacy_plan` plans it: the batch, rate
    and steps, and the noise multiplier given or calibrated for the target over all planned rounds."""
    plan = plan_for_config(cfg, num_examples, trainable=0, clients_per_round=1)  # d and K only judge the plan
    return Mechanism(noise_multiplier=plan.noise_multiplier, steps=plan.steps_per_round, sample_rate=plan.sample_rate)


@dataclass
class Decision:
    """Whether this client trains this round, and the record that decided it."""

    record: PrivacyRecord
    planned: Mechanism
    budget: float
    projected: float

    @property
    def allowed(self) -> bool:
        return self.budget <= 0 or self.projected <= self.budget

    def refusal(self) -> ConfigRecord:
        return ConfigRecord(
            {
                "status": BUDGET_EXHAUSTED,
                "epsilon-spent": self.record.spent(),
                "epsilon-projected": self.projected,
                "epsilon-budget": self.budget,
                "delta": self.record.delta,
                "fingerprint": self.record.fingerprint,
            }
        )


def decide(cfg: FedtuneConfig, train_set, node_config: dict, *, planned: Mechanism | None = None) -> Decision:
    """Open this client's record and check the planned round (this client's own DP-SGD plan, or the
    distributed mechanism the server announced) against its budget.

    The budget is the tighter of the server's (dp-epsilon-budget / dp-target-epsilon) and
    the node's own `epsilon-budget`: a client never accepts a looser limit from the server.
    """
    record = PrivacyRecord.open(privacy_dir(node_config), data_fingerprint(train_set), delta=cfg.dp_delta)
    planned = planned or planned_mechanism(cfg, len(train_set))
    budgets = [b for b in (cfg.sample_epsilon_budget, float(node_config.get("epsilon-budget", 0.0))) if b > 0]
    budget = min(budgets) if budgets else 0.0
    return Decision(record=record, planned=planned, budget=budget, projected=record.projected(planned))


# Run-config keys that do not change what a client computes: left out of the seed, so that a resumed
# run (resume, run-dir) or one with another time-out repeats its randomness exactly.
BOOKKEEPING_KEYS = ("resume", "run-dir", "round-timeout", "best-metric", "early-stopping-rounds")


def seeded_config(cfg: FedtuneConfig) -> bytes:
    """The run config less BOOKKEEPING_KEYS, as canonical JSON: the same for a run and its resumption."""
    import json

    config = {k: v for k, v in cfg.to_run_config().items() if k not in BOOKKEEPING_KEYS}
    return json.dumps(config, sort_keys=True).encode()


def run_canaries(cfg: FedtuneConfig, node_config: dict, client_id: str) -> Canaries | None:
    """This client's gradient canaries for the run (dp-audit-canaries; common/canaries.py): keyed by the
    node's secret, so the server learns them only when the client reveals the seed after the last round,
    and by the run config, so a resumed run keeps them."""
    if not cfg.dp_audit_canaries:
        return None
    import hashlib

    run = hashlib.sha256(seeded_config(cfg)).hexdigest()
    seed = private_seed(node_secret(privacy_dir(node_config)), "canaries", client_id, run)
    return Canaries(seed=seed, count=cfg.dp_audit_canaries)


def dp_seed(node_config: dict, cfg: FedtuneConfig, server_round: int, client_id: str, arrays, *records) -> int:
    """The seed of this round's DP randomness (Poisson sample, noise, rounding): keyed by this node's
    secret (common/budget.py) and bound to everything the round computes from: the run config (less
    BOOKKEEPING_KEYS), the global adapter and any `records` the server announced (distributed DP's
    rate, noise and scale). The same input repeats its output exactly; any other gets fresh randomness,
    so two releases never share a noise draw."""
    import hashlib
    import json

    digest = hashlib.sha256(seeded_config(cfg))
    for name in sorted(arrays.keys()):
        digest.update(name.encode())
        digest.update(arrays[name].numpy().tobytes())
    for record in records:
        digest.update(json.dumps(dict(record), sort_keys=True).encode())
    return private_seed(node_secret(privacy_dir(node_config)), "dp", server_round, client_id, digest.hexdigest())


def train_private(
    decision: Decision,
    cfg: FedtuneConfig,
    model,
    encoded,
    *,
    pad_id: int,
    seed: int,
    run: str,
    server_round: int,
    progress,
    canaries: Canaries | None = None,
) -> tuple[TrainResult, ConfigRecord]:
    """Run DP-SGD (with this client's canaries, if any), record the mechanism on disk, and describe it
    for the server's ledger."""
    from common.dp_train import dp_train  # Opacus loads only in runs with sample-level DP
    from common.train import round_schedule  # torch: not for the secure rounds' key and share stages

    result, mechanism = dp_train(
        model,
        encoded,
        pad_id=pad_id,
        steps=decision.planned.steps,
        batch_size=dp_batch_size(cfg.dp_batch_size, len(encoded)),
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        noise_multiplier=decision.planned.noise_multiplier,
        clipping_norm=cfg.dp_clipping_norm,
        seed=seed,
        progress=progress,
        physical_batch_size=cfg.dp_physical_batch_size,
        lr_at=round_schedule(cfg, server_round),
        compute_dtype=cfg.compute_dtype,
        canaries=canaries,
        server_round=server_round,
    )
    if not math.isclose(mechanism.sample_rate, decision.planned.sample_rate):
        raise RuntimeError(
            f"DP sample rate: planned {decision.planned.sample_rate}, loader used {mechanism.sample_rate}"
        )
    return result, spend(decision, mechanism, cfg.dp_clipping_norm, run=run, server_round=server_round)


def spend(
    decision: Decision, mechanism: Mechanism, clipping_norm: float, *, run: str, server_round: int
) -> ConfigRecord:
    """Record a mechanism that ran in this client's own record (before anything leaves the node) and
    describe it, with the client's whole history, for the server's ledger."""
    entry = decision.record.append(run=run, server_round=server_round, mechanism=mechanism, clipping_norm=clipping_norm)
    history = decision.record.mechanisms()
    return ConfigRecord(
        {
            "status": TRAINED,
            "fingerprint": decision.record.fingerprint,
            "noise-multiplier": mechanism.noise_multiplier,
            "sample-rate": mechanism.sample_rate,
            "steps": mechanism.steps,
            "clipping-norm": clipping_norm,
            "noise": mechanism.noise,
            "l2-sensitivity": mechanism.l2_sensitivity,
            "l1-sensitivity": mechanism.l1_sensitivity,
            "epsilon": entry["epsilon"],
            "epsilon-rdp": entry["epsilon_rdp"],
            "accountant": entry["accountant"],
            "delta": decision.record.delta,
            "epsilon-budget": decision.budget,
            "history-noise": [m.noise_multiplier for m in history],
            "history-rate": [m.sample_rate for m in history],
            "history-steps": [m.steps for m in history],
            "history-kind": [m.noise for m in history],
            "history-l2": [m.l2_sensitivity for m in history],
            "history-l1": [m.l1_sensitivity for m in history],
        }
    )


def distributed_mechanism(cfg: FedtuneConfig, announced, data) -> Mechanism:
    """The distributed DP-SGD step the server announced for this round (sample rate, noise
    multiplier, integer scale, dimension), checked, as the Skellam mechanism that protects this
    client's records; the client accounts it in its own record as any other."""
    from common.privacy import SKELLAM
    from common.skellam import sensitivities

    values = {k: announced.get(k) for k in ("sample-rate", "noise-multiplier", "scale", "dimension")}
    bad = {
        k: v
        for k, v in values.items()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
    }
    if bad or values["sample-rate"] > 1:
        raise ConfigError(
            f"distributed DP: expected a sample rate in (0, 1] and a positive noise multiplier, "
            f"scale and dimension from the server, got {values}"
        )
    l2, l1 = sensitivities(
        scale=float(values["scale"]), clipping_norm=cfg.dp_clipping_norm, dimension=int(values["dimension"])
    )
    return Mechanism(
        noise_multiplier=float(values["noise-multiplier"]),
        steps=1,
        sample_rate=float(values["sample-rate"]),
        noise=SKELLAM,
        l2_sensitivity=l2,
        l1_sensitivity=l1,
    )
