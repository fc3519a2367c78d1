"""A training round whose updates the server sees only as a secure sum, and what it does with it.

- No DP or local DP: the sum is of examples-weighted updates (common/quantize.py); the mean update
  is added to the global adapter and handed to the configured mean-based strategy as a single
  reply, so FedAvg, FedProx, FedAvgM and the FedOpt family apply it as they would the plain mean.
- Distributed DP: the sum is of noisy clipped-gradient sums; the server takes its DP-SGD step
  (server/distributed_dp.py).
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from common.flower import server_made_reply
from common.quantize import HEADER, decode_update, flatten, unflatten, update_scale
from common.records import record_to_state, state_to_record
from server.distributed_dp import announcement, dp_step
from server.replies import RoundOutcome, privacy_problem
from server.secure_round import round_entry, run_secure_round
from server.state import ServerState, conform_to_schema
from server.validation import WEIGHT_KEY


def secure_train(grid, state: ServerState, strategy, server_round: int, messages: list[Message]) -> RoundOutcome:
    cfg = state.cfg
    names = sorted(state.arrays)
    dimension = sum(state.arrays[n].size for n in names)
    distributed, scale = cfg.dp_sample and cfg.dp_mode == "distributed", 0.0
    if distributed:
        extra = {"dp": ConfigRecord(announcement(state.distributed_plan))}
        length = dimension
    else:
        total_weight = sum(state.declared.get(m.metadata.dst_node_id, 0) for m in messages)
        scale = update_scale(total_weight=total_weight, clients=len(messages))
        extra = {"masked": ConfigRecord({"update-scale": scale})}
        length = len(HEADER) + dimension
    result = run_secure_round(grid, state, server_round, messages, length=length, extra=extra)
    entry = round_entry(server_round, result, state.clients)
    summary = {"clients_sampled": len(messages), "clients_ok": len(result.summed)}
    if result.total is not None and distributed:
        records = sum(state.declared.get(n, 0) for n in result.summed)
        state.arrays = dp_step(state, result.total, records, server_round)
        entry["secure_aggregation"]["records"] = records
    elif result.total is not None:
        summary.update(apply_mean_update(state, strategy, server_round, result.total, scale=scale, names=names))
    client = {n: state.clients.get(n, f"node-{n}") for n in result.nodes}
    unreadable = {}  # a privacy record the ledger cannot be written from: the client's spend is unknown
    for n, reply in [*result.spent.items(), *result.refusals.items()]:
        if problem := privacy_problem(reply):
            log(WARNING, "fedtune: secure round %d: client %s: %s", server_round, client[n], problem)
            unreadable[n] = problem
    return RoundOutcome(
        entry=entry,
        summary=summary,
        trained=[(client[n], r) for n, r in sorted(result.spent.items()) if n not in unreadable],
        refused=[(client[n], r) for n, r in sorted(result.refusals.items()) if n not in unreadable],
        failed=[client[n] for n in sorted(result.nodes) if result.fates.get(n) == "failed" or n in unreadable],
    )


def apply_mean_update(
    state: ServerState, strategy, server_round: int, total, *, scale: float, names: list[str]
) -> dict:
    """global + mean update, through the strategy as the one reply it aggregates; the training figures."""
    mean, header = decode_update(total, scale=scale)
    if header["clipped"]:
        log(
            WARNING,
            "fedtune: secure round %d: %d update values were outside +-8 and clipped before the sum",
            server_round,
            int(header["clipped"]),
        )
    start = flatten(state.arrays, names)
    merged = unflatten(start + mean, state.arrays, names)
    aggregated, _ = strategy.aggregate_train(server_round, [_as_reply(merged, header["examples"], server_round)])
    state.arrays = conform_to_schema(state.initial, record_to_state(aggregated))
    return {"train_loss": header["loss"], "train_examples": int(header["examples"])}


def _as_reply(arrays, examples: float, server_round: int) -> Message:
    """The unmasked mean as one training reply, weighted by the examples of every client in the sum."""
    content = RecordDict({"arrays": state_to_record(arrays), "metrics": MetricRecord({WEIGHT_KEY: examples})})
    return server_made_reply(content, message_id=f"secure-sum-{server_round}", group_id=str(server_round))
