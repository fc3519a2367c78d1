"""One live progress display for `fedtune simulate` on a terminal: the rounds, and a bar per client
with its local step and loss, instead of every client process's interleaved log lines.

The client processes write their progress to small files in a temporary folder
(client/training.py: `progress_reporter`); a thread of the driver renders them with rich, and the
rounds from the run's metrics.jsonl. The log lines that remain (the server's summary of each
round, warnings) print above the display. Off a terminal (logs, CI) the clients log a line every
few steps as before; `--quiet` drops those lines too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from client.messages import PROGRESS_DIR_ENV, QUIET_ENV

REFRESH_SECONDS = 0.5


def read_clients(folder: Path) -> list[dict]:
    states = []
    for path in sorted(folder.glob("*.json")):
        try:
            states.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # replaced between listing and reading: next refresh
            continue
    return states


def completed_rounds(run_dir: Path) -> tuple[int, str]:
    """(rounds completed, the last round's held-out accuracy and macro-F1, or loss) from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    except (OSError, ValueError):
        return 0, ""
    if not rows:
        return 0, ""
    last = rows[-1]
    if "heldout_macro_f1" in last:
        return last["round"], f"acc {last['heldout_accuracy']:.3f} F1 {last['heldout_macro_f1']:.3f}"
    return last["round"], f"loss {last.get('heldout_loss', float('nan')):.3f}"


@contextmanager
def progress_display(run_dir: Path, rounds: int, *, quiet: bool) -> Iterator[None]:
    """Show the display while the simulation runs (on a terminal, unless quiet)."""
    if quiet:
        os.environ[QUIET_ENV] = "1"  # read by the client processes the engine starts
        yield
        return
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    folder = Path(tempfile.mkdtemp(prefix="fedtune-progress-"))
    os.environ[PROGRESS_DIR_ENV] = str(folder)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        redirect_stdout=True,
        redirect_stderr=True,
    )
    stop = threading.Event()

    def refresh(tasks: dict) -> None:
        done, note = completed_rounds(run_dir)
        progress.update(tasks["rounds"], completed=done, note=note)
        for state in read_clients(folder):
            name = state["client"]
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=state["total"], note="")
            progress.update(
                tasks[name],
                completed=state["step"],
                total=state["total"],
                description=f"round {state['round']} {name}",
                note=f"loss {state['loss']:.4f}",
            )

    def loop() -> None:
        tasks = {"rounds": progress.add_task("rounds", total=rounds, note="")}
        while not stop.wait(REFRESH_SECONDS):
            refresh(tasks)
        refresh(tasks)

    with progress:
        streams = _log_streams_to(sys.stderr)  # now rich's proxy: log lines print above the display
        thread = threading.Thread(target=loop, name="fedtune-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            for handler, stream in streams:
                handler.setStream(stream)
            os.environ.pop(PROGRESS_DIR_ENV, None)
            shutil.rmtree(folder, ignore_errors=True)


def _log_streams_to(stream) -> list[tuple[logging.StreamHandler, object]]:
    """Point every console log handler (Flower's included) at `stream`; returns what to restore."""
    handlers = [
        h
        for name in ("", "flwr")
        for h in logging.getLogger(name or None).handlers
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.__stderr__, sys.__stdout__)
    ]
    return [(h, h.setStream(stream)) for h in handlers]
