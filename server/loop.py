"""The round loop: discover clients, train, aggregate, evaluate, checkpoint; resume.

Flower's `Strategy.start()` cannot resume, so fedtune runs its own loop around the
strategy's `configure_train` / `aggregate_train` / `configure_evaluate` /
`aggregate_evaluate` hooks. Client sampling is made reproducible across restarts: a
QUERY message first learns each node's stable client id, and each round samples from
the nodes ordered by that id with a RNG seeded by (seed, round).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.budget import privacy_dir
from common.config import FedtuneConfig, parse_run_config
from common.data import LabelMap
from common.errors import CheckpointError, ConfigError, FedtuneError
from common.federation_data import data_fingerprint, federation_labels, heldout_set
from common.ledger import Ledger
from common.model import (
    check_adapter_state, frozen_fingerprint, get_adapter_state, load_tokenizer, save_adapter,
    set_adapter_state,
)
from common.lm import encode_for_task, generate, model_for_config, sample_prompts
from common.records import FROZEN_KEY, record_to_state, state_to_record
from common.train import evaluate
from server.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from server.privacy import (
    check_sample_level_plan, client_entries, current_clipping_norm, federation_entry, federation_would_exceed,
    wrap_client_dp,
)
from server.rundir import RunDir
from server.strategy import build_strategy, load_strategy_state, robust_capacity_problem, strategy_state
from server.validation import Policy, ValidatedStrategy

# Keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"num-server-rounds", "resume", "run-dir", "round-timeout", "num-threads"}


class OrderedGrid:
    """One round's view of the Grid: a snapshot of the connected nodes, ordered by client id.

    The order makes seeded sampling repeat across restarts. The snapshot keeps Flower's
    `sample_nodes` from waiting without a deadline when a node drops out between counting
    and sampling (it waits while fewer nodes are connected than it chose to sample); fedtune's
    own wait for min-available-clients, bounded by round-timeout, runs before the snapshot.
    """

    def __init__(self, grid: Grid, client_ids: dict[int, str]) -> None:
        self._grid = grid
        self._nodes = sorted(grid.get_node_ids(), key=lambda n: (n not in client_ids, client_ids.get(n, ""), n))

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name):
        return getattr(self._grid, name)


@dataclass
class ServerState:
    cfg: FedtuneConfig
    labels: LabelMap
    run: RunDir
    initial: dict
    arrays: dict
    history: list[dict] = field(default_factory=list)
    clients: dict[int, str] = field(default_factory=dict)
    declared: dict[int, int] = field(default_factory=dict)  # node id -> training examples it declared
    ledger: Ledger = field(default_factory=Ledger)
    rounds: list[dict] = field(default_factory=list)  # the round ledger (I4)
    status: str = "running"
    frozen: str = ""  # fingerprint of the frozen LoRA A matrices (lora-freeze-a), sent to every client
    data: str = ""  # fingerprint of the training data and held-out set (data_fingerprint): resume checks it

    @property
    def private(self) -> bool:
        return self.cfg.dp_sample or self.cfg.dp_client != "off"

    def message_config(self) -> ConfigRecord:
        """The run config every message carries, with the frozen-A fingerprint when there is one."""
        config = self.cfg.to_run_config()
        if self.frozen:
            config[FROZEN_KEY] = self.frozen
        return ConfigRecord(config)


def run_server(grid: Grid, cfg: FedtuneConfig) -> list[dict]:
    """Run (or resume) a whole federated fine-tuning run; returns the per-round rows."""
    cfg, labels = with_labels(cfg)
    model_for_config(cfg, len(labels))  # a bad model or lora-target-modules fails before the run dir exists
    run = RunDir.for_config(cfg)
    log(INFO, "fedtune: run directory %s", run.path)
    model, state = initial_state(cfg, labels, run)
    strategy = build_strategy_chain(state)
    start_round = restore(state, strategy) if cfg.resume else fresh_start(state)
    run.write_json("config.json", cfg.to_run_config())
    try:
        discover_clients(grid, state)
    except TimeoutError as err:
        end_run(state, "not-enough-clients", str(err))
    check_sample_level_plan(cfg, state.declared, trainable=sum(v.size for v in state.initial.values()),
                            connected=len(state.declared))
    problem = robust_capacity_problem(cfg, cfg.train_sample_size(len(state.declared)))
    if problem:
        end_run(state, "not-enough-clients", problem)
    if start_round == 0:
        state.history = [evaluation_row(state, 0)]
        commit_round(state, strategy, 0)
    for server_round in range(start_round + 1, cfg.num_server_rounds + 1):
        run_round(grid, state, strategy, server_round)
        if state.status != "running":
            break
    else:
        state.status = "completed"
    save_adapter(model, state.arrays, run.adapters / "final")
    if state.status == "client-privacy-budgets-exhausted" and not any(r["aggregated"] for r in state.rounds):
        end_run(state, state.status, "no client trained in any round: every client's privacy record was already "
                f"at its budget (records in each node's privacy-dir, else $FEDTUNE_PRIVACY_DIR, else "
                f"~/.fedtune/privacy; here {privacy_dir()})")
    if state.status in FAILURES:
        end_run(state, state.status, FAILURES[state.status])
    run.write_json("status.json", {"status": state.status, "rounds_completed": state.history[-1]["round"]})
    log(INFO, "fedtune: %s after %d rounds; results in %s", state.status, state.history[-1]["round"], run.path)
    return state.history


def with_labels(cfg: FedtuneConfig) -> tuple[FedtuneConfig, LabelMap]:
    """The federation's labels, and for classification the config that names them: one label
    order for every client (causal-lm labels are only partition groups)."""
    labels = federation_labels(cfg)
    return (cfg.replace(labels=labels.to_spec()) if cfg.task == "classification" else cfg), labels


def initial_state(cfg: FedtuneConfig, labels: LabelMap, run: RunDir):
    """(model, ServerState) before round 1: the model's initial adapter is the global one."""
    model = model_for_config(cfg, len(labels))
    initial = get_adapter_state(model)
    state = ServerState(cfg=cfg, labels=labels, run=run, initial=initial, arrays=initial,
                        frozen=frozen_fingerprint(model), data=data_fingerprint(cfg))
    return model, state


