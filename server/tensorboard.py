"""TensorBoard event files in <run-dir>/tensorboard: every round's held-out and client metrics,
train loss, and with DP each client's epsilon, for `tensorboard --logdir <run-dir>`.

Written when the optional `tensorboard` package is installed (`pip install -e ".[tensorboard]"`);
without it the run says so once and goes on. A resumed run rewrites the events from its
checkpoint's history (an earlier process may have died between a round's checkpoint and its
events, or written events of a round the checkpoint does not hold), so each round shows once.
"""

from __future__ import annotations

import math
from logging import INFO
from pathlib import Path

from flwr.common.logger import log

# metrics.jsonl column prefix -> TensorBoard section
SECTIONS = (
    ("heldout_", "heldout/"),
    ("clients_val_", "clients/val_"),
    ("train_", "train/"),
    ("epsilon_", "privacy/epsilon_"),
)
COUNTS = ("aggregated", "rejected", "failed", "timed_out", "refused", "clients_sampled")


def tag_of(column: str) -> str | None:
    for prefix, section in SECTIONS:
        if column.startswith(prefix):
            return section + column[len(prefix) :]
    return f"clients/{column}" if column in COUNTS else None


class Scalars:
    def __init__(self, run_dir: Path, history: list[dict], ledger_entries: list[dict]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log(INFO, "fedtune: no TensorBoard event files (install the tensorboard extra to get them)")
            self.writer = None
            return
        # purge_step 0: TensorBoard drops every earlier event of this run directory on reading
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=0 if history else None)
        for row in history:
            self.add_round(row, ledger_entries)

    def add_round(self, row: dict, ledger_entries: list[dict]) -> None:
        """One metrics row, and the epsilon of each client that trained in its round."""
        if self.writer is None:
            return
        step = row["round"]
        for column, value in row.items():
            tag = tag_of(column)
            if tag is not None and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        for e in ledger_entries:
            if e.get("round") == step and e.get("kind") == "client" and e.get("status") == "trained":
                self.writer.add_scalar(f"privacy/epsilon_client/{e['client_id']}", e["epsilon"], step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
