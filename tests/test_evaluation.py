"""Per-class metrics, noisy-input perturbations and `fedtune evaluate` on a run directory.

RELIABILITY bad inputs: a scored file with labels the run never saw, a round the run does not
have, `--round best` on a run without best.json, `-c` keys that are not data options, an output
folder that holds files, unknown perturbations and rates.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from common.config import FedtuneConfig
from common.errors import CheckpointError, ConfigError, DataError
from common.metrics import confusion_matrix, per_class
from common.perturb import PERTURBATIONS, perturb
from server.checkpoint import Checkpoint, save_checkpoint
from tests.reliability import count


def test_per_class_figures_match_scikit_learn_including_classes_never_predicted():
    from sklearn.metrics import confusion_matrix as sk_confusion
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 5, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 4, 300))  # label 4 is never predicted
    names = [f"c{i}" for i in range(6)]  # c5: no support and never predicted
    matrix = confusion_matrix(y_true, y_pred, 6)
    assert np.array_equal(matrix, sk_confusion(y_true, y_pred, labels=range(6)))
    report = per_class(matrix, names)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(6), zero_division=0)
    for i, name in enumerate(names):
        assert report[name] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]})


TEXTS = ["Hello there, how are you today? I am fine.", "The quick brown fox jumps over the lazy dog!",
         "What is the capital of France?", "ok"]


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_perturbations_are_seeded_change_text_at_their_rate_and_keep_it_at_rate_zero(kind):
    assert perturb(TEXTS, kind, 0.0) == TEXTS
    assert perturb(TEXTS, kind, 0.3, seed=1) == perturb(TEXTS, kind, 0.3, seed=1)
    assert perturb(TEXTS * 20, kind, 0.3, seed=1) != perturb(TEXTS * 20, kind, 0.3, seed=2)
    long = " ".join(TEXTS * 50)
    changed = sum(a != b for a, b in zip(long, perturb([long], kind, 0.1, seed=4)[0]))
    assert changed > 0 and (kind != "case" or changed < 0.2 * sum(ch.isalpha() for ch in long))


def test_each_perturbation_does_what_it_says():
    assert perturb(["abc DEF"], "case", 1.0) == ["ABC def"]
    assert not any(ch in ",?!." for ch in perturb([TEXTS[0]], "punct", 1.0)[0].split()[0][:-1])
    typo = perturb(["keyboard"], "typo", 1.0, seed=0)[0]
    assert typo != "keyboard" and abs(len(typo) - len("keyboard")) <= 1


@pytest.mark.parametrize("kind, rate", [("spelling", 0.1), ("typo", 1.5), ("typo", -0.1)])
def test_bad_perturbations_are_refused(kind, rate):
    with pytest.raises(ValueError, match="perturbation"):
        perturb(TEXTS, kind, rate)
    count("bad_inputs_rejected", f"perturbation {kind} at {rate}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with rounds 0 and 1 of the initial adapter (no training needed to score),
    written as an older fedtune wrote it: num-threads (since moved to the node config) in its config."""
    from server.rundir import RunDir
    from server.state import initial_state, with_labels

    path = tmp_path_factory.mktemp("run")
    cfg, labels = with_labels(FedtuneConfig(max_train_examples=300, max_heldout_examples=80, max_length=32,
                                            run_dir=str(path)))
    _, state = initial_state(cfg, labels, RunDir(path))
    for r in (0, 1):
        save_checkpoint(path / "checkpoints", Checkpoint(server_round=r, adapter=state.initial, strategy={},
                                                         meta={"config": {**cfg.to_run_config(), "num-threads": 2},
                                                               "history": []}))
    return path, cfg, labels, state