def preflight(cfg: FedtuneConfig) -> None:
    """run_server's checks of the run directory, for a caller that can make them before the
    federation starts: the simulation makes them before its engine does, so a refusal takes
    seconds rather than the engine's start-up. An empty run-dir names a new, timestamped one.
    The model is loaded here too (cached: the server's run reuses it), so a model path or a
    `lora-target-modules` that cannot work is refused before the engine starts."""
    cfg, labels = with_labels(cfg)
    model_for_config(cfg, len(labels))
    if not cfg.run_dir:
        return
    run = RunDir(Path(cfg.run_dir).resolve())
    if not cfg.resume:
        refuse_checkpoints(run)
        return
    checked_checkpoint(initial_state(cfg, labels, run)[1])


# Named endings that are failures: the run stops fast, says why, and exits non-zero.
FAILURES = {
    "all-clients-failed": "every sampled client failed, timed out or was rejected in a round",
    "not-enough-clients": "fewer clients connected than min-available-clients within round-timeout",
}


class RunFailed(FedtuneError, RuntimeError):
    """The run ended with a named failure status (see status.json)."""


def end_run(state: ServerState, status: str, reason: str) -> None:
    rounds = state.history[-1]["round"] if state.history else 0
    state.run.write_json("status.json", {"status": status, "reason": reason, "rounds_completed": rounds})
    log(WARNING, "fedtune: run failed: %s (%s); results so far in %s", status, reason, state.run.path)
    raise RunFailed(f"{status}: {reason}")


