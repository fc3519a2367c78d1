"""The run directory a person reads after a run.

    <run-dir>/config.json          resolved configuration (labels included)
    <run-dir>/clients.json         per-client data summary (size, label histogram)
    <run-dir>/metrics.jsonl|.csv   one row per round, round 0 = before training
    <run-dir>/rounds.jsonl         the round ledger: sampled = aggregated + rejected + failed + timed out + refused
    <run-dir>/status.json          how the run ended (completed, or a named status)
    <run-dir>/privacy-ledger.jsonl with DP: per round and client, the mechanism and epsilon
    <run-dir>/metrics.png          held-out accuracy, macro-F1 and loss over rounds
    <run-dir>/adapters/round-NNNN  PEFT adapter per round (PeftModel.from_pretrained), with fedtune-adapter.json:
                                   the round and the privacy ledger's length and head hash it was trained through
    <run-dir>/adapters/final       the last round's adapter
    <run-dir>/adapters/best        the adapter of the best round by best-metric (best.json says which)
    <run-dir>/heldout/             per round: per-class precision/recall/F1, confusion matrix (classification)
    <run-dir>/tensorboard/         TensorBoard event files (with the tensorboard extra installed)
    <run-dir>/checkpoints/         resumable state, one hashed file per round
    <run-dir>/.fedtune-run         written first: marks the folder as a fedtune run's

A new run writes only into an empty folder or one fedtune marked; a folder of someone else's
files, even with fedtune's names, is refused, as are a file, a place fedtune cannot write, and
(failing later) a full disk, which ends the run with status `write-failed`.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

from common.config import FedtuneConfig
from common.errors import ConfigError
from common.files import atomic_write

MARKER = ".fedtune-run"
ADAPTER_RECORD = "fedtune-adapter.json"  # in every adapters/<name>: the round and ledger head it was trained through

# What fedtune writes into a run directory (and `fedtune audit` beside it): a new run refuses a
# folder holding anything else, rather than writing over a user's files.
RUN_FILES = frozenset(
    {
        "config.json",
        "clients.json",
        "metrics.jsonl",
        "metrics.csv",
        "metrics.png",
        "rounds.jsonl",
        "status.json",
        "privacy-ledger.jsonl",
        "samples.jsonl",
        "adapters",
        "checkpoints",
        "audit.csv",
        "audit.json",
        "audit-epsilon.png",
        "audit-accuracy.png",
        "best.json",
        "heldout",
        "tensorboard",
        "evaluations",
        MARKER,
    }
)


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoints = path / "checkpoints"
        self.adapters = path / "adapters"

    @classmethod
    def for_config(cls, cfg: FedtuneConfig) -> RunDir:
        """The run's folder, claimed (see `claim`)."""
        path = Path(cfg.run_dir) if cfg.run_dir else Path.cwd() / "runs" / time.strftime("%Y%m%d-%H%M%S")
        return claim(path.expanduser().resolve(), resume=cfg.resume)

    def foreign_files(self) -> list[str]:
        """Names in the directory that fedtune did not write (temporary files of its atomic writes aside)."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name not in RUN_FILES and not p.name.endswith(".tmp"))

    @property
    def marked(self) -> bool:
        return (self.path / MARKER).is_file()

    def write_json(self, name: str, obj) -> None:
        atomic_write(self.path / name, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def write_lines(self, name: str, rows: list[dict]) -> None:
        atomic_write(self.path / name, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def write_metrics(self, rows: list[dict]) -> None:
        """Rewrite metrics.jsonl and metrics.csv from the full history (cheap; each file atomically)."""
        self.write_lines("metrics.jsonl", rows)
        fields: list[str] = []
        for row in rows:
            fields += [k for k in row if k not in fields]
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path / "metrics.csv", table.getvalue().encode())

    def plot(self, rows: list[dict], best_round: int | None = None) -> Path:
        """metrics.png: the held-out curves over whole rounds, the legend below the axes, the best
        round marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        rounds = [r["round"] for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4.4))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if "heldout_perplexity" in rows[0]:  # causal LM
            ax.plot(rounds, [r["heldout_loss"] for r in rows], marker="o", label="held-out loss (per token)")
            ax.set_ylabel("loss")
            axes = [ax]
            if "heldout_accuracy" in rows[0]:  # scored on a closed set of responses (choices)
                score_ax = ax.twinx()
                score_ax.plot(rounds, [r["heldout_accuracy"] for r in rows], color="C1", marker="s", label="accuracy")
                score_ax.plot(rounds, [r["heldout_macro_f1"] for r in rows], color="C2", marker="^", label="macro-F1")
                score_ax.set_ylabel("score")
                score_ax.set_ylim(0, 1)
                axes.append(score_ax)
        else:
            ax.plot(rounds, [r["heldout_accuracy"] for r in rows], marker="o", label="held-out accuracy")
            ax.plot(rounds, [r["heldout_macro_f1"] for r in rows], marker="s", label="held-out macro-F1")
            ax.set_ylabel("score")
            ax.set_ylim(0, 1)
            loss_ax = ax.twinx()
            loss_ax.plot(rounds, [r["heldout_loss"] for r in rows], color="grey", ls="--", label="held-out loss")
            loss_ax.set_ylabel("loss")
            axes = [ax, loss_ax]
        if best_round is not None:
            ax.axvline(best_round, color="green", ls=":", lw=1.5, label=f"best round ({best_round})")
        handles = [h for a in axes for h in a.get_legend_handles_labels()[0]]
        fig.legend(
            handles,
            [str(h.get_label()) for h in handles],
            loc="lower center",
            ncol=min(4, len(handles)),
            frameon=False,
            fontsize=9,
        )
        ax.set_title("fedtune: global adapter on the held-out set")
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        return self._save(fig, plt)

    def _save(self, fig, plt) -> Path:
        out = self.path / "metrics.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out


def claim(path: Path, *, resume: bool) -> RunDir:
    """Make `path` this run's folder, or refuse with one line before anything is written: a file of
    that name; a folder with contents and no marker (a resumed run of an older fedtune, whose
    checkpoints are checked next, aside); a place fedtune cannot create or write."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run-dir {path}: expected a folder (new or fedtune's own), got a file of that name")
    run = RunDir(path)
    contents = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if contents and not run.marked and not (resume and (path / "checkpoints").is_dir()):
        raise ConfigError(
            f"run-dir {path}: expected an empty folder or a run folder fedtune made (it holds "
            f"{MARKER}), got a folder of files fedtune did not mark: {contents[:5]}"
            f"{'...' if len(contents) > 5 else ''}; choose another run-dir"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not run.marked:
            atomic_write(
                path / MARKER,
                (json.dumps({"fedtune_run": True, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n").encode(),
            )
    except OSError as err:
        raise ConfigError(
            f"run-dir {path}: expected a place fedtune can write, got {err.strerror or err} ({type(err).__name__})"
        ) from None
    return run
