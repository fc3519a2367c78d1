"""Hardening, second pass (issue 39): what a careless or malicious user tries on the newer surfaces.

RELIABILITY bad inputs and evidence: a run folder is fedtune's only when fedtune marked it (class 3:
someone else's folder with fedtune's file names, a file, a read-only place, a full disk); a node
config's unknown key or bad value (class 4); `fedtune plan`'s flags checked as the run-config keys
they stand for (class 5); `fedtune evaluate`'s columns, a damaged best.json, an --out it cannot write
(class 6); `fedtune certs`' hosts, colliding names, a file where a folder should be, nothing
half-made (class 7); settings that cannot both take effect, a Hub model offline, a data folder
(class 9). Each refusal names what was expected and what arrived.
"""

from __future__ import annotations

import errno
import json
import os
import sys

import pytest

from common.config import FedtuneConfig, parse_run_config
from common.errors import ConfigError, DataError
from tests.procs import run_cli
from tests.reliability import count

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower stamps messages with it


def fedtune(*args: str, timeout: float = 120, env: dict | None = None):
    return run_cli([sys.executable, "-m", "simulation.cli", *args], timeout=timeout, env=env)


# --- class 3: run folders ---------------------------------------------------------------------------

def test_a_folder_fedtune_did_not_mark_is_refused_even_with_fedtunes_file_names(tmp_path):
    from server.rundir import MARKER, claim

    theirs = tmp_path / "theirs"
    (theirs / "adapters" / "final").mkdir(parents=True)
    for name in ("config.json", "metrics.csv", "status.json"):
        (theirs / name).write_text("someone else's")
    with pytest.raises(ConfigError, match=rf"expected an empty folder or a run folder fedtune made \(it holds {MARKER}\)"):
        claim(theirs, resume=False)
    assert (theirs / "config.json").read_text() == "someone else's" and not (theirs / MARKER).exists()
    ours = claim(tmp_path / "new", resume=False)  # a new folder: made and marked first
    assert ours.marked and json.loads((tmp_path / "new" / MARKER).read_text())["fedtune_run"] is True
    (tmp_path / "new" / "metrics.csv").write_text("from an attempt that never checkpointed")
    assert claim(tmp_path / "new", resume=False).marked  # its own folder again: fine
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="expected a folder .*got a file of that name"):
        claim(tmp_path / "a-file", resume=False)
    count("bad_inputs_rejected", "run-dir of someone else's files named like fedtune's")
    count("bad_inputs_rejected", "run-dir naming a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a folder's permissions")
def test_a_read_only_place_is_refused_before_anything_runs(tmp_path):  # pragma: no cover - root here
    from server.rundir import claim

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(ConfigError, match="expected a place fedtune can write"):
        claim(locked / "run", resume=False)


def test_a_place_that_cannot_be_written_is_one_line_before_round_1(tmp_path):
    """As root (here and in CI) permissions do not stop a write; a path under a file does, for anyone."""
    (tmp_path / "plain-file").write_text("x")
    out = fedtune("simulate", "-c", f'run-dir="{tmp_path / "plain-file" / "run"}"')
    assert out.returncode == 2 and out.stdout.strip().splitlines()[-1].startswith(
        f"fedtune: error: run-dir {tmp_path / 'plain-file' / 'run'}: expected a place fedtune can write"), out.stdout
    assert "Traceback" not in out.stdout
    count("bad_inputs_rejected", "run-dir that cannot be written")


