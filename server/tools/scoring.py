"""`fedtune evaluate RUN_DIR --data FILE`: a finished run's adapter on any labelled file.

    fedtune evaluate runs/x --data test.csv                       the final round's adapter
    fedtune evaluate runs/x --data test.tsv --round best -c column-names="label,text"
    fedtune evaluate runs/x --data test.csv --perturb typo,case,punct --rate 0.1

The adapter comes from the run's checkpoint of that round (its hash is checked), the model,
LoRA settings and label order from the config stored with it. The file is read with the same
data options as training (format, columns, header-less files; `-c` sets them for this file).
Classification writes evaluation.json (accuracy, macro-F1, loss, per class: precision, recall,
F1, support), confusion.csv and confusion.png; a causal-LM run, the loss per response token and
the perplexity, and with `choices` the classification figures of its closed-set answers too
(common/lm.py's score_choices). With --perturb, the same file is scored again under each seeded noise
(common/perturb.py) and the drop is reported.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from common.config import parse_key_values, parse_run_config
from common.errors import CheckpointError, ConfigError, DataError
from common.model import set_adapter_state
from common.perturb import PERTURBATIONS, perturb
from common.task import TASKS, task_for
from server.checkpoint import checkpoints_by_round, load_checkpoint

# What `-c` may set for the scored file: its data options, the batch size and device, and a causal LM's choices.
OPTIONS = ("eval-batch-size", "device", "compute-dtype", "choices")


def checkpoint_for(run_dir: Path, which: str) -> Path:
    """The checkpoint of round `which`: a number, `best` (best.json) or `final` (the latest)."""
    folder = run_dir / "checkpoints"
    rounds = checkpoints_by_round(folder)
    if not rounds:
        raise CheckpointError(
            f"evaluate: expected checkpoints in {folder}, found none (is {str(run_dir)!r} a fedtune run directory?)"
        )
    if which == "final":
        return rounds[max(rounds)]
    if which == "best":
        marker = run_dir / "best.json"
        if not marker.exists():
            raise CheckpointError(
                f"evaluate --round best: expected {marker} (written by every round since fedtune "
                "kept a best round), found none; give a round number or final"
            )
        try:
            number = json.loads(marker.read_text())["round"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            number = None
        if isinstance(number, bool) or not isinstance(number, int):
            raise CheckpointError(
                f'evaluate --round best: expected {marker} to name a round ({{"round": N, ...}}), '
                "got a damaged file; give a round number or final"
            )
    else:
        try:
            number = int(which)
        except ValueError:
            raise ConfigError(f"--round: expected a round number, best or final, got {which!r}") from None
    if number not in rounds:
        raise CheckpointError(f"evaluate: expected a checkpoint of round {number}, the run has rounds {list(rounds)}")
    return rounds[number]


def evaluate_run(
    run_dir: str | Path,
    data: str,
    *,
    overrides: Sequence[str] = (),
    which: str = "final",
    out: str | Path | None = None,
    perturbations: Sequence[str] = (),
    rate: float = 0.1,
    seed: int = 0,
    progress=None,
) -> tuple[Path, dict]:
    """Score the run's adapter of round `which` on `data`; returns (output folder, evaluation.json)."""
    run_dir = Path(run_dir)
    unknown = [k for k in perturbations if k not in PERTURBATIONS]
    if unknown:
        raise ConfigError(f"--perturb: expected some of {', '.join(PERTURBATIONS)}, got {unknown}")
    if not 0.0 < rate <= 1.0:
        raise ConfigError(f"--rate: expected a value in (0, 1], got {rate}")
    path = checkpoint_for(run_dir, which)
    ckpt = load_checkpoint(path)
    cfg = ckpt.run_config()
    task = task_for(cfg)
    options = parse_key_values(list(overrides), what="evaluate -c")
    allowed = (*task.data_keys, *OPTIONS)
    wrong = sorted(k for k in options if k not in allowed)
    if wrong:
        raise ConfigError(
            f"evaluate -c: expected keys among {', '.join(allowed)} (the scored file's data options), got {wrong}"
        )
    moved = {k: options.pop(k) for k in OPTIONS if k in options}
    if moved:
        cfg = parse_run_config({**cfg.to_run_config(), **moved})
        task = task_for(cfg)
    run = cfg.to_run_config()
    columns = {**{k: run[k] for k in task.data_keys}, **options}
    parse_run_config({**run, **columns})  # the file's columns under the run's rules (a text column that is the label)
    dataset = task.read(data, columns)
    if len(dataset) == 0:
        raise DataError(f"{data!r}: expected at least one example, got none")
    labels = task.scoring_labels(dataset, where=repr(data))
    folder = output_folder(run_dir, data, ckpt.server_round, out)  # before any scoring
    model = task.model(len(labels), device=task.device())
    set_adapter_state(model, ckpt.adapter)
    tokenizer = task.tokenizer()

    def score(texts: list[str] | None, what: str) -> dict:
        part = dataset if texts is None else replace(dataset, texts=texts, cache={})
        encoded = task.encode(part, tokenizer, labels, where=repr(data))
        return task.score(
            model,
            encoded,
            pad_id=tokenizer.pad_token_id,
            num_labels=len(labels),
            progress=(lambda d, n: progress(what, d, n)) if progress else None,
        )

    clean = score(None, "clean")
    report = {
        "run_dir": str(run_dir.resolve()),
        "data": str(data),
        "round": ckpt.server_round,
        "task": cfg.task,
        **task.evaluation_report(clean, labels),
    }
    if perturbations:
        report["perturbations"] = {"rate": rate, "seed": seed}
        for kind in perturbations:
            noisy = score(perturb(dataset.texts, kind, rate, seed), kind)
            report["perturbations"][kind] = {
                **{n: noisy[n] for n in task.metrics},
                **{f"{n}_change": noisy[n] - clean[n] for n in task.metrics},
            }
    (folder / "evaluation.json").write_text(json.dumps(report, indent=1) + "\n")
    task.write_evaluation(folder, clean, labels, title=f"{Path(data).name}, round {ckpt.server_round}")
    return folder, report


