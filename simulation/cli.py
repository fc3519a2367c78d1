"""The `fedtune` command line.

    fedtune simulate [--num-clients N] [-c key=value ...]   local multi-client simulation
    fedtune config                                           list every config key and default
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from common.config import FedtuneConfig
from common.errors import FedtuneError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated LoRA fine-tuning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="Run N simulated clients on this machine (offline by default).")
    sim.add_argument("--num-clients", type=int, default=3, help="Simulated clients (default 3).")
    sim.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE",
                     help="Override a config key (repeatable), as with `flwr run --run-config`.")
    sub.add_parser("config", help="List every config key with its default and help.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            for f in dataclasses.fields(FedtuneConfig):
                print(f"{f.name.replace('_', '-'):24} {f.default!r:30} {f.metadata['help']}")
            return 0
        from simulation.run import parse_overrides, prepare, simulate

        cfg = prepare(parse_overrides(args.run_config), args.num_clients)
        simulate(cfg, args.num_clients)
        return 0
    except FedtuneError as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
