"""End-to-end simulations with the packaged model and corpus (real Flower engine, real weights).

RELIABILITY: I1 finite, I2 schema, I5 durable after every round; fault - server stopped
and restarted (resume from the last complete round, same final adapter; killed between a round's
checkpoint and its adapter); bad input - a
checkpoint trained against another frozen LoRA A.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from peft import PeftModel

from common.model import base_classifier
from server.checkpoint import load_checkpoint
from tests.invariants import check_run_invariants
from tests.procs import fedtune, kill_matching, run_cli, run_in_terminal
from tests.reliability import count
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.minutes(8)]

SMALL = ["max-train-examples=360", "max-heldout-examples=120", "local-steps=6", "batch-size=16",
         "max-length=32", 'partitioner="iid"']


SERVER_STARTED = "fedtune: run directory"  # the ServerApp's first line, once the engine is up


def simulate(run_dir, *extra: str, clients: int = 3):
    args = ["simulate", "--num-clients", str(clients)]
    for item in [*SMALL, f'run-dir="{run_dir}"', *extra]:
        args += ["-c", item]
    result = fedtune(*args, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    return result


def test_three_clients_two_rounds_learn_and_leave_a_readable_run_dir(tmp_path):
    run = tmp_path / "run"
    out = simulate(run, "num-server-rounds=2").stdout
    rows = check_run_invariants(run, 2)
    assert rows[2]["heldout_accuracy"] > rows[0]["heldout_accuracy"]
    assert all(r["clients_ok"] == 3 for r in rows[1:])
    assert "round 2/2 | clients 3/3" in out  # one summary line per round
    assert "step 6/6" in out  # progress while clients train
    with open(run / "metrics.csv") as handle:
        assert [int(r["round"]) for r in csv.DictReader(handle)] == [0, 1, 2]
    config = json.loads((run / "config.json").read_text())
    assert config["num-server-rounds"] == 2 and config["labels"]
    clients = json.loads((run / "clients.json").read_text())
    assert [c["client_id"] for c in clients] == ["partition-0", "partition-1", "partition-2"]
    assert (run / "metrics.png").stat().st_size > 10_000
    labels = config["labels"].split(",")
    base = base_classifier(config["model"], len(labels))
    PeftModel.from_pretrained(base, str(run / "adapters" / "final"))
    check_evaluation_outputs(run, rows, labels)


def check_evaluation_outputs(run, rows: list[dict], labels: list[str]) -> None:
    """Issue 30 on a real run: per-class held-out figures every round, the best round's adapter,
    TensorBoard scalars, and `fedtune evaluate` of the final adapter on the held-out set giving
    the server's own figures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from common.config import parse_run_config
    from common.federation_data import heldout_set

    for row in rows:
        report = json.loads((run / "heldout" / f"round-{row['round']:04d}.json").read_text())
        assert list(report["per_class"]) == labels and report["accuracy"] == row["heldout_accuracy"]
        assert sum(map(sum, report["confusion"]["counts"])) == row["heldout_examples"]
    best = max(rows, key=lambda r: (r["heldout_macro_f1"], -r["round"]))["round"]
    assert json.loads((run / "best.json").read_text())["round"] == best
    assert json.loads((run / "status.json").read_text())["best_round"] == best
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (run / "adapters" / "best" / name).read_bytes() == \
            (run / "adapters" / f"round-{best:04d}" / name).read_bytes()
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"heldout/accuracy", "heldout/macro_f1", "heldout/loss", "train/loss", "clients/val_accuracy"} <= \
        set(events.Tags()["scalars"])
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("heldout/accuracy")] == \
        [(r["round"], round(r["heldout_accuracy"], 6)) for r in rows]
    assert [e.step for e in events.Scalars("train/loss")] == [r["round"] for r in rows[1:]]

    heldout = heldout_set(parse_run_config(json.loads((run / "config.json").read_text())))
    data = run.parent / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(heldout.texts, heldout.labels)))
    scored = fedtune("evaluate", str(run), "--data", str(data), "--perturb", "typo,case", "--out", str(run.parent / "ev"))
    assert scored.returncode == 0, scored.stdout[-3000:]
    report = json.loads((run.parent / "ev" / "evaluation.json").read_text())
    assert report["accuracy"] == pytest.approx(rows[-1]["heldout_accuracy"])
    assert report["macro_f1"] == pytest.approx(rows[-1]["heldout_macro_f1"])
    assert {"typo", "case"} <= set(report["perturbations"]) and "macro_f1" in scored.stdout


