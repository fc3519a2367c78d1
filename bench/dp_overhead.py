"""DP-SGD step time over non-DP step time on the same batches (issue target: <= 1.25).

    python bench/dp_overhead.py [--data ../shared/data/sst2/train.tsv] [--steps 30] [--batch-size 32]

Both loops run the same padded batches through the same LoRA model with the same threads;
the DP loop adds Opacus' per-sample gradients, per-sample clipping and noise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.config import FedtuneConfig
import common.dp_train  # noqa: F401  (imports Opacus without its logging side effect)
from common.federation_data import federation_labels, train_and_heldout
from common.model import load_tokenizer
from common.task import task_for
from common.train import collate, encode

REPO = Path(__file__).resolve().parents[1]


def batches(data, batch_size: int, steps: int, pad_id: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [collate(data, rng.choice(len(data), size=batch_size, replace=False), pad_id) for _ in range(steps)]


def time_steps(model, params, optimizer, batch_list, *, wrap=None) -> float:
    net = wrap or model
    net.train()
    start = time.perf_counter()
    for b in batch_list:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]).backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(batch_list)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2" / "train.tsv"))
    parser.add_argument("--text-column", default="sentence")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = FedtuneConfig(data=args.data, text_column=args.text_column, max_train_examples=5000)
    labels = federation_labels(cfg)
    cfg = cfg.replace(labels=labels.to_spec())
    model, tok = task_for(cfg).model(len(labels)), load_tokenizer(cfg.model)
    data = encode(train_and_heldout(cfg)[0], tok, labels, max_length=cfg.max_length, where="bench")
    work = batches(data, args.batch_size, args.steps + 3, tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    plain = torch.optim.AdamW(params, lr=1e-4)
    time_steps(model, params, plain, work[:3])  # warm up
    non_dp = time_steps(model, params, plain, work[3:])
    gsm = GradSampleModule(model)
    dp_opt = DPOptimizer(torch.optim.AdamW(params, lr=1e-4), noise_multiplier=1.0, max_grad_norm=1.0,
                         expected_batch_size=args.batch_size)
    time_steps(model, params, dp_opt, work[:3], wrap=gsm)
    dp = time_steps(model, params, dp_opt, work[3:], wrap=gsm)
    gsm._close()
    result = {"non_dp_step_s": non_dp, "dp_step_s": dp, "ratio": dp / non_dp, "batch_size": args.batch_size,
              "steps": args.steps, "threads": args.threads, "target_ratio": 1.25}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
