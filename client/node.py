"""`fedtune supernode [--cold] ARGS...`: check a node's setup, then run `flower-supernode ARGS...` beside
the node's warm worker (client/warm.py), restarting the worker whenever it ends; with `--cold`, exec
`flower-supernode ARGS...` alone (Flower's own behaviour: each message loads everything in its process).

Flower starts a SuperNode even when its data file is missing and fails only when the first
message arrives. This refuses to start, with a message, when the node config's data file is
missing or unreadable or has the columns of neither task (classification: text and label;
causal-lm: instruction and response, renamed by the node config's *-column keys), when a
certificate or key is unreadable, or when the node's private and public keys are not one pair.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from client.messages import check_node_config
from client.warm import WARM_SOCKET_ENV
from common.config import parse_key_values
from common.errors import ConfigError, DataError
from common.task import TASKS

FILE_FLAGS = ("--root-certificates", "--auth-supernode-private-key", "--auth-supernode-public-key")


def parse_node_config(text: str) -> dict:
    """Flower's node-config string 'k1="v" k2=3' -> mapping (TOML values)."""
    return parse_key_values([text], what="--node-config")


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def check_node(args: list[str]) -> dict:
    """Validate what a SuperNode will need; returns the parsed node config."""
    for flag in FILE_FLAGS:
        path = _flag(args, flag)
        if path is not None and not (Path(path).is_file() and os.access(path, os.R_OK)):
            raise ConfigError(f"{flag}: expected a readable file, got {path!r} (missing, unreadable or a directory)")
    if (roots := _flag(args, "--root-certificates")) is not None:
        from cryptography import x509

        pem = Path(roots).read_bytes()
        try:
            x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise ConfigError(
                f"--root-certificates: expected a PEM certificate, got {_flag(args, '--root-certificates')!r}"
                " which is not one"
            ) from None
    text = _flag(args, "--node-config")
    if text is None:
        raise ConfigError('--node-config: expected data-path="..." (the node\'s own data file), got none')
    node = check_node_config(parse_node_config(text))
    if "data-path" not in node:
        raise ConfigError(f"--node-config: expected a data-path key, got keys {sorted(node)}")
    path = str(node["data-path"])
    if not (Path(path).is_file() and os.access(path, os.R_OK)):
        raise DataError(f"data-path: expected a readable file, got {path!r} (missing, unreadable or a directory)")
    check_key_pair(_flag(args, "--auth-supernode-private-key"), _flag(args, "--auth-supernode-public-key"))
    data = node_examples(path, node)
    if len(data) == 0:
        raise DataError(f"data-path {path!r}: expected at least one example, got none")
    return node


def node_examples(path: str, node: dict):
    """The node's data read for either task: the server's run config decides which one trains,
    so the file must fit at least one (the error names both when it fits neither)."""
    errors = {}
    for name, task in TASKS.items():
        try:
            return task.read(path, {"data-format": "auto", "column-names": "", **node})
        except DataError as err:
            errors[name] = err
    raise DataError(
        f"data-path {path!r} fits neither task: " + "; ".join(f"{task}: {err}" for task, err in errors.items())
    ) from None


def check_key_pair(private_path: str | None, public_path: str | None) -> None:
    """The node authenticates with its private key and is registered by its public key: they must be one pair."""
    if private_path is None or public_path is None:
        return
    from cryptography.hazmat.primitives import serialization

    try:
        private = serialization.load_ssh_private_key(Path(private_path).read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as err:
        raise ConfigError(
            f"--auth-supernode-private-key: expected an OpenSSH private key, got {private_path!r} ({err})"
        ) from None
    try:
        public = serialization.load_ssh_public_key(Path(public_path).read_bytes())
    except (ValueError, TypeError, OSError) as err:
        raise ConfigError(
            f"--auth-supernode-public-key: expected an OpenSSH public key, got {public_path!r} ({err})"
        ) from None
    raw = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if private.public_key().public_bytes(*raw) != public.public_bytes(*raw):
        raise ConfigError(
            f"--auth-supernode-public-key: expected the public key of {private_path!r}, got "
            f"{public_path!r}, which belongs to another key pair"
        )


SUPEREXEC_POLL_S = 0.1
RESTARTS_PER_MINUTE = 5  # a worker that keeps dying (a broken install, memory) is restarted more slowly


def run_supernode(args: list[str], *, cold: bool = False) -> int:
    """Check the node, then run flower-supernode (and, unless cold, the warm worker) until it ends."""
    check_node(args)
    binary = shutil.which("flower-supernode")
    if binary is None:
        raise ConfigError("flower-supernode: expected it on PATH (activate the environment fedtune is installed in)")
    # The SuperExec inside flower-supernode looks for a message to start every second by default; a
    # local call (SuperExec to SuperNode on this machine), so every 0.1 s costs nothing and saves ~0.5 s
    # a message. Flower's own switch; a value the user set wins.
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_POLL_S))
    if cold:
        os.execv(binary, [binary, *args])
    folder = tempfile.mkdtemp(prefix="fedtune-node-")  # mode 0700: only this user reaches the socket
    path = os.path.join(folder, "worker.sock")
    supervisor = Supervisor(path)
    try:
        supervisor.start_worker()
        node = subprocess.Popen([binary, *args], env={**os.environ, WARM_SOCKET_ENV: path})
        supervisor.node = node
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, supervisor.forward_signal)
        while node.poll() is None:
            supervisor.keep_worker()
            time.sleep(0.5)
        return node.returncode
    finally:
        supervisor.stop()
        shutil.rmtree(folder, ignore_errors=True)


class Supervisor:
    """Keeps one warm worker running beside the SuperNode; the worker exits by itself when this process is gone."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.worker: subprocess.Popen | None = None
        self.node: subprocess.Popen | None = None
        self.starts: list[float] = []
        self.stopping = False  # set by a signal: the worker is not started again

    def start_worker(self) -> None:
        self.starts = [t for t in self.starts if t > time.monotonic() - 60] + [time.monotonic()]
        command = [sys.executable, "-m", "client.warm", "--socket", self.path, "--parent", str(os.getpid())]
        self.worker = subprocess.Popen(command)

    def keep_worker(self) -> None:
        if self.stopping or self.worker is None or self.worker.poll() is None:
            return
        print(
            f"fedtune: the warm worker ended (exit {self.worker.returncode}); starting it again",
            file=sys.stderr,
            flush=True,
        )
        self.worker = None
        if len(self.starts) >= RESTARTS_PER_MINUTE:
            time.sleep(10)  # its messages wait (the ClientApp waits for the socket) or run cold
        self.start_worker()

    def forward_signal(self, signum, _frame) -> None:
        self.stopping = True
        for proc in (self.node, self.worker):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signum)

    def stop(self) -> None:
        for proc in (self.node, self.worker):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
