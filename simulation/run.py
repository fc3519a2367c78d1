"""Run a fedtune federation of N simulated clients on Flower's simulation engine.

    fedtune simulate --num-clients 3 -c num-server-rounds=3 -c partitioner=iid

The config is parsed and the data partitioned before the engine starts, so a bad value
or an empty partition fails in seconds with a message, not inside a worker. One Ctrl-C ends
the simulation at once: it records `interrupted` in status.json and stops every process the
engine started; the last completed round's checkpoint is intact, so `-c resume=true` continues.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.config import FedtuneConfig, parse_key_values, parse_run_config
from common.errors import ConfigError
from common.federation_data import federation_labels, partition_summaries


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`-c key=value` items, several per item as with `flwr run --run-config 'k1=v1 k2=v2'`."""
    return parse_key_values(items, what="run config override")


def plan_resources(clients_training: int, cpus: int | None = None) -> tuple[int, int]:
    """(parallel clients, torch threads per client) that fit the machine's cores.

    Sized by the clients that train at once (those sampled a round), not all clients:
    with 2 of 100 sampled on 8 cores, each of the 2 gets 4 threads rather than 1.
    """
    cpus = cpus or len(os.sched_getaffinity(0))
    parallel = max(1, min(clients_training, cpus))
    return parallel, max(1, cpus // parallel)


def prepare(overrides: Mapping[str, Any], num_clients: int) -> FedtuneConfig:
    """Parse and validate everything that can be checked before round 1."""
    cfg = parse_run_config(overrides)
    if not cfg.run_dir:  # named here, so that an interrupted run can say where it stopped
        cfg = cfg.replace(run_dir=str(Path.cwd() / "runs" / time.strftime("%Y%m%d-%H%M%S")))
    if num_clients < 1:
        raise ConfigError(f"num-clients: expected at least 1, got {num_clients}")
    from common.task import task_for
    from server.strategy import robust_capacity_problem

    task_for(cfg).device()  # a device or precision this machine lacks: refused before the engine starts

    problem = robust_capacity_problem(cfg, cfg.train_sample_size(num_clients))
    if problem:
        raise ConfigError(problem)
    if cfg.secure_aggregation:
        from common.secagg import SecAggError, threshold_for

        try:
            threshold_for(cfg.train_sample_size(num_clients), cfg.secagg_max_dropouts)
        except SecAggError as err:
            raise ConfigError(f"secagg-max-dropouts: {err}") from None
    if cfg.min_available_clients > num_clients or cfg.min_train_clients > num_clients:
        raise ConfigError(
            f"min-available-clients / min-train-clients: expected at most num-clients={num_clients}, "
            f"got {cfg.min_available_clients} / {cfg.min_train_clients}"
        )
    cfg = task_for(cfg).with_labels(federation_labels(cfg))  # a classifier's label order, for every client
    partition_summaries(cfg, num_clients)  # raises on empty partitions or unknown labels
    return cfg


def load_client_app(spec: str):
    """'module:attribute' -> the ClientApp object (fedtune's own by default)."""
    import importlib

    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr or "app")
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"--client-app: expected 'module:attribute' naming a ClientApp, got {spec!r} ({err})"
        ) from None


def simulate(
    cfg: FedtuneConfig, num_clients: int, client_app_spec: str = "client.app:app", *, quiet: bool = False
) -> None:
    """Start the simulation engine with fedtune's ServerApp and a ClientApp."""
    # Ray has no authentication: its GCS, raylet and workers must listen on loopback only. On
    # Linux Ray takes the machine's network address as the node's and listens on all interfaces
    # unless clustering is switched off (Ray's switch for a one-machine instance), which this
    # one-machine engine never needs. Set before Ray is imported: Ray reads it at import.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    keep_ray_home()
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from common.device import MEMORY_FRACTION_ENV
    from server.loop import run_server
    from server.resume import preflight
    from simulation.progress import progress_display

    client_app = load_client_app(client_app_spec)
    preflight(cfg)  # the server's run-dir refusals, before the engine's start-up rather than after

    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:  # the CLI's config replaces the app's defaults
        run_server(grid, cfg)

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # show every client's progress lines
    backend = backend_config(cfg, num_clients)
    share = backend["client_resources"]["num_gpus"]
    if share:  # read by each client process (common/device.py: bound_memory)
        os.environ[MEMORY_FRACTION_ENV] = str(round(0.9 * share, 3))
    with stop_on_interrupt(Path(cfg.run_dir)), progress_display(Path(cfg.run_dir), cfg.num_server_rounds, quiet=quiet):
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients, backend_config=backend)


