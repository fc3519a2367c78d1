"""The warm path of a deployed node: one worker process per SuperNode keeps what is slow to rebuild.

Flower 1.42 runs every message in a fresh `flwr-clientapp` process. Without help, each train and
evaluate message pays the Python start, importing torch, transformers, PEFT and Opacus, loading the
base model and attaching LoRA, and reading this node's data: seconds for MiniLM, minutes for a 7B
model. `fedtune supernode` (client/node.py) starts a worker beside the SuperNode; the worker has
imported those libraries once, holds the LoRA-wrapped model (common.model.load_lora_model) and the
node's data (client.messages.node_data) across the messages of a run, and runs the ClientApp on each
message it is handed. Each message's own `flwr-clientapp` process stays thin: the `warm_path` mod
(client/app.py) sends it the message and context over a Unix socket and returns the reply, so
Flower's task process, heartbeats, error replies and retries are untouched.

Why a worker behind a mod, not the other mechanisms: a fork server would hand each message a copy
of a process that has already run torch (its OpenMP pool is not fork-safe), and nothing a child
learns (the data read, the model loaded) comes back to the parent; a SuperExec executor of our own
would speak Flower's internal task protocol (AcquireTask, tokens), which changes between releases.
The mod uses only the public ClientApp API, and a node started without the worker (`--cold`), or a
worker running other code than the FAB's, gets Flower's own behaviour: the message runs in its
process.

Safety: the socket lives in a folder only the node's user can open (0700, the socket 0600), the
worker answers only processes of its own user (SO_PEERCRED), and nothing listens on the network.
What crosses the socket is Flower's own protobuf wire format for messages, contexts and records
beside a small JSON header: nothing received can run code (RELIABILITY: no unsafe deserialization).
State follows the run: a message of another run frees the previous run's model and data first, so
one model per node and run stays in memory; a data file that changed on disk is read again (its
size, mtime and inode key the cache); the privacy record is read from and written to disk on every
message, as in a cold process, so a worker killed mid-message loses or double-charges nothing a
killed ClientApp process would not.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import json
import os
import socket
import struct
import time
import traceback
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.logger import log
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

WARM_SOCKET_ENV = "FEDTUNE_WARM_SOCKET"  # set by `fedtune supernode` for the SuperNode's ClientApp processes
REQUEST_WAIT_S = 120.0  # the longest a worker waits on one connection's bytes (a request, or its reply's reader)
CONNECT_WAIT_S = 120.0  # a worker restarting after a crash imports torch and binds again within this
_HEADER = struct.Struct(">Q")
_MAX_PARTS = 8  # a request has a header and 2 parts, a reply a header and 2
_PACKAGES = ("client", "common")  # the code a message runs: the FAB's and the worker's must be the same
IN_WORKER = False  # True inside the worker: its own ClientApp must not forward to itself


class WorkerGone(RuntimeError):
    """The other end of the socket closed, or sent what is not a frame, before a whole frame arrived."""


def code_digest(root: Path | None = None) -> str:
    """SHA-256 over the ClientApp's source (client/ and common/): the thin process' copy comes from the
    run's FAB, the worker's from the node's installation; a message runs warm only when they agree."""
    root = root or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for package in _PACKAGES:
        for path in sorted((root / package).glob("*.py")):
            h.update(f"{package}/{path.name}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def send_frame(conn: socket.socket, header: dict, *parts: bytes) -> None:
    """One frame: a JSON header and any number of binary parts (serialized protobufs), each length-prefixed."""
    chunks = [json.dumps(header).encode(), *parts]
    conn.sendall(_HEADER.pack(len(chunks)) + b"".join(_HEADER.pack(len(c)) + c for c in chunks))


def recv_frame(conn: socket.socket) -> tuple[dict, list[bytes]]:
    count = _HEADER.unpack(_recv_exact(conn, _HEADER.size))[0]
    if not 1 <= count <= _MAX_PARTS:
        raise WorkerGone(f"expected a frame of 1 to {_MAX_PARTS} parts, got {count}")
    chunks = [_recv_exact(conn, _HEADER.unpack(_recv_exact(conn, _HEADER.size))[0]) for _ in range(count)]
    header = json.loads(chunks[0])
    if not isinstance(header, dict):
        raise WorkerGone(f"expected a JSON object as the frame's header, got {type(header).__name__}")
    return header, chunks[1:]


def _parsed(data: bytes, proto, from_proto):
    """Flower's protobuf wire format back into its object: `proto` an empty message of the right type."""
    proto.ParseFromString(data)
    return from_proto(proto)


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise WorkerGone(f"the other end closed after {size - left} of {size} bytes")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# The thin side: the ClientApp process Flower starts for a message.


def _connect(path: str, wait: float) -> socket.socket | None:
    deadline = time.monotonic() + wait
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)