def build_strategy_chain(state: ServerState):
    """Validation outermost, then Flower's client-level DP wrapper, then the aggregation strategy."""
    cfg = state.cfg
    expected = cfg.train_sample_size(cfg.min_available_clients)  # run_round sets the real one each round
    strategy = wrap_client_dp(cfg, build_strategy(cfg), num_sampled=expected)
    if not cfg.validate_updates:
        return strategy
    policy = Policy(max_update_norm=cfg.max_update_norm, max_norm_factor=cfg.max_norm_factor,
                    uniform_weights=cfg.weight_policy == "uniform" or cfg.dp_client != "off",
                    max_client_weight=cfg.max_client_weight, reject_zero_norm=cfg.dp_client != "off")
    return ValidatedStrategy(strategy, initial=state.initial, policy=policy, clients=state.clients,
                             declared=state.declared)


def strategy_with(strategy, attr: str):
    """The first strategy in the wrapper chain that has `attr` (e.g. Flower's DP wrapper)."""
    while strategy is not None and not hasattr(strategy, attr):
        strategy = getattr(strategy, "strategy", None)
    return strategy


def fresh_start(state: ServerState) -> int:
    refuse_checkpoints(state.run)
    return 0


def refuse_checkpoints(run: RunDir) -> None:
    """A new run starts in an empty run directory: it never overwrites another run's checkpoints,
    nor a folder that holds files other than a fedtune run's."""
    foreign = run.foreign_files()
    if foreign:
        raise ConfigError(f"run-dir {run.path}: expected an empty folder or a fedtune run directory for a new run, "
                          f"but it holds files fedtune did not write: {foreign[:5]}{'...' if len(foreign) > 5 else ''}"
                          "; choose another run-dir")
    if latest_checkpoint(run.checkpoints) is not None:
        raise CheckpointError(
            f"run-dir {run.path} already holds checkpoints: expected an empty run directory "
            "for a new run; set resume=true to continue it, or choose another run-dir"
        )


def checked_checkpoint(state: ServerState) -> tuple[Path, Checkpoint]:
    """The latest checkpoint of the run directory and its path, after every check against this
    run: the same config (except RESUMABLE_CHANGES), the same data, an adapter and frozen A that
    fit the model. Nothing is written or removed."""
    path = latest_checkpoint(state.run.checkpoints)
    if path is None:
        raise CheckpointError(f"resume: expected checkpoints in {state.run.checkpoints}, found none")
    ckpt = load_checkpoint(path)
    try:  # parsed as any config is: an older run's removed options at their neutral values drop out
        saved = parse_run_config(ckpt.meta["config"]).to_run_config()
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {path}: expected a config this fedtune can run, got one that is not "
                              f"({err})") from None
    now = state.cfg.to_run_config()
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        diffs = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in changed)
        raise CheckpointError(f"resume: expected the checkpoint's config, but these keys differ: {diffs}")
    if ckpt.meta.get("data", state.data) != state.data:
        raise CheckpointError(
            f"resume: expected the data the run was trained on (fingerprint {ckpt.meta['data']} of the training "
            f"data and held-out set), got {state.data}: {' or '.join(repr(f) for f in (state.cfg.data, state.cfg.heldout_data) if f)} "
            "changed since; train on the new data in a new run-dir")
    try:
        check_adapter_state(state.initial, ckpt.adapter)
    except FedtuneError as err:
        raise CheckpointError(f"checkpoint {path}: adapter does not fit the model: {err}") from None
    if ckpt.meta.get("frozen", "") != state.frozen:  # lora-freeze-a: B was trained against this A
        raise CheckpointError(
            f"checkpoint {path}: expected the frozen LoRA A matrices it was trained with (fingerprint "
            f"{ckpt.meta.get('frozen') or 'none'}), got {state.frozen or 'none'} from this model, seed and torch build"
        )
    return path, ckpt


