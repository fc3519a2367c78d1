"""fedtune's own commands attempt no connection beyond loopback (hardening class 10).

Every Python process a command starts (the simulation's Ray workers included) loads a
sitecustomize that refuses, and records, a socket connection or a name lookup for anything but a
loopback address or this machine's own name. The commands run with none of the switches that
silence Flower's telemetry and update check, Ray's usage statistics and the Hub's telemetry set:
fedtune must set them itself (simulation/cli.py: NO_CALLS_HOME).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from simulation.cli import NO_CALLS_HOME
from tests.conftest import REPO
from tests.procs import run_cli
from tests.reliability import count

pytestmark = [pytest.mark.slow, pytest.mark.minutes(2)]

GUARD = '''
import ipaddress, os, socket

_LOG = os.environ["FEDTUNE_CONNECT_LOG"]
_OWN = {socket.gethostname(), "localhost", "", None}


def _local(host):
    if host in _OWN:
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what):
    with open(_LOG, "a") as handle:
        handle.write(f"{os.getpid()} {what}\\n")
    raise OSError(101, f"outbound connection refused by the test: {what}")


def _guard(original):
    def connect(self, address, *rest):
        if isinstance(address, tuple) and not _local(address[0]):
            _refuse(f"connect {address}")
        return original(self, address, *rest)
    return connect


socket.socket.connect = _guard(socket.socket.connect)
socket.socket.connect_ex = _guard(socket.socket.connect_ex)
_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, *args, **kwargs):
    if not _local(host if not isinstance(host, bytes) else host.decode()):
        _refuse(f"lookup {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = getaddrinfo
'''


def test_fedtunes_commands_make_no_connection_beyond_loopback(tmp_path):
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "connections.log"
    env = {k: v for k, v in os.environ.items() if k not in NO_CALLS_HOME}
    env.update(PYTHONPATH=f"{guard}{os.pathsep}{REPO}", FEDTUNE_CONNECT_LOG=str(log),
               FEDTUNE_PRIVACY_DIR=str(tmp_path / "privacy"))
    run = tmp_path / "run"
    fedtune = [sys.executable, "-m", "simulation.cli"]
    commands = {
        "simulate": [*fedtune, "simulate", "--quiet", "-c", f'run-dir="{run}"', "-c", "num-server-rounds=1", "-c",
                     "max-train-examples=90", "-c", "max-heldout-examples=30", "-c", "local-steps=1", "-c",
                     "fraction-evaluate=0.0", "-c", "dp-sample=true", "-c", "dp-noise-multiplier=1.0"],
        "evaluate": [*fedtune, "evaluate", str(run), "--data", str(tmp_path / "heldout.csv")],
        "audit": [*fedtune, "audit", str(run)],
        "plan": [*fedtune, "plan", "--target-epsilon", "3", "--rounds", "3", "--num-clients", "3",
                 "--clients-per-round", "3", "--local-examples", "100"],
        "export": [*fedtune, "export", str(run), str(tmp_path / "export")],
        "certs": [*fedtune, "certs", str(tmp_path / "pki"), "--nodes", "a,b"],
    }
    (tmp_path / "heldout.csv").write_text("text,label\nhello there,greetings\nwhat is a computer,computers\n")
    for name, args in commands.items():
        done = run_cli(args, timeout=300, env=env)
        refused = log.read_text() if log.exists() else ""
        assert not refused, f"{name} tried to reach beyond loopback:\n{refused}\n{done.stdout[-2000:]}"
        assert done.returncode in (0, 2) or name == "audit", (name, done.stdout[-3000:])
    assert (run / "status.json").exists() and (tmp_path / "pki" / "ca.crt").exists()
    count("invariant_checks_passed", "no outbound connection from simulate, evaluate, audit, plan, export, certs")
