"""The server's side of distributed DP-SGD: the run's plan, the step it takes with each noisy sum,
and the federation's entries in the privacy ledger.

Each applied round is one DP-SGD step over the whole federation's data: the secure sum holds the
clipped per-example gradients of every record the clients' Poisson samples drew, scaled by s and
rounded, plus Skellam noise of at least the planned variance. The server divides it by s and by
the expected batch q * N (N: the records of the clients whose vectors were summed, as they
declared) and steps AdamW on the adapter, as central DP-SGD with Opacus would. AdamW's state is
checkpointed with the adapter, so a resumed run continues the same steps.
"""

from __future__ import annotations

import numpy as np
import torch

from common.config import FedtuneConfig
from common.ledger import Ledger
from common.privacy import Mechanism, epsilon_rdp
from common.privacy_plan import DistributedPlan, distributed_plan_for_config
from common.quantize import unflatten
from common.train import round_schedule

ACCOUNTANT = "rdp-skellam"


def make_plan(cfg: FedtuneConfig, declared: dict[int, int], *, dimension: int) -> DistributedPlan:
    """The run's plan from the clients' declared training examples and the adapter's size (and the
    canaries, half of which each client includes: dp-audit-canaries)."""
    clients = sum(1 for n in declared.values() if n > 0)
    return distributed_plan_for_config(
        cfg,
        sum(n for n in declared.values() if n > 0),
        dimension=dimension,
        canaries=cfg.dp_audit_canaries * clients // 2,
    )


def plan_from_dict(d: dict) -> DistributedPlan:
    return DistributedPlan(**d)


def plan_to_dict(plan: DistributedPlan) -> dict:
    return {
        k: getattr(plan, k)
        for k in ("examples", "batch_size", "rounds", "noise_multiplier", "clipping_norm", "dimension", "scale")
    }


def announcement(plan: DistributedPlan) -> dict:
    """What every stage of a round tells the clients about the DP step."""
    return {
        "sample-rate": plan.sample_rate,
        "noise-multiplier": plan.noise_multiplier,
        "scale": plan.scale,
        "dimension": plan.dimension,
    }


class ServerAdamW:
    """AdamW on the global adapter, stepped with the unmasked noisy gradient; state as named arrays."""

    def __init__(self, arrays: dict[str, np.ndarray], *, learning_rate: float, weight_decay: float) -> None:
        self.names = sorted(arrays)
        self.params = [torch.nn.Parameter(torch.from_numpy(np.array(arrays[n], dtype=np.float32))) for n in self.names]
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=weight_decay)

    def step(
        self, arrays: dict[str, np.ndarray], gradient: dict[str, np.ndarray], *, lr: float
    ) -> dict[str, np.ndarray]:
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                p.copy_(torch.from_numpy(np.asarray(arrays[name], dtype=np.float32)))
                p.grad = torch.from_numpy(np.asarray(gradient[name], dtype=np.float32))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return {name: p.detach().numpy().copy() for name, p in zip(self.names, self.params, strict=True)}

    def state(self) -> dict[str, np.ndarray]:
        out = {}
        for name, p in zip(self.names, self.params, strict=True):
            for key, value in self.optimizer.state.get(p, {}).items():
                out[f"{name}|{key}"] = (
                    value.detach().numpy().copy() if torch.is_tensor(value) else np.asarray(value, dtype=np.float64)
                )
        return out

    def load(self, state: dict[str, np.ndarray]) -> None:
        for name, p in zip(self.names, self.params, strict=True):
            keys = {k.split("|", 1)[1]: v for k, v in state.items() if k.split("|", 1)[0] == name}
            if keys:
                self.optimizer.state[p] = {k: torch.from_numpy(np.array(v)) for k, v in keys.items()}


def gradient_from_sum(
    total: np.ndarray, plan: DistributedPlan, *, like: dict[str, np.ndarray], records: int
) -> dict[str, np.ndarray]:
    """The noisy mean gradient from the unmasked signed integer sum: / s, / (q * records)."""
    names = sorted(like)
    expected = plan.sample_rate * records
    return unflatten(total.astype(np.float64) / (plan.scale * expected), like, names)


def dp_step(state, total: np.ndarray, records: int, server_round: int) -> dict[str, np.ndarray]:
    """The server's DP-SGD step on the global adapter with one round's unmasked sum."""
    cfg = state.cfg
    grad = gradient_from_sum(total, state.dp_plan, like=state.arrays, records=records)
    lr_at = round_schedule(cfg, server_round)
    return state.dp_optimizer.step(state.arrays, grad, lr=lr_at(0.0) if lr_at else cfg.learning_rate)


def federation_entry(
    ledger: Ledger,
    cfg: FedtuneConfig,
    plan: DistributedPlan,
    *,
    server_round: int,
    sampled: int,
    threshold: int,
    summed: int,
    records: int,
    applied: bool,
) -> dict:
    """The mechanism that protected every record this round (the central Skellam step, when the sum
    was released) and the federation's epsilon over every released round."""
    history = [
        Mechanism.from_dict(e["mechanism"])
        for e in ledger.entries
        if e.get("kind") == "federation" and e.get("mechanism")
    ]
    mechanism = plan.mechanism(steps=1) if applied else None
    if mechanism is not None:
        history.append(mechanism)
    l2, l1 = plan.sensitivities
    return {
        "round": server_round,
        "kind": "federation",
        "mode": "distributed",
        "mechanism": mechanism.to_dict() if mechanism else None,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "clipping_norm": cfg.dp_clipping_norm,
        "scale": plan.scale,
        "dimension": plan.dimension,
        "l2_sensitivity": l2,
        "l1_sensitivity": l1,
        "sampled": sampled,
        "threshold": threshold,
        "summed": summed,
        "max_dropouts": cfg.secagg_max_dropouts,
        "noise_variance_target": plan.variance,
        "noise_variance_summed": summed * plan.variance / threshold,
        "expected_batch": plan.sample_rate * records if applied else 0.0,
        "epsilon": epsilon_rdp(history, delta=cfg.dp_delta),
        "delta": cfg.dp_delta,
        "accountant": ACCOUNTANT,
        "neighbouring": "add/remove one record",
        "epsilon_budget": cfg.sample_epsilon_budget,
    }


def would_exceed(ledger: Ledger, cfg: FedtuneConfig, plan: DistributedPlan) -> float | None:
    """The federation's epsilon after one more released round, when that passes its budget; else None."""
    budget = cfg.sample_epsilon_budget
    if budget <= 0:
        return None
    history = [
        Mechanism.from_dict(e["mechanism"])
        for e in ledger.entries
        if e.get("kind") == "federation" and e.get("mechanism")
    ]
    projected = epsilon_rdp([*history, plan.mechanism(steps=1)], delta=cfg.dp_delta)
    return projected if projected > budget + 1e-9 else None
