"""The round loop: discover clients, train, aggregate, account, evaluate, checkpoint; resume.

Flower's `Strategy.start()` cannot resume, so fedtune runs its own loop around the
strategy's `configure_train` / `aggregate_train` / `configure_evaluate` /
`aggregate_evaluate` hooks. Client sampling is made reproducible across restarts: a
QUERY message first learns each node's stable client id, and each round samples from
the nodes ordered by that id with a RNG seeded by (seed, round). The pieces live in
their own modules: the state (server/state.py), starting or resuming (server/resume.py),
replies and the round ledger (server/replies.py), evaluation (server/evaluation.py),
privacy (server/privacy.py), and every reach into Flower's internals (common/flower.py).
"""

from __future__ import annotations

import json
import time
from logging import INFO, WARNING

from flwr.common.logger import log
from flwr.serverapp import Grid

from common.budget import privacy_dir
from common.config import FedtuneConfig
from common.errors import FedtuneError
from common.files import atomic_write
from common.flower import (
    OrderedGrid,
    dp_clipping_norm,
    find_strategy,
    seed_sampling_and_noise,
    set_dp_sample_size,
    strategy_state,
)
from common.model import save_adapter
from common.records import record_to_state, state_to_record
from common.secagg import SecAggError, threshold_for
from common.task import task_for
from server.best import best_row, keep_best, rounds_without_improvement, should_stop_early
from server.canaries import reveal_canaries
from server.checkpoint import Checkpoint, save_checkpoint
from server.distributed_dp import ServerAdamW, make_plan, plan_to_dict, would_exceed
from server.distributed_dp import federation_entry as distributed_entry
from server.evaluation import evaluation_row, federated_evaluation
from server.privacy import (
    check_sample_level_plan,
    client_entries,
    federation_entry,
    federation_would_exceed,
    wrap_client_dp,
)
from server.replies import (
    RoundOutcome,
    classify_replies,
    client_of,
    discover_clients,
    round_entry,
    sent_to,
    sort_replies,
    train_summary,
)
from server.resume import fresh_start, restore
from server.rundir import ADAPTER_RECORD, RunDir
from server.secure_train import secure_train
from server.state import ServerState, conform_to_schema, initial_state, with_labels
from server.strategy import build_strategy, robust_capacity_problem
from server.tensorboard import Scalars
from server.validation import Policy, ValidatedStrategy

# Named endings that are failures: the run stops fast, says why, and exits non-zero.
FAILURES = {
    "all-clients-failed": "every sampled client failed, timed out or was rejected in a round",
    "not-enough-clients": "fewer clients connected than min-available-clients within round-timeout",
    "write-failed": "the run directory could not be written (disk full, or no longer writable)",
}


class RunFailed(FedtuneError, RuntimeError):
    """The run ended with a named failure status (see status.json)."""