def test_resumed_run_ends_with_the_same_adapter_and_a_reused_or_changed_run_dir_is_refused(tmp_path):
    """Full-state resume (I5): FedAdam's server moments come back from the checkpoint, so round 2
    after a restart ends bit-equal.
    Then bad input on the finished run's directory: a new run over it, or a resume with a
    changed config, is refused before the engine starts, and no checkpoint is lost."""
    common = ["strategy=fedadam", "server-learning-rate=0.005", "fraction-train=0.67", "fraction-evaluate=0.0"]
    simulate(tmp_path / "full", "num-server-rounds=2", *common)
    simulate(tmp_path / "cut", "num-server-rounds=1", *common)
    # As if killed right after round 1's checkpoint: its adapter, best.json and rounds.jsonl not yet written
    # (CI once hit this window: the resume then failed copying the missing adapter to adapters/best).
    shutil.rmtree(tmp_path / "cut" / "adapters" / "round-0001")
    for name in ("best.json", "rounds.jsonl"):
        (tmp_path / "cut" / name).unlink()
    out = simulate(tmp_path / "cut", "num-server-rounds=2", "resume=true", *common).stdout
    assert "resumed from round-0001" in out
    for name in ("round-0001/adapter_model.safetensors", "round-0001/fedtune-adapter.json"):
        assert (tmp_path / "cut" / "adapters" / name).read_bytes() == \
            (tmp_path / "full" / "adapters" / name).read_bytes()
    full = check_run_invariants(tmp_path / "full", 2)
    resumed = check_run_invariants(tmp_path / "cut", 2)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "round-0002.safetensors")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "round-0002.safetensors")
    assert a.adapter.keys() == b.adapter.keys()
    assert all(np.array_equal(a.adapter[k], b.adapter[k]) for k in a.adapter)
    assert [r["clients_sampled"] for r in full[1:]] == [2, 2]
    assert a.strategy.keys() == b.strategy.keys() and a.strategy  # FedAdam's m_t and v_t
    assert all(np.array_equal(a.strategy[k], b.strategy[k]) for k in a.strategy)
    assert [r["heldout_accuracy"] for r in full] == [r["heldout_accuracy"] for r in resumed]

    run = ["-c", f'run-dir="{tmp_path / "full"}"', *sum([["-c", s] for s in [*SMALL, *common]], [])]
    again = fedtune("simulate", *run)
    assert again.returncode != 0 and "already holds checkpoints" in again.stdout
    changed = fedtune("simulate", *run, "-c", "resume=true", "-c", "lora-r=4")
    assert changed.returncode != 0 and "lora-r: checkpoint 8, now 4" in changed.stdout
    assert SERVER_STARTED not in again.stdout + changed.stdout  # refused before the engine started
    assert len(list((tmp_path / "full" / "checkpoints").glob("*.safetensors"))) == 3  # nothing lost


def test_early_stopping_ends_the_run_and_a_resume_keeps_its_best_round_and_its_stop(tmp_path):
    """A learning rate too small to change any prediction: no round beats round 0's macro-F1, so
    early-stopping-rounds = 1 ends the run after round 1 as early-stopped with round 0 as best. A
    resume (adapters/best lost meanwhile) restores adapters/best and stops again without training;
    with early stopping switched off it trains on, and round 0 stays the best.
    The first run has a terminal: one live display of rounds and clients replaces the clients'
    step lines; the last runs with --quiet: one line per round."""
    run = tmp_path / "run"
    args = ["num-server-rounds=3", "learning-rate=1e-9", "fraction-evaluate=0.0"]
    command = [sys.executable, "-m", "simulation.cli", "simulate", "--num-clients", "3",
               *sum([["-c", c] for c in [*SMALL, f'run-dir="{run}"', *args, "early-stopping-rounds=1"]], [])]
    terminal = run_in_terminal(command, timeout=300)  # a person's terminal: the live progress display
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.stdout)
    assert terminal.returncode == 0, out[-3000:]
    flat = " ".join(out.split())  # log lines wrap at the terminal's width
    assert "stopping early before round 2: 1 rounds without a better heldout_macro_f1 than round 0's" in flat
    assert re.search(r"round 1 partition-0 +\S+ +6/6 +loss", out) and re.search(r"rounds +\S+ +1/3 +acc", out)
    assert not re.search(r"step \d+/\d+", out)  # the display, not the clients' step lines
    status = json.loads((run / "status.json").read_text())
    assert status == {"status": "early-stopped", "rounds_completed": 1, "best_round": 0}
    assert json.loads((run / "best.json").read_text())["round"] == 0
    shutil.rmtree(run / "adapters" / "best")
    out = simulate(run, *args, "early-stopping-rounds=1", "resume=true").stdout
    assert "round 2/3" not in out and json.loads((run / "status.json").read_text())["status"] == "early-stopped"
    assert (run / "adapters" / "best" / "adapter_model.safetensors").read_bytes() == \
        (run / "adapters" / "round-0000" / "adapter_model.safetensors").read_bytes()
    quiet = fedtune("simulate", "--quiet", "--num-clients", "3", *sum([["-c", c] for c in [
        *SMALL, f'run-dir="{run}"', "num-server-rounds=2", *args[1:], "early-stopping-rounds=0", "resume=true"]], []))
    assert quiet.returncode == 0 and "round 2/2 | clients 3/3" in quiet.stdout
    assert not re.search(r"step \d+/\d+", quiet.stdout)  # --quiet: a line per round, none per step
    rows = check_run_invariants(run, 2)
    assert json.loads((run / "status.json").read_text()) == {"status": "completed", "rounds_completed": 2,
                                                              "best_round": 0}
    assert len({r["heldout_macro_f1"] for r in rows}) == 1


