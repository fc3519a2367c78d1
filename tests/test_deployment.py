"""Deployment end to end: a real SuperLink and SuperNodes as separate processes on loopback,
with TLS, SuperNode authentication and a persistent database (no mocks).

RELIABILITY security checks: a SuperNode without TLS, or trusting the wrong CA, cannot
connect; an unregistered node key is refused. RELIABILITY faults: a SuperNode killed
mid-round; a node that restarts and rejoins under TLS + authentication; local training
longer than the heartbeat interval; fewer nodes than the minimum; a SuperLink restart with a
persistent database. Where the machine allows (root, iproute2), the main test runs each
SuperNode in a network namespace of its own. Invariants I1, I2, I4, I5 after every round.
Every process started here is stopped, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common.config import FedtuneConfig
from common.federation_data import federation_labels, simulated_client_data
from server.tools.pki import make_ca, make_deployment_pki
from tests.conftest import REPO
from tests.invariants import check_run_invariants
from tests.procs import kill_group, kill_matching
from tests.reliability import count

pytestmark = [pytest.mark.slow, pytest.mark.minutes(12)]
BIN = Path(sys.executable).parent
SITES = ["site-0", "site-1", "site-2"]
SMALL_RUN = ["local-steps=2", "max-train-examples=480", "max-heldout-examples=60", "max-length=32",
             'partitioner="iid"', "fraction-evaluate=0.0"]
# Secure aggregation with distributed DP-SGD (issue 38): one DP-SGD step a round, noise shares, a secure sum.
SECURE_DP = [*(item for item in SMALL_RUN if not item.startswith("local-steps")), "secure-aggregation=true",
             "validate-updates=false", "dp-sample=true", 'dp-mode="distributed"', "dp-target-epsilon=6.0",
             "dp-batch-size=120"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Namespaces:
    """One network namespace per SuperNode, joined to this host by a veth pair with its own
    /24, so a node's traffic to the SuperLink really crosses an interface. Needs root and
    iproute2; `available()` says whether this machine allows it."""

    def __init__(self, names: list[str]) -> None:
        tag = os.getpid() % 200
        self.links = {n: {"ns": f"ft{tag}-{i}", "host_if": f"fth{tag}x{i}", "node_if": f"ftn{tag}x{i}",
                          "host_ip": f"10.{tag}.{i}.1", "node_ip": f"10.{tag}.{i}.2"} for i, n in enumerate(names)}

    @staticmethod
    def available() -> bool:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return False
        probe = f"ftprobe{os.getpid()}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
        if made:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return made

    def create(self) -> None:
        for link in self.links.values():
            ns, h, n = link["ns"], link["host_if"], link["node_if"]
            for cmd in (["ip", "netns", "add", ns], ["ip", "link", "add", h, "type", "veth", "peer", "name", n],
                        ["ip", "link", "set", n, "netns", ns], ["ip", "addr", "add", f"{link['host_ip']}/24", "dev", h],
                        ["ip", "link", "set", h, "up"], ["ip", "-n", ns, "addr", "add", f"{link['node_ip']}/24", "dev", n],
                        ["ip", "-n", ns, "link", "set", n, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]):
                subprocess.run(cmd, check=True, capture_output=True)

    def bytes_through(self, name: str) -> tuple[int, int]:
        """(received, sent) bytes on the host end of `name`'s link."""
        stats = Path("/sys/class/net") / self.links[name]["host_if"] / "statistics"
        return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())

    def delete(self) -> None:
        for link in self.links.values():  # deleting the namespace deletes its veth pair too
            subprocess.run(["ip", "netns", "del", link["ns"]], capture_output=True)
            subprocess.run(["ip", "link", "del", link["host_if"]], capture_output=True)


