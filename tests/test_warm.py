"""The warm worker of a deployed node (client/warm.py), as a real process on a real Unix socket.

What it must keep: a message handled warm gets the reply a cold ClientApp process would send; the
worker's failures look like a ClientApp's (RELIABILITY fault: a worker killed mid-message fails that
message, the next one is served by its successor); bad setups fall back to Flower's own behaviour
(no worker, or one running other code than the FAB: the message runs in its own process);
RELIABILITY security: the socket is reachable by the node's user only; memory: a new run frees the
previous run's model and data; a data file changed on the node is read again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client import warm
from client.app import app
from client.messages import node_data
from common.config import FedtuneConfig
from common.federation_data import federation_labels
from common.model import get_adapter_state
from common.records import record_to_state, state_to_record
from common.task import task_for
from tests.conftest import REPO
from tests.procs import kill_group
from tests.reliability import count

pytestmark = [pytest.mark.minutes(2), pytest.mark.usefixtures("task_identity")]
CFG = FedtuneConfig(partitioner="iid", local_steps=2, batch_size=8, max_length=32)
NODE = {"partition-id": 0, "num-partitions": 3, "num-threads": 1}


def message(kind: str, cfg: FedtuneConfig, arrays=None) -> Message:
    content = {"config": ConfigRecord({**cfg.to_run_config(), "server-round": 1})}
    if arrays is not None:
        content["arrays"] = state_to_record(arrays)
    return Message(content=RecordDict(content), message_type=kind, dst_node_id=1)


def context(node_config: dict, run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def local_rows(cfg: FedtuneConfig, n: int) -> list[str]:
    """`n` JSONL lines of a node's own file, cycling through the federation's labels."""
    names = cfg.labels.split(",")
    return [f'{{"text": "example {i}", "label": "{names[i % len(names)]}"}}\n' for i in range(n)]


def never(msg, ctx):
    raise AssertionError("the message ran in the thin process; it was to run in the worker")


class WorkerProcess:
    """`python -m client.warm` on a socket in a private folder, its output in a file; stopped by `stop()`."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(mode=0o700, exist_ok=True)
        self.socket, self.out = str(folder / "worker.sock"), folder / "worker.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "client.warm", "--socket", self.socket], cwd=REPO,
                                     stdout=open(self.out, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "warm worker ready" not in self.log():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.2)

    def stop(self) -> None:
        kill_group(self.proc.pid)
        self.proc.wait()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = WorkerProcess(tmp_path_factory.mktemp("node") / "private")
    try:
        w.wait_ready()
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def setup():
    cfg = CFG.replace(labels=federation_labels(CFG).to_spec())
    return cfg, get_adapter_state(task_for(cfg).model(len(federation_labels(cfg))))


def test_warm_replies_equal_cold_replies(worker, setup):
    """Train and evaluate through the worker give the arrays and metrics the ClientApp gives in this process."""
    cfg, initial = setup
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        warm_reply = warm.forward(worker.socket, message(kind, cfg, initial), context(NODE), never)
        cold_reply = app(message(kind, cfg, initial), context(NODE))
        assert not warm_reply.has_error() and warm_reply.metadata.message_type == kind
        assert set(warm_reply.content) == set(cold_reply.content)
        if kind == MessageType.TRAIN:
            sent, here = record_to_state(warm_reply.content["arrays"]), record_to_state(cold_reply.content["arrays"])
            assert set(sent) == set(initial) and all(np.array_equal(sent[k], here[k]) for k in here)
            assert any(not np.array_equal(sent[k], initial[k]) for k in initial)  # it trained
        metrics = {k: v for k, v in dict(warm_reply.content["metrics"]).items() if k != "train-seconds"}
        assert metrics == {k: v for k, v in dict(cold_reply.content["metrics"]).items() if k != "train-seconds"}
    assert worker.log().count("handled in") == 2


def test_a_handler_error_raises_in_the_thin_process_and_the_worker_serves_on(worker, setup):
    cfg, _ = setup
    with pytest.raises(RuntimeError, match="expected 'data-path'"):  # the node config names no data
        warm.forward(worker.socket, message(MessageType.QUERY, cfg), context({}), never)
    reply = warm.forward(worker.socket, message(MessageType.QUERY, cfg), context(NODE), never)
    assert dict(reply.content["client"])["client-id"] == "partition-0"


