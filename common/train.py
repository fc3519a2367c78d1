"""Local training and evaluation in plain PyTorch (no Flower here).

Batches are padded dynamically to their longest member. Token ids are computed once per
data set and process (`encode`), so a round never re-tokenizes.
"""

from __future__ import annotations

import functools
import math
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

from common.data import LabelMap, TextDataset
from common.device import autocast, grad_scaler, model_device, to_device
from common.metrics import confusion_matrix

IGNORE_INDEX = -100  # token label that carries no loss (prompt and padding in causal-LM data)


@dataclass
class EncodedData:
    """Token ids (unpadded) and targets of one data set: a class index per example, or with
    `token_labels` one label per token (-100 where no loss is taken: a causal LM's prompt)."""

    input_ids: list[list[int]]
    labels: np.ndarray | list[list[int]]
    token_labels: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(data: TextDataset, tokenizer, label_map: LabelMap, *, max_length: int, where: str) -> EncodedData:
    """Tokenize once per (data set, tokenizer, max_length, labels); the result is kept on the data set."""
    key = ("encoded", tokenizer.name_or_path, max_length, label_map.names)
    if key not in data.cache:
        ids = tokenizer(data.texts, truncation=True, max_length=max_length)["input_ids"] if len(data) else []
        data.cache[key] = EncodedData(input_ids=list(ids), labels=label_map.encode(data.labels, where=where))
    return data.cache[key]