def test_resume_on_changed_data_is_refused_before_the_engine_starts(tmp_path):
    """Hardening class 5: a resume on a data file whose labels all changed used to train on.
    Every label flipped (same names, same config) and labels renamed are both refused, naming
    what changed, before the engine starts; the checkpoints stay as they were."""
    data = tmp_path / "reviews.csv"
    rows = [("a fine and lovely film", "pos"), ("a dull and awful film", "neg")] * 60
    write = lambda pairs: data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in pairs))  # noqa: E731
    write(rows)
    run = tmp_path / "run"
    simulate(run, f'data="{data}"', "num-server-rounds=1", clients=2)
    resume = ["simulate", "--num-clients", "2", *sum([["-c", s] for s in [
        *SMALL, f'data="{data}"', f'run-dir="{run}"', "num-server-rounds=2", "resume=true"]], [])]
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}

    write([(t, {"pos": "neg", "neg": "pos"}[y]) for t, y in rows])
    flipped = fedtune(*resume, timeout=120)
    assert flipped.returncode == 2, flipped.stdout[-3000:]
    assert "resume: expected the data the run was trained on (fingerprint " in flipped.stdout
    assert f"{str(data)!r} changed since; train on the new data in a new run-dir" in flipped.stdout

    write([(t, {"pos": "good", "neg": "bad"}[y]) for t, y in rows])
    renamed = fedtune(*resume, timeout=120)
    assert renamed.returncode == 2 and "labels: checkpoint 'neg,pos', now 'bad,good'" in renamed.stdout
    assert SERVER_STARTED not in flipped.stdout + renamed.stdout
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before  # nothing lost
    write(rows)  # the original data resumes
    assert "resumed from round-0001" in fedtune(*resume, timeout=300).stdout
    check_run_invariants(run, 2)
    count("bad_inputs_rejected", "resume on data whose labels all flipped")
    count("bad_inputs_rejected", "resume on data whose labels were renamed")


def test_ffa_lora_run_exports_its_seeded_a_and_resume_refuses_another_a(tmp_path):
    """lora-freeze-a end to end: only B and the head travel (A never changes), the exported
    PEFT adapter carries the seeded A so it loads without fedtune, and a checkpoint whose B was
    trained against another A is refused on resume (a bad checkpoint: clear error, nothing lost)."""
    from dataclasses import replace

    from server.checkpoint import save_checkpoint

    run = tmp_path / "ffa"
    ffa = ["lora-freeze-a=true", "strategy=fedavgm", "server-momentum=0.0", "fedavgm-learning-rate=2.0"]
    simulate(run, "num-server-rounds=1", *ffa)
    check_run_invariants(run, 1)
    ckpt = load_checkpoint(run / "checkpoints" / "round-0001.safetensors")
    assert ckpt.adapter and not any("lora_A" in k for k in ckpt.adapter) and len(ckpt.meta["frozen"]) == 16
    config = json.loads((run / "config.json").read_text())
    base = base_classifier(config["model"], len(config["labels"].split(",")))
    exported = PeftModel.from_pretrained(base, str(run / "adapters" / "final"))
    from common.task import task_for
    from common.config import parse_run_config
    ours = task_for(parse_run_config(config)).model(len(config["labels"].split(",")))
    a_ours = {n: p for n, p in ours.named_parameters() if "lora_A" in n}
    a_exported = {n: p for n, p in exported.named_parameters() if "lora_A" in n}
    assert a_ours and a_ours.keys() == a_exported.keys()
    assert all(torch.equal(a_ours[n], a_exported[n]) for n in a_ours)  # the seeded A, untouched by training

    save_checkpoint(run / "checkpoints", replace(ckpt, server_round=2, meta={**ckpt.meta, "frozen": "0" * 16}))
    again = fedtune("simulate", "--num-clients", "3", "-c", f'run-dir="{run}"', "-c", "resume=true",
                    "-c", "num-server-rounds=3", *sum([["-c", s] for s in [*SMALL, *ffa]], []), timeout=300)
    assert again.returncode != 0
    assert "expected the frozen LoRA A matrices it was trained with (fingerprint 0000000000000000), got " \
        f"{ckpt.meta['frozen']}" in again.stdout, again.stdout[-3000:]
    assert SERVER_STARTED not in again.stdout
    assert sorted(p.name for p in (run / "checkpoints").glob("*.safetensors")) == [
        "round-0000.safetensors", "round-0001.safetensors", "round-0002.safetensors"]  # nothing lost
    count("bad_inputs_rejected", "checkpoint-trained-against-another-frozen-lora-a")