def restore(state: ServerState, strategy) -> int:
    path, ckpt = checked_checkpoint(state)
    state.arrays = ckpt.adapter
    state.history = [row for row in ckpt.meta["history"] if row["round"] <= ckpt.server_round]
    load_strategy_state(strategy, ckpt.strategy)
    state.ledger = Ledger(ckpt.meta.get("ledger", []))
    state.rounds = [r for r in ckpt.meta.get("rounds", []) if r["round"] <= ckpt.server_round]
    state.run.write_metrics(state.history)
    if state.private:
        state.ledger.write(state.run.path / "privacy-ledger.jsonl")
    log(INFO, "fedtune: resumed from %s (round %d)", path.name, ckpt.server_round)
    return ckpt.server_round


def discover_clients(grid: Grid, state: ServerState) -> None:
    """Ask every node not yet known who it is; record the answers in clients.json."""
    cfg = state.cfg
    deadline = time.monotonic() + cfg.round_timeout
    while len(list(grid.get_node_ids())) < cfg.min_available_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"expected at least {cfg.min_available_clients} connected clients within "
                f"{cfg.round_timeout:.0f}s, got {len(list(grid.get_node_ids()))}"
            )
        time.sleep(0.5)
    new = [n for n in grid.get_node_ids() if n not in state.clients]
    if not new:
        return
    query = RecordDict({"config": ConfigRecord(cfg.to_run_config())})
    messages = [Message(content=query, message_type=MessageType.QUERY, dst_node_id=n) for n in new]
    summaries = []
    replies = grid.send_and_receive(messages, timeout=cfg.round_timeout)
    sent = sent_to(messages)
    for reply in replies:
        if reply.has_error():
            log(WARNING, "fedtune: node %d did not describe itself: %s", node_of(reply, sent), reply.error.reason)
            continue
        info = reply.content["client"]
        state.clients[reply.metadata.src_node_id] = str(info["client-id"])
        state.declared[reply.metadata.src_node_id] = int(info["train-examples"])
        summaries.append({
            "client_id": str(info["client-id"]),
            "train_examples": int(info["train-examples"]),
            "val_examples": int(info["val-examples"]),
            "label_histogram": dict(zip(info["label-names"], info["label-counts"])),
        })
    known = state.run.path / "clients.json"  # a node that rejoins under a new node id replaces its entry
    earlier = {c["client_id"]: c for c in json.loads(known.read_text())} if known.exists() else {}
    everyone = {**earlier, **{c["client_id"]: c for c in summaries}}
    state.run.write_json("clients.json", [everyone[c] for c in sorted(everyone)])
    for s in summaries:
        top = sorted(s["label_histogram"].items(), key=lambda kv: -kv[1])[:4]
        log(INFO, "fedtune: client %-14s train %5d  val %4d  top labels %s",
            s["client_id"], s["train_examples"], s["val_examples"], ", ".join(f"{k}:{v}" for k, v in top))


