"""Client-side DP: plan this round's mechanism, enforce the client's own budget, run DP-SGD.

The noise multiplier is either given or calibrated once, up front, so that the planned
rounds (this client taking part in every one, the worst case) meet the target epsilon.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from flwr.app import ConfigRecord

from common.budget import PrivacyRecord, data_fingerprint, privacy_dir
from common.config import FedtuneConfig
from common.privacy import Mechanism, calibrate_noise
from common.train import round_schedule

BUDGET_EXHAUSTED = "budget-exhausted"
TRAINED = "trained"


def steps_per_round(cfg: FedtuneConfig, num_examples: int) -> int:
    """Logical DP-SGD steps per round: local-steps, or local-epochs passes at the Poisson rate."""
    return cfg.local_steps or cfg.local_epochs * math.ceil(num_examples / cfg.batch_size)


def poisson_rate(cfg: FedtuneConfig, num_examples: int) -> float:
    """The rate Opacus' DPDataLoader uses for a loader of this batch size (1 / len(loader))."""
    return 1.0 / math.ceil(num_examples / cfg.batch_size)


@functools.lru_cache(maxsize=64)
def noise_multiplier(cfg: FedtuneConfig, num_examples: int) -> float:
    if cfg.dp_noise_multiplier > 0:
        return cfg.dp_noise_multiplier
    return calibrate_noise(
        target_epsilon=cfg.dp_target_epsilon, delta=cfg.dp_delta, sample_rate=poisson_rate(cfg, num_examples),
        steps=steps_per_round(cfg, num_examples) * cfg.num_server_rounds,
    )


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
        return ConfigRecord({
            "status": BUDGET_EXHAUSTED, "epsilon-spent": self.record.spent(),
            "epsilon-projected": self.projected, "epsilon-budget": self.budget,
            "delta": self.record.delta, "fingerprint": self.record.fingerprint,
        })


def decide(cfg: FedtuneConfig, train_set, node_config: dict) -> Decision:
    """Open this client's record and check the planned round against its budget.

    The budget is the tighter of the server's (dp-epsilon-budget / dp-target-epsilon) and
    the node's own `epsilon-budget`: a client never accepts a looser limit from the server.
    """
    record = PrivacyRecord.open(privacy_dir(node_config), data_fingerprint(train_set), delta=cfg.dp_delta)
    n = len(train_set)
    planned = Mechanism(noise_multiplier=noise_multiplier(cfg, n), steps=steps_per_round(cfg, n),
                        sample_rate=poisson_rate(cfg, n))
    budgets = [b for b in (cfg.sample_epsilon_budget, float(node_config.get("epsilon-budget", 0.0))) if b > 0]
    budget = min(budgets) if budgets else 0.0
    return Decision(record=record, planned=planned, budget=budget, projected=record.projected(planned))


def train_private(decision: Decision, cfg: FedtuneConfig, model, encoded, *, pad_id: int, seed: int,
                  run: str, server_round: int, progress) -> tuple[object, ConfigRecord]:
    """Run DP-SGD, record the mechanism on disk, and describe it for the server's ledger."""
    from common.dp_train import dp_train  # Opacus loads only in runs with sample-level DP

    result, mechanism = dp_train(
        model, encoded, pad_id=pad_id, steps=decision.planned.steps, batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        noise_multiplier=decision.planned.noise_multiplier, clipping_norm=cfg.dp_clipping_norm,
        seed=seed, progress=progress, physical_batch_size=cfg.dp_physical_batch_size,
        lr_at=round_schedule(cfg, server_round),
    )
    if not math.isclose(mechanism.sample_rate, decision.planned.sample_rate):
        raise RuntimeError(
            f"DP sample rate: planned {decision.planned.sample_rate}, loader used {mechanism.sample_rate}"
        )
    entry = decision.record.append(run=run, server_round=server_round, mechanism=mechanism,
                                   clipping_norm=cfg.dp_clipping_norm)
    history = decision.record.mechanisms()
    return result, ConfigRecord({
        "status": TRAINED, "fingerprint": decision.record.fingerprint,
        "noise-multiplier": mechanism.noise_multiplier, "sample-rate": mechanism.sample_rate,
        "steps": mechanism.steps, "clipping-norm": cfg.dp_clipping_norm,
        "epsilon": entry["epsilon"], "epsilon-rdp": entry["epsilon_rdp"], "accountant": entry["accountant"],
        "delta": decision.record.delta, "epsilon-budget": decision.budget,
        "history-noise": [m.noise_multiplier for m in history],
        "history-rate": [m.sample_rate for m in history],
        "history-steps": [m.steps for m in history],
    })