@pytest.mark.parametrize("args, message", [
    (["-c", "learning-rate=nan"], "learning-rate: expected a finite number"),
    (["-c", "data=/no/such.csv"], "not found"),
    (["--num-clients", "5000"], "at least 2 examples per client"),
    (["-c", "data=WRONG_COLUMNS"], "expected columns 'text' (text) and 'label' (label), found columns ['sentence', 'stars']"),
    (["-c", "labels=a,b"], "are not in the federation's labels ['a', 'b']"),
    (["-c", "strategy=krum"], "strategy krum with num-malicious-clients = 1: expected at least 5 clients sampled a "
                              "round, got 3"),  # Krum cannot tolerate f = 1 among 3 (hardening class 5)
    (["-c", "run-dir=TMP"], "expected an empty folder or a run folder fedtune made (it holds .fedtune-run), got a "
                            "folder of files fedtune did not mark: ['wrong.csv']"),  # the user's file stays (hardening class 6)
    # Hardening class 7: these came only after the engine's start-up and left an empty run dir.
    (["-c", "model=/no/such/model", "-c", "run-dir=NEWRUN"],
     "model: expected an existing directory, got '/no/such/model' which does not exist"),
    (["-c", "lora-target-modules=qkv_nope", "-c", "run-dir=NEWRUN"],
     "lora-target-modules: expected names of this 'bert' model's linear layers (dense, key, query, value; "
     "usually its attention projections), got 'qkv_nope'"),
])
def test_bad_input_fails_before_round_one(tmp_path, args, message):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("sentence,stars\ngreat,5\nawful,1\n")
    args = [a.replace("WRONG_COLUMNS", str(wrong)).replace("NEWRUN", f'"{tmp_path / "run"}"')
            .replace("TMP", f'"{tmp_path}"') for a in args]
    result = fedtune("simulate", *args, timeout=60)
    assert result.returncode == 2, result.stdout[-2000:]
    assert message in result.stdout, result.stdout[-2000:]
    assert "round 1" not in result.stdout and SERVER_STARTED not in result.stdout
    assert wrong.read_text() == "sentence,stars\ngreat,5\nawful,1\n" and sorted(tmp_path.iterdir()) == [wrong]


def test_flwr_run_dot_runs_the_same_app(tmp_path):
    home = tmp_path / "flwr-home"
    cfg = " ".join([*SMALL, "num-server-rounds=1", "fraction-evaluate=0.0", f'run-dir="{tmp_path / "run"}"'])
    bin_dir = os.path.dirname(sys.executable)  # flwr starts flower-superlink from PATH
    env = {"FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # use this venv; no `uv sync` of torch
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the README's setting: Ray on loopback only
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    flwr = os.path.join(bin_dir, "flwr")
    superlink = f"{home}/local-superlink"  # in the detached SuperLink's command line (its log and database)
    try:
        result = run_cli([flwr, "run", ".", "--stream", "--run-config", cfg, "--federation-config",
                          "num-supernodes=3 client-resources-num-cpus=1"], timeout=420, env=env, cwd=REPO)
        assert result.returncode == 0, result.stdout[-4000:]
        assert any(superlink in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))
        # Hardening class 8: the README's stop command ends that SuperLink and matches nothing else
        # (it used to say `pkill -f flower-superlink`: every SuperLink on the machine).
        if shutil.which("pkill"):
            subprocess.run(["pkill", "-f", superlink], check=True)
        else:
            kill_matching(superlink)
        deadline = time.monotonic() + 20
        while any(superlink in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
            assert time.monotonic() < deadline, "the README's pkill left the local SuperLink running"
            time.sleep(0.5)
    finally:
        kill_matching(str(home))  # the detached local SuperLink and its children
    rows = check_run_invariants(tmp_path / "run", 1)
    assert rows[1]["clients_ok"] == 3
    assert not (REPO / "pyproject.toml").read_text().count("MIGRATION")  # flwr left our file alone
