"""Start real processes for tests and make sure every one of them is stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from tests.conftest import REPO


def run_cli(args: list[str], *, timeout: float, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command in its own process group; kill the whole group on timeout or error."""
    proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"{args[:4]} did not finish within {timeout}s; output tail:\n{out[-4000:]}") from None
    finally:
        kill_group(proc.pid)
    return subprocess.CompletedProcess(args, proc.returncode, out, "")


def run_in_terminal(args: list[str], *, timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command with a pseudo-terminal as its stdin, stdout and stderr (what a person's shell
    gives it); kill its whole process group on timeout. Returns the terminal's output, escapes and all."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(args, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"{args[:4]} did not finish within {timeout}s; output tail:\n"
                                     f"{b''.join(chunks)[-4000:].decode(errors='replace')}")
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal has exited
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=30)
    finally:
        kill_group(proc.pid)
        os.close(master)
    return subprocess.CompletedProcess(args, proc.returncode, b"".join(chunks).decode(errors="replace"), "")


def fedtune(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli([sys.executable, "-m", "simulation.cli", *args], timeout=timeout)


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_matching(marker: str) -> int:
    """Kill every process (and its children) whose command line contains `marker`."""
    killed = 0
    for proc in psutil.process_iter(["cmdline"]):
        if marker in " ".join(proc.info.get("cmdline") or []):
            for p in [*proc.children(recursive=True), proc]:
                try:
                    p.kill()
                    killed += 1
                except psutil.NoSuchProcess:
                    pass
    return killed


def run_until(args: list[str], *, condition, timeout: float, env: dict | None = None, cwd: Path = REPO) -> bool:
    """Start a command and SIGKILL its whole process group as soon as `condition()` holds.

    Returns True when it was killed that way, False when it ended on its own first.
    """
    import time

    proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if condition():
                kill_group(proc.pid)
                return True
            if proc.poll() is not None:
                return False
            time.sleep(0.02)
        raise AssertionError(f"{args[:4]}: condition not reached within {timeout}s")
    finally:
        kill_group(proc.pid)
        proc.wait()