def run_round(grid: Grid, state: ServerState, strategy, server_round: int) -> None:
    cfg, start = state.cfg, time.perf_counter()
    try:
        discover_clients(grid, state)
    except TimeoutError as err:
        log(WARNING, "fedtune: %s", err)
        state.status = "not-enough-clients"
        return
    random.seed(round_seed(cfg.seed, server_round))  # Flower's sample_nodes uses `random`
    np.random.seed(round_seed(cfg.seed, server_round) % 2**32)  # Flower's DP noise uses numpy's global RNG
    ordered = OrderedGrid(grid, state.clients)
    messages = list(strategy.configure_train(
        server_round, state_to_record(state.arrays), state.message_config(), ordered
    ))
    population = len(ordered.get_node_ids())
    dp_wrapper = strategy_with(strategy, "num_sampled_clients")
    if dp_wrapper is not None:  # Flower's DP noise is z*C/num_sampled_clients: use the real sample size
        dp_wrapper.num_sampled_clients = max(1, len(messages))
    projected = federation_would_exceed(state.ledger, cfg, population=population, sampled=len(messages))
    if projected is not None:
        state.status = "federation-privacy-budget-exhausted"
        log(WARNING, "fedtune: stopping before round %d: federation epsilon would reach %.3f, budget %.3f",
            server_round, projected, cfg.dp_client_epsilon_budget)
        return
    log(INFO, "fedtune: round %d/%d: training on %d clients", server_round, cfg.num_server_rounds, len(messages))
    replies = grid.send_and_receive(messages, timeout=cfg.round_timeout)  # sets each message's id
    sent = sent_to(messages)
    replies = sort_replies(replies, state.clients, sent)
    failed, refused, ok = classify_replies(replies, state.clients, sent)
    if refused and not ok and not failed:
        state.status = "client-privacy-budgets-exhausted"  # committed below; the loop then stops
        log(WARNING, "fedtune: every sampled client refused round %d: its own privacy record says the round would "
            "take its epsilon above its budget. The records persist across runs on the same data, in each node's "
            "privacy-dir (node config), else $FEDTUNE_PRIVACY_DIR, else ~/.fedtune/privacy (here: %s)",
            server_round, privacy_dir())
    summary = train_summary(ok, sampled=len(messages))
    aggregated, _ = strategy.aggregate_train(server_round, ok) if ok else (None, None)
    rejected = list(getattr(strategy, "rejections", [])) if ok else []
    if aggregated is not None:
        state.arrays = conform_to_schema(state.initial, record_to_state(aggregated))
    entry = round_entry(server_round, messages, replies, failed, refused, rejected, state.clients, sent)
    state.rounds.append(entry)
    if entry["sampled"] and not entry["aggregated"] and not entry["refused"]:
        state.status = "all-clients-failed"
    privacy = record_privacy(state, strategy, server_round, ok, refused, failed, population=population,
                             sampled=len(messages), accepted=len(entry["aggregated"]))
    row = evaluation_row(state, server_round)
    row.update(summary)
    row.update({k: len(entry[k]) for k in ("aggregated", "rejected", "failed", "timed_out", "refused")})
    row.update(privacy)
    if state.status == "running":
        row.update(federated_evaluation(grid, state, strategy, server_round, ordered))
    row["seconds"] = round(time.perf_counter() - start, 2)
    state.history.append(row)
    commit_round(state, strategy, server_round)
    log(INFO, "fedtune: %s", summary_line(row, cfg.num_server_rounds))


def round_entry(server_round: int, messages, replies, failed, refused, rejected, clients, sent) -> dict:
    """Where every sampled client ended up this round; the categories partition the sample (I4)."""
    name = {m.metadata.dst_node_id: clients.get(m.metadata.dst_node_id, f"node-{m.metadata.dst_node_id}")
            for m in messages}
    replied = {node_of(r, sent) for r in replies}
    rejected_first = {}
    for client_id, reason in rejected:  # a node's duplicate replies are extra; its first verdict counts
        rejected_first.setdefault(client_id, reason)
    refused_ids = {c for c, _ in refused}
    entry = {
        "round": server_round,
        "sampled": sorted(name.values()),
        "failed": sorted(set(failed)),
        "refused": sorted(refused_ids),
        "timed_out": sorted(name[n] for n in name if n not in replied),
        "rejected": [{"client": c, "reason": r} for c, r in sorted(rejected_first.items())],
    }
    settled = set(entry["failed"]) | refused_ids | set(entry["timed_out"]) | set(rejected_first)
    entry["aggregated"] = sorted(c for c in name.values() if c not in settled)
    parts = [entry["aggregated"], entry["failed"], entry["refused"], entry["timed_out"], list(rejected_first)]
    if sorted(c for part in parts for c in part) != entry["sampled"]:
        raise AssertionError(f"round ledger does not close in round {server_round}: {entry}")
    return entry


def classify_replies(replies: list[Message], clients: dict[int, str], sent: dict[str, int]):
    """(failed client ids, refused (id, reply), trained replies) of one training round."""
    failed, refused, ok = [], [], []
    for reply in replies:
        client_id = client_of(reply, clients, sent)
        if reply.has_error():
            log(WARNING, "fedtune: client %s failed: %s", client_id, reply.error.reason)
            failed.append(client_id)
        elif "privacy" in reply.content.config_records and reply.content["privacy"]["status"] != "trained":
            log(WARNING, "fedtune: client %s did not train: %s", client_id, reply.content["privacy"]["status"])
            refused.append((client_id, reply))
        else:
            ok.append(reply)
    return failed, refused, ok


