"""Durable state (RELIABILITY: I5 durable; faults - kill during a checkpoint write; bad checkpoints)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from common.config import FedtuneConfig
from common.errors import CheckpointError
from server.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from server.strategy import build_strategy
from tests.reliability import count


def ckpt(r: int) -> Checkpoint:
    rng = np.random.default_rng(r)
    return Checkpoint(server_round=r, adapter={"a": rng.normal(size=(4, 2)).astype(np.float32)},
                      strategy={"s0|m_t|dict|a": np.ones((4, 2), np.float32)},
                      meta={"config": {"seed": 1}, "history": [{"round": r}]})


def test_checkpoint_round_trip(tmp_path):
    path = save_checkpoint(tmp_path, ckpt(3))
    back = load_checkpoint(path)
    assert back.server_round == 3 and back.meta["history"] == [{"round": 3}]
    assert np.array_equal(back.adapter["a"], ckpt(3).adapter["a"])
    assert np.array_equal(back.strategy["s0|m_t|dict|a"], np.ones((4, 2)))
    assert latest_checkpoint(tmp_path) == path


def test_edited_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, ckpt(1))
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="expected SHA-256"):
        load_checkpoint(path)


def test_a_truncated_checkpoint_with_a_rewritten_hash_is_refused_without_a_traceback(tmp_path):
    """Hardening class 7: the hash matches (someone rewrote it), the content is cut short."""
    import hashlib

    path = save_checkpoint(tmp_path, ckpt(1))
    cut = path.read_bytes()[:200]
    path.write_bytes(cut)
    path.with_suffix(".sha256").write_text(hashlib.sha256(cut).hexdigest())
    with pytest.raises(CheckpointError, match="expected fedtune checkpoint metadata, got an unreadable file"):
        load_checkpoint(path)
    count("bad_inputs_rejected", "truncated checkpoint with a matching hash")


def test_missing_hash_and_missing_file_are_refused(tmp_path):
    path = save_checkpoint(tmp_path, ckpt(1))
    path.with_suffix(".sha256").unlink()
    with pytest.raises(CheckpointError, match="hash file"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="found none"):
        load_checkpoint(tmp_path / "round-0009.safetensors")


KILL_AT_REPLACE = """
import os, signal, sys
from pathlib import Path
import server.checkpoint as mod
from tests.test_checkpoint import ckpt
calls, real = [0], os.replace
def replace(src, dst):
    if calls[0] == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no exception handler or finally runs
    calls[0] += 1
    return real(src, dst)
os.replace = replace  # common.files renames with os.replace
mod.save_checkpoint(Path(sys.argv[1]), ckpt(2))
"""


@pytest.mark.parametrize("kill_at", [0, 1], ids=["before-the-hash-file-rename", "before-the-data-file-rename"])
def test_kill_during_write_leaves_the_previous_checkpoint_loadable(tmp_path, kill_at):
    """RELIABILITY fault 'a kill during a checkpoint write': the process writing round 2 is
    SIGKILLed at each of the write's renames; round 1 stays the latest loadable checkpoint and
    the leftovers do not stop round 2 from being written again."""
    import signal
    import subprocess

    from tests.conftest import REPO

    save_checkpoint(tmp_path, ckpt(1))
    child = subprocess.run([sys.executable, "-c", KILL_AT_REPLACE, str(tmp_path), str(kill_at)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "round-0001.safetensors"
    assert load_checkpoint(latest).server_round == 1
    assert load_checkpoint(save_checkpoint(tmp_path, ckpt(2))).server_round == 2
    count("faults_survived", f"SIGKILL during a checkpoint write ({kill_at and 'data' or 'hash'} file rename)")


def test_fedavgm_server_learning_rate_scales_the_averaged_update():
    """With server-momentum 0, FedAvgM is FedAvg whose averaged update is multiplied by
    fedavgm-learning-rate: the global moves 3x as far as the clients' mean."""
    from flwr.app import Array, ArrayRecord

    from tests.flower_messages import train_reply

    strategy = build_strategy(FedtuneConfig(strategy="fedavgm", server_momentum=0.0, fedavgm_learning_rate=3.0))
    old = np.zeros((2, 3), np.float32)
    strategy.current_arrays = ArrayRecord({"w": Array(old)})
    clients = [np.full((2, 3), 0.1, np.float32), np.full((2, 3), 0.3, np.float32)]
    arrays, _ = strategy.aggregate_train(1, [train_reply(n, {"w": w}) for n, w in enumerate(clients, 1)])
    assert np.allclose(arrays["w"].numpy(), 3.0 * 0.2)


def test_a_checkpoint_of_an_older_version_resumes_with_a_removed_option_left_neutral(tmp_path):
    """Redesign (issue 29): removed options in a checkpoint's config at the value that made them do
    nothing do not block a resume; at any other value the resume is refused, naming the key, and
    the checkpoint stays as it was."""
    from server.resume import checked_checkpoint
    from server.rundir import RunDir
    from server.state import initial_state, with_labels

    cfg, labels = with_labels(FedtuneConfig(run_dir=str(tmp_path), resume=True, max_train_examples=200))
    _, state = initial_state(cfg, labels, RunDir(tmp_path))

    def saved(extra: dict) -> None:
        save_checkpoint(state.run.checkpoints, Checkpoint(
            server_round=1, adapter=state.initial, strategy={},
            meta={"config": {**cfg.to_run_config(), **extra}, "frozen": state.frozen, "data": state.data}))

    saved({"shared-moments": "none", "client-sampling": "random"})
    assert checked_checkpoint(state)[1].server_round == 1
    saved({"num-threads": 2})  # moved to the node config: an older run's value, whatever it was, resumes
    assert checked_checkpoint(state)[1].server_round == 1
    from server.tools.export import export_run  # and exports (fedtune evaluate: tests/test_evaluation.py)

    assert export_run(tmp_path, tmp_path / "exported", merged=False)[1] == 1
    saved({"shared-moments": "second"})
    before = (tmp_path / "checkpoints" / "round-0001.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match=r"expected a config this fedtune can run, got one that is not "
                                              r"\(unknown config key\(s\) \['shared-moments'\]"):
        checked_checkpoint(state)
    assert (tmp_path / "checkpoints" / "round-0001.safetensors").read_bytes() == before
    count("bad_inputs_rejected", "checkpoint config with a removed option switched on")
