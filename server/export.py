"""Export a run's global adapter for use outside fedtune.

    fedtune export RUN_DIR OUT            the adapter alone (PEFT: PeftModel.from_pretrained)
    fedtune export RUN_DIR OUT --merged   base + adapter merged (transformers: from_pretrained)

The adapter comes from the run's latest checkpoint (its hash is checked), the base model and
LoRA settings from the config stored in the checkpoint. The model is built fresh, not taken
from the process cache, because merging rewrites the base weights in place.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.data import LabelMap
from common.errors import CheckpointError, ConfigError
from common.lm import export_model, load_lora_causal_lm
from common.model import load_lora_model, load_tokenizer, set_adapter_state
from server.checkpoint import latest_checkpoint, load_checkpoint


def export_run(run_dir: str | Path, out: str | Path, *, merged: bool) -> tuple[Path, int]:
    """Write the export; returns its directory and the round it comes from."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: expected a new or empty output directory, got {str(out)!r}, which is a file")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export: expected a new or empty output directory, got {str(out)!r} which holds "
                          "files; refusing to overwrite them")
    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise CheckpointError(f"export: expected checkpoints in {run_dir / 'checkpoints'}, found none")
    ckpt = load_checkpoint(path)
    cfg = ckpt.run_config()
    lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                target_modules=tuple(cfg.target_modules), seed=cfg.seed, freeze_a=cfg.lora_freeze_a)
    if cfg.task == "causal-lm":
        # A QLoRA adapter goes onto the full-precision base (on the CPU, no bitsandbytes needed):
        # its weights are float32 with the same names either way, and a merge into a 4-bit base
        # would round the merged weights back to 4 bits.
        model = load_lora_causal_lm.__wrapped__(cfg.model, **lora, load_in="none")
    else:
        model = load_lora_model.__wrapped__(cfg.model, len(LabelMap.parse(cfg.labels)), **lora)
    set_adapter_state(model, ckpt.adapter)
    out = export_model(model, load_tokenizer(cfg.model), out, merged=merged)
    if cfg.task == "classification":  # the label names, so a user can read the predictions
        (out / "fedtune-labels.json").write_text(json.dumps(list(LabelMap.parse(cfg.labels).names)))
    return out, ckpt.server_round
