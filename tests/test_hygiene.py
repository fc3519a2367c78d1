"""Source checks: no unsafe deserialization (RELIABILITY security checks), and the ML code in
common/ stays framework-free (only the Flower glue modules, records.py and flower.py, import flwr)."""

from __future__ import annotations

import os
import re
import sys

import pytest

from tests.conftest import REPO

SOURCES = sorted(p for d in ("server", "client", "common", "simulation") for p in (REPO / d).glob("*.py"))
UNSAFE = [
    (r"\bimport pickle\b|\bpickle\.loads?\(", "pickle"),
    (r"allow_pickle\s*=\s*True", "np.load(allow_pickle=True)"),
    (r"torch\.load\((?![^)]*weights_only\s*=\s*True)", "torch.load without weights_only=True"),
    (r"yaml\.load\(", "yaml.load (use yaml.safe_load)"),
    (r"(?<![.\w])(eval|exec)\(", "eval/exec builtins"),
]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_unsafe_deserialization(path):
    text = path.read_text()
    for pattern, what in UNSAFE:
        assert not re.search(pattern, text), f"{path.name}: {what}"


def test_common_ml_code_does_not_import_flower():
    glue = {"records.py", "flower.py"}
    offenders = [p.name for p in (REPO / "common").glob("*.py")
                 if p.name not in glue and re.search(r"^\s*(from|import) flwr", p.read_text(), flags=re.M)]
    assert offenders == []


@pytest.mark.parametrize("module", ["client.app", "client.training", "server.loop"])
def test_apps_load_the_privacy_libraries_only_when_a_run_uses_them(module):
    """Every ClientApp actor and ServerApp process imports its app; Opacus and dp-accounting
    (about 1.5 s of CPU each time) load only where a run computes DP or epsilon."""
    import subprocess
    import sys

    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('opacus', 'dp_accounting') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_client_answers_the_servers_query_without_loading_torch():
    """In deployment a SuperNode starts a ClientApp process for every message; the query that
    opens each run (who are you, how much data) is answered without torch, transformers or
    PEFT, which only train and evaluate messages need (several seconds of CPU per process)."""
    import subprocess
    import sys

    code = """
import sys
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from client.app import query
from common.config import FedtuneConfig
from common.federation_data import federation_labels
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as a SuperNode sets it
cfg = FedtuneConfig(partitioner="iid")
cfg = cfg.replace(labels=federation_labels(cfg).to_spec())
msg = Message(content=RecordDict({"config": ConfigRecord(cfg.to_run_config())}), message_type=MessageType.QUERY,
              dst_node_id=1)
node = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
               run_config={})
answer = query(msg, node).content["client"]
print(answer["client-id"], answer["train-examples"] > 0, sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "partition-0 True []"


def test_the_reliability_report_counts_only_tests_that_passed_each_case_once(tmp_path):
    """Hardening class 10 (the report's honesty): a case counted before an assertion that then
    fails is left out and the failing test named; a case counted by two tests (one input in two
    orders) is one case; invariant checks add up; the session's outcome is in the report."""
    import json
    import subprocess

    (tmp_path / "test_synthetic.py").write_text(
        "from tests.reliability import count\n"
        "def test_a():\n    count('bad_inputs_rejected', 'nan-update')\n    count('invariant_checks_passed', 'I1')\n"
        "def test_b():\n    count('bad_inputs_rejected', 'nan-update')\n    count('invariant_checks_passed', 'I1')\n"
        "def test_c():\n    count('faults_survived', 'kill')\n    assert False\n")
    report = tmp_path / "report.json"
    env = {**os.environ, "FEDTUNE_RELIABILITY_REPORT": str(report), "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-c", os.devnull,
                          "--rootdir", str(tmp_path), str(tmp_path / "test_synthetic.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout[-2000:]
    got = json.loads(report.read_text())
    assert got["session"] == "failed"
    assert got["tests_failed_not_counted"] == ["test_synthetic.py::test_c"]
    assert got["totals"] == {"bad_inputs_rejected": 1, "faults_survived": 0, "invariant_checks_passed": 2}
    assert "1 bad inputs rejected, 0 faults survived, 2 invariant checks passed, by tests that passed; " \
           "1 failing tests not counted" in run.stdout
