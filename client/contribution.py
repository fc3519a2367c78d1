"""What a client contributes to a secure sum (stage 3 of client/secagg.py), as signed integers.

- No DP, or local DP: train as without secure aggregation, then upload the examples-weighted
  update with the examples and the loss in its header (common/quantize.py).
- Distributed DP: one Poisson sample's clipped gradient sum at the global adapter, scaled by the
  server's integer scale, randomly rounded, plus this client's share of the Skellam noise: the
  round's variance over the threshold, so that any `threshold` clients of the round carry all of
  it. The spend is recorded in the client's own privacy record before the vector leaves.
"""

from __future__ import annotations

import math
import time

import numpy as np
from flwr.app import Context, Message, MetricRecord

from client.messages import client_record, message_config
from common.errors import PrivacyBudgetError
from common.fields import as_float, as_int
from common.quantize import encode_update, flatten, randomized_round
from common.records import record_to_state
from common.secagg import ClientRound, SecAggError


def contribute(msg: Message, context: Context, state: ClientRound) -> tuple[np.ndarray, dict]:
    """(signed integer vector, records to send beside it) of this client for this round."""
    cfg, _ = message_config(msg)
    if cfg.dp_sample and cfg.dp_mode == "distributed":
        return distributed_step(msg, context, state)
    return weighted_update(msg, context)


def weighted_update(msg: Message, context: Context) -> tuple[np.ndarray, dict]:
    from client.privacy import dp_seed
    from client.training import train_locally
    from common.model import get_adapter_state

    t = train_locally(msg, context)
    s = t.session
    if t.refusal is not None:
        raise PrivacyBudgetError(
            f"client {s.data.client_id}: its privacy budget refuses round {s.server_round} "
            f"(epsilon would reach {as_float(t.refusal, 'epsilon-projected'):.3f})"
        )
    arrays = msg.content.array_records["arrays"]
    start = flatten(record_to_state(arrays), names := sorted(arrays.keys()))
    update = flatten(get_adapter_state(s.model), names) - start
    result = t.trained()
    loss = result.loss if math.isfinite(result.loss) else 0.0
    rng = np.random.default_rng(
        dp_seed(dict(context.node_config), s.cfg, s.server_round, s.data.client_id, msg.content.array_records["arrays"])
    )
    vector = encode_update(
        update,
        examples=t.examples,
        loss=loss,
        scale=as_float(msg.content.config_records["secagg"], "update-scale"),
        rng=rng,
    )
    extra = {
        "client": client_record(s.data, s.server_round),
        "metrics": MetricRecord({"train-seconds": result.seconds}),
    }
    if t.privacy is not None:
        extra["privacy"] = t.privacy
    return vector, extra


def distributed_step(msg: Message, context: Context, state: ClientRound) -> tuple[np.ndarray, dict]:
    from client.privacy import decide, distributed_mechanism, dp_seed, run_canaries, spend
    from client.training import open_session
    from common.dp_train import clipped_gradient_sum
    from common.skellam import noise_share_variance, skellam_noise

    start = time.perf_counter()
    s = open_session(msg, context)
    cfg, node = s.cfg, dict(context.node_config)
    announced = msg.content.config_records["dp"]
    mechanism = distributed_mechanism(cfg, announced, s.data)
    decision = decide(cfg, s.data.train, node, planned=mechanism)
    if not decision.allowed:
        raise PrivacyBudgetError(
            f"client {s.data.client_id}: its privacy budget refuses round {s.server_round} "
            f"(epsilon would reach {decision.projected:.3f}, budget {decision.budget:.3f})"
        )
    seed = dp_seed(node, cfg, s.server_round, s.data.client_id, msg.content.array_records["arrays"], announced)
    sums, _ = clipped_gradient_sum(
        s.model,
        s.encode(s.data.train),
        pad_id=s.tokenizer.pad_token_id,
        sample_rate=mechanism.sample_rate,
        clipping_norm=cfg.dp_clipping_norm,
        seed=seed,
        physical_batch_size=cfg.dp_physical_batch_size,
        compute_dtype=cfg.compute_dtype,
        canaries=run_canaries(cfg, node, s.data.client_id),
        server_round=s.server_round,
    )
    names = sorted(sums)
    if sum(sums[n].size for n in names) != (dimension := as_int(announced, "dimension")):
        raise SecAggError(
            f"distributed DP: the server announced {dimension} values, this client's "
            f"adapter has {sum(sums[n].size for n in names)}"
        )
    rounding, noise = np.random.default_rng(seed).spawn(2)
    vector = randomized_round(as_float(announced, "scale") * flatten(sums, names), rounding)
    vector += skellam_noise(noise_share_variance(mechanism.variance, threshold=state.threshold), vector.size, noise)
    privacy = spend(decision, mechanism, cfg.dp_clipping_norm, run=str(context.run_id), server_round=s.server_round)
    return vector, {
        "client": client_record(s.data, s.server_round),
        "privacy": privacy,
        "metrics": MetricRecord({"train-seconds": time.perf_counter() - start}),
    }
