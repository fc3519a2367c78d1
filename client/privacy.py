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
from common.privacy import Mechanism
from common.privacy_plan import dp_batch_size, plan_for_config
from common.train import round_schedule

BUDGET_EXHAUSTED = "budget-exhausted"
TRAINED = "trained"


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
    planned = planned_mechanism(cfg, len(train_set))
    budgets = [b for b in (cfg.sample_epsilon_budget, float(node_config.get("epsilon-budget", 0.0))) if b > 0]
    budget = min(budgets) if budgets else 0.0
    return Decision(record=record, planned=planned, budget=budget, projected=record.projected(planned))


def train_private(decision: Decision, cfg: FedtuneConfig, model, encoded, *, pad_id: int, seed: int,
                  run: str, server_round: int, progress) -> tuple[object, ConfigRecord]:
    """Run DP-SGD, record the mechanism on disk, and describe it for the server's ledger."""
    from common.dp_train import dp_train  # Opacus loads only in runs with sample-level DP

    result, mechanism = dp_train(
        model, encoded, pad_id=pad_id, steps=decision.planned.steps,
        batch_size=dp_batch_size(cfg.dp_batch_size, len(encoded)),
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        noise_multiplier=decision.planned.noise_multiplier, clipping_norm=cfg.dp_clipping_norm,
        seed=seed, progress=progress, physical_batch_size=cfg.dp_physical_batch_size,
        lr_at=round_schedule(cfg, server_round), compute_dtype=cfg.compute_dtype,
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