def record_privacy(state: ServerState, strategy, server_round: int, ok, refused, failed, *, population: int,
                   sampled: int, accepted: int) -> dict:
    """Append this round's ledger entries; returns the round's epsilon figures for the metrics row."""
    cfg, out = state.cfg, {}
    if cfg.dp_sample:
        trained = [(client_of(r, state.clients, {}), r) for r in ok if "privacy" in r.content.config_records]
        entries = [state.ledger.append(e) for e in client_entries(server_round, trained, refused, failed)]
        spent = [e["epsilon"] for e in entries if e["status"] == "trained"]
        if spent:
            out["epsilon_client_max"] = max(spent)
    if cfg.dp_client != "off":
        entry = state.ledger.append(federation_entry(
            state.ledger, cfg, server_round=server_round, population=population, sampled=sampled,
            accepted=accepted, clipping_norm=current_clipping_norm(strategy_with(strategy, "noise_multiplier"), cfg),
            noise_denominator=max(1, sampled),
        ))
        out["epsilon_federation"] = entry["epsilon"]
    return out


def federated_evaluation(grid: Grid, state: ServerState, strategy, server_round: int, ordered) -> dict:
    """Clients evaluate the new global adapter on their local validation slices."""
    if state.cfg.fraction_evaluate == 0.0:
        return {}
    messages = list(strategy.configure_evaluate(
        server_round, state_to_record(state.arrays), state.message_config(), ordered
    ))
    replies = grid.send_and_receive(messages, timeout=state.cfg.round_timeout)
    replies = sort_replies(replies, state.clients, sent_to(messages))
    ok = [r for r in replies if not r.has_error() and r.content["metrics"]["num-examples"] > 0]
    metrics = strategy.aggregate_evaluate(server_round, ok) if ok else None
    if metrics is None:
        return {}
    return {f"clients_{k.replace('-', '_')}": float(v) for k, v in metrics.items() if k != "num-examples"}


def evaluation_row(state: ServerState, server_round: int) -> dict:
    """Evaluate the global adapter on the server's held-out set."""
    cfg = state.cfg
    model = model_for_config(cfg, len(state.labels))
    tokenizer = load_tokenizer(cfg.model)
    set_adapter_state(model, state.arrays)
    heldout = encode_for_task(cfg, heldout_set(cfg), tokenizer, state.labels, where="held-out set")
    res = evaluate(model, heldout, pad_id=tokenizer.pad_token_id, batch_size=cfg.eval_batch_size,
                   num_labels=len(state.labels))
    names = ("loss", "perplexity") if cfg.task == "causal-lm" else ("loss", "accuracy", "macro_f1")
    row = {"round": server_round, **{f"heldout_{n}": res[n] for n in names}, "heldout_examples": res["examples"]}
    if cfg.task == "causal-lm":
        write_samples(state, model, tokenizer, server_round)
    if server_round == 0:
        log(INFO, "fedtune: round 0 (before training): held-out %s",
            " ".join(f"{n.replace('macro_f1', 'macro-F1')} {res[n]:.4f}" for n in names))
    return row


def write_samples(state: ServerState, model, tokenizer, server_round: int) -> None:
    """Generate from the fixed sample prompts with the global adapter; append to samples.jsonl."""
    cfg = state.cfg
    prompts = sample_prompts(cfg.sample_prompts, heldout_set(cfg))
    outputs = generate(model, tokenizer, prompts, template=cfg.prompt_template, max_new_tokens=cfg.max_new_tokens,
                       max_length=cfg.max_length)
    path = state.run.path / "samples.jsonl"
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["round"] < server_round] \
        if path.exists() else []  # a resumed run rewrites the rounds after its checkpoint
    rows = [json.dumps({"round": server_round, "prompt": p, "response": o}) for p, o in zip(prompts, outputs)]
    path.write_text("".join(line + "\n" for line in kept + rows))