class Federation:
    """Processes of one test federation; `stop()` kills every one of them."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs, self.port = root, {}, free_port()
        self.env = {**os.environ, "FLWR_HOME": str(root / "flwr-home"), "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FEDTUNE_TEST_RUN": str(root),
                    "FEDTUNE_PRIVACY_DIR": str(root / "privacy")}  # DP runs of other tests spend other budgets

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

    def start_superlink(self, host: str = "127.0.0.1") -> None:
        """Certificates, the CLI's connection config, a SuperLink with TLS + node auth + database."""
        pki = self.root / "pki"
        home = self.root / "flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{pki / "ca.crt"}"\n')
        self.start("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(pki / "ca.crt"),
                                 "--ssl-certfile", str(pki / "server.crt"), "--ssl-keyfile", str(pki / "server.key"),
                                 "--enable-supernode-auth", "--database", str(self.root / "state.db"),
                                 "--disable-runtime-dependency-installation",  # else `uv sync` per run
                                 "--host", host, "--port", str(self.port)])
        wait_for(lambda: self.flwr("supernode", "list", "test").returncode == 0, 60, "the SuperLink")

    def register(self, sites: list[str]) -> None:
        for site in sites:
            registered = self.flwr("supernode", "register", str(self.root / "pki" / "nodes" / f"{site}.pub"), "test")
            assert registered.returncode == 0, registered.stdout + registered.stderr

    def submit(self, app: Path, config: list[str]) -> int:
        submit = self.flwr("run", str(app), "test", "--run-config", " ".join(config), "--format", "json",
                           timeout=120)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        return int(json.loads(submit.stdout)["run-id"])

    def server_log(self, run_id: int) -> str:
        """The ServerApp's own log, as `flwr log` shows it to the user."""
        try:
            shown = self.flwr("log", str(run_id), "test", "--show", timeout=60)
        except subprocess.TimeoutExpired:
            return "(flwr log timed out)"
        return shown.stdout[-6000:] + shown.stderr[-2000:]

    def wait_for_run(self, run: Path, run_id: int, timeout: float) -> None:
        try:
            wait_for(lambda: (run / "status.json").exists(), timeout, "the run to finish")
        except AssertionError as err:
            raise AssertionError(f"{err}; ServerApp log:\n{self.server_log(run_id)}") from None

    def serverapps(self) -> list[psutil.Process]:
        """This federation's live ServerApp processes (found by the environment they inherit)."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if ("flwr-serverapp" in " ".join(proc.info.get("cmdline") or [])
                        and proc.environ().get("FEDTUNE_TEST_RUN") == str(self.root)):
                    found.append(proc)
            except psutil.Error:
                pass
        return found

    def stop(self) -> None:
        for proc in self.procs.values():
            kill_group(proc.pid)
        kill_matching(str(self.root))


def start_node(fed: Federation, name: str, *, ca: Path, key: str | None, insecure: bool = False,
               retries: int = 3, netns: dict | None = None, cold: bool = False, threads: int = 0) -> None:
    """A SuperNode through `fedtune supernode` (with its warm worker unless `cold`); inside `netns` (a
    Namespaces link) when given; `threads`: the node's num-threads (0: torch's default)."""
    superlink = netns["host_ip"] if netns else "127.0.0.1"
    args = [sys.executable, "-m", "simulation.cli", "supernode", *(["--cold"] if cold else []),
            "--superlink", f"{superlink}:{fed.port}",
            "--port", str(free_port()), "--max-retries", str(retries), "--max-wait-time", str(10 * retries),
            "--node-config", f'data-path="{fed.root / (name + ".jsonl")}" client-id="{name}" num-threads={threads}']
    args += ["--insecure"] if insecure else ["--root-certificates", str(ca)]
    if key:
        args += ["--auth-supernode-private-key", str(fed.root / "pki" / "nodes" / key),
                 "--auth-supernode-public-key", str(fed.root / "pki" / "nodes" / f"{key}.pub")]
    fed.start(name, ["ip", "netns", "exec", netns["ns"], *args] if netns else args)


def write_client_files(root: Path, names: list[str], cfg: FedtuneConfig | None = None) -> None:
    """Each site's file: its IID share (of 480 examples unless `cfg` says otherwise), as a simulated client's."""
    cfg = cfg or FedtuneConfig(partitioner="iid", max_train_examples=480)
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
    """The three sites run in network namespaces of their own, each dialing the SuperLink
    over its veth link, where the machine allows it (root and iproute2); else on loopback."""
    fed = Federation(tmp_path)
    nets = Namespaces(SITES) if Namespaces.available() else None
    try:
        if nets:
            nets.create()
        hosts = ["127.0.0.1", "localhost", *([v["host_ip"] for v in nets.links.values()] if nets else [])]
        make_deployment_pki(tmp_path / "pki", nodes=[*SITES, "intruder"], hosts=hosts)
        (tmp_path / "other-ca").mkdir()
        make_ca(tmp_path / "other-ca", name="someone else's CA")
        write_client_files(tmp_path, [*SITES, "intruder", "plain", "wrong-ca"])
        pki = tmp_path / "pki"
        fed.start_superlink(host="0.0.0.0" if nets else "127.0.0.1")
        fed.register(SITES)
        for site in SITES:
            start_node(fed, site, ca=pki / "ca.crt", key=site, netns=nets.links[site] if nets else None)
        start_node(fed, "intruder", ca=pki / "ca.crt", key="intruder")  # valid TLS, unregistered key
        start_node(fed, "plain", ca=pki / "ca.crt", key=None, insecure=True)  # no TLS (Flower refuses --insecure with a key)
        start_node(fed, "wrong-ca", ca=tmp_path / "other-ca" / "ca.crt", key="site-1")  # trusts another CA
        wait_for(lambda: fed.online() == 3, 90, "3 SuperNodes online")

        run = tmp_path / "run"  # under secure aggregation with distributed DP
        config = [*SECURE_DP, "num-server-rounds=2", "min-available-clients=3", "min-train-clients=3",
                  "round-timeout=240.0", f'run-dir="{run}"']
        start = time.monotonic()
        run_id = fed.submit(REPO, config)
        fed.wait_for_run(run, run_id, 600)
        wall = time.monotonic() - start

        assert json.loads((run / "status.json").read_text())["status"] == "completed", fed.server_log(run_id)
        rows = check_run_invariants(run, 2)
        assert all(0.0 <= r["heldout_accuracy"] <= 1.0 for r in rows)  # held-out metric every round
        rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
        assert all(r["aggregated"] == SITES and r["secure_aggregation"]["applied"] for r in rounds) and len(rounds) == 2
        audit = subprocess.run([sys.executable, "-m", "simulation.cli", "audit", str(run)], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
        assert audit.returncode == 0 and "audit passed" in audit.stdout, audit.stdout[-3000:]
        clients = {c["client_id"] for c in json.loads((run / "clients.json").read_text())}
        assert clients == set(SITES) and "intruder" not in clients

        # Refusals: none of the three ever became a node of the federation.
        listed = json.loads(fed.flwr("supernode", "list", "test", "--format", "json").stdout)["nodes"]
        assert len(listed) == 3
        for name in ("intruder", "plain", "wrong-ca"):
            assert fed.procs[name].poll() is not None or "client-id" not in fed.log(name)
        (tmp_path / "refusals.txt").write_text("\n".join(f"== {n}\n{fed.log(n)[-1500:]}"
                                                         for n in ("intruder", "plain", "wrong-ca")))
        # What each refusal looks like to the user.
        assert "ApiError:2004" in fed.log("superlink")
        assert "Failed to activate SuperNode" in fed.log("intruder") or fed.procs["intruder"].poll() is None
        assert "CERTIFICATE_VERIFY_FAILED" in fed.log("wrong-ca")
        assert "Connection attempt failed" in fed.log("plain")
        count("bad_inputs_rejected", "unregistered-node-key")
        count("bad_inputs_rejected", "supernode-without-tls")
        count("bad_inputs_rejected", "supernode-trusting-wrong-ca")

        # Fewer nodes than the minimum: a bounded wait, then a named status (RELIABILITY fault).
        short = tmp_path / "short"
        start = time.monotonic()
        run_id = fed.submit(REPO, [*SMALL_RUN, "num-server-rounds=2", "min-available-clients=4",
                                   "round-timeout=15.0", f'run-dir="{short}"'])
        fed.wait_for_run(short, run_id, 180)
        waited = time.monotonic() - start
        status = json.loads((short / "status.json").read_text())
        assert status["status"] == "not-enough-clients" and status["rounds_completed"] == 0, status
        assert "expected at least 4 connected clients" in fed.server_log(run_id)
        count("faults_survived", "fewer-nodes-than-minimum")
        if nets:  # each site's adapter (~300 kB) and masked vector (~600 kB) crossed its own link, both ways
            adapter_bytes = 300_000
            for site in SITES:
                received, sent = nets.bytes_through(site)
                assert received > 2 * adapter_bytes and sent > 2 * adapter_bytes, (site, received, sent)
            assert all(v["node_ip"] in fed.log("superlink") for v in nets.links.values())
        where = "own network namespaces" if nets else "loopback (no network namespaces here)"
        print(f"deployment test ({where}): run wall time {wall:.0f}s; not-enough-clients after {waited:.0f}s")
    finally:
        fed.stop()
        if nets:
            nets.delete()


def bring_up(fed: Federation, sites: list[str], *, retries: int = 3, nets: Namespaces | None = None,
             cold: bool = False, data: bool = True, threads: int = 0) -> None:
    """Keys and data for `sites` (`data`: the tiny IID files), a SuperLink with TLS + auth + database, the
    sites registered and started (warm unless `cold`), all online: on loopback, or each in its network
    namespace of `nets`."""
    hosts = ["127.0.0.1", "localhost", *([v["host_ip"] for v in nets.links.values()] if nets else [])]
    make_deployment_pki(fed.root / "pki", nodes=sites, hosts=hosts)
    if data:
        write_client_files(fed.root, sites)
    fed.start_superlink(host="0.0.0.0" if nets else "127.0.0.1")
    fed.register(sites)
    for site in sites:
        start_node(fed, site, ca=fed.root / "pki" / "ca.crt", key=site, retries=retries,
                   netns=nets.links[site] if nets else None, cold=cold, threads=threads)
    wait_for(lambda: fed.online() == len(sites), 90, f"{len(sites)} SuperNodes online")


def fault_injecting_app(root: Path) -> Path:
    """A copy of the project whose ClientApp is simulation.faults:app (fedtune's ClientApp plus
    the fault mod); the production app is never changed for a test."""
    app = root / "faults-app"
    for part in ("common", "client", "server", "simulation"):
        shutil.copytree(REPO / part, app / part, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'clientapp = "client.app:app"' in pyproject
    (app / "pyproject.toml").write_text(pyproject.replace('clientapp = "client.app:app"',
                                                          'clientapp = "simulation.faults:app"'))
    return app


def rounds_done(run: Path) -> int:
    path = run / "rounds.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_killed_node_fails_its_round_and_rejoins_while_a_slow_node_outlasts_heartbeats(tmp_path):
    """Under secure aggregation with distributed DP. Round 1: site-2 is SIGKILLed while it trains
    (after sharing its keys, in the stage that uploads its masked vector) and site-0 stays busy
    for 70 s, more than twice Flower's 30 s heartbeat interval. The round completes with site-0 and
    site-1, site-2's masks removed with the others' shares, and counts site-2 failed; site-2
    restarts with the same key, rejoins, and is sampled in rounds 2 and 3 (min-available-clients=3
    makes round 2 wait for it, bounded). The audit passes: the noise of two clients' shares met
    the target (threshold 2 of 3). Each site in its own network namespace where the machine allows."""
    fed = Federation(tmp_path)
    nets = Namespaces(SITES) if Namespaces.available() else None
    training = tmp_path / "site-2-uploading"  # written by the fault when site-2 reaches the stage that uploads
    fed.env["FEDTUNE_FAULTS"] = json.dumps({"site-0": {"kind": "hang", "seconds": 70, "rounds": [1]},
                                            "site-2": {"kind": "hang", "seconds": 120, "rounds": [1],
                                                       "mark": str(training)}})
    try:
        if nets:
            nets.create()
        bring_up(fed, SITES, nets=nets)
        pki = tmp_path / "pki"

        run = tmp_path / "run"
        config = [*SECURE_DP, "num-server-rounds=3", "min-available-clients=3", "min-train-clients=3",
                  "round-timeout=200.0", f'run-dir="{run}"']
        start = time.monotonic()
        run_id = fed.submit(fault_injecting_app(tmp_path), config)
        wait_for(training.exists, 300, "site-2 in round 1's masked stage")
        assert training.read_text() == "train.secagg_masked"
        assert rounds_done(run) == 0
        kill_group(fed.procs["site-2"].pid)
        killed_at = time.monotonic()
        try:
            wait_for(lambda: rounds_done(run) >= 1, 300, "round 1 to end")
        except AssertionError as err:
            raise AssertionError(f"{err}; ServerApp log:\n{fed.server_log(run_id)}") from None
        round1_s = time.monotonic() - killed_at
        start_node(fed, "site-2", ca=pki / "ca.crt", key="site-2",  # same key: a restart, not a new member
                   netns=nets.links["site-2"] if nets else None)
        fed.wait_for_run(run, run_id, 600)
        wall = time.monotonic() - start

        assert json.loads((run / "status.json").read_text())["status"] == "completed", fed.server_log(run_id)
        check_run_invariants(run, 3)
        rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
        assert rounds[0]["aggregated"] == ["site-0", "site-1"]  # the slow node was waited for, not dropped
        assert rounds[0]["failed"] + rounds[0]["timed_out"] == ["site-2"]
        assert rounds[0]["secure_aggregation"]["applied"] and rounds[0]["secure_aggregation"]["stages"]["masked"] == 2
        assert rounds[1]["aggregated"] == SITES and rounds[2]["aggregated"] == SITES  # rejoined, sampled again
        audit = subprocess.run([sys.executable, "-m", "simulation.cli", "audit", str(run)], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
        assert audit.returncode == 0 and "audit passed" in audit.stdout, audit.stdout[-3000:]
        count("faults_survived", "supernode-killed-mid-round")
        count("faults_survived", "supernode killed mid secure round: its masks removed, the noise target met")
        count("faults_survived", "supernode-restarted-and-rejoined")
        count("faults_survived", "local-training-longer-than-heartbeat")
        seconds = [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines()[1:]]
        print(f"deployment fault test ({'own network namespaces' if nets else 'loopback'}): wall {wall:.0f}s, "
              f"round 1 ended {round1_s:.0f}s after the kill; seconds per round {seconds}; round ledger "
              f"{[r['secure_aggregation'] for r in rounds]}")
    finally:
        fed.stop()
        if nets:
            nets.delete()


def test_superlink_restart_keeps_registrations_and_the_run_resumes(tmp_path):
    """RELIABILITY fault 'a SuperLink restart with a persistent database': the SuperLink (and the
    ServerApp it runs) is SIGKILLed after round 1. Restarted on the same database, it still knows
    the registered node keys, the SuperNodes reconnect on their own, and the run resubmitted with
    resume=true continues from round 1: no round is run twice, I1, I2, I4, I5 hold."""
    fed = Federation(tmp_path)
    sites = SITES[:2]
    try:
        bring_up(fed, sites, retries=60)  # retries: the nodes outlive the SuperLink's restart
        run = tmp_path / "run"
        config = [*SMALL_RUN, "num-server-rounds=3", "min-available-clients=2", "round-timeout=120.0",
                  f'run-dir="{run}"']
        run_id = fed.submit(REPO, config)
        wait_for(lambda: rounds_done(run) >= 1, 300, "round 1")
        kill_group(fed.procs["superlink"].pid)  # the SuperLink's machine goes down, its ServerApp with it
        for proc in fed.serverapps():  # (the ServerApp runs in a session of its own)
            proc.kill()
        wait_for(lambda: not fed.serverapps(), 30, "the ServerApp to be gone")
        done_before = rounds_done(run)
        assert not (run / "status.json").exists() and done_before < 3

        fed.start_superlink()  # same port, same database
        wait_for(lambda: fed.online() == 2, 180, "the SuperNodes to reconnect to the restarted SuperLink")
        resumed_id = fed.submit(REPO, [*config, "resume=true"])
        fed.wait_for_run(run, resumed_id, 600)

        assert json.loads((run / "status.json").read_text())["status"] == "completed", fed.server_log(resumed_id)
        check_run_invariants(run, 3)
        rounds = [json.loads(line)["round"] for line in (run / "rounds.jsonl").read_text().splitlines()]
        assert rounds == [1, 2, 3]  # nothing lost, nothing run twice
        assert f"resumed from round-{done_before:04d}.safetensors (round {done_before})" in fed.server_log(resumed_id)
        count("faults_survived", "superlink-restart-with-database")
        print(f"superlink restart: killed after {done_before} round(s); runs {run_id} then {resumed_id}")
    finally:
        fed.stop()


def warm_worker(fed: Federation, site: str) -> psutil.Process:
    """The warm worker `fedtune supernode` runs beside `site`'s SuperNode."""
    def is_worker(proc: psutil.Process) -> bool:
        try:
            return "client.warm" in " ".join(proc.cmdline())
        except psutil.Error:  # a ClientApp process that just ended
            return False

    workers = [p for p in psutil.Process(fed.procs[site].pid).children(recursive=True) if is_worker(p)]
    assert len(workers) == 1, workers
    return workers[0]