def collate(data: EncodedData, indices, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the selected examples to the longest of them (token labels with -100)."""
    return pad_batch(
        [data.input_ids[i] for i in indices], [data.labels[i] for i in indices], pad_id, token_labels=data.token_labels
    )


def pad_batch(seqs: list, labels: list, pad_id: int, *, token_labels: bool) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence, in numpy, handed to torch once: a torch operation per row
    costs microseconds, thousands of them for a DP-SGD batch (bench/README.md)."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    mask = np.arange(lengths.max()) < lengths[:, None]  # row-major: True cells in the order of the tokens
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    ids[mask] = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    if token_labels:
        counts = np.fromiter(map(len, labels), dtype=np.int64, count=len(seqs))
        if not np.array_equal(counts, lengths):
            row = int(np.flatnonzero(counts != lengths)[0])
            raise ValueError(
                f"token labels: expected one label per token, got {counts[row]} labels for "
                f"{lengths[row]} tokens in row {row} of the batch"
            )
        targets = np.full(mask.shape, IGNORE_INDEX, dtype=np.int64)
        targets[mask] = np.fromiter(chain.from_iterable(labels), dtype=np.int64, count=int(lengths.sum()))
    else:
        targets = np.asarray(labels, dtype=np.int64)
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        "labels": torch.from_numpy(targets),
    }


def batch_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss over the batch's examples: cross-entropy of a class index per example, or, with
    a label per token (a causal LM), each example's mean next-token cross-entropy over its
    labelled (response) tokens; averaging per example, not per token, keeps each example's
    weight equal, which per-sample DP clipping assumes."""
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels)
    nll, counts = token_nll(logits, labels)
    return (nll / counts.clamp(min=1)).mean()


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed next-token NLL over labelled tokens, and how many tokens that is."""
    shifted, targets = logits[:, :-1, :], labels[:, 1:]
    nll = F.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    return nll.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


GROUP_SPAN = 50  # length grouping sorts within windows of this many batches


def batch_order(
    lengths: list[int], batch_size: int, rng: np.random.Generator, *, group_by_length: bool = True
) -> list[np.ndarray]:
    """One shuffled epoch of batch index arrays.

    With `group_by_length`, the shuffled examples are sorted by length within windows of
    GROUP_SPAN batches and the batches are shuffled again, so each batch holds examples of
    similar length (little padding) while batch composition and order stay random.
    """
    n = len(lengths)
    order = rng.permutation(n)
    if group_by_length:
        span = batch_size * GROUP_SPAN
        order = np.concatenate(
            [
                w[np.argsort([-lengths[i] for i in w], kind="stable")]
                for w in (order[i : i + span] for i in range(0, n, span))
            ]
        )
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def cosine_lr(peak: float, floor: float, progress: float) -> float:
    """Cosine decay from `peak` at progress 0 to `floor` at progress 1 (SGDR without restarts,
    Loshchilov & Hutter 2017)."""
    progress = min(max(progress, 0.0), 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def warmup_then(peak: float, floor: float, warmup: float, cosine: bool, progress: float) -> float:
    """The rate at `progress` in [0, 1] of a whole run: a linear rise from 0 to `peak` over the
    first `warmup` of it, then `peak` (constant) or a cosine decay to `floor` over the rest."""
    if progress < warmup:
        return peak * progress / warmup
    if not cosine:
        return peak
    return cosine_lr(peak, floor, (progress - warmup) / (1.0 - warmup))


def round_schedule(cfg, server_round: int) -> Callable[[float], float] | None:
    """The learning rate over one round's local steps (None = constant learning-rate).

    The schedule (warm-up, then constant or cosine) spans all rounds: round t covers progress
    [(t-1)/R, t/R), so every client of a round starts from the same rate, and a resumed run
    continues the same curve (it depends only on the round number).
    """
    if cfg.lr_schedule == "constant" and cfg.warmup_fraction == 0:
        return None
    rounds, cosine = cfg.num_server_rounds, cfg.lr_schedule == "cosine"

    def lr_at(f: float) -> float:
        return warmup_then(
            cfg.learning_rate, cfg.min_learning_rate, cfg.warmup_fraction, cosine, (server_round - 1 + f) / rounds
        )

    return lr_at


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def padding_efficiency(lengths: list[int], batches: list[np.ndarray]) -> float:
    """Real tokens over processed tokens (every batch padded to its longest member)."""
    real = sum(lengths[i] for b in batches for i in b)
    processed = sum(len(b) * max(lengths[i] for i in b) for b in batches if len(b))
    return real / processed if processed else 1.0


@dataclass
class TrainResult:
    loss: float
    steps: int
    examples: int
    seconds: float
    padding_efficiency: float = float("nan")  # real tokens / processed tokens


@dataclass
class StepOutcome:
    """What one optimizer step did: its batch's mean loss (NaN for an empty batch), examples, and
    real / processed (padded) tokens."""

    loss: float
    examples: int
    real_tokens: int
    processed_tokens: int


def run_steps(
    passes: Callable[[], Iterable],
    step: Callable[[object], StepOutcome],
    optimizer,
    *,
    total: int,
    lr_at: Callable[[float], float] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """The one local training loop: `total` optimizer steps, over as many passes of batches as that takes.

    `passes()` yields the batches of one pass (a shuffled epoch, or one pass of DP-SGD's Poisson
    loader); `step(batch)` takes one optimizer step on it: plain AdamW (`train`) or a clipped,
    noised DP-SGD step (`common/dp_train.py`). `lr_at` maps the fraction of steps done
    (0 <= f < 1) to the next step's learning rate; without it the rate stays as the optimizer has it.
    """
    start = time.perf_counter()
    done, loss_sum, seen, real, processed = 0, 0.0, 0, 0, 0
    while done < total:
        empty_pass = True
        for batch in passes():
            empty_pass = False
            if lr_at is not None:
                set_learning_rate(optimizer, lr_at(done / total))
            out = step(batch)
            done += 1
            if out.examples:
                loss_sum += out.loss * out.examples
                seen += out.examples
            real, processed = real + out.real_tokens, processed + out.processed_tokens
            if progress is not None:
                progress(done, total, out.loss)
            if done >= total:
                break
        if empty_pass:
            raise ValueError("train: expected batches to train on, a pass over the data gave none")
    return TrainResult(
        loss=loss_sum / max(seen, 1),
        steps=done,
        examples=seen,
        seconds=time.perf_counter() - start,
        padding_efficiency=real / max(processed, 1),
    )


def train(
    model: torch.nn.Module,
    data: EncodedData,
    *,
    pad_id: int,
    epochs: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    max_grad_norm: float,
    seed: int,
    proximal_mu: float = 0.0,
    progress: Callable[[int, int, float], None] | None = None,
    group_by_length: bool = False,
    lr_at: Callable[[float], float] | None = None,
    compute_dtype: str = "float32",
) -> TrainResult:
    """Train the adapter with AdamW (started afresh) for `steps` steps, or `epochs` epochs when steps == 0.

    `compute_dtype` bfloat16 or float16 runs the forward pass under autocast (float16 with loss
    scaling); the trainable weights and AdamW's state stay float32.

    With proximal_mu > 0 the FedProx term mu/2 * ||w - w_global||^2 over the trainable
    weights is added to the loss (Li et al. 2020, https://arxiv.org/abs/1812.06127).
    """
    if len(data) == 0:
        raise ValueError("train: expected at least one training example, got none")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    lengths = [len(s) for s in data.input_ids]
    device = model_device(model)
    scaler = grad_scaler(device, compute_dtype)

    def epoch():
        return batch_order(lengths, batch_size, rng, group_by_length=group_by_length)

    def step(batch_idx) -> StepOutcome:
        batch = collate(data, batch_idx, pad_id)
        real, processed = int(batch["attention_mask"].sum()), batch["attention_mask"].numel()  # on the CPU: no sync
        batch = to_device(batch, device)
        with autocast(device, compute_dtype):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = batch_loss(out.logits.float(), batch["labels"])
        objective = loss if anchor is None else loss + proximal_term(params, anchor, mu=proximal_mu)
        optimizer.zero_grad(set_to_none=True)
        (objective if scaler is None else scaler.scale(objective)).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)  # skips a step whose gradients overflowed
            scaler.update()
        return StepOutcome(loss.item(), len(batch_idx), real, processed)  # the step's one read from the device

    model.train()
    total = steps if steps > 0 else epochs * math.ceil(len(data) / batch_size)
    return run_steps(epoch, step, optimizer, total=total, lr_at=lr_at, progress=progress)


def proximal_term(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], *, mu: float) -> torch.Tensor:
    """mu/2 * sum ||p - p0||^2 (FedProx)."""
    squares = (((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
    return 0.5 * mu * functools.reduce(operator.add, squares)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: EncodedData,
    *,
    pad_id: int,
    batch_size: int,
    num_labels: int,
    progress: Callable[[int, int], None] | None = None,
    compute_dtype: str = "float32",
) -> dict:
    """Loss, accuracy, macro-F1 and the confusion matrix (common/metrics.py) of a classifier over
    `data`, in batches sorted by length (a causal LM: `evaluate_lm`). `progress(examples done,
    examples)` is called after every batch."""
    model.eval()
    if len(data) == 0:
        return {
            "loss": float("nan"),
            "accuracy": float("nan"),
            "macro_f1": float("nan"),
            "examples": 0,
            "confusion": np.zeros((num_labels, num_labels), dtype=np.int64),
        }
    order = np.argsort([len(s) for s in data.input_ids], kind="stable")
    loss_sum, preds, device = 0.0, np.empty(len(data), dtype=np.int64), model_device(model)
    for i in range(0, len(data), batch_size):
        idx = order[i : i + batch_size]
        batch = to_device(collate(data, idx, pad_id), device)
        with autocast(device, compute_dtype):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        preds[idx] = logits.argmax(dim=-1).cpu().numpy()
        if progress is not None:
            progress(min(i + batch_size, len(data)), len(data))
    return {
        "loss": loss_sum / len(data),
        "accuracy": float((preds == data.labels).mean()),
        "macro_f1": macro_f1(labels := np.asarray(data.labels), preds),
        "examples": len(data),
        "confusion": confusion_matrix(labels, preds, num_labels),
    }


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over classes present in y_true or y_pred."""
    classes = np.union1d(y_true, y_pred)
    scores = []
    for c in classes:
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        denom = 2 * tp + fp + fn
        scores.append(0.0 if denom == 0 else 2 * tp / denom)
    return float(np.mean(scores))


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    data: EncodedData,
    *,
    pad_id: int,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
    compute_dtype: str = "float32",
) -> dict:
    """Token-level mean NLL over all labelled (response) tokens, and its exponential."""
    model.eval()
    if len(data) == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "examples": 0, "tokens": 0}
    order = np.argsort([len(s) for s in data.input_ids], kind="stable")
    nll_sum, tokens, device = 0.0, 0, model_device(model)
    for i in range(0, len(data), batch_size):
        batch = to_device(collate(data, order[i : i + batch_size], pad_id), device)
        with autocast(device, compute_dtype):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, counts = token_nll(logits.float(), batch["labels"])
        nll_sum += nll.sum().item()
        tokens += int(counts.sum().item())
        if progress is not None:
            progress(min(i + batch_size, len(data)), len(data))
    loss = nll_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "examples": len(data), "tokens": tokens}
