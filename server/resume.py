"""Starting a run: a new run's empty run directory, or a resume's checks of its checkpoint
against this run (config, data, model), before anything is written."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.common.logger import log

from common.config import FedtuneConfig
from common.errors import CheckpointError, ConfigError, FedtuneError
from common.flower import load_strategy_state
from common.ledger import Ledger
from common.model import check_adapter_state
from common.task import task_for
from server.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint
from server.rundir import RunDir
from server.state import ServerState, initial_state, with_labels

# Keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = {
    "num-server-rounds",
    "resume",
    "run-dir",
    "round-timeout",
    "best-metric",
    "early-stopping-rounds",
    "device",
}


def preflight(cfg: FedtuneConfig) -> None:
    """run_server's checks of the run directory, for a caller that can make them before the
    federation starts: the simulation makes them before its engine does, so a refusal takes
    seconds rather than the engine's start-up. An empty run-dir names a new, timestamped one.
    The model is loaded here too (cached: the server's run reuses it), so a model path or a
    `lora-target-modules` that cannot work is refused before the engine starts."""
    cfg, labels = with_labels(cfg)
    task_for(cfg).model(len(labels))
    if not cfg.run_dir:
        return
    run = RunDir.for_config(cfg)  # a file, someone else's folder, a place that cannot be written: refused
    if not cfg.resume:
        refuse_checkpoints(run)
        return
    checked_checkpoint(initial_state(cfg, labels, run)[1])


def fresh_start(state: ServerState) -> int:
    refuse_checkpoints(state.run)
    return 0


def refuse_checkpoints(run: RunDir) -> None:
    """A new run starts in an empty run directory: it never overwrites another run's checkpoints,
    nor a folder that holds files other than a fedtune run's."""
    foreign = run.foreign_files()
    if foreign:
        raise ConfigError(
            f"run-dir {run.path}: expected an empty folder or a fedtune run directory for a new run, "
            f"but it holds files fedtune did not write: {foreign[:5]}{'...' if len(foreign) > 5 else ''}"
            "; choose another run-dir"
        )
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
        saved = ckpt.run_config().to_run_config()
    except ConfigError as err:
        raise CheckpointError(
            f"checkpoint {path}: expected a config this fedtune can run, got one that is not ({err})"
        ) from None
    now = state.cfg.to_run_config()
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        diffs = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in changed)
        raise CheckpointError(f"resume: expected the checkpoint's config, but these keys differ: {diffs}")
    if ckpt.meta.get("data", state.data) != state.data:
        files = (state.cfg.data, state.cfg.heldout_data)
        raise CheckpointError(
            f"resume: expected the data the run was trained on (fingerprint {ckpt.meta['data']} of the training "
            f"data and held-out set), got {state.data}: {' or '.join(repr(f) for f in files if f)} "
            "changed since; train on the new data in a new run-dir"
        )
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
    state.secagg_keys = list(ckpt.meta.get("secagg_keys", []))
    if "dp_plan" in ckpt.meta:  # distributed DP: the plan the ledger accounts, and the server's AdamW state
        from server.distributed_dp import plan_from_dict

        state.dp_plan = plan_from_dict(ckpt.meta["dp_plan"])
    if state.dp_optimizer is not None:
        state.dp_optimizer.load(ckpt.optimizer)
    state.rounds = [r for r in ckpt.meta.get("rounds", []) if r["round"] <= ckpt.server_round]
    state.run.write_metrics(state.history)
    if state.private:
        state.ledger.write(state.run.path / "privacy-ledger.jsonl")
    log(INFO, "fedtune: resumed from %s (round %d)", path.name, ckpt.server_round)
    return ckpt.server_round
