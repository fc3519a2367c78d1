"""Shared fixtures. `SHARED_DATA` is the benchmark data folder beside the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))


def require_shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"benchmark data not found at {path} (set FEDTUNE_SHARED_DATA to its folder)")
    return path


def save_tiny_llama(out: Path, *, hidden: int = 64) -> str:
    """A 2-layer Llama with random weights and the packaged model's tokenizer, saved to `out`:
    a causal LM that loads offline (tests/test_causal_lm.py, tests/test_gpu.py)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.model import load_tokenizer

    tokenizer = load_tokenizer("packaged:all-MiniLM-L6-v2")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32,
                         max_position_embeddings=256, bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def save_tiny_gpt2(out: Path) -> str:
    """A 2-layer GPT-2 with random weights and the packaged model's tokenizer, saved to `out`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from common.model import load_tokenizer

    tokenizer = load_tokenizer("packaged:all-MiniLM-L6-v2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.cls_token_id,
                        eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                        n_layer=2, n_head=2, n_embd=64, n_positions=256)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def pytest_configure(config):
    """Under pytest-xdist (the default, see pyproject's addopts) each worker gets its share of
    the cores, and so do the federations it starts (they inherit OMP_NUM_THREADS): two workers
    with two threads each on two cores run several times slower than one. The controller
    collects the workers' reliability counts.

    DP clients keep their privacy records across runs (in ~/.fedtune/privacy unless
    FEDTUNE_PRIVACY_DIR says otherwise): every process the tests start writes them to a
    folder of this session's instead, so the tests neither spend a user's budget nor start
    from the records of earlier test sessions."""
    import atexit
    import shutil
    import tempfile

    private = tempfile.mkdtemp(prefix="fedtune-test-privacy-")
    os.environ["FEDTUNE_PRIVACY_DIR"] = private
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(workers)))
    elif config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_ReliabilityFromWorkers())


def pytest_collection_modifyitems(config, items):
    """Longest files first (their `minutes` marker), so that under `--dist loadfile` the workers
    finish together instead of one starting a nine-minute file last. Each file stays whole and
    in its own order; every worker computes the same order."""
    def file_of(item) -> str:
        return item.nodeid.split("::")[0]

    minutes: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        marker = item.get_closest_marker("minutes")
        minutes[file_of(item)] = max(minutes.get(file_of(item), 0.0), marker.args[0] if marker else 0.0)
        first.setdefault(file_of(item), i)
    items.sort(key=lambda item: (-minutes[file_of(item)], first[file_of(item)]))  # stable: files stay in order


class _ReliabilityFromWorkers:
    def pytest_testnodedown(self, node, error):
        import json

        from tests.reliability import FAILED, merge

        worker = json.loads(node.workeroutput.get("reliability", "{}"))
        merge(worker)
        FAILED.extend(worker.get("failed", []))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test's reliability counts enter the report only when the test passed (call phase)."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and not report.passed):
        from tests.reliability import settle

        settle(item.nodeid, passed=report.passed)


@pytest.fixture(scope="module")
def task_identity():
    """Flower stamps new messages with the process's task identity; set one as a SuperNode would (for tests
    that build ClientApp messages in this process: `pytestmark = pytest.mark.usefixtures("task_identity")`)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(autouse=True)
def _quiet_threads():
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))
    yield


def pytest_sessionfinish(session, exitstatus):
    """Write the reliability report: what the tests that passed actually rejected, survived, checked."""
    import json

    from tests.reliability import FAILED, REPORT, totals

    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller writes the report
        session.config.workeroutput["reliability"] = json.dumps({**REPORT, "failed": FAILED})
        return
    out = Path(os.environ.get("FEDTUNE_RELIABILITY_REPORT", REPO / "build" / "reliability-report.json"))
    out.parent.mkdir(exist_ok=True)
    outcome = "passed" if exitstatus == 0 else "failed"
    out.write_text(json.dumps({"session": outcome, "tests_failed_not_counted": sorted(FAILED), "totals": totals(),
                               **REPORT}, indent=1, sort_keys=True))


def pytest_terminal_summary(terminalreporter):
    from tests.reliability import totals

    t = totals()
    if any(t.values()):
        from tests.reliability import FAILED

        left_out = f"; {len(FAILED)} failing tests not counted" if FAILED else ""
        terminalreporter.write_line(
            f"reliability report: {t['bad_inputs_rejected']} bad inputs rejected, {t['faults_survived']} faults "
            f"survived, {t['invariant_checks_passed']} invariant checks passed, by tests that passed{left_out} "
            "(build/reliability-report.json)"
        )