def run_server(grid: Grid, cfg: FedtuneConfig) -> list[dict]:
    """Run (or resume) a whole federated fine-tuning run; returns the per-round rows."""
    cfg, labels = with_labels(cfg)
    # Each fails before the run directory exists: a device or precision this machine lacks, a model
    # path or lora-target-modules that cannot work.
    task = task_for(cfg)
    task.device()
    task.model(len(labels))
    run = RunDir.for_config(cfg)
    log(INFO, "fedtune: run directory %s", run.path)
    model, state = initial_state(cfg, labels, run)
    state.run_id = int(getattr(getattr(grid, "run", None), "run_id", 0) or 0)
    strategy = build_strategy_chain(state)
    if cfg.dp_sample and cfg.dp_mode == "distributed":
        state.dp_optimizer = ServerAdamW(state.arrays, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
    start_round = restore(state, strategy) if cfg.resume else fresh_start(state)
    run.write_json("config.json", cfg.to_run_config())
    state.scalars = Scalars(run.path, state.history, state.ledger.entries)
    check_federation(grid, state)
    try:
        run_rounds(grid, state, strategy, start_round)
        release_adapter(model, state, "final")
        reveal_canaries(grid, state)
    except OSError as err:  # a full disk, a folder made read-only mid-run: named, nothing half-written
        end_run(state, "write-failed", f"{err.strerror or err}{f': {err.filename}' if err.filename else ''}")
    finish(state)
    return state.history


def run_rounds(grid: Grid, state: ServerState, strategy, start_round: int) -> None:
    """Round 0's evaluation (a new run), then rounds until the last, an early stop or a named status."""
    cfg = state.cfg
    if start_round == 0:
        state.history = [evaluation_row(state, 0)]
        commit_round(state, strategy, 0)
    else:
        publish_round(state)  # a crash may have come between a round's checkpoint and its adapter or best
    for server_round in range(start_round + 1, cfg.num_server_rounds + 1):
        if should_stop_early(state):
            state.status = "early-stopped"
            log(
                INFO,
                "fedtune: stopping early before round %d: %d rounds without a better %s than round %d's",
                server_round,
                rounds_without_improvement(state),
                cfg.best_column[0],
                best_row(state)["round"],
            )
            return
        run_round(grid, state, strategy, server_round)
        if state.status != "running":
            return
    state.status = "completed"


def release_adapter(model, state: ServerState, name: str) -> None:
    """Save the global adapter as adapters/<name> with what it was trained through: its round and the
    privacy ledger's length and head hash then (adapter.json), which `fedtune audit` checks the ledger
    against, so a ledger rolled back behind a released adapter is caught."""
    directory = state.run.adapters / name
    save_adapter(model, state.arrays, directory)
    record = {
        "round": state.history[-1]["round"],
        "ledger_entries": len(state.ledger.entries),
        "ledger_head": state.ledger.head,
    }
    atomic_write(directory / ADAPTER_RECORD, (json.dumps(record, indent=1) + "\n").encode())


def build_strategy_chain(state: ServerState):
    """Validation outermost, then Flower's client-level DP wrapper, then the aggregation strategy."""
    cfg = state.cfg
    expected = cfg.train_sample_size(cfg.min_available_clients)  # run_round sets the real one each round
    strategy = wrap_client_dp(cfg, build_strategy(cfg), num_sampled=expected)
    if not cfg.validate_updates:
        return strategy
    policy = Policy(
        max_update_norm=cfg.max_update_norm,
        max_norm_factor=cfg.max_norm_factor,
        uniform_weights=cfg.weight_policy == "uniform" or cfg.dp_client != "off",
        max_client_weight=cfg.max_client_weight,
        reject_zero_norm=cfg.dp_client != "off",
    )
    return ValidatedStrategy(
        strategy, initial=state.initial, policy=policy, clients=state.clients, declared=state.declared
    )


def check_federation(grid: Grid, state: ServerState) -> None:
    """Before the first round: enough clients, a DP-SGD plan that can learn (warned), and a
    robust strategy that can tolerate its attackers among the clients sampled a round."""
    cfg = state.cfg
    try:
        discover_clients(grid, state)
    except TimeoutError as err:
        end_run(state, "not-enough-clients", str(err))
    check_sample_level_plan(
        cfg, state.declared, trainable=sum(v.size for v in state.initial.values()), connected=len(state.declared)
    )
    problem = robust_capacity_problem(cfg, cfg.train_sample_size(len(state.declared)))
    if problem:
        end_run(state, "not-enough-clients", problem)
    if cfg.secure_aggregation:
        try:
            threshold_for(cfg.train_sample_size(len(state.declared)), cfg.secagg_max_dropouts)
        except SecAggError as err:
            end_run(state, "not-enough-clients", str(err))
    if cfg.dp_sample and cfg.dp_mode == "distributed" and state.dp_plan is None:
        state.dp_plan = make_plan(cfg, state.declared, dimension=sum(v.size for v in state.initial.values()))
        plan = state.dp_plan
        log(
            INFO,
            "fedtune: distributed DP-SGD over %d records: expected batch %d (rate %.5f), %d steps (one a "
            "round), noise multiplier %.4f of the summed Skellam noise (integer scale %.1f), noise per coordinate "
            "%.3g, noise/signal %.2f",
            plan.examples,
            plan.batch_size,
            plan.sample_rate,
            plan.rounds,
            plan.noise_multiplier,
            plan.scale,
            plan.gradient_noise_std,
            plan.noise_to_signal,
        )


def run_round(grid: Grid, state: ServerState, strategy, server_round: int) -> None:
    """One round: sample, train, aggregate, account for privacy, evaluate, checkpoint."""
    cfg, start = state.cfg, time.perf_counter()
    try:
        discover_clients(grid, state)
    except TimeoutError as err:
        log(WARNING, "fedtune: %s", err)
        state.status = "not-enough-clients"
        return
    seed_sampling_and_noise(round_seed(cfg.seed, server_round))
    ordered = OrderedGrid(grid, state.clients)
    messages = list(
        strategy.configure_train(server_round, state_to_record(state.arrays), state.message_config(), ordered)
    )
    population = len(ordered.get_node_ids())
    set_dp_sample_size(strategy, len(messages))  # Flower's DP noise is z*C/num_sampled_clients
    if federation_budget_exhausted(state, server_round, population=population, sampled=len(messages)):
        return
    log(
        INFO,
        "fedtune: round %d/%d: training on %d clients%s",
        server_round,
        cfg.num_server_rounds,
        len(messages),
        " (secure aggregation)" if cfg.secure_aggregation else "",
    )
    train = secure_train if cfg.secure_aggregation else plain_train
    outcome = train(grid, state, strategy, server_round, messages)
    entry = outcome.entry
    state.rounds.append(entry)
    if outcome.refused and not (entry["aggregated"] or entry["rejected"] or outcome.failed or entry.get("discarded")):
        all_refused(state, server_round)
    if entry["sampled"] and not entry["aggregated"] and not entry["refused"] and not entry.get("discarded"):
        state.status = "all-clients-failed"
    privacy = record_privacy(state, strategy, server_round, outcome, population=population)
    row = {
        **evaluation_row(state, server_round),
        **outcome.summary,
        **{
            k: len(entry.get(k, []))
            for k in ("aggregated", "rejected", "failed", "timed_out", "refused", "discarded")
            if k in entry
        },
        **privacy,
    }
    if state.status == "running":
        row.update(federated_evaluation(grid, state, strategy, server_round, ordered))
    row["seconds"] = round(time.perf_counter() - start, 2)
    state.history.append(row)
    commit_round(state, strategy, server_round)
    log(INFO, "fedtune: %s", summary_line(row, cfg.num_server_rounds))


def plain_train(grid: Grid, state: ServerState, strategy, server_round: int, messages) -> RoundOutcome:
    """Send the round's training messages, validate and aggregate the replies the strategy's way."""
    replies = grid.send_and_receive(messages, timeout=state.cfg.round_timeout)  # sets each message's id
    sent = sent_to(messages)
    replies = sort_replies(replies, state.clients, sent)
    failed, refused, ok = classify_replies(replies, state.clients, sent)
    summary = train_summary(ok, sampled=len(messages))
    aggregated, _ = strategy.aggregate_train(server_round, ok) if ok else (None, None)
    if aggregated is not None:
        state.arrays = conform_to_schema(state.initial, record_to_state(aggregated))
    validation = find_strategy(strategy, ValidatedStrategy)
    rejected = list(validation.rejections) if ok and validation is not None else []
    entry = round_entry(server_round, messages, replies, failed, refused, rejected, state.clients, sent)
    trained = [(client_of(r, state.clients, sent), r) for r in ok if "privacy" in r.content.config_records]
    return RoundOutcome(entry=entry, summary=summary, trained=trained, refused=refused, failed=failed)


def federation_budget_exhausted(state: ServerState, server_round: int, *, population: int, sampled: int) -> bool:
    """With dp-client or distributed DP: would this round take the federation's epsilon above its
    budget? Then the run stops."""
    cfg = state.cfg
    if cfg.dp_sample and cfg.dp_mode == "distributed":
        projected, budget = would_exceed(state.ledger, cfg, state.distributed_plan), cfg.sample_epsilon_budget
    else:
        projected = federation_would_exceed(state.ledger, cfg, population=population, sampled=sampled)
        budget = cfg.dp_client_epsilon_budget
    if projected is None:
        return False
    state.status = "federation-privacy-budget-exhausted"
    log(
        WARNING,
        "fedtune: stopping before round %d: federation epsilon would reach %.3f, budget %.3f",
        server_round,
        projected,
        budget,
    )
    return True


def all_refused(state: ServerState, server_round: int) -> None:
    state.status = "client-privacy-budgets-exhausted"  # the round is committed; the loop then stops
    log(
        WARNING,
        "fedtune: every sampled client refused round %d: its own privacy record says the round would "
        "take its epsilon above its budget. The records persist across runs on the same data, in each node's "
        "privacy-dir (node config), else $FEDTUNE_PRIVACY_DIR, else ~/.fedtune/privacy (here: %s)",
        server_round,
        privacy_dir(),
    )


def record_privacy(state: ServerState, strategy, server_round: int, outcome: RoundOutcome, *, population: int) -> dict:
    """Append this round's ledger entries; returns the round's epsilon figures for the metrics row."""
    cfg, out, entry = state.cfg, {}, outcome.entry
    if cfg.dp_sample:
        entries = [
            state.ledger.append({**e, "run_id": state.run_id})
            for e in client_entries(server_round, outcome.trained, outcome.refused, outcome.failed)
        ]
        spent = [e["epsilon"] for e in entries if e["status"] == "trained"]
        if spent:
            out["epsilon_client_max"] = max(spent)
    if cfg.dp_sample and cfg.dp_mode == "distributed":
        secure = entry["secure_aggregation"]
        federation = state.ledger.append(
            distributed_entry(
                state.ledger,
                cfg,
                state.distributed_plan,
                server_round=server_round,
                sampled=len(entry["sampled"]),
                threshold=secure["threshold"],
                summed=len(entry["aggregated"]),
                records=secure.get("records", 0),
                applied=secure["applied"],
            )
        )
        out["epsilon_federation"] = federation["epsilon"]
    if cfg.dp_client != "off":
        sampled = len(entry["sampled"])
        federation = state.ledger.append(
            federation_entry(
                state.ledger,
                cfg,
                server_round=server_round,
                population=population,
                sampled=sampled,
                accepted=len(entry["aggregated"]),
                clipping_norm=dp_clipping_norm(strategy, cfg.dp_client_clipping_norm),
                noise_denominator=max(1, sampled),
            )
        )
        out["epsilon_federation"] = federation["epsilon"]
    return out


def commit_round(state: ServerState, strategy, server_round: int) -> None:
    """Checkpoint, adapter, metrics and plot for a completed round."""
    run = state.run
    save_checkpoint(
        run.checkpoints,
        Checkpoint(
            server_round=server_round,
            adapter=state.arrays,
            strategy=strategy_state(strategy),
            meta={
                "config": state.cfg.to_run_config(),
                "history": state.history,
                "ledger": state.ledger.entries,
                "rounds": state.rounds,
                "frozen": state.frozen,
                "data": state.data,
                **({"secagg_keys": state.secagg_keys} if state.secagg_keys else {}),
                **({"dp_plan": plan_to_dict(state.dp_plan)} if state.dp_plan else {}),
            },
            optimizer=state.dp_optimizer.state() if state.dp_optimizer else {},
        ),
    )
    publish_round(state)
    if state.scalars is not None:
        state.scalars.add_round(state.history[-1], state.ledger.entries)


def publish_round(state: ServerState) -> None:
    """What follows from the last checkpoint: rounds.jsonl, the ledger, the round's adapter, adapters/best,
    metrics and plot. A resume calls it again: everything here derives from the checkpointed state, so a
    second call writes the same files, and a kill after the checkpoint leaves none missing or half-written."""
    run = state.run
    run.write_lines("rounds.jsonl", state.rounds)
    if state.private:
        state.ledger.write(run.path / "privacy-ledger.jsonl")
    release_adapter(state.task.model(len(state.labels)), state, f"round-{state.history[-1]['round']:04d}")
    best = keep_best(state)
    run.write_metrics(state.history)
    run.plot(state.history, best_round=best["round"])


def finish(state: ServerState) -> None:
    """status.json for how the run ended; a failure raises RunFailed after writing it."""
    if state.status == "client-privacy-budgets-exhausted" and not any(r["aggregated"] for r in state.rounds):
        end_run(
            state,
            state.status,
            "no client trained in any round: every client's privacy record was already "
            f"at its budget (records in each node's privacy-dir, else $FEDTUNE_PRIVACY_DIR, else "
            f"~/.fedtune/privacy; here {privacy_dir()})",
        )
    if state.status in FAILURES:
        end_run(state, state.status, FAILURES[state.status])
    state.task.final_report(state.run.path, state.history[-1]["round"])
    if state.scalars is not None:
        state.scalars.close()
    rounds, best = state.history[-1]["round"], best_row(state)["round"]
    state.run.write_json("status.json", {"status": state.status, "rounds_completed": rounds, "best_round": best})
    log(
        INFO,
        "fedtune: %s after %d rounds (best: round %d, adapters/best); results in %s",
        state.status,
        rounds,
        best,
        state.run.path,
    )


def end_run(state: ServerState, status: str, reason: str) -> None:
    rounds = state.history[-1]["round"] if state.history else 0
    try:
        state.run.write_json("status.json", {"status": status, "reason": reason, "rounds_completed": rounds})
    except OSError as err:  # the disk that failed the run may refuse this too: the log still says why
        log(WARNING, "fedtune: could not write status.json (%s)", err.strerror or err)
    log(WARNING, "fedtune: run failed: %s (%s); results so far in %s", status, reason, state.run.path)
    raise RunFailed(f"{status}: {reason}")


def round_seed(seed: int, server_round: int) -> int:
    return seed * 100_003 + server_round


def summary_line(row: dict, num_rounds: int) -> str:
    text = f"round {row['round']}/{num_rounds} | clients {row.get('aggregated', 0)}/{row.get('clients_sampled', 0)}"
    if "train_loss" in row:  # distributed DP releases no training loss
        text += f" | train loss {row['train_loss']:.4f}"
    if "heldout_perplexity" in row:
        text += f" | held-out loss {row['heldout_loss']:.4f} perplexity {row['heldout_perplexity']:.2f}"
        if "heldout_accuracy" in row:  # a causal LM scored on a closed set of responses (choices)
            text += f" acc {row['heldout_accuracy']:.4f} macro-F1 {row['heldout_macro_f1']:.4f}"
    else:
        text += f" | held-out acc {row['heldout_accuracy']:.4f} macro-F1 {row['heldout_macro_f1']:.4f}"
    if "epsilon_client_max" in row:
        text += f" | client eps max {row['epsilon_client_max']:.3f}"
    if "epsilon_federation" in row:
        text += f" | federation eps {row['epsilon_federation']:.3f}"
    return text + f" | {row['seconds']:.1f}s"
