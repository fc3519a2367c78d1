"""fedtune's client training path against a plain PEFT (+ Opacus) loop, on whatever device it finds.

    python bench/gpu.py --out DIR            about 8 minutes on a GPU
    python bench/gpu.py --quick --out DIR    under 2 minutes on a CPU

Both sides train LoRA on the packaged all-MiniLM-L6-v2 with the same examples, batch size and
steps on the device `auto` resolves to (CUDA when torch sees one):
- train: fedtune's `common.train.train` (what the ClientApp runs: shuffled batches, dynamic
  padding, FedProx-free AdamW, gradient clipping) against a plain loop: the same LoRA model,
  `tokenizer.pad` batches of the same examples, AdamW, clipping;
- dp: fedtune's `common.dp_train.dp_train` at its default dp-physical-batch-size (auto: chunks
  of 8 length-sorted examples on a CPU, the whole Poisson batch on a GPU) against Opacus'
  PrivacyEngine over a Poisson DataLoader of the same expected batch, noise and clipping, in
  one piece (Opacus' default).
On a CPU also `dp_whole` (fedtune in one piece, what auto does on a GPU). On CUDA also
`dp_chunked` (both sides in pieces of at most 256 examples: fedtune's length-sorted chunks,
Opacus' BatchMemoryManager), `train_bf16` (bfloat16 autocast, batch 256, both sides) and, with
SST-2, one epoch of SST-2 through fedtune's loop with the dev accuracy. Each side warms up
first, then is timed; samples/s counts the examples stepped on. Writes gpu.json with the
figures and `ratio_<run>` for each: fedtune / plain loop, >= 0.8 is the target.
Data: SST-2 train from ../shared/data when present, else the packaged chatterbot corpus.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SST2 = Path(os.environ.get("FEDTUNE_SHARED_DATA", REPO.parent / "shared" / "data")) / "sst2" / "train.tsv"

from common.dp_train import AUTO_CHUNK  # noqa: E402  (imports Opacus without its logging side effect)
from common.config import FedtuneConfig  # noqa: E402
from common.device import autocast, resolve_device  # noqa: E402
from common.federation_data import federation_labels, train_and_heldout  # noqa: E402
from common.task import task_for
from common.model import base_classifier, get_adapter_state, load_tokenizer, set_adapter_state  # noqa: E402
from common.train import EncodedData, encode, train  # noqa: E402


def settings(quick: bool, device: torch.device) -> dict:
    if device.type == "cuda":
        return {"examples": 8192, "batch": 32, "steps": 120, "dp_batch": 1024, "dp_steps": 24, "dp_chunk": 256,
                "max_length": 66, "bf16_batch": 256, "bf16_steps": 40}
    if quick:
        return {"examples": 1024, "batch": 32, "steps": 10, "dp_batch": 128, "dp_steps": 3, "max_length": 64}
    return {"examples": 4096, "batch": 32, "steps": 40, "dp_batch": 256, "dp_steps": 6, "max_length": 64}


def plain_model(cfg: FedtuneConfig, num_labels: int, device: torch.device):
    """LoRA by PEFT directly on the same base classifier, with the same settings."""
    from peft import LoraConfig, TaskType, get_peft_model

    base = base_classifier(cfg.model, num_labels, seed=cfg.seed)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=["query", "value"], modules_to_save=["classifier"])
    return get_peft_model(base, lora).to(device)


def plain_train(model, data: EncodedData, tokenizer, *, batch: int, steps: int, lr: float, device,
                compute_dtype: str = "float32") -> float:
    rng = np.random.default_rng(0)
    precision = autocast(device, compute_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    start, seen = time.perf_counter(), 0
    for _ in range(steps):
        idx = rng.choice(len(data), size=batch, replace=False)
        enc = tokenizer.pad({"input_ids": [data.input_ids[i] for i in idx]}, return_tensors="pt").to(device)
        labels = torch.as_tensor(data.labels[idx], device=device)
        with precision:
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        seen += batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def plain_dp(model, data: EncodedData, tokenizer, *, batch: int, steps: int, lr: float, device,
             physical: int = 0) -> float:
    """Opacus' PrivacyEngine; with `physical` > 0 its BatchMemoryManager computes each Poisson
    batch in pieces of at most that many examples (in sampled order, each padded to its longest)."""
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from torch.utils.data import DataLoader

    def collate(items):
        enc = tokenizer.pad({"input_ids": [ids for ids, _ in items]}, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.as_tensor([y for _, y in items], dtype=torch.long)

    examples = list(zip(data.input_ids, data.labels.tolist()))
    loader = DataLoader(examples, batch_size=batch, collate_fn=collate)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    module, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.AdamW(params, lr=lr), data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, poisson_sampling=True)
    start, seen, done = time.perf_counter(), 0, 0
    pieces = (BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer)
              if physical else contextlib.nullcontext(loader))
    while done < steps:
        with pieces as batches:
            for ids, mask, labels in batches:
                optimizer.zero_grad(set_to_none=True)  # Opacus keeps the summed clipped gradients of skipped steps
                if len(labels):
                    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
                    F.cross_entropy(module(input_ids=ids, attention_mask=mask).logits, labels).backward()
                    seen += len(labels)
                optimizer.step()
                done += not optimizer._is_last_step_skipped
                if done >= steps:
                    break
    if device.type == "cuda":
        torch.cuda.synchronize()
    module._close()
    return seen / (time.perf_counter() - start)


def fedtune_train(model, data, pad_id: int, *, batch: int, steps: int, lr: float, device,
                  compute_dtype: str = "float32") -> float:
    result = train(model, data, pad_id=pad_id, epochs=1, steps=steps, batch_size=batch, learning_rate=lr,
                   weight_decay=0.0, max_grad_norm=1.0, seed=0, compute_dtype=compute_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result.examples / result.seconds


def fedtune_dp(model, data, pad_id: int, *, batch: int, steps: int, lr: float, physical: int, device) -> float:
    from common.dp_train import dp_train

    result, _ = dp_train(model, data, pad_id=pad_id, steps=steps, batch_size=batch, learning_rate=lr,
                         weight_decay=0.0, noise_multiplier=1.0, clipping_norm=1.0, seed=0,
                         physical_batch_size=physical)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result.examples / result.seconds


def fedtune_epoch(cfg: FedtuneConfig, labels, tok, device) -> dict:
    """One epoch of all of SST-2's training sentences, batch 32, then the dev set (the issue's
    plain-loop figure on an H200: 55 s, dev accuracy 0.870)."""
    from common.federation_data import heldout_set
    from common.train import evaluate

    full = cfg.replace(max_train_examples=0, heldout_data=str(SST2.parent / "dev.tsv"))
    train_data = encode(train_and_heldout(full)[0], tok, labels, max_length=cfg.max_length, where="bench")
    dev = encode(heldout_set(full), tok, labels, max_length=cfg.max_length, where="bench")
    model = task_for(cfg).model(len(labels), device=device)
    start = time.perf_counter()
    result = train(model, train_data, pad_id=tok.pad_token_id, epochs=1, steps=0, batch_size=32,
                   learning_rate=cfg.learning_rate, weight_decay=0.0, max_grad_norm=1.0, seed=0)
    scored = evaluate(model, dev, pad_id=tok.pad_token_id, batch_size=256, num_labels=len(labels))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"examples": result.examples, "seconds_with_dev": round(time.perf_counter() - start, 1),
            "dev_accuracy": round(scored["accuracy"], 4), "dev_macro_f1": round(scored["macro_f1"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="A CPU-sized run (under 2 minutes).")
    args = parser.parse_args()
    device = resolve_device("auto")
    s = settings(args.quick, device)
    source = {"data": str(SST2), "text_column": "sentence"} if SST2.exists() else {}
    cfg = FedtuneConfig(max_train_examples=s["examples"], max_length=s["max_length"], device="auto", **source)
    labels = federation_labels(cfg)
    cfg = cfg.replace(labels=labels.to_spec())
    tok = load_tokenizer(cfg.model)
    data = encode(train_and_heldout(cfg)[0], tok, labels, max_length=cfg.max_length, where="bench")
    ours = task_for(cfg).model(len(labels)).to(device)
    initial = get_adapter_state(ours)
    plain = plain_model(cfg, len(labels), device)
    lr = cfg.learning_rate
    figures: dict = {}
    runs = [
        ("train", lambda: (fedtune_train(ours, data, tok.pad_token_id, batch=s["batch"], steps=s["steps"], lr=lr,
                                         device=device),
                           plain_train(plain, data, tok, batch=s["batch"], steps=s["steps"], lr=lr, device=device))),
        ("dp", lambda: (fedtune_dp(ours, data, tok.pad_token_id, batch=s["dp_batch"], steps=s["dp_steps"], lr=lr,
                                   physical=AUTO_CHUNK, device=device),
                        plain_dp(plain, data, tok, batch=s["dp_batch"], steps=s["dp_steps"], lr=lr, device=device))),
    ]
    if device.type != "cuda":  # the GPU's auto choice (the Poisson batch in one piece) on this device
        runs.append(("dp_whole", lambda: (
            fedtune_dp(ours, data, tok.pad_token_id, batch=s["dp_batch"], steps=s["dp_steps"], lr=lr, physical=0,
                       device=device),
            plain_dp(plain, data, tok, batch=s["dp_batch"], steps=s["dp_steps"], lr=lr, device=device))))
    else:  # pieces that bound memory; bfloat16 autocast at a larger batch (refused on a CPU)
        runs.append(("dp_chunked", lambda: (
            fedtune_dp(ours, data, tok.pad_token_id, batch=s["dp_batch"], steps=s["dp_steps"], lr=lr,
                       physical=s["dp_chunk"], device=device),
            plain_dp(plain, data, tok, batch=s["dp_batch"], steps=s["dp_steps"], lr=lr, device=device,
                     physical=s["dp_chunk"]))))
        runs.append(("train_bf16", lambda: (
            fedtune_train(ours, data, tok.pad_token_id, batch=s["bf16_batch"], steps=s["bf16_steps"], lr=lr,
                          device=device, compute_dtype="bfloat16"),
            plain_train(plain, data, tok, batch=s["bf16_batch"], steps=s["bf16_steps"], lr=lr, device=device,
                        compute_dtype="bfloat16"))))
    for name, run in runs:
        set_adapter_state(ours, initial)
        run()  # warm-up: kernels, allocator, Opacus hooks
        set_adapter_state(ours, initial)
        fed, ref = run()
        figures[name] = {"fedtune_samples_per_s": round(fed, 1), "plain_samples_per_s": round(ref, 1)}
        figures[f"ratio_{name}"] = round(fed / ref, 3)
        print(f"{name}: fedtune {fed:.1f} samples/s, plain loop {ref:.1f} samples/s, ratio {fed / ref:.3f}", flush=True)
    if device.type == "cuda" and SST2.exists():
        set_adapter_state(ours, initial)
        figures["sst2_epoch"] = fedtune_epoch(cfg, labels, tok, device)
        print(f"SST-2 epoch: {figures['sst2_epoch']}", flush=True)
    result = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
              "quick": args.quick, "data": cfg.data, "settings": s, **figures}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