def test_a_full_disk_mid_run_ends_with_a_named_status_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """ENOSPC while round 2 is committed: status write-failed names it, the run fails with one line,
    and round 1's checkpoint and adapters/best stay whole."""
    import server.loop as loop
    from server.checkpoint import latest_checkpoint, load_checkpoint
    from tests.test_secure_rounds import NODES
    from client.app import app
    from tests.inprocess_grid import InProcessGrid

    cfg = FedtuneConfig(partitioner="iid", max_train_examples=120, max_heldout_examples=20, max_length=16,
                        local_steps=1, batch_size=8, fraction_evaluate=0.0, num_server_rounds=3,
                        run_dir=str(tmp_path / "run"))
    grid = InProcessGrid(app, {n: {"partition-id": i, "num-partitions": 3} for i, n in enumerate(NODES)})
    real = loop.save_checkpoint

    def full_disk(directory, ckpt):
        if ckpt.server_round == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "round-0002.safetensors"))
        return real(directory, ckpt)

    monkeypatch.setattr(loop, "save_checkpoint", full_disk)
    with pytest.raises(loop.RunFailed, match="write-failed: No space left on device"):
        loop.run_server(grid, cfg)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "write-failed" and "No space left on device" in status["reason"]
    assert load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints")).server_round == 1
    assert (tmp_path / "run" / "adapters" / "best" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "adapters" / "best.tmp").exists()
    count("faults_survived", "disk full mid-run: status write-failed, the last checkpoint intact")


# --- class 4: node config ------------------------------------------------------------------------------

@pytest.mark.parametrize("node, message", [
    ({"data-path": "x.csv", "epsilon_budget": 1.0}, r"unknown key\(s\) \['epsilon_budget'\]; expected some of: .*epsilon-budget"),
    ({"data-path": "x.csv", "epsilon-budget": -1.0}, r"epsilon-budget \(node config\): expected a finite number >= 0"),
    ({"data-path": "x.csv", "epsilon-budget": "lots"}, r"epsilon-budget \(node config\): expected a finite number"),
    ({"data-path": "x.csv", "client-id": ""}, r"client-id \(node config\): expected a non-empty name, got ''"),
    ({"data-path": "x.csv", "num-threads": -2}, r"num-threads \(node config\): expected an integer >= 0, got -2"),
    ({"data-path": "x.csv", "device": "gpu"}, r"device \(node config\): expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    ({"partition-id": 1, "num-partitions": 0}, r"num-partitions \(node config\): expected an integer >= 1, got 0"),
])
def test_a_node_config_key_the_node_does_not_know_or_a_bad_value_is_refused(node, message):
    from client.messages import check_node_config

    with pytest.raises(ConfigError, match=message):
        check_node_config(node)
    count("bad_inputs_rejected", f"node config {node}")


def test_fedtune_supernode_refuses_a_typo_in_a_budget_before_flower_starts(tmp_path):
    from client.node import check_node

    data = tmp_path / "labelled.csv"
    data.write_text("text,label\ngreat,pos\nawful,neg\n")
    args = ["--superlink", "127.0.0.1:9093", "--node-config", f'data-path="{data}" epsilon_budget=1.0']
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epsilon_budget'\]"):
        check_node(args)


# --- class 5: fedtune plan ------------------------------------------------------------------------------

PLAN = ["plan", "--target-epsilon", "3", "--rounds", "5", "--num-clients", "10", "--clients-per-round", "10",
        "--local-examples", "600", "--trainable", "1000"]


@pytest.mark.parametrize("flag, value, message", [
    ("--delta", "1", r"--delta \(dp-delta: expected a value in \[0.0, 1.0\), got 1.0\)"),
    ("--clipping-norm", "-1", r"--clipping-norm \(dp-clipping-norm: expected a value > 0, got -1.0\)"),
    ("--rounds", "100000000", r"--rounds \(num-server-rounds: expected at most 10,000, got 100,000,000"),
    ("--trainable", "-5", r"--trainable: expected the adapter's trainable values \(>= 1\), or 0"),
    ("--target-epsilon", "inf", r"--target-epsilon \(dp-target-epsilon\): expected a finite value > 0, got inf"),
    ("--batch-size", "-3", r"--batch-size \(dp-batch-size: expected a value >= 0, got -3\)"),
])
def test_plan_checks_its_flags_as_the_run_config_keys_they_stand_for(flag, value, message):
    import re

    out = fedtune(*PLAN, flag, value, timeout=60)
    assert out.returncode == 2 and re.search(message, out.stdout), out.stdout[-2000:]
    assert "Traceback" not in out.stdout
    count("bad_inputs_rejected", f"plan {flag} {value}")


# --- class 6: fedtune evaluate --------------------------------------------------------------------------

def test_evaluate_refuses_a_label_column_as_text_a_damaged_best_json_and_an_out_it_cannot_write(tmp_path):
    from server.checkpoint import Checkpoint, save_checkpoint
    from server.tools.scoring import evaluate_run

    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", Checkpoint(server_round=1, adapter={}, strategy={},
                                                    meta={"config": FedtuneConfig(labels="a,b").to_run_config()}))
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhi,a\nho,b\n")
    with pytest.raises(ConfigError, match="text-column / label-column: expected two different columns, got 'label'"):
        evaluate_run(run, str(data), overrides=["text-column=label"], out=tmp_path / "o1")
    for damaged in ("{not json", "[]", '{"round": "one"}', '{"score": 1}'):
        (run / "best.json").write_text(damaged)
        with pytest.raises(Exception, match=r"expected .*best.json to name a round .*got a damaged file"):
            evaluate_run(run, str(data), which="best", out=tmp_path / "o2")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="evaluate --out: expected a folder fedtune can write"):
        evaluate_run(run, str(data), out=tmp_path / "a-file" / "out")
    count("bad_inputs_rejected", "evaluate with text-column equal to label-column")
    count("bad_inputs_rejected", "evaluate --round best with a damaged best.json")
    count("bad_inputs_rejected", "evaluate --out that cannot be written, refused before scoring")