def test_warm_worker_killed_mid_message_fails_that_message_only_and_a_new_run_frees_the_old(tmp_path):
    """Issue 42's faults on real processes. Run A (sample-level DP): site-1's warm worker is SIGKILLed while
    it trains in round 2; that message fails (counted failed in rounds.jsonl), `fedtune supernode` starts
    the worker again and site-1 is aggregated in round 3; no privacy record holds a round twice and the
    audit passes. Then site-0's data file grows on disk and run B is submitted to the same nodes: each
    worker frees run A's model and data, and site-0 trains on the new file (noticed without a restart)."""
    fed = Federation(tmp_path)
    try:
        bring_up(fed, SITES)
        run = tmp_path / "run-a"
        config = [*(i for i in SMALL_RUN if not i.startswith("local-steps")), "local-steps=30", "num-server-rounds=3",
                  "min-available-clients=3", "min-train-clients=3", "round-timeout=200.0", "dp-sample=true",
                  "dp-noise-multiplier=1.0", "dp-batch-size=16", f'run-dir="{run}"']
        run_id = fed.submit(REPO, config)
        first = warm_worker(fed, "site-1")
        wait_for(lambda: "[round 2] site-1 step 10/" in fed.log("site-1"), 400, "site-1 training in round 2")
        first.kill()
        fed.wait_for_run(run, run_id, 600)
        assert json.loads((run / "status.json").read_text())["status"] == "completed", fed.server_log(run_id)
        check_run_invariants(run, 3)
        rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
        assert rounds[1]["failed"] == ["site-1"] and rounds[1]["aggregated"] == ["site-0", "site-2"]
        assert rounds[0]["aggregated"] == rounds[2]["aggregated"] == SITES  # the restarted worker served round 3
        assert "the warm worker ended (exit -9); starting it again" in fed.log("site-1")
        for site in SITES:  # every message ran in the node's warm worker
            assert fed.log(site).count("train message of run") >= 2, fed.log(site)[-3000:]
        assert warm_worker(fed, "site-1").pid != first.pid
        for record in (tmp_path / "privacy").glob("*.json"):
            charged = [(e["run"], e["round"]) for e in json.loads(record.read_text())["entries"]]
            assert len(charged) == len(set(charged)), (record, charged)  # no round charged twice
        audit = subprocess.run([sys.executable, "-m", "simulation.cli", "audit", str(run)], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
        assert audit.returncode == 0 and "audit passed" in audit.stdout, audit.stdout[-3000:]
        count("faults_survived", "warm worker killed mid-message on a deployed node")

        examples_a = {c["client_id"]: c["train_examples"] for c in json.loads((run / "clients.json").read_text())}
        extra = [json.loads(line) for line in (tmp_path / "site-1.jsonl").read_text().splitlines()][:60]
        with open(tmp_path / "site-0.jsonl", "a") as data:  # site-0's file changes while its worker runs
            data.writelines(json.dumps(row) + "\n" for row in extra)
        run_b = tmp_path / "run-b"
        run_id_b = fed.submit(REPO, [*SMALL_RUN, "num-server-rounds=1", "min-available-clients=3",
                                     "round-timeout=200.0", f'run-dir="{run_b}"'])
        fed.wait_for_run(run_b, run_id_b, 600)
        assert json.loads((run_b / "status.json").read_text())["status"] == "completed", fed.server_log(run_id_b)
        examples_b = {c["client_id"]: c["train_examples"] for c in json.loads((run_b / "clients.json").read_text())}
        assert examples_b["site-0"] > examples_a["site-0"] and examples_b["site-1"] == examples_a["site-1"]
        for site in SITES:
            assert "its model and data freed" in fed.log(site), fed.log(site)[-3000:]
        count("faults_survived", "a deployed node's data file changed between runs: read again by its warm worker")
    finally:
        fed.stop()
