"""Why the first DP rounds sit at the majority class: one client's DP-SGD rounds, lever by lever.

    python bench/dp_levers.py base noise-0.1 warmup head-zero lr-1e-2 clip-10 head-only normalize

One client of the reviewer's check (SST-2, 8,000 training examples over 4 IID clients: 1,800 to
train on), trained as a fedtune client is with the default DP settings at epsilon 8: 3 rounds of
8 DP-SGD steps at expected batch 225, noise multiplier 0.762, clipping norm 1, AdamW at 5e-3
started afresh each round; held-out accuracy on SST-2 dev after each round. (The federated run
averages 4 such clients: its rounds 1-3 gave 0.520, 0.544, 0.758; this probe's base 0.522,
0.547, 0.767.) Each lever changes one thing:

    base         the defaults
    noise-0.1    noise multiplier 0.1 instead of 0.762 ("clipping on, almost no noise")
    warmup       the learning rate rises linearly over the first half of each round
    head-zero    the classification head starts at zero instead of N(0, 0.02)
    lr-X         learning rate X
    clip-X       clipping norm X
    head-only    LoRA frozen, only the head trains
    normalize    the pooled vector is L2-normalised (all-MiniLM-L6-v2's Normalize module)
    group-F      per-layer clipping (Opacus' DPPerLayerOptimizer): each trainable tensor is clipped
                 on its own, the head's tensors sharing a fraction F of the squared clipping norm and
                 the LoRA tensors the rest, so the total norm (and the noise) stays that of clip 1

Prints one LEVER line each: (train loss, dev accuracy) per round and the wall time.
Needs ../shared/data/sst2 (or FEDTUNE_SHARED_DATA).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from opacus.optimizers import DPPerLayerOptimizer

import common.dp_train
import common.model
from common.config import FedtuneConfig
from common.dp_train import dp_train
from common.federation_data import federation_labels, heldout_set, simulated_client_data
from common.model import load_lora_model, load_tokenizer
from common.train import encode, evaluate

SST2 = Path(os.environ.get("FEDTUNE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "sst2"


def run(lever: str, client, dev, pad_id: int) -> list[tuple[float, float]]:
    value = float(lever.split("-", 1)[1]) if lever.startswith(("lr-", "clip-", "noise-", "group-")) else None
    lr = value if lever.startswith("lr-") else 5e-3
    clip = value if lever.startswith("clip-") else 1.0
    sigma = value if lever.startswith("noise-") else 0.762
    pool = common.model.pool
    if lever == "normalize":
        common.model.pool = lambda h, m, mode: torch.nn.functional.normalize(pool(h, m, mode), dim=-1)
    model = load_lora_model.__wrapped__("packaged:all-MiniLM-L6-v2", 2, r=8, alpha=16.0, dropout=0.05,
                                        target_modules=(), seed=42)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lever == "head-zero" and "classifier" in name and p.requires_grad:
                p.zero_()
            if lever == "head-only" and "lora_" in name:
                p.requires_grad_(False)
    schedule = (lambda f: lr * min(1.0, f / 0.5)) if lever == "warmup" else None
    rows = []
    optimizer_class = common.dp_train.DPOptimizer
    if lever.startswith("group-"):
        common.dp_train.DPOptimizer = per_layer(model, head_share=value)
    try:
        for r in range(1, 4):
            res, _ = dp_train(model, client, pad_id=pad_id, steps=8, batch_size=225, learning_rate=lr,
                              weight_decay=0.0, noise_multiplier=sigma, clipping_norm=clip, seed=42 + r,
                              physical_batch_size=8, lr_at=schedule)
            acc = evaluate(model, dev, pad_id=pad_id, batch_size=64, num_labels=2)["accuracy"]
            rows.append((round(res.loss, 3), round(acc, 3)))
    finally:
        common.model.pool = pool
        common.dp_train.DPOptimizer = optimizer_class
    return rows


def per_layer(model, *, head_share: float):
    """A DPOptimizer stand-in that clips head and LoRA tensors separately (total norm = clip)."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}

    def build(optimizer, *, noise_multiplier, max_grad_norm, expected_batch_size, generator):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        head = [("lora_" not in names[id(p)]) for p in params]
        n_head, n_lora = sum(head), len(head) - sum(head)
        norms = [max_grad_norm * (head_share / n_head if h else (1 - head_share) / n_lora) ** 0.5 for h in head]
        return DPPerLayerOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=norms,
                                   expected_batch_size=expected_batch_size, generator=generator)
    return build


def main() -> None:
    levers = sys.argv[1:] or ["base"]
    if not (SST2 / "train.tsv").exists():
        sys.exit(f"SST-2 not found at {SST2} (set FEDTUNE_SHARED_DATA)")
    cfg = FedtuneConfig(data=str(SST2 / "train.tsv"), heldout_data=str(SST2 / "dev.tsv"), text_column="sentence",
                        max_train_examples=8000, partitioner="iid")
    labels = federation_labels(cfg)
    tok = load_tokenizer(cfg.model)
    client = encode(simulated_client_data(cfg.replace(labels=labels.to_spec()), 0, 4).train, tok, labels,
                    max_length=cfg.max_length, where="client 0")
    dev = encode(heldout_set(cfg), tok, labels, max_length=cfg.max_length, where="dev")
    for lever in levers:
        start = time.perf_counter()
        rows = run(lever, client, dev, tok.pad_token_id)
        print(f"LEVER {lever} {rows} {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
