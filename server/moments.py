"""shared-moments: AdamW moment estimates that travel with the global adapter.

Every round's clients start AdamW afresh; a centralized run whose AdamW restarts as often
loses about a point on AG News (the README's benchmark notes), though sharing the moments did
not win it back for the federated run there. With `shared-moments`, each client sends the
bias-corrected moments its AdamW ended the round with beside its adapter; the server averages
them over the clients whose updates it aggregated, with the same weights, and sends the
average with the next round's adapter, from which the clients' AdamW continues
(`common.train.warm_adam_state`).

The moments are validated like updates (names, shapes, dtype, finiteness, a non-negative
second moment); a client whose moments fail is left out of the average and logged, its
adapter update is judged on its own. The average is checkpointed with the adapter.
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from common.records import MOMENTS_KEY, record_to_state
from common.train import SHARED_SLOTS


def expected_moments(model: torch.nn.Module, which: str) -> dict[str, tuple[int, ...]]:
    """The moment arrays a client sends for this model: key -> shape, per trainable tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    return {f"{i}.{slot}": tuple(p.shape) for i, p in enumerate(params) for slot in SHARED_SLOTS[which]}


def take_moments(replies: list[Message]) -> dict[str, ArrayRecord | None]:
    """Remove the moments from each reply (the strategy sees the adapter and metrics only);
    message id of the reply -> its moments, or None where a reply carried none."""
    taken = {}
    for reply in replies:
        content = reply.content
        taken[reply.metadata.message_id] = content.array_records.get(MOMENTS_KEY)
        if MOMENTS_KEY in content:
            del content[MOMENTS_KEY]
    return taken


def check_moments(record: ArrayRecord | None, expected: dict[str, tuple[int, ...]]) -> tuple[dict | None, str | None]:
    """(the decoded moments, None), or (None, a reason code)."""
    if record is None:
        return None, "moments-missing"
    try:
        moments = record_to_state(record)
    except Exception:  # noqa: BLE001 - any undecodable payload is a rejection
        return None, "moments-malformed"
    reason = misfit(moments, expected)
    if reason is not None:
        return None, reason
    if not all(np.isfinite(a).all() for a in moments.values()):
        return None, "moments-non-finite"
    if any((a < 0).any() for k, a in moments.items() if k.endswith(".exp_avg_sq")):
        return None, "moments-negative-second-moment"
    return moments, None


def misfit(moments: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> str | None:
    """"moments-keys" or "moments-shape" when `moments` do not fit the adapter, else None."""
    if set(moments) != set(expected):
        return "moments-keys"
    if any(moments[k].shape != shape or moments[k].dtype != np.float32 for k, shape in expected.items()):
        return "moments-shape"
    return None


def average_moments(sent: list[tuple[str, ArrayRecord | None, float]], expected: dict[str, tuple[int, ...]],
                    server_round: int) -> tuple[dict[str, np.ndarray] | None, int]:
    """Weighted mean of the valid moments among `sent` ((client id, moments, weight) of the
    clients whose updates were aggregated); (None, 0) when none is valid."""
    valid = []
    for client_id, record, weight in sent:
        moments, reason = check_moments(record, expected)
        if reason is None and not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0
                                   and np.isfinite(weight)):
            reason = "moments-bad-weight"
        if reason is not None:
            log(WARNING, "fedtune: left the moments of %s out of round %d's average: %s", client_id, server_round,
                reason)
            continue
        valid.append((moments, float(weight)))
    if not valid:
        return None, 0
    total = sum(w for _, w in valid)
    averaged = {k: (sum(m[k].astype(np.float64) * w for m, w in valid) / total).astype(np.float32) for k in expected}
    return averaged, len(valid)
