"""Round time of a deployed federation against a simulated one on the same work (issue 42).

    python bench/deploy.py --quick --out DIR                # the tiny work, warm and cold, and simulated
    python bench/deploy.py --out DIR                        # a default-sized round (the packaged MiniLM)
    python bench/deploy.py --quick --rounds 100 --only warm --out DIR   # a long deployed run

Deployed: a real SuperLink (TLS, SuperNode authentication, a database) and 3 SuperNodes started by
`fedtune supernode` (warm: beside the node's warm worker; cold: `--cold`, one process per message as
Flower does it) with one torch thread each (num-threads=1, as each simulated client gets one core),
each in a network namespace of its own where the machine allows (root, iproute2), else on loopback;
the run submitted with `flwr run`. Simulated: `fedtune simulate` with 3 clients.
The quick work is the deployment tests': 480 examples split IID over 3 sites, 2 local steps of
batch 16, 60 held-out examples, max-length 32; the default size is the default config's data and
steps with 3 IID clients. Seconds per round come from each run's metrics.jsonl (the server's own
clock, training and held-out evaluation); the per-message start-up left on a warm node is the age of
the message's ClientApp process when it handed the message over (the worker logs it); peak memory is
the largest resident set of a node's processes together (supervisor, worker, SuperNode, ClientApps),
sampled every second. Writes DIR/deploy.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_deployment import (  # noqa: E402 - the deployment tests' harness, one copy of it
    SITES,
    SMALL_RUN,
    Federation,
    Namespaces,
    bring_up,
    write_client_files,
)

DEFAULT_RUN = ['partitioner="iid"', "fraction-evaluate=0.0"]


class NodeMemory:
    """Peak resident memory of each node's process tree (its `fedtune supernode` and every descendant)."""

    def __init__(self, fed: Federation) -> None:
        self.fed, self.peak = fed, {s: 0 for s in SITES}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.stop.wait(1.0):
            for site in SITES:
                try:
                    root = psutil.Process(self.fed.procs[site].pid)
                    procs = [root, *root.children(recursive=True)]
                    rss = sum(p.memory_info().rss for p in procs if p.is_running())
                except psutil.Error:
                    continue
                self.peak[site] = max(self.peak[site], rss)


def seconds_per_round(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [round(r["seconds"], 2) for r in rows if r["round"] > 0]


def summary(seconds: list[float]) -> dict:
    return {
        "seconds_per_round": seconds,
        "mean": round(statistics.mean(seconds), 2),
        "mean_after_round_1": round(statistics.mean(seconds[1:]), 2) if len(seconds) > 1 else None,
    }


def deployed(out: Path, settings: list[str], rounds: int, *, cold: bool, netns: bool, quick: bool) -> dict:
    root = out / ("deployed-cold" if cold else "deployed-warm")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    fed = Federation(root)
    nets = Namespaces(SITES) if netns and Namespaces.available() else None
    memory = NodeMemory(fed)
    try:
        if nets:
            nets.create()
        if not quick:  # the default config's data split IID over the sites, before the nodes check their files
            from common.config import FedtuneConfig

            write_client_files(root, SITES, FedtuneConfig(partitioner="iid"))
        bring_up(fed, SITES, nets=nets, cold=cold, data=quick, threads=1)  # 1 core a client, as simulated
        memory.thread.start()
        run = root / "run"
        config = [
            *settings,
            f"num-server-rounds={rounds}",
            "min-available-clients=3",
            "round-timeout=600.0",
            f'run-dir="{run}"',
        ]
        start = time.monotonic()
        run_id = fed.submit(REPO, config)
        fed.wait_for_run(run, run_id, 120 + rounds * 600)
        wall = time.monotonic() - start
        status = json.loads((run / "status.json").read_text())["status"]
        if status != "completed":
            raise SystemExit(f"{root}: the deployed run ended {status!r}; see {root}/*.log")
    finally:
        memory.stop.set()
        fed.stop()
        if nets:
            nets.delete()
    ages = [float(a) for site in SITES for a in re.findall(r"ClientApp process ([0-9.]+) s old", fed.log(site))]
    handled = [
        float(a) for site in SITES for a in re.findall(r"message of run \d+ handled in ([0-9.]+) s", fed.log(site))
    ]
    rounds_log = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    return {
        **summary(seconds_per_round(run)),
        "wall_seconds": round(wall, 1),
        "where": "network namespaces" if nets else "loopback",
        "failed_or_timed_out": sum(len(r["failed"]) + len(r["timed_out"]) for r in rounds_log),
        "node_peak_rss_gb": {s: round(v / 2**30, 2) for s, v in memory.peak.items()},
        "clientapp_startup_seconds": _spread(ages),
        "worker_handling_seconds": _spread(handled),
    }


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"messages": len(values), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def simulated(out: Path, settings: list[str], rounds: int) -> dict:
    run = out / "simulated"
    shutil.rmtree(run, ignore_errors=True)
    args = [
        sys.executable,
        "-m",
        "simulation.cli",
        "simulate",
        "--quiet",
        "--num-clients",
        "3",
        "-c",
        f'run-dir="{run}"',
        "-c",
        f"num-server-rounds={rounds}",
    ]
    for item in settings:
        args += ["-c", item]
    start = time.monotonic()
    subprocess.run(args, cwd=REPO, check=True)
    return {**summary(seconds_per_round(run)), "wall_seconds": round(time.monotonic() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="the tiny work of the deployment tests")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="simulated,warm,cold", help="which of simulated, warm, cold to run")
    parser.add_argument("--loopback", action="store_true", help="no network namespaces even where possible")
    args = parser.parse_args()
    args.out = args.out.resolve()  # the federation's processes run in folders of their own
    settings = SMALL_RUN if args.quick else DEFAULT_RUN
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "deploy.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update({"work": "quick" if args.quick else "default", "settings": settings, "rounds": args.rounds})
    for part in args.only.split(","):
        if part == "simulated":
            result[part] = simulated(args.out, settings, args.rounds)
        elif part in ("warm", "cold"):
            result[f"deployed_{part}"] = deployed(
                args.out, settings, args.rounds, cold=part == "cold", netns=not args.loopback, quick=args.quick
            )
        else:
            sys.exit(f"--only: expected parts among simulated, warm, cold; got {part!r}")
        print(f"{part}: {json.dumps(result.get(part) or result.get('deployed_' + part))}", flush=True)
    if "simulated" in result:
        sim = result["simulated"]
        for part in ("warm", "cold"):
            dep = result.get(f"deployed_{part}")
            if dep and dep["seconds_per_round"] and len(dep["seconds_per_round"]) == len(sim["seconds_per_round"]):
                result[f"ratio_deployed_{part}_to_simulated"] = round(dep["mean"] / sim["mean"], 2)
                if dep["mean_after_round_1"]:
                    result[f"ratio_deployed_{part}_to_simulated_after_round_1"] = round(
                        dep["mean_after_round_1"] / sim["mean_after_round_1"], 2
                    )
        if "ratio_deployed_warm_to_simulated" in result:
            result["ratio_deployed_to_simulated"] = result["ratio_deployed_warm_to_simulated"]
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("ratio")}))


if __name__ == "__main__":
    main()