def output_folder(run_dir: Path, data: str, server_round: int, out) -> Path:
    """The folder the results go to, made (and written once) before any scoring, so that a long
    scoring is never lost to a folder that holds files, a file of that name or a read-only place."""
    folder = Path(out) if out else run_dir / "evaluations" / f"{Path(data).stem}-round-{server_round:04d}"
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(
            f"evaluate --out: expected a new or empty directory, got {str(folder)!r}, which "
            f"{'is a file' if not folder.is_dir() else 'holds files'}; refusing to overwrite "
            f"{'it' if not folder.is_dir() else 'them'} (give another --out)"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"evaluate --out: expected a folder fedtune can write, got {str(folder)!r} ({err.strerror or err})"
        ) from None
    return folder


def print_report(report: dict, folder: Path) -> None:
    """The per-class table and the perturbation table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = f"{report['data']}, round {report['round']}: {report['examples']} examples"
    metrics = [m for m in TASKS[report["task"]].metrics if m != "loss"]  # the figures that perturbations change
    if "per_class" in report:
        table = Table(title=title)
        for column in ("label", "precision", "recall", "F1", "support"):
            table.add_column(column, justify="left" if column == "label" else "right")
        for label, m in report["per_class"].items():
            table.add_row(label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
        console.print(table)
    else:
        console.print(f"{title}")
    console.print("  ".join(f"{m.replace('macro_f1', 'macro-F1')} {report[m]:.4f}" for m in (*metrics, "loss")))
    if "perturbations" in report:
        noise = report["perturbations"]
        table = Table(title=f"perturbations at rate {noise['rate']} (seed {noise['seed']})")
        table.add_column("input")
        for m in metrics:
            table.add_column(m, justify="right")
            table.add_column("change", justify="right")
        table.add_row("clean", *[x for m in metrics for x in (f"{report[m]:.4f}", "")])
        for kind, res in noise.items():
            if isinstance(res, dict):
                table.add_row(kind, *[x for m in metrics for x in (f"{res[m]:.4f}", f"{res[m + '_change']:+.4f}")])
        console.print(table)
    console.print(f"wrote {', '.join(p.name for p in sorted(folder.iterdir()))} to {folder}")


def terminal_progress():
    """A progress callback for large files: a line per tenth of the examples, on stderr."""
    shown: dict[str, int] = {}

    def report(what: str, done: int, total: int) -> None:
        tenth = done * 10 // total
        if total >= 2000 and tenth > shown.get(what, 0):
            shown[what] = tenth
            print(f"fedtune: evaluate {what}: {done}/{total} examples", file=sys.stderr, flush=True)

    return report
