"""`fedtune evaluate RUN_DIR --data FILE`: a finished run's adapter on any labelled file.

    fedtune evaluate runs/x --data test.csv                       the final round's adapter
    fedtune evaluate runs/x --data test.tsv --round best -c column-names="label,text"
    fedtune evaluate runs/x --data test.csv --perturb typo,case,punct --rate 0.1

The adapter comes from the run's checkpoint of that round (its hash is checked), the model,
LoRA settings and label order from the config stored with it. The file is read with the same
data options as training (format, columns, header-less files; `-c` sets them for this file).
Classification writes evaluation.json (accuracy, macro-F1, loss, per class: precision, recall,
F1, support), confusion.csv and confusion.png; a causal-LM run, the loss per response token and
the perplexity. With --perturb, the same file is scored again under each seeded noise
(common/perturb.py) and the drop is reported.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from common.config import parse_key_values, parse_run_config
from common.data import LabelMap
from common.device import check_precision, resolve_device
from common.errors import CheckpointError, ConfigError, DataError
from common.federation_data import DATA_KEYS, read_for_task
from common.lm import encode_for_task, model_for_config
from common.metrics import class_report, plot_confusion, write_confusion_csv
from common.model import load_tokenizer, set_adapter_state
from common.perturb import PERTURBATIONS, perturb
from common.train import evaluate
from server.checkpoint import checkpoints_by_round, load_checkpoint

# What `-c` may set for the scored file: its data options, and the batch size.
OPTIONS = ("eval-batch-size", "device", "compute-dtype")


def checkpoint_for(run_dir: Path, which: str) -> Path:
    """The checkpoint of round `which`: a number, `best` (best.json) or `final` (the latest)."""
    folder = run_dir / "checkpoints"
    rounds = checkpoints_by_round(folder)
    if not rounds:
        raise CheckpointError(f"evaluate: expected checkpoints in {folder}, found none (is {str(run_dir)!r} a fedtune "
                              "run directory?)")
    if which == "final":
        return rounds[max(rounds)]
    if which == "best":
        marker = run_dir / "best.json"
        if not marker.exists():
            raise CheckpointError(f"evaluate --round best: expected {marker} (written by every round since fedtune "
                                  "kept a best round), found none; give a round number or final")
        try:
            number = json.loads(marker.read_text())["round"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            number = None
        if isinstance(number, bool) or not isinstance(number, int):
            raise CheckpointError(f"evaluate --round best: expected {marker} to name a round ({{\"round\": N, ...}}), "
                                  "got a damaged file; give a round number or final")
    else:
        try:
            number = int(which)
        except ValueError:
            raise ConfigError(f"--round: expected a round number, best or final, got {which!r}") from None
    if number not in rounds:
        raise CheckpointError(f"evaluate: expected a checkpoint of round {number}, the run has rounds {list(rounds)}")
    return rounds[number]


def evaluate_run(run_dir: str | Path, data: str, *, overrides: list[str] = (), which: str = "final",
                 out: str | Path | None = None, perturbations: list[str] = (), rate: float = 0.1,
                 seed: int = 0, progress=None) -> tuple[Path, dict]:
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
    options = parse_key_values(list(overrides), what="evaluate -c")
    allowed = (*DATA_KEYS[cfg.task], *OPTIONS)
    wrong = sorted(k for k in options if k not in allowed)
    if wrong:
        raise ConfigError(f"evaluate -c: expected keys among {', '.join(allowed)} (the scored file's data options), "
                          f"got {wrong}")
    moved = {k: options.pop(k) for k in OPTIONS if k in options}
    if moved:
        cfg = parse_run_config({**cfg.to_run_config(), **moved})
    run = cfg.to_run_config()
    columns = {**{k: run[k] for k in DATA_KEYS[cfg.task]}, **options}
    if cfg.task == "classification" and str(columns["text-column"]) == str(columns["label-column"]):
        raise ConfigError(f"text-column / label-column: expected two different columns, got "
                          f"{columns['text-column']!r} for both (the model would read the answer)")
    dataset = read_for_task(cfg.task, data, columns)
    if len(dataset) == 0:
        raise DataError(f"{data!r}: expected at least one example, got none")
    labels = LabelMap.parse(cfg.labels) if cfg.task == "classification" else LabelMap.from_labels(dataset.labels)
    if cfg.task == "classification":
        unseen = sorted(set(dataset.labels) - set(labels.names))
        if unseen:
            raise DataError(f"{data!r}: expected the run's labels {list(labels.names)}, got labels the run never "
                            f"saw: {unseen[:10]}{' ...' if len(unseen) > 10 else ''}")
    folder = output_folder(run_dir, data, ckpt.server_round, out)  # before any scoring
    device = resolve_device(cfg.device)
    check_precision(device, cfg.compute_dtype, cfg.load_in)
    model = model_for_config(cfg, len(labels) if cfg.task == "classification" else 0, device=device)
    set_adapter_state(model, ckpt.adapter)
    tokenizer = load_tokenizer(cfg.model)

    def score(texts: list[str] | None, what: str) -> dict:
        part = dataset if texts is None else replace(dataset, texts=texts, cache={})
        encoded = encode_for_task(cfg, part, tokenizer, labels, where=repr(data))
        return evaluate(model, encoded, pad_id=tokenizer.pad_token_id, batch_size=cfg.eval_batch_size,
                        num_labels=len(labels), compute_dtype=cfg.compute_dtype, progress=(lambda d, n: progress(what, d, n)) if progress else None)

    clean = score(None, "clean")
    names = ("loss", "perplexity") if cfg.task == "causal-lm" else ("accuracy", "macro_f1", "loss")
    report = {"run_dir": str(run_dir.resolve()), "data": str(data), "round": ckpt.server_round, "task": cfg.task}
    if cfg.task == "causal-lm":
        report.update({"examples": clean["examples"], "tokens": clean["tokens"], "loss": clean["loss"],
                       "perplexity": clean["perplexity"]})
    else:
        report.update(class_report(clean, labels.names))
    if perturbations:
        report["perturbations"] = {"rate": rate, "seed": seed}
        for kind in perturbations:
            noisy = score(perturb(dataset.texts, kind, rate, seed), kind)
            report["perturbations"][kind] = {
                **{n: noisy[n] for n in names},
                **{f"{n}_change": noisy[n] - clean[n] for n in names},
            }
    (folder / "evaluation.json").write_text(json.dumps(report, indent=1) + "\n")
    if cfg.task == "classification":
        write_confusion_csv(folder / "confusion.csv", clean["confusion"], labels.names)
        plot_confusion(folder / "confusion.png", clean["confusion"], labels.names,
                       f"{Path(data).name}, round {ckpt.server_round}: accuracy {clean['accuracy']:.3f}, "
                       f"macro-F1 {clean['macro_f1']:.3f}")
    return folder, report


def output_folder(run_dir: Path, data: str, server_round: int, out) -> Path:
    """The folder the results go to, made (and written once) before any scoring, so that a long
    scoring is never lost to a folder that holds files, a file of that name or a read-only place."""
    folder = Path(out) if out else run_dir / "evaluations" / f"{Path(data).stem}-round-{server_round:04d}"
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"evaluate --out: expected a new or empty directory, got {str(folder)!r}, which "
                          f"{'is a file' if not folder.is_dir() else 'holds files'}; refusing to overwrite "
                          f"{'it' if not folder.is_dir() else 'them'} (give another --out)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"evaluate --out: expected a folder fedtune can write, got {str(folder)!r} "
                          f"({err.strerror or err})") from None
    return folder


def print_report(report: dict, folder: Path) -> None:
    """The per-class table and the perturbation table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = f"{report['data']}, round {report['round']}: {report['examples']} examples"
    if report["task"] == "causal-lm":
        console.print(f"{title}: loss per response token {report['loss']:.4f}, perplexity {report['perplexity']:.2f}")
    else:
        table = Table(title=title)
        for column in ("label", "precision", "recall", "F1", "support"):
            table.add_column(column, justify="left" if column == "label" else "right")
        for label, m in report["per_class"].items():
            table.add_row(label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
        console.print(table)
        console.print(f"accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  loss {report['loss']:.4f}")
    if "perturbations" in report:
        noise = report["perturbations"]
        metrics = ["loss", "perplexity"] if report["task"] == "causal-lm" else ["accuracy", "macro_f1"]
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