def test_ctrl_c_in_a_command_ends_with_a_line_not_a_traceback(monkeypatch, capsys):
    import simulation.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "plan", interrupted)
    assert cli.main(PLAN) == 130
    assert capsys.readouterr().err.strip() == "fedtune: plan interrupted; its results were not written"


# --- class 7: fedtune certs -----------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--nodes", "a", "--host", ""], r"--host: expected an IP address or a DNS name .*got ''"),
    (["--nodes", "a", "--host", "https://coordinator.example.org"], r"--host: .*got 'https://coordinator.example.org'"),
    (["--nodes", "a", "--host", "coördinator.org"], r"--host: .*got 'coördinator.org'"),
    (["--nodes", "a", "--host", "host:9093"], r"--host: .*got 'host:9093'"),
    (["--nodes", "x,x.pub"], r"expected node names whose key files differ, got \['x.pub'\] beside \['x'\]"),
])
def test_certs_refuses_bad_hosts_and_colliding_names_before_writing_anything(tmp_path, args, message):
    import re

    out = fedtune("certs", str(tmp_path / "pki"), *args, timeout=60)
    assert out.returncode == 2 and re.search(message, out.stdout), out.stdout
    assert not (tmp_path / "pki").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".pki")]
    count("bad_inputs_rejected", f"certs {args}")


def test_certs_keys_only_into_a_file_is_refused_and_a_failed_write_leaves_nothing_half_made(tmp_path, monkeypatch):
    from server.tools import pki

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="expected a directory, got the file"):
        pki.make_node_key_pairs(tmp_path / "file", nodes=["a"])
    real_write = pki._write
    calls = []

    def fails_on_the_third(path, data, *, private):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data, private=private)

    monkeypatch.setattr(pki, "_write", fails_on_the_third)
    with pytest.raises(OSError):
        pki.make_deployment_pki(tmp_path / "pki", nodes=["a", "b"], hosts=["127.0.0.1"])
    assert not (tmp_path / "pki").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".pki")]
    monkeypatch.setattr(pki, "_write", real_write)
    pki.make_deployment_pki(tmp_path / "pki", nodes=["a", "b"], hosts=["127.0.0.1"])  # a re-run is not blocked
    assert sorted(p.name for p in (tmp_path / "pki" / "nodes").iterdir()) == ["a", "a.pub", "b", "b.pub"]
    count("faults_survived", "certs failing part-way leaves no half-made PKI")


# --- class 8 and 9: plans that cannot finish, settings that cannot both take effect ---------------------

