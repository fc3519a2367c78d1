"""Export a run's global adapter for use outside fedtune.

    fedtune export RUN_DIR OUT            the adapter alone (PEFT: PeftModel.from_pretrained)
    fedtune export RUN_DIR OUT --merged   base + adapter merged (transformers: from_pretrained)

The adapter comes from the run's latest checkpoint (its hash is checked), the base model and
LoRA settings from the config stored in the checkpoint. The model is built fresh, not taken
from the process cache, because merging rewrites the base weights in place; the task adds what
it exports beside the model (a classifier's label names).
"""

from __future__ import annotations

from pathlib import Path

from common.data import LabelMap
from common.errors import CheckpointError, ConfigError
from common.lm import export_model
from common.model import set_adapter_state
from common.task import task_for
from server.checkpoint import latest_checkpoint, load_checkpoint


def export_run(run_dir: str | Path, out: str | Path, *, merged: bool) -> tuple[Path, int]:
    """Write the export; returns its directory and the round it comes from."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: expected a new or empty output directory, got {str(out)!r}, which is a file")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(
            f"export: expected a new or empty output directory, got {str(out)!r} which holds "
            "files; refusing to overwrite them"
        )
    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise CheckpointError(f"export: expected checkpoints in {run_dir / 'checkpoints'}, found none")
    ckpt = load_checkpoint(path)
    task = task_for(ckpt.run_config())
    model = task.model(len(LabelMap.parse(task.cfg.labels)), fresh=True)
    set_adapter_state(model, ckpt.adapter)
    out = export_model(model, task.tokenizer(), out, merged=merged)
    task.export_extras(out)
    return out, ckpt.server_round