CLOSED_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens there


def keep_ray_home() -> None:
    """Ray's dashboard process probes the cloud metadata services (169.254.169.254,
    metadata.google.internal) over plain HTTP as it starts, whatever its usage-statistics switch
    says (with the dashboard off it loads just that module). A one-machine simulation makes no
    plain-HTTP request beyond this machine: unless the user set a proxy, such requests go to a
    closed loopback port instead (HTTPS, as the Hub uses, is untouched)."""
    if not any(os.environ.get(k) for k in ("http_proxy", "HTTP_PROXY")):
        os.environ["http_proxy"] = CLOSED_PROXY
        os.environ["no_proxy"] = ",".join(filter(None, [os.environ.get("no_proxy"), "localhost,127.0.0.1,::1"]))


def backend_config(cfg: FedtuneConfig, num_clients: int) -> dict:
    """The engine's resources: as many clients at once as train a round (up to the cores), each
    with an equal share of the cores. Ray sets each client actor's OMP_NUM_THREADS to its
    num_cpus, which is what a client's torch threads default to (client/training.py). With a GPU
    the clients that train at once share it, each capped at 90% of its share of the memory."""
    parallel, threads = plan_resources(cfg.train_sample_size(num_clients))
    from common.task import task_for

    gpus = 1.0 / parallel if task_for(cfg).device().type == "cuda" else 0.0  # the clients share one GPU
    return {
        "client_resources": {"num_cpus": threads, "num_gpus": gpus},
        "init_args": {"num_cpus": parallel * threads, "include_dashboard": False},
    }


@contextmanager
def stop_on_interrupt(run_dir: Path) -> Iterator[None]:
    """SIGINT (Ctrl-C) ends the run at once. Flower's engine would stop its clients and leave the
    ServerApp thread waiting for their replies until round-timeout; instead the run is recorded as
    `interrupted` (with the last completed round) and every process the engine started is ended."""

    def interrupted(signum, frame) -> None:
        import psutil

        from server.checkpoint import checkpoints_by_round
        from server.rundir import RunDir

        saved = checkpoints_by_round(run_dir / "checkpoints") if run_dir.is_dir() else {}
        rounds = max(saved, default=0)
        if RunDir(run_dir).marked:
            RunDir(run_dir).write_json(
                "status.json",
                {"status": "interrupted", "reason": "stopped by SIGINT (Ctrl-C)", "rounds_completed": rounds},
            )
        if sys.stderr.isatty():
            sys.stderr.write("\x1b[?25h")  # the progress display hides the cursor; os._exit skips its cleanup
        if saved:
            print(
                f"\nfedtune: interrupted after round {rounds}; results so far in {run_dir}; continue with "
                f"-c run-dir={run_dir} -c resume=true",
                file=sys.stderr,
                flush=True,
            )
        else:  # nothing checkpointed yet: a resume would find nothing to continue
            print(
                f"\nfedtune: interrupted before round 0 was checkpointed; nothing to resume: start the run again "
                f"(the same -c run-dir={run_dir} is fine)",
                file=sys.stderr,
                flush=True,
            )
        for child in psutil.Process().children(recursive=True):  # Ray's GCS, raylet and client actors
            try:
                child.kill()
            except psutil.Error:
                pass
        os._exit(130)

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