@pytest.mark.parametrize("raw, message", [
    ({"num-server-rounds": 1_000_000}, r"num-server-rounds: expected at most 10,000, got 1,000,000"),
    ({"partitioner": "iid", "dirichlet-alpha": 0.3}, r"dirichlet-alpha: set to 0.3, but partitioner = 'iid' does not use it"),
    ({"shards-per-client": 4}, r"shards-per-client: set to 4, but partitioner = 'dirichlet' does not use it"),
    ({"partition-column": "category", "partitioner": "iid"}, r"partition-column: set to 'category', but partitioner"),
    ({"local-steps": 20, "local-epochs": 2}, r"local-epochs: set to 2, but local-steps = 20 decides the local work"),
    ({"local-val-fraction": 1.0}, r"local-val-fraction: expected a value below 1, got 1.0"),
    ({"heldout-data": "dev.tsv", "heldout-fraction": 0.3}, r"heldout-fraction: set to 0.3, but heldout-data"),
])
def test_settings_that_cannot_both_take_effect_are_refused_naming_both(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config(raw)
    count("bad_inputs_rejected", f"contradictory config {raw}")


def test_a_hub_model_offline_and_a_data_folder_are_one_line_each(tmp_path):
    out = fedtune("simulate", "-c", "model=no-such-org/no-such-model", "-c", f'run-dir="{tmp_path / "r1"}"',
                  env={"HF_HUB_OFFLINE": "1"})
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(
        "fedtune: error: model: expected a packaged model, a local model folder or a Hub name this machine can fetch, "
        "got 'no-such-org/no-such-model'"), out.stdout
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="which is a folder; name a file in it"):
        from common.data import load_file

        load_file(str(tmp_path / "folder"))
    count("bad_inputs_rejected", "a Hub model name offline")
    count("bad_inputs_rejected", "a data path that is a folder")


