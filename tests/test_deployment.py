"""Deployment end to end: a real SuperLink and SuperNodes as separate processes on loopback,
with TLS, SuperNode authentication and a persistent database (no mocks).

RELIABILITY security checks: a SuperNode without TLS, or trusting the wrong CA, cannot
connect; an unregistered node key is refused. Invariants I1, I2, I4, I5 after every round.
Every process started here is stopped, also on failure. (A SuperNode killed mid-round is
not covered yet: in this session such a run stalled in round 1; see issue 4.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.config import FedtuneConfig
from common.federation_data import federation_labels, simulated_client_data
from common.pki import make_ca, make_deployment_pki
from tests.conftest import REPO
from tests.invariants import check_run_invariants
from tests.procs import kill_group, kill_matching
from tests.reliability import count

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
SITES = ["site-0", "site-1", "site-2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """Processes of one test federation; `stop()` kills every one of them."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs, self.port = root, {}, free_port()
        self.env = {**os.environ, "FLWR_HOME": str(root / "flwr-home"), "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FEDTUNE_TEST_RUN": str(root)}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen(args, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def online(self) -> int:
        out = self.flwr("supernode", "list", "test", "--format", "json").stdout
        try:
            return sum(1 for n in json.loads(out).get("nodes", []) if n.get("status") == "online")
        except json.JSONDecodeError:
            return -1

    def stop(self) -> None:
        for proc in self.procs.values():
            kill_group(proc.pid)
        kill_matching(str(self.root))


def start_node(fed: Federation, name: str, *, ca: Path, key: str | None, insecure: bool = False) -> None:
    args = [sys.executable, "-m", "simulation.cli", "supernode", "--superlink", f"127.0.0.1:{fed.port}",
            "--port", str(free_port()), "--max-retries", "3", "--max-wait-time", "30",
            "--node-config", f'data-path="{fed.root / (name + ".jsonl")}" client-id="{name}"']
    args += ["--insecure"] if insecure else ["--root-certificates", str(ca)]
    if key:
        args += ["--auth-supernode-private-key", str(fed.root / "pki" / "nodes" / key),
                 "--auth-supernode-public-key", str(fed.root / "pki" / "nodes" / f"{key}.pub")]
    fed.start(name, args)


def write_client_files(root: Path, names: list[str]) -> None:
    cfg = FedtuneConfig(partitioner="iid", max_train_examples=480)
    cfg = cfg.replace(labels=federation_labels(cfg).to_spec())
    for i, name in enumerate(names):
        data = simulated_client_data(cfg, i % 3, 3)
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in
                                                    zip(data.train.texts + data.val.texts,
                                                        data.train.labels + data.val.labels)))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_tls_authenticated_federation_runs_and_refuses_intruders(tmp_path):
    fed = Federation(tmp_path)
    try:
        make_deployment_pki(tmp_path / "pki", nodes=[*SITES, "intruder"], hosts=["127.0.0.1", "localhost"])
        (tmp_path / "other-ca").mkdir()
        make_ca(tmp_path / "other-ca", name="someone else's CA")
        write_client_files(tmp_path, [*SITES, "intruder", "plain", "wrong-ca"])
        home = tmp_path / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{fed.port}"\n'
            f'root-certificates = "{tmp_path / "pki" / "ca.crt"}"\n')
        pki = tmp_path / "pki"
        fed.start("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(pki / "ca.crt"),
                                "--ssl-certfile", str(pki / "server.crt"), "--ssl-keyfile", str(pki / "server.key"),
                                "--enable-supernode-auth", "--database", str(tmp_path / "state.db"),
                                "--host", "127.0.0.1", "--port", str(fed.port)])
        wait_for(lambda: fed.flwr("supernode", "list", "test").returncode == 0, 60, "the SuperLink")
        for site in SITES:
            registered = fed.flwr("supernode", "register", str(pki / "nodes" / f"{site}.pub"), "test")
            assert registered.returncode == 0, registered.stdout + registered.stderr
        for site in SITES:
            start_node(fed, site, ca=pki / "ca.crt", key=site)
        start_node(fed, "intruder", ca=pki / "ca.crt", key="intruder")  # valid TLS, unregistered key
        start_node(fed, "plain", ca=pki / "ca.crt", key="site-0", insecure=True)  # no TLS
        start_node(fed, "wrong-ca", ca=tmp_path / "other-ca" / "ca.crt", key="site-1")  # trusts another CA
        wait_for(lambda: fed.online() == 3, 90, "3 SuperNodes online")

        run = tmp_path / "run"
        config = " ".join(["num-server-rounds=2", "local-steps=2", "max-train-examples=480",
                           "max-heldout-examples=60", "max-length=32", 'partitioner="iid"', "fraction-evaluate=0.0",
                           "min-available-clients=3", "min-train-clients=3", "round-timeout=240.0",
                           f'run-dir="{run}"'])
        start = time.monotonic()
        submit = fed.flwr("run", ".", "test", "--run-config", config, timeout=120)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        wait_for(lambda: (run / "status.json").exists(), 600, "the run to finish")
        wall = time.monotonic() - start

        assert json.loads((run / "status.json").read_text())["status"] == "completed"
        rows = check_run_invariants(run, 2)
        assert all(0.0 <= r["heldout_accuracy"] <= 1.0 for r in rows)  # held-out metric every round
        rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
        assert all(r["aggregated"] == SITES for r in rounds) and len(rounds) == 2
        clients = {c["client_id"] for c in json.loads((run / "clients.json").read_text())}
        assert clients == set(SITES) and "intruder" not in clients

        # Refusals: none of the three ever became a node of the federation.
        listed = json.loads(fed.flwr("supernode", "list", "test", "--format", "json").stdout)["nodes"]
        assert len(listed) == 3
        for name in ("intruder", "plain", "wrong-ca"):
            assert fed.procs[name].poll() is not None or "client-id" not in fed.log(name)
        (tmp_path / "refusals.txt").write_text("\n".join(f"== {n}\n{fed.log(n)[-1500:]}"
                                                         for n in ("intruder", "plain", "wrong-ca")))
        count("bad_inputs_rejected", "unregistered-node-key")
        count("bad_inputs_rejected", "supernode-without-tls")
        count("bad_inputs_rejected", "supernode-trusting-wrong-ca")
        print(f"deployment test: run wall time {wall:.0f}s")
    finally:
        fed.stop()
