"""The `fedtune` command line.

fedtune simulate [--num-clients N] [-c key=value ...]   local multi-client simulation
fedtune config                                           list every config key and default
fedtune plan --target-epsilon 3 --rounds 10 ...          noise needed for a privacy target
fedtune audit RUN_DIR                                    check a run's privacy ledger
fedtune export RUN_DIR OUT [--merged]                    save the adapter, or the merged model
fedtune evaluate RUN_DIR --data FILE [--round N|best|final] [--perturb typo,case,punct]
                                                         score a run's adapter on a labelled file
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

from common.errors import ConfigError, FedtuneError

# Calls home that the libraries under fedtune make unless told not to (docs/deployment.md#outbound-calls):
# Flower's telemetry and update check, Ray's usage statistics, the Hugging Face Hub's telemetry. fedtune's
# commands switch them off, also in the processes they start (the simulation's Ray workers, the SuperNode
# `fedtune supernode` execs); a variable the user set wins.
NO_CALLS_HOME = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated LoRA fine-tuning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_simulate(sub)
    sub.add_parser("config", help="List every config key with its default and help.")
    add_plan(sub)
    add_audit(sub)
    add_certs(sub)
    add_export(sub)
    add_evaluate(sub)
    node = sub.add_parser(
        "supernode",
        help="Check a node's data and keys, then start flower-supernode with ARGS beside a warm worker that keeps "
        "the model and data loaded across messages (--cold: without it, one process per message).",
    )
    node.add_argument("args", nargs=argparse.REMAINDER, help="[--cold] flower-supernode arguments.")
    return parser


def add_simulate(sub) -> None:
    sim = sub.add_parser("simulate", help="Run N simulated clients on this machine (offline by default).")
    sim.add_argument("--num-clients", type=int, default=3, help="Simulated clients (default 3).")
    sim.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a config key (repeatable), as with `flwr run --run-config`.",
    )
    sim.add_argument(
        "--quiet",
        action="store_true",
        help="No live progress display and no per-step client lines: one line per round (for logs).",
    )
    sim.add_argument(
        "--client-app",
        default="client.app:app",
        metavar="MODULE:ATTR",
        help="ClientApp to simulate (e.g. simulation.faults:app for fault injection).",
    )


def add_plan(sub) -> None:
    plan = sub.add_parser("plan", help="DP-SGD noise, batch and noise/signal for a privacy target, before training.")
    plan.add_argument("--target-epsilon", type=float, required=True)
    plan.add_argument("--delta", type=float, default=1e-5)
    plan.add_argument("--rounds", type=int, required=True)
    plan.add_argument("--num-clients", type=int, required=True, help="Clients in the federation.")
    plan.add_argument("--clients-per-round", type=int, required=True)
    plan.add_argument("--local-examples", type=int, required=True, help="Training examples on one client.")
    plan.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="Expected DP-SGD batch (dp-batch-size); 0 = auto, examples / 8 up to 1024.",
    )
    plan.add_argument("--local-epochs", type=int, default=1)
    plan.add_argument("--local-steps", type=int, default=0)
    plan.add_argument("--clipping-norm", type=float, default=1.0)
    plan.add_argument(
        "--trainable",
        type=int,
        default=0,
        help="Trainable values d; 0 = the adapter of the run config's model and LoRA (-c).",
    )
    plan.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Model and LoRA keys that set d when --trainable is 0 (e.g. -c lora-r=16).",
    )
    plan.add_argument(
        "--dp-mode",
        choices=["local", "distributed"],
        default="local",
        help="local: each client's DP-SGD (default); distributed: one DP-SGD step a round over the "
        "federation's records, --batch-size their expected batch, --rounds the steps.",
    )
    plan.add_argument(
        "--max-dropouts",
        type=int,
        default=1,
        help="distributed: secagg-max-dropouts, the clients a round may lose (default 1).",
    )


def add_audit(sub) -> None:
    audit = sub.add_parser("audit", help="Verify a run's privacy ledger; exit 1 on any problem.")
    audit.add_argument("run_dir", help="A fedtune run directory.")
    audit.add_argument(
        "--records",
        action="append",
        default=[],
        metavar="DIR",
        help="A folder of clients' own privacy records (a node's privacy-dir; in simulation "
        "$FEDTUNE_PRIVACY_DIR) to hold the ledger against (repeatable).",
    )


def add_certs(sub) -> None:
    certs = sub.add_parser("certs", help="Create a CA, the SuperLink's TLS certificate and one key pair per node.")
    certs.add_argument("out", help="A new directory for the certificates and keys.")
    certs.add_argument("--nodes", required=True, help="Comma-separated node names, e.g. site-a,site-b.")
    certs.add_argument("--host", action="append", default=[], help="SuperLink host name or IP (repeatable).")
    certs.add_argument(
        "--keys-only",
        action="store_true",
        help="Only the node key pairs, into OUT/nodes/ (a data owner's own pair, or a node added "
        "to an existing deployment); the CA and server files are not touched.",
    )


def add_export(sub) -> None:
    export = sub.add_parser("export", help="Save a run's global adapter, alone or merged into the base model.")
    export.add_argument("run_dir", help="A fedtune run directory.")
    export.add_argument("out", help="Output directory.")
    export.add_argument(
        "--merged",
        action="store_true",
        help="Merge the adapter into the base model (a plain transformers model directory).",
    )


def add_evaluate(sub) -> None:
    score = sub.add_parser(
        "evaluate",
        help="Score a run's adapter on a labelled file: per-class metrics, confusion "
        "matrix, and optionally the drop under noisy input.",
    )
    score.add_argument("run_dir", help="A fedtune run directory.")
    score.add_argument("--data", required=True, help="Labelled file (CSV/TSV/JSONL/Parquet), read like training data.")
    score.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="The file's data options (data-format, column-names, text-column, label-column, ...), "
        "eval-batch-size, device, compute-dtype and (causal-lm) choices; the rest comes from the run.",
    )
    score.add_argument("--round", default="final", help="A round number, best (best.json) or final (default).")
    score.add_argument("--out", default=None, help="Output directory (default RUN_DIR/evaluations/<file>-round-N).")
    score.add_argument("--perturb", default="", help="Comma-separated noise kinds to score too: typo, case, punct.")
    score.add_argument("--rate", type=float, default=0.1, help="Noise rate of --perturb (default 0.1).")
    score.add_argument("--seed", type=int, default=0, help="Seed of --perturb's noise (default 0).")


def print_plan(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from common.privacy_plan import make_plan

    check_plan_args(args)
    if args.clients_per_round > args.num_clients:
        raise ConfigError(
            f"--clients-per-round: expected at most --num-clients ({args.num_clients}), got {args.clients_per_round}"
        )
    trainable = args.trainable or trainable_values(args.run_config)
    if args.dp_mode == "distributed":
        print_distributed_plan(args, trainable)
        return
    plan = make_plan(
        target_epsilon=args.target_epsilon,
        delta=args.delta,
        rounds=args.rounds,
        num_clients=args.num_clients,
        clients_per_round=args.clients_per_round,
        local_examples=args.local_examples,
        trainable=trainable,
        batch_size=args.batch_size,
        local_epochs=args.local_epochs,
        local_steps=args.local_steps,
        clipping_norm=args.clipping_norm,
    )
    s = plan.sample
    console = Console()
    console.print(
        f"sample level: dp-noise-multiplier = {s.noise_multiplier:.4f} (dp-batch-size {s.batch_size}: "
        f"Poisson rate {s.sample_rate:.5f}, expected batch {s.expected_batch:.0f}, "
        f"{s.steps_per_round} steps per round, {s.steps_per_round * s.rounds} in all, PLD)"
    )
    console.print(
        f"  noise per coordinate sigma*C/B = {s.noise_std:.3g}; noise/signal sigma*sqrt(d)/B = "
        f"{s.noise_to_signal:.3f} for d = {trainable:,} trainable values, "
        f"{s.averaged_noise_to_signal:.3f} averaged over {s.clients_per_round} clients"
    )
    for problem in s.problems():
        console.print(f"  [bold red]warning[/]: {problem}")
    console.print(
        f"client level: dp-client-noise-multiplier = {plan.client_noise_multiplier:.4f} "
        f"({args.clients_per_round} of {args.num_clients} clients without replacement, RDP)"
    )
    table = Table(title=f"projected epsilon at delta={args.delta:g}")
    for col in ("round", "sample-level epsilon", "client-level epsilon"):
        table.add_column(col, justify="right")
    for r, a, b in zip(plan.rounds_shown, plan.sample_epsilons, plan.client_epsilons, strict=True):
        table.add_row(str(r), f"{a:.4f}", f"{b:.4f}")
    console.print(table)
    others = Table(title="the same target at other dp-batch-size values", caption="* this plan")
    for col in ("batch", "sigma", "steps", "noise/signal", "averaged", "verdict"):
        others.add_column(col, justify="right", no_wrap=True)
    for p in sorted([s, *plan.alternatives], key=lambda p: p.batch_size):
        verdict = ", ".join(p.verdicts()) or "fine"
        mark = "*" if p is s else ""
        others.add_row(
            f"{p.batch_size}{mark}",
            f"{p.noise_multiplier:.3f}",
            str(p.steps_per_round * p.rounds),
            f"{p.noise_to_signal:.2f}",
            f"{p.averaged_noise_to_signal:.2f}",
            verdict,
        )
    console.print(others)


# `fedtune plan`'s flags that mean what a run-config key means, checked as that key is.
PLAN_KEYS = {
    "target_epsilon": "dp-target-epsilon",
    "delta": "dp-delta",
    "rounds": "num-server-rounds",
    "batch_size": "dp-batch-size",
    "local_epochs": "local-epochs",
    "local_steps": "local-steps",
    "clipping_norm": "dp-clipping-norm",
    "max_dropouts": "secagg-max-dropouts",
}


def check_plan_args(args) -> None:
    """The flags against the rules of the run-config keys they stand for (parsed as one config), and
    the federation's own numbers."""
    import math

    from common.config import parse_run_config

    if not (math.isfinite(args.target_epsilon) and args.target_epsilon > 0):
        raise ConfigError(
            f"--target-epsilon (dp-target-epsilon): expected a finite value > 0, got {args.target_epsilon}"
        )
    raw = {"dp-sample": True, **{key: getattr(args, flag) for flag, key in PLAN_KEYS.items()}}
    if raw["local-steps"] > 0 and raw["local-epochs"] == 1:
        raw.pop("local-epochs")
    try:
        parse_run_config(raw)
    except ConfigError as err:
        key = str(err).split(":", 1)[0]
        flag = next((f for f, k in PLAN_KEYS.items() if k == key), None)
        raise ConfigError(f"--{flag.replace('_', '-')} ({err})" if flag else str(err)) from None
    for name in ("num_clients", "clients_per_round", "local_examples"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a value >= 1, got {getattr(args, name)}")
    if args.trainable < 0:
        raise ConfigError(
            f"--trainable: expected the adapter's trainable values (>= 1), or 0 for the configured "
            f"model's, got {args.trainable}"
        )


def print_distributed_plan(args, trainable: int) -> None:
    """`fedtune plan --dp-mode distributed`: the noise of the summed Skellam noise, each client's share,
    and the epsilon the federation reaches over the steps."""
    from rich.console import Console
    from rich.table import Table

    from common.privacy import epsilon_rdp
    from common.privacy_plan import distributed_plan, shown_rounds
    from common.secagg import SecAggError, threshold_for

    try:
        threshold = threshold_for(args.clients_per_round, args.max_dropouts)
    except SecAggError as err:
        raise ConfigError(f"--max-dropouts: {err}") from None
    plan = distributed_plan(
        examples=args.num_clients * args.local_examples,
        batch_size=args.batch_size,
        rounds=args.rounds,
        clipping_norm=args.clipping_norm,
        dimension=trainable,
        delta=args.delta,
        target_epsilon=args.target_epsilon,
    )
    l2, _ = plan.sensitivities
    console = Console()
    console.print(
        f"distributed: dp-noise-multiplier = {plan.noise_multiplier:.4f} of the summed Skellam noise "
        f"(expected batch {plan.batch_size} of {plan.examples:,} records, rate {plan.sample_rate:.5f}, "
        f"{plan.rounds} steps, one a round; Skellam RDP)"
    )
    console.print(
        f"  integer scale s = {plan.scale:.1f}, L2 sensitivity s*C + sqrt(d) = {l2:.1f}; each of "
        f"{args.clients_per_round} clients adds noise of std {plan.noise_multiplier * l2 / threshold**0.5:.1f}"
        f" (any {threshold} carry the target {plan.noise_multiplier * l2:.1f})"
    )
    console.print(
        f"  noise per coordinate {plan.gradient_noise_std:.3g}; noise/signal {plan.noise_to_signal:.3f} for "
        f"d = {trainable:,} trainable values"
    )
    table = Table(title=f"projected federation epsilon at delta={args.delta:g}")
    for col in ("round", "epsilon"):
        table.add_column(col, justify="right")
    for r in shown_rounds(plan.rounds):
        table.add_row(str(r), f"{epsilon_rdp([plan.mechanism(steps=r)], delta=args.delta):.4f}")
    console.print(table)


def trainable_values(overrides: list[str]) -> int:
    """d for `fedtune plan`: the adapter size of the configured model and LoRA (loads the model)."""
    from common.config import parse_run_config
    from common.model import get_adapter_state
    from common.task import task_for
    from simulation.run import parse_overrides

    cfg = parse_run_config(parse_overrides(overrides))
    labels = len(cfg.labels.split(",")) if cfg.labels else 2
    return sum(v.size for v in get_adapter_state(task_for(cfg).model(labels, fresh=True)).values())


def run_config_listing(args) -> int:
    from common.config_reference import reference

    for _, key, default, help_text in reference():
        print(f"{key:26} {default:28} {help_text}")
    return 0


def run_plan(args) -> int:
    print_plan(args)
    return 0


def run_certs(args) -> int:
    from pathlib import Path

    from server.tools.pki import make_deployment_pki, make_node_key_pairs

    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    if args.keys_only:
        make_node_key_pairs(Path(args.out), nodes=nodes)
        print(f"wrote nodes/<name> and nodes/<name>.pub for {nodes} to {args.out}")
        return 0
    make_deployment_pki(Path(args.out), nodes=nodes, hosts=args.host or ["127.0.0.1", "localhost"])
    print(f"wrote ca.crt, server.crt/.key and nodes/<name>(.pub) for {nodes} to {args.out}")
    return 0


def run_supernode(args) -> int:
    from client.node import run_supernode as run

    rest = [a for a in args.args if a != "--"]
    return run([a for a in rest if a != "--cold"], cold="--cold" in rest)


def run_export(args) -> int:
    from server.tools.export import export_run

    out, server_round = export_run(args.run_dir, args.out, merged=args.merged)
    print(f"wrote the {'merged model' if args.merged else 'adapter'} of round {server_round} to {out}")
    return 0


def run_evaluate(args) -> int:
    from server.tools.scoring import evaluate_run, print_report, terminal_progress

    folder, report = evaluate_run(
        args.run_dir,
        args.data,
        overrides=args.run_config,
        which=args.round,
        out=args.out,
        perturbations=[k.strip() for k in args.perturb.split(",") if k.strip()],
        rate=args.rate,
        seed=args.seed,
        progress=terminal_progress(),
    )
    print_report(report, folder)
    return 0


def run_audit_command(args) -> int:
    from pathlib import Path

    from server.tools.audit import render_table, run_audit

    result = run_audit(Path(args.run_dir), records=[Path(r) for r in args.records])
    render_table(result)
    return 0 if result.ok else 1


def run_simulate(args) -> int:
    from simulation.run import parse_overrides, prepare, simulate

    cfg = prepare(parse_overrides(args.run_config), args.num_clients)
    simulate(cfg, args.num_clients, args.client_app, quiet=args.quiet)
    return 0


COMMANDS = {
    "config": run_config_listing,
    "plan": run_plan,
    "certs": run_certs,
    "supernode": run_supernode,
    "export": run_export,
    "evaluate": run_evaluate,
    "audit": run_audit_command,
    "simulate": run_simulate,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["supernode"] and not {"-h", "--help"} & set(argv[1:2]):
        argv = ["supernode", "--", *argv[1:]]  # pass flower-supernode's own options through untouched
    args = build_parser().parse_args(argv)
    for key, value in NO_CALLS_HOME.items():  # before Flower is imported: it reads its switch at import
        os.environ.setdefault(key, value)
    try:
        return COMMANDS[args.command](args)
    except FedtuneError as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C in evaluate, plan, audit, export: a line, not a traceback
        print(f"\nfedtune: {args.command} interrupted; its results were not written", file=sys.stderr)
        return 130


def entry() -> int:
    """The `fedtune` command: `main`, then an exit without the interpreter's last sweep for
    garbage cycles through everything torch, transformers and Ray loaded (seconds of CPU,
    bench/README.md). Only for a process about to end: exit handlers still
    run (Ray's shutdown, logging's flush); fedtune closes what it writes as it writes it; frozen
    objects are never collected afterwards."""
    try:
        code = main()
    except BrokenPipeError:  # `fedtune config | head`: the reader left; no traceback (Python's docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(entry())