def test_ctrl_c_before_round_0_does_not_suggest_a_resume_that_cannot_work(tmp_path):
    """The simulation's interrupt handler, called as SIGINT would: with no checkpoint it says there is
    nothing to resume; after round 0 it names the resume command."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".fedtune-run").write_text("{}")
    interrupt = ("import signal, sys; from pathlib import Path; from simulation.run import stop_on_interrupt\n"
                 "with stop_on_interrupt(Path(sys.argv[1])):\n"
                 "    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)\n")
    outputs = []
    for checkpointed in (False, True):
        if checkpointed:
            from server.checkpoint import Checkpoint, save_checkpoint

            save_checkpoint(run / "checkpoints", Checkpoint(server_round=0, adapter={}, strategy={}, meta={}))
        done = run_cli([sys.executable, "-c", interrupt, str(run)], timeout=60)
        assert done.returncode == 130, done.stdout
        outputs.append(done.stdout)
    assert "nothing to resume: start the run again" in outputs[0] and "resume=true" not in outputs[0]
    assert "interrupted after round 0" in outputs[1] and "-c resume=true" in outputs[1]
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"


# --- client replies the ledger is written from ---------------------------------------------------------

def _privacy_reply(node: int, **changes):
    from flwr.app import ConfigRecord, RecordDict

    from tests.flower_messages import reply_from

    record = {"status": "trained", "fingerprint": "f" * 64, "noise-multiplier": 1.1, "sample-rate": 0.1,
              "steps": 3, "clipping-norm": 1.0, "noise": "gaussian", "l2-sensitivity": 1.0,
              "l1-sensitivity": 1.0, "epsilon": 0.5, "epsilon-rdp": 0.6, "accountant": "pld", "delta": 1e-5,
              "epsilon-budget": 3.0, "history-noise": [1.1], "history-rate": [0.1], "history-steps": [3],
              "history-kind": ["gaussian"], "history-l2": [1.0], "history-l1": [1.0]}
    for key, value in changes.items():
        if value is None:
            record.pop(key.replace("_", "-"))
        else:
            record[key.replace("_", "-")] = value
    return reply_from(node, RecordDict({"privacy": ConfigRecord(record),
                                        "client": ConfigRecord({"client-id": f"c{node}", "round": 1})}))


@pytest.mark.parametrize("changes, expected", [
    ({"epsilon": None}, "expected a field 'epsilon', got none"),
    ({"epsilon": "0.5"}, "expected 'epsilon' as a number, got '0.5'"),
    ({"steps": 2.5}, "expected 'steps' as an integer, got 2.5"),
    ({"history_rate": [0.1, 0.2]}, "expected history lists of one length"),
    ({"history_l2": 1.0}, "expected 'history-l2' as a list of float, got 1.0"),
    ({"noise": "skellam", "l1_sensitivity": None}, "expected a field 'l1-sensitivity', got none"),
    ({"status": "budget-exhausted"}, "expected a field 'epsilon-spent', got none"),  # a refusal's fields
    ({"status": 3}, "expected a status string, got 3"),
])
def test_a_privacy_record_the_ledger_cannot_be_written_from_makes_the_reply_failed(changes, expected):
    """A client's privacy record that is missing a field, holds another type or history lists of
    different lengths is named and its reply counts as failed (its update is not aggregated, its
    ledger entry says the spend is unknown) instead of crashing the server while it writes the ledger."""
    from server.replies import classify_replies, privacy_problem

    good, bad = _privacy_reply(1), _privacy_reply(2, **changes)
    assert privacy_problem(good) is None
    assert expected in privacy_problem(bad)
    failed, refused, ok = classify_replies([good, bad], {1: "c1", 2: "c2"}, {})
    assert failed == ["c2"] and refused == [] and ok == [good]
    count("bad_inputs_rejected", "client privacy record the ledger cannot be written from")


@pytest.mark.parametrize("client", [
    {"client-id": "c1", "train-examples": 10, "val-examples": 2, "label-names": ["a", "b"]},
    {"client-id": "c1", "train-examples": "ten", "val-examples": 2, "label-names": ["a"], "label-counts": [10]},
    {"client-id": "c1", "train-examples": 10, "val-examples": 2, "label-names": ["a", "b"], "label-counts": [10]},
    {"client-id": "c1", "train-examples": -5, "val-examples": 2, "label-names": ["a"], "label-counts": [10]},
    None,
])
def test_a_nodes_malformed_self_description_is_named_and_skipped(client):
    from flwr.app import ConfigRecord, MessageType, RecordDict

    from server.replies import describe
    from tests.flower_messages import reply_from

    content = RecordDict({} if client is None else {"client": ConfigRecord(client)})
    problem = describe(reply_from(1, content, message_type=MessageType.QUERY))
    assert isinstance(problem, str) and problem.startswith("expected")
    ok = {"client-id": "c1", "train-examples": 10, "val-examples": 2, "label-names": ["a"], "label-counts": [10]}
    assert describe(reply_from(1, RecordDict({"client": ConfigRecord(ok)}), message_type=MessageType.QUERY)) == {
        "client_id": "c1", "train_examples": 10, "val_examples": 2, "label_histogram": {"a": 10}}
    count("bad_inputs_rejected", "node's malformed answer to the server's query")


@pytest.mark.parametrize("content", [
    {},  # no metrics record
    {"metrics": {"val-accuracy": 0.5}},  # no num-examples
    {"metrics": {"num-examples": float("nan"), "val-accuracy": 0.5}},
    {"metrics": {"num-examples": -3, "val-accuracy": 0.5}},
    {"metrics": {"num-examples": 0, "val-accuracy": 0.0}},  # a client without validation data
])
def test_an_evaluation_reply_without_a_usable_example_count_is_left_out(content):
    """Federated evaluation used to index num-examples of every reply: one without it was a KeyError."""
    from flwr.app import MessageType, MetricRecord, RecordDict

    from server.evaluation import evaluated
    from tests.flower_messages import reply_from

    record = RecordDict({k: MetricRecord(v) for k, v in content.items()})
    assert not evaluated(reply_from(1, record, message_type=MessageType.EVALUATE))
    good = RecordDict({"metrics": MetricRecord({"num-examples": 12, "val-accuracy": 0.5})})
    assert evaluated(reply_from(1, good, message_type=MessageType.EVALUATE))
    count("bad_inputs_rejected", "evaluation reply without a usable num-examples")