def forward(path: str, msg: Message, context: Context, call_next, wait: float = CONNECT_WAIT_S) -> Message:
    """Run `msg` in the node's warm worker; its reply content and the context's updated state come back.

    No worker within `wait` seconds, or one running other code than this FAB: the message runs here, cold.
    The worker dying mid-message fails the message (Flower replies with an error, the server counts the
    client failed); `fedtune supernode` starts the worker again for the next one.
    """
    conn = _connect(path, wait)
    if conn is None:
        log(WARNING, "fedtune: no warm worker at %s after %.0f s; this message runs cold", path, wait)
        return call_next(msg, context)
    with conn:
        import psutil

        now = time.time()  # the age of this process: the start-up Flower's fresh process per message still costs
        header = {"digest": code_digest(), "sent_at": now, "age": now - psutil.Process().create_time()}
        message, ctx = message_to_proto(msg).SerializeToString(), context_to_proto(context).SerializeToString()
        send_frame(conn, header, message, ctx)
        try:
            answer, parts = recv_frame(conn)
        except (WorkerGone, ConnectionResetError) as err:
            raise RuntimeError(
                f"fedtune: the node's warm worker ended while it handled this {msg.metadata.message_type} message "
                f"({err}); the message fails, `fedtune supernode` restarts the worker for the next one"
            ) from None
    if answer.get("refused"):
        log(WARNING, "fedtune: warm worker: %s; this message runs cold", answer["refused"])
        return call_next(msg, context)
    if answer.get("raised"):  # the ClientApp raised in the worker: raise here, as a cold ClientApp would
        raise RuntimeError(f"fedtune: the ClientApp raised in the node's warm worker:\n{answer['raised']}")
    reply, context.state = (
        _parsed(parts[0], ProtoMessage(), message_from_proto),
        _parsed(parts[1], ProtoRecordDict(), recorddict_from_proto),
    )
    if reply.has_error():
        return Message(reply.error, reply_to=msg)
    return Message(content=reply.content, reply_to=msg)


# The worker.


class Worker:
    """Serves messages on a Unix socket, one at a time, with the ClientApp `app` (client.app's by default)."""

    def __init__(self, path: str, parent: int | None = None, app_ref: str = "client.app:app") -> None:
        self.path, self.parent, self.app_ref = path, parent, app_ref
        self.digest = code_digest()
        self.run_id: int | None = None

    def switch_run(self, run_id: int) -> None:
        """A new run: free the previous run's model and data before this one loads its own."""
        if self.run_id is not None and run_id != self.run_id:
            from client.messages import node_data_cache_clear
            from common.model import load_lora_model

            load_lora_model.cache_clear()
            node_data_cache_clear()
            gc.collect()
            log(INFO, "fedtune: warm worker: run %d replaces run %d; its model and data freed", run_id, self.run_id)
        self.run_id = run_id

    def handle(self, conn: socket.socket, app) -> None:
        request, parts = recv_frame(conn)
        if request.get("digest") != self.digest:
            refusal = (
                f"its code (client/, common/ digest {self.digest[:12]}) differs from the run's FAB "
                f"({str(request.get('digest'))[:12]}); install the FAB's fedtune on this node to run warm"
            )
            log(WARNING, "fedtune: warm worker: refused a message: %s", refusal)
            send_frame(conn, {"refused": refusal})
            return
        msg, context = (
            _parsed(parts[0], ProtoMessage(), message_from_proto),
            _parsed(parts[1], ProtoContext(), context_from_proto),
        )
        waited = time.time() - float(request["sent_at"])
        self.switch_run(context.run_id)
        start = time.perf_counter()
        try:
            reply = app(msg, context)
        except Exception:  # the thin process raises it again, so Flower replies with an error as it would cold
            send_frame(conn, {"raised": traceback.format_exc()})
            return
        answer = message_to_proto(reply).SerializeToString(), recorddict_to_proto(context.state).SerializeToString()
        send_frame(conn, {}, *answer)
        log(
            INFO,
            "fedtune: warm worker: %s message of run %d handled in %.2f s (ClientApp process %.2f s old when it "
            "sent the message, %.3f s in transit)",
            msg.metadata.message_type,
            context.run_id,
            time.perf_counter() - start,
            float(request["age"]),
            waited,
        )

    def serve(self) -> None:
        global IN_WORKER
        IN_WORKER = True
        folder = Path(self.path).parent
        if folder.stat().st_mode & 0o077 or folder.stat().st_uid != os.getuid():
            raise SystemExit(f"fedtune warm worker: expected {folder} to be private to this user (mode 0700)")
        Path(self.path).unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        os.chmod(self.path, 0o600)
        listener.listen(16)
        listener.settimeout(1.0)
        start = time.perf_counter()
        module, _, name = self.app_ref.partition(":")
        app = getattr(importlib.import_module(module), name)
        importlib.import_module("client.training")  # torch, transformers, PEFT: imported once, here

        log(INFO, "fedtune: warm worker ready at %s (imports %.1f s)", self.path, time.perf_counter() - start)
        while self.parent is None or os.getppid() == self.parent:  # ends with the `fedtune supernode` that started it
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(REQUEST_WAIT_S)  # a ClientApp sends its whole request at once; none blocks the worker
                pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                if uid != os.getuid():
                    log(WARNING, "fedtune: warm worker: refused a connection from pid %d of uid %d", pid, uid)
                    continue
                try:
                    self.handle(conn, app)
                except (WorkerGone, BrokenPipeError, ConnectionResetError) as err:  # the ClientApp process went away
                    log(WARNING, "fedtune: warm worker: the ClientApp process left mid-message (%s)", err)
                except Exception as err:  # noqa: BLE001 - a malformed request must not end the worker
                    log(WARNING, "fedtune: warm worker: refused a request that is not a message (%r)", err)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fedtune's warm worker for one SuperNode (`fedtune supernode`).")
    parser.add_argument("--socket", required=True, help="the Unix socket to serve, in a folder private to this user")
    parser.add_argument("--parent", type=int, help="exit when this process (fedtune supernode) is gone")
    args = parser.parse_args(argv)
    Worker(args.socket, args.parent).serve()


if __name__ == "__main__":
    main()