def write_csv(path, rows, header=True):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def test_evaluate_scores_the_runs_adapter_as_the_server_does_per_class(run_dir, tmp_path):
    from common.federation_data import heldout_set
    from common.task import task_for
    from common.model import load_tokenizer, set_adapter_state
    from common.train import evaluate
    from server.tools.scoring import evaluate_run

    path, cfg, labels, state = run_dir
    heldout = heldout_set(cfg)
    data = write_csv(tmp_path / "heldout.csv", zip(heldout.texts, heldout.labels))
    folder, report = evaluate_run(path, str(data), which="1", out=tmp_path / "out", perturbations=["typo", "punct"])
    model = task_for(cfg).model(len(labels))
    set_adapter_state(model, state.initial)
    tok = load_tokenizer(cfg.model)
    direct = evaluate(model, task_for(cfg).encode(heldout, tok, labels, where="x"), pad_id=tok.pad_token_id,
                      batch_size=64, num_labels=len(labels))
    assert report["accuracy"] == pytest.approx(direct["accuracy"]) and report["round"] == 1
    assert list(report["per_class"]) == list(labels.names)
    assert sum(m["support"] for m in report["per_class"].values()) == len(heldout) == report["examples"]
    assert json.loads((folder / "evaluation.json").read_text()) == report
    rows = list(csv.reader(open(folder / "confusion.csv")))
    assert rows[0][1:] == list(labels.names) and sum(int(x) for row in rows[1:] for x in row[1:]) == len(heldout)
    assert (folder / "confusion.png").stat().st_size > 5_000
    assert set(report["perturbations"]) == {"rate", "seed", "typo", "punct"}
    assert report["perturbations"]["typo"]["accuracy_change"] == pytest.approx(
        report["perturbations"]["typo"]["accuracy"] - report["accuracy"])

    headerless = write_csv(tmp_path / "plain.csv", [(label, text) for text, label in zip(heldout.texts, heldout.labels)],
                           header=False)
    _, again = evaluate_run(path, str(headerless), overrides=["column-names='label,text'"], out=tmp_path / "out2")
    assert again["accuracy"] == report["accuracy"]


def test_evaluate_refuses_what_it_cannot_score_and_writes_nothing(run_dir, tmp_path):
    from server.tools.scoring import evaluate_run

    path, cfg, labels, _ = run_dir
    good = write_csv(tmp_path / "good.csv", [("hello there", labels.names[0]), ("what is ai", labels.names[1])])
    unseen = write_csv(tmp_path / "unseen.csv", [("hello", labels.names[0]), ("buy now", "spam"), ("x", "ads")])
    out = tmp_path / "out"
    cases = [
        (dict(data=str(unseen)), DataError, r"labels the run never saw: \['ads', 'spam'\]"),
        (dict(data=str(good), which="7"), CheckpointError, r"a checkpoint of round 7, the run has rounds \[0, 1\]"),
        (dict(data=str(good), which="best"), CheckpointError, r"best.json.*found none; give a round number or final"),
        (dict(data=str(good), which="latest"), ConfigError, r"--round: expected a round number, best or final"),
        (dict(data=str(good), overrides=["lora-r=4"]), ConfigError, r"expected keys among .*text-column.*got \['lora-r'\]"),
        (dict(data=str(good), perturbations=["spelling"]), ConfigError, r"--perturb: expected some of typo, case, punct"),
        (dict(data=str(good), rate=0.0), ConfigError, r"--rate: expected a value in \(0, 1\]"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            evaluate_run(path, out=out, **kwargs)
        count("bad_inputs_rejected", f"evaluate {message[:40]}")
    assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="holds files; refusing to overwrite them"):
        evaluate_run(path, str(good), out=out)
    assert (out / "mine.txt").read_text() == "keep"
    count("bad_inputs_rejected", "evaluate into a folder holding files")


def test_a_resumed_runs_tensorboard_events_follow_its_checkpointed_history(tmp_path):
    """An earlier process died between round 1's checkpoint and its events (the checkpoint comes
    first): the resumed run's events are the checkpointed history's, each round once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from server.tensorboard import Scalars

    rows = [{"round": r, "heldout_accuracy": 0.1 * r, "train_loss": 1.0 / (r + 1)} for r in range(2)]
    first = Scalars(tmp_path, [], [])
    first.add_round(rows[0], [])  # the earlier process wrote round 0's events, then checkpointed round 1
    first.close()
    ledger = [{"round": 1, "kind": "client", "client_id": "a", "status": "trained", "epsilon": 0.5}]
    resumed = Scalars(tmp_path, rows[:2], ledger)  # resumed from that checkpoint (rounds 0 and 1)
    resumed.add_round({"round": 2, "heldout_accuracy": 0.9}, ledger)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 3)) for e in events.Scalars("heldout/accuracy")] == [(0, 0.0), (1, 0.1), (2, 0.9)]
    assert [(e.step, e.value) for e in events.Scalars("privacy/epsilon_client/a")] == [(1, 0.5)]
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1]