def train_summary(replies: list[Message], *, sampled: int) -> dict:
    """Per-round training figures; computed before any weight policy rewrites num-examples."""
    if not replies:
        return {"clients_sampled": sampled, "clients_ok": 0}
    m = [r.content["metrics"] for r in replies]
    n = sum(x["num-examples"] for x in m)
    return {
        "clients_sampled": sampled,
        "clients_ok": len(replies),
        "train_loss": sum(x["train-loss"] * x["num-examples"] for x in m) / n if n else float("nan"),
        "train_examples": int(n),
        "train_seconds_max": max(x["train-seconds"] for x in m),
    }


def commit_round(state: ServerState, strategy, server_round: int) -> None:
    """Checkpoint, adapter, metrics and plot for a completed round."""
    run = state.run
    save_checkpoint(run.checkpoints, Checkpoint(
        server_round=server_round, adapter=state.arrays, strategy=strategy_state(strategy),
        meta={"config": state.cfg.to_run_config(), "history": state.history, "ledger": state.ledger.entries,
              "rounds": state.rounds, "frozen": state.frozen, "data": state.data},
    ))
    run.write_lines("rounds.jsonl", state.rounds)
    if state.private:
        state.ledger.write(run.path / "privacy-ledger.jsonl")
    model = model_for_config(state.cfg, len(state.labels))
    save_adapter(model, state.arrays, run.adapters / f"round-{server_round:04d}")
    run.write_metrics(state.history)
    run.plot(state.history)


def conform_to_schema(initial: dict, aggregated: dict) -> dict:
    """The server's own aggregate, in the initial adapter's dtypes (I2).

    Flower's FedOpt family computes in float64; the global adapter stays float32. Keys and
    shapes must already match: anything else is a bug and raises.
    """
    cast = {k: v.astype(initial[k].dtype, copy=False) if k in initial else v for k, v in aggregated.items()}
    check_adapter_state(initial, cast)
    return cast


def sort_replies(replies: Iterable[Message], clients: dict[int, str], sent: dict[str, int]) -> list[Message]:
    """Replies in client-id order, so aggregation sums in the same order on every run."""
    return sorted(replies, key=lambda r: (client_of(r, clients, sent), r.metadata.src_node_id))


def sent_to(messages: Iterable[Message]) -> dict[str, int]:
    """Message id -> the node it was sent to (ids are set when the Grid pushes the messages)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages}


def node_of(reply: Message, sent: dict[str, int]) -> int:
    """The node a reply answers for. When a node is lost mid-round, the SuperLink itself replies
    with an error from its own node id, so the sender alone would misattribute the failure."""
    return sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def client_of(reply: Message, clients: dict[int, str], sent: dict[str, int]) -> str:
    node = node_of(reply, sent)
    return clients.get(node, f"node-{node}")


def round_seed(seed: int, server_round: int) -> int:
    return seed * 100_003 + server_round


def summary_line(row: dict, num_rounds: int) -> str:
    text = (f"round {row['round']}/{num_rounds} | clients {row.get('aggregated', 0)}/{row.get('clients_sampled', 0)}"
            f" | train loss {row.get('train_loss', float('nan')):.4f}")
    if "heldout_perplexity" in row:
        text += f" | held-out loss {row['heldout_loss']:.4f} perplexity {row['heldout_perplexity']:.2f}"
    else:
        text += f" | held-out acc {row['heldout_accuracy']:.4f} macro-F1 {row['heldout_macro_f1']:.4f}"
    if "epsilon_client_max" in row:
        text += f" | client eps max {row['epsilon_client_max']:.3f}"
    if "epsilon_federation" in row:
        text += f" | federation eps {row['epsilon_federation']:.3f}"
    return text + f" | {row['seconds']:.1f}s"