def test_no_worker_or_other_code_runs_the_message_here(worker, setup, monkeypatch, tmp_path):
    """Flower's own behaviour whenever the warm path cannot serve: the message runs in its process."""
    cfg, _ = setup
    ran = []

    def here(msg, ctx):
        ran.append(msg.metadata.message_type)
        return app(msg, ctx)

    start = time.monotonic()
    reply = warm.forward(str(tmp_path / "none.sock"), message(MessageType.QUERY, cfg), context(NODE), here, wait=1.0)
    assert time.monotonic() - start >= 1.0 and ran == [MessageType.QUERY] and not reply.has_error()
    monkeypatch.setattr(warm, "code_digest", lambda root=None: "0" * 64)  # a FAB of another fedtune
    reply = warm.forward(worker.socket, message(MessageType.QUERY, cfg), context(NODE), here)
    assert ran == [MessageType.QUERY] * 2 and not reply.has_error()
    assert "differs from the run's FAB" in worker.log()
    count("bad_inputs_rejected", "warm worker running other code than the run's FAB: the message runs cold")


def test_code_digest_follows_the_source(tmp_path):
    for package in ("client", "common"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("x = 1\n")
    before = warm.code_digest(tmp_path)
    (tmp_path / "common" / "a.py").write_text("x = 2\n")
    assert warm.code_digest(tmp_path) != before
    assert warm.code_digest() == warm.code_digest(REPO)


def test_only_the_nodes_user_reaches_the_socket(worker, tmp_path):
    """The socket is 0600 in a 0700 folder; another user's process is refused by the kernel. A worker
    asked to serve from a folder others can open refuses to start."""
    assert os.stat(worker.socket).st_mode & 0o777 == 0o600
    assert os.stat(Path(worker.socket).parent).st_mode & 0o777 == 0o700
    if os.geteuid() == 0:  # as root, try as nobody
        probe = ("import socket, os; os.setgid(65534); os.setuid(65534); s = socket.socket(socket.AF_UNIX); "
                 f"s.connect({worker.socket!r})")
        denied = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        assert denied.returncode != 0 and "PermissionError" in denied.stderr, denied.stderr
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    refused = subprocess.run([sys.executable, "-m", "client.warm", "--socket", str(shared / "w.sock")], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "to be private to this user (mode 0700)" in refused.stderr
    assert not (shared / "w.sock").exists()
    count("bad_inputs_rejected", "warm worker socket in a folder others can open")


def test_a_worker_killed_mid_message_fails_that_message_and_its_successor_serves(setup, tmp_path):
    cfg, initial = setup
    w = WorkerProcess(tmp_path / "private")
    try:
        w.wait_ready()
        long = cfg.replace(local_steps=2000)
        failure: list[BaseException] = []

        def send() -> None:
            try:
                warm.forward(w.socket, message(MessageType.TRAIN, long, initial), context(NODE), never)
            except BaseException as err:  # noqa: BLE001 - the test reads it below
                failure.append(err)

        thread = threading.Thread(target=send)
        thread.start()
        deadline = time.monotonic() + 120
        while "step 10/2000" not in w.log():  # training, mid-message
            assert time.monotonic() < deadline and thread.is_alive(), w.log()
            time.sleep(0.2)
        w.proc.send_signal(signal.SIGKILL)
        thread.join(60)
        assert len(failure) == 1 and isinstance(failure[0], RuntimeError)
        assert "warm worker ended while it handled this train message" in str(failure[0])
        w.stop()
        successor = WorkerProcess(tmp_path / "private")  # what `fedtune supernode` starts next
        w = successor
        reply = warm.forward(w.socket, message(MessageType.TRAIN, cfg, initial), context(NODE), never)
        assert not reply.has_error() and set(record_to_state(reply.content["arrays"])) == set(initial)
        count("faults_survived", "warm worker killed mid-message")
    finally:
        w.stop()


def test_a_new_run_frees_the_previous_runs_model_and_data(setup, tmp_path):
    from client.messages import _deployed
    from common.model import load_lora_model

    cfg, _ = setup
    path = tmp_path / "local.jsonl"
    path.write_text("".join(local_rows(cfg, 20)))
    node = context({"data-path": str(path)})
    task_for(cfg).model(len(cfg.labels.split(",")))
    node_data(cfg, node)
    assert load_lora_model.cache_info().currsize >= 1 and _deployed.cache_info().currsize == 1
    w = warm.Worker(str(tmp_path / "unused.sock"))
    w.switch_run(1)
    assert load_lora_model.cache_info().currsize >= 1  # the same run keeps them
    w.switch_run(2)
    assert load_lora_model.cache_info().currsize == 0 and _deployed.cache_info().currsize == 0


def test_a_changed_data_file_is_read_again(setup, tmp_path):
    cfg, _ = setup
    path = tmp_path / "local.jsonl"
    rows = local_rows(cfg, 30)
    path.write_text("".join(rows[:20]))
    node = context({"data-path": str(path), "client-id": "site-a"})
    first = node_data(cfg, node)
    assert node_data(cfg, node) is first  # the same file: read once
    path.write_text("".join(rows))
    again = node_data(cfg, node)
    assert len(again.train) + len(again.val) == 30 and len(first.train) + len(first.val) == 20
    count("faults_survived", "a node's data file changed between messages of a warm worker")


def test_a_malformed_request_is_refused_and_the_worker_serves_on(worker, setup):
    """RELIABILITY bad input: what reaches the socket is parsed as a JSON header and Flower protobufs, never
    run as code; garbage, a truncated frame or a header that is not an object leave the worker serving."""
    import socket as sockets
    import struct

    cfg, _ = setup
    frame = struct.Struct(">Q").pack
    for raw, answer in ((b"\x00" * 3, None), (frame(1) + frame(5) + b"[1,2]", None), (frame(10**6), None),
                        (frame(3) + frame(2) + b"{}" + frame(4) + b"junk" + frame(0), "refused")):
        with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as conn:
            conn.connect(worker.socket)
            conn.sendall(raw)
            conn.shutdown(sockets.SHUT_WR)
            if answer is None:
                assert conn.recv(1 << 16) == b""  # nothing answered, nothing run
            else:  # a well-formed frame without the code digest: refused before anything is parsed
                header, parts = warm.recv_frame(conn)
                assert "differs from the run's FAB" in header["refused"] and parts == []
    reply = warm.forward(worker.socket, message(MessageType.QUERY, cfg), context(NODE), never)
    assert dict(reply.content["client"])["client-id"] == "partition-0"
    count("bad_inputs_rejected", "malformed requests on a warm worker's socket", 4)


def test_fedtune_supernode_keeps_a_worker_beside_flower_and_stops_both(tmp_path):
    """`fedtune supernode`: a worker and flower-supernode run side by side; a killed worker is started
    again (RELIABILITY fault: the worker dies); SIGTERM ends both, and the socket's private folder goes."""
    import psutil

    from tests.test_deployment import free_port

    data = tmp_path / "local.jsonl"
    data.write_text("".join(f'{{"text": "example {i}", "label": "l{i % 2}"}}\n' for i in range(8)))
    log = tmp_path / "node.log"
    args = [sys.executable, "-m", "simulation.cli", "supernode", "--superlink", f"127.0.0.1:{free_port()}",
            "--insecure", "--max-retries", "1000", "--max-wait-time", "600", "--port", str(free_port()),
            "--node-config", f'data-path="{data}"']
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    node = subprocess.Popen(args, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)

    def workers() -> list[psutil.Process]:
        found = []
        for child in psutil.Process(node.pid).children(recursive=True):
            try:
                if "client.warm" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                pass
        return found

    def wait(condition, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline and node.poll() is None, f"{what}:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)

    try:
        wait(lambda: log.read_text().count("warm worker ready") == 1, "a ready worker")
        first = workers()[0]
        folder = Path(first.cmdline()[first.cmdline().index("--socket") + 1]).parent
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        assert any("flower-supernode" in " ".join(p.cmdline()) for p in psutil.Process(node.pid).children())
        first.kill()
        wait(lambda: log.read_text().count("warm worker ready") == 2, "a second worker after the first was killed")
        assert "the warm worker ended (exit -9); starting it again" in log.read_text()
        assert [w.pid for w in workers()] != [first.pid]
        children = psutil.Process(node.pid).children(recursive=True)
        node.send_signal(signal.SIGTERM)
        node.wait(60)
        def alive() -> list:
            running = []
            for p in children:  # Flower's SuperExec notices its parent's end within a few seconds
                try:
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        running.append(p.cmdline())
                except psutil.Error:
                    pass
            return running

        deadline = time.monotonic() + 30
        while alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive(), alive()
        assert not folder.exists()
        count("faults_survived", "warm worker killed beside an idle SuperNode: started again")
    finally:
        kill_group(node.pid)


def test_a_data_file_gone_between_messages_is_a_clear_error(setup, tmp_path):
    """RELIABILITY bad input: the node's file removed after its worker read it is named, not served stale."""
    from common.errors import DataError

    cfg, _ = setup
    path = tmp_path / "local.jsonl"
    path.write_text("".join(local_rows(cfg, 20)))
    node = context({"data-path": str(path)})
    node_data(cfg, node)
    path.unlink()
    with pytest.raises(DataError, match="local.jsonl"):
        node_data(cfg, node)
    count("bad_inputs_rejected", "a node's data file removed while its warm worker runs")
