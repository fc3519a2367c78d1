"""Sample-level DP-SGD on the adapter with Opacus (Abadi et al. 2016, https://arxiv.org/abs/1607.00133).

Opacus' building blocks are used directly (GradSampleModule, DPOptimizer, DPDataLoader)
rather than a PrivacyEngine, because fedtune keeps one privacy record per client for the
whole run (see `common/budget.py`): building a PrivacyEngine every round would restart its
accountant at zero. What this module returns is the mechanism that actually ran, with the
sample rate taken from the Poisson loader that was used.

Guards against the silent failures known for Opacus + PEFT: parameters the optimizer
holds that are not the model's own (a model moved after `get_peft_model`), a loader whose
sampler is not Poisson sampling at the recorded rate, and a DP step that leaves the LoRA
weights unchanged or non-finite.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.canaries import Canaries, Layout, canary_gradients
from common.device import autocast, model_device, noise_generator
from common.errors import FedtuneError
from common.opacus import (
    DPDataLoader,
    DPOptimizer,
    GradSampleModule,
    UniformWithReplacementSampler,
    clipped_sum,
    drop_clipped_sums,
    drop_pending_skips,
    empty_grad_samples,
    forget_activations,
    grad_samples_in_param_dtype,
    remove_hooks,
    reset_forward_counters,
    set_grad_sample,
)
from common.privacy import Mechanism
from common.train import EncodedData, StepOutcome, TrainResult, batch_loss, collate, run_steps

log = logging.getLogger(__name__)


AUTO_CHUNK = -1  # dp-physical-batch-size's default: by device
CPU_CHUNK = 8  # on a CPU, small chunks cut padding (bench/README.md)


class DPTrainingError(FedtuneError, RuntimeError):
    """DP training ran, but its result cannot be trusted."""


class _Indices(Dataset):
    """The loader samples example indices; `_pad` pads the sampled examples in one go. Opacus
    sizes an empty first batch from item 0: a one-element list, a 0-length index tensor."""

    def __init__(self, data: EncodedData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[int]:
        return (i,)


def _pad(data: EncodedData, pad_id: int):
    def pad(items):
        batch = collate(data, [i for (i,) in items], pad_id)
        return batch["input_ids"], batch["attention_mask"], batch["labels"]

    return pad


def poisson_loader(data: EncodedData, *, batch_size: int, pad_id: int, seed: int) -> DPDataLoader:
    """A Poisson-sampling loader with expected batch size ~ batch_size; its rate is what we account."""
    base = DataLoader(_Indices(data), batch_size=batch_size, collate_fn=_pad(data, pad_id))
    loader = DPDataLoader.from_data_loader(base, generator=torch.Generator().manual_seed(seed))
    if not isinstance(loader.batch_sampler, UniformWithReplacementSampler):
        raise DPTrainingError(f"DP loader: expected Poisson sampling, got {type(loader.batch_sampler).__name__}")
    if not np.isclose(loader.batch_sampler.sample_rate, loader.sample_rate):
        raise DPTrainingError(
            f"DP loader: sampler rate {loader.batch_sampler.sample_rate} differs from the recorded {loader.sample_rate}"
        )
    return loader


def dp_train(
    model: torch.nn.Module,
    data: EncodedData,
    *,
    pad_id: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    noise_multiplier: float,
    clipping_norm: float,
    seed: int,
    progress: Callable[[int, int, float], None] | None = None,
    physical_batch_size: int = 0,
    lr_at: Callable[[float], float] | None = None,
    compute_dtype: str = "float32",
    canaries: Canaries | None = None,
    server_round: int = 0,
) -> tuple[TrainResult, Mechanism]:
    """`steps` DP-SGD steps (per-sample clipping to `clipping_norm`, Gaussian noise).

    A Poisson batch cannot be regrouped by length without changing what is accounted, but it
    can be computed in pieces: with `physical_batch_size` > 0 each logical batch is sorted by
    length and run in chunks of that many examples, each padded only to its own longest
    member. Per-sample gradients are clipped and summed across the chunks and noised once per
    logical batch (Opacus' skip-step accumulation), so the released update is the same.
    0 runs a logical batch in one piece; AUTO_CHUNK (-1) picks by device (`Chunking`). On a GPU
    a chunk that runs out of memory is halved and the logical batch computed again.

    With `compute_dtype` bfloat16 the forward pass runs under autocast; the per-sample gradients
    are cast to the parameters' float32 before clipping, so clipping, noise and the update are
    computed in float32 as without it. float16 is refused (its loss scaling would scale what is clipped).

    `canaries` (common/canaries.py): the included ones drawn for each step at the loader's rate join
    that step's per-example gradients before clipping; `server_round` keys their draws.
    """
    _check_inputs(data, compute_dtype)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = [p.detach().clone() for p in params]
    loader = poisson_loader(data, batch_size=batch_size, pad_id=pad_id, seed=seed)
    device = model_device(model)  # placed before the optimizer is built (see _check_same_parameters)
    gsm = GradSampleModule(model)
    try:
        optimizer = DPOptimizer(
            torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay),
            noise_multiplier=noise_multiplier,
            max_grad_norm=clipping_norm,
            expected_batch_size=max(1, round(loader.sample_rate * len(data))),
            generator=noise_generator(seed + 1, device),
        )
        _check_same_parameters(gsm, optimizer)

        chunking = Chunking.for_device(physical_batch_size, device)
        steps_taken = itertools.count()

        def add_canaries(index: int) -> None:
            if canaries is not None:
                _add_canaries(optimizer, named, canaries, clipping_norm, loader.sample_rate, server_round, index)

        def step(batch) -> StepOutcome:  # the learning rate (set by run_steps) is post-processing
            index = next(steps_taken)
            optimizer.zero_grad(set_to_none=True)
            if len(batch[-1]) == 0:  # an empty Poisson batch still releases a noisy (zero-sum) update; one
                add_canaries(index)  # before any example was drawn is a single empty tensor (Opacus)
                _release(optimizer)
                return StepOutcome(float("nan"), 0, 0, 0)
            ids, mask, labels = batch  # on the CPU: lengths and chunks are planned there, without syncs
            while True:
                try:
                    outcome = _accumulate(gsm, optimizer, ids, mask, labels, device, chunking.size, compute_dtype)
                    break
                except torch.cuda.OutOfMemoryError:
                    _discard_partial_step(gsm, optimizer)
                    chunking.shrink(len(labels))
            add_canaries(index)
            try:
                _release(optimizer)
            except torch.cuda.OutOfMemoryError as err:  # not retried: the noise may have been drawn
                raise DPTrainingError("DP step: out of GPU memory while noising and applying the update") from err
            return outcome

        gsm.train()
        result = run_steps(lambda: loader, step, optimizer, total=steps, lr_at=lr_at, progress=progress)
    finally:
        forget_activations(gsm)  # whatever stopped a step part-way: the cached model is reused by later rounds
        remove_hooks(gsm)
    _check_weights_moved(params, before)
    mechanism = Mechanism(noise_multiplier=noise_multiplier, steps=result.steps, sample_rate=loader.sample_rate)
    return result, mechanism


def _accumulate(
    gsm, optimizer: DPOptimizer, ids, mask, labels, device: torch.device, physical: int, compute_dtype: str = "float32"
) -> StepOutcome:
    """Clip every example's gradient and add it to the parameters' clipped sums (Opacus' skipped
    steps), in length-sorted physical chunks. The batch arrives on the CPU, where the chunks and
    their widths are planned; each chunk then moves to `device`, and the loss is read back once
    (a sync per chunk would stall a GPU). No noise is drawn here."""
    lengths = mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    chunks = order.split(physical) if physical > 0 else [order]
    loss_sum, real, processed = torch.zeros((), device=device), 0, 0
    for chunk in chunks:
        width = int(lengths[chunk].max())
        chunk_labels = labels[chunk, :width] if labels.dim() == 2 else labels[chunk]  # token labels are cut too
        chunk_ids, chunk_mask, chunk_labels = (
            t.to(device, non_blocking=True) for t in (ids[chunk, :width], mask[chunk, :width], chunk_labels)
        )
        with autocast(device, compute_dtype):
            logits = gsm(input_ids=chunk_ids, attention_mask=chunk_mask).logits
        loss = batch_loss(logits.float(), chunk_labels)
        loss.backward()
        if compute_dtype != "float32":
            grad_samples_in_param_dtype(optimizer)
        optimizer.signal_skip_step(do_skip=True)  # clip and accumulate only; noise once, at the end
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # keeps the accumulated sum (the step was skipped)
        loss_sum += loss.detach() * len(chunk)
        real += int(lengths[chunk].sum())
        processed += len(chunk) * width
    return StepOutcome(loss_sum.item() / max(1, len(order)), len(order), real, processed)


def _add_canaries(
    optimizer: DPOptimizer,
    named: Mapping[str, torch.Tensor],
    canaries: Canaries,
    clipping_norm: float,
    sample_rate: float,
    server_round: int,
    step: int,
) -> None:
    """Add the canaries drawn for this step to its logical batch as per-example gradients: Opacus
    clips them with the batch's examples and adds them to the clipped sums; the noise comes later,
    once, in `_release`."""
    layout = Layout.of({n: tuple(p.shape) for n, p in named.items()})
    grads = canary_gradients(
        canaries, layout, clipping_norm, sample_rate=sample_rate, server_round=server_round, step=step
    )
    if grads is None:
        return
    for name, p in named.items():
        set_grad_sample(p, torch.from_numpy(grads[name]).to(device=p.device, dtype=p.dtype))
    optimizer.signal_skip_step(do_skip=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # keeps the accumulated sum (the step was skipped)


def clipped_gradient_sum(
    model: torch.nn.Module,
    data: EncodedData,
    *,
    pad_id: int,
    sample_rate: float,
    clipping_norm: float,
    seed: int,
    physical_batch_size: int = AUTO_CHUNK,
    compute_dtype: str = "float32",
    canaries: Canaries | None = None,
    server_round: int = 0,
) -> tuple[dict[str, np.ndarray], int]:
    """Distributed DP-SGD's client step: draw one Poisson sample of `data` at `sample_rate` and sum
    its per-example gradients, each clipped to `clipping_norm`. No noise and no update: the client
    adds its share of the noise after rounding the sum to integers (common/quantize.py) and the
    server, which sees only the secure sum of every client's, takes the step.

    Returns (clipped sum by adapter tensor name, float64 on the CPU; examples sampled). The count
    stays on the client: it depends on the data, so it must not travel unprotected. `canaries` drawn
    at `sample_rate` join the sum as examples do (common/canaries.py); they are not counted.
    """
    _check_inputs(data, compute_dtype)
    if not 0 < sample_rate <= 1:
        raise DPTrainingError(f"DP training: expected a sample rate in (0, 1], got {sample_rate}")
    torch.manual_seed(seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loader = DPDataLoader(
        _Indices(data),
        sample_rate=sample_rate,
        collate_fn=_pad(data, pad_id),
        generator=torch.Generator().manual_seed(seed),
    )
    device = model_device(model)
    ids, mask, labels = next(iter(loader))
    gsm = GradSampleModule(model)
    try:
        optimizer = DPOptimizer(
            torch.optim.SGD([p for _, p in named], lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=clipping_norm,
            expected_batch_size=1,
        )
        _check_same_parameters(gsm, optimizer)
        optimizer.zero_grad(set_to_none=True)
        chunking = Chunking.for_device(physical_batch_size, device)
        gsm.train()
        while len(labels):
            try:
                _accumulate(gsm, optimizer, ids, mask, labels, device, chunking.size, compute_dtype)
                break
            except torch.cuda.OutOfMemoryError:
                _discard_partial_step(gsm, optimizer)
                chunking.shrink(len(labels))
        if canaries is not None:
            _add_canaries(optimizer, dict(named), canaries, clipping_norm, sample_rate, server_round, 0)
        sums = {
            n: (
                summed.detach().to("cpu", torch.float64).numpy()
                if (summed := clipped_sum(p)) is not None
                else np.zeros(tuple(p.shape))
            )
            for n, p in named
        }
    finally:
        forget_activations(gsm)
        drop_clipped_sums(p for _, p in named)  # the cached model is reused: no clipped sum may outlive this call
        remove_hooks(gsm)
    return sums, len(labels)


@dataclass
class Chunking:
    """How many examples of a logical batch run through the model at once (0 = all of them).

    Auto: CPU_CHUNK on a CPU, where less padding is less work; the whole batch on a GPU, where
    each chunk costs a model's worth of kernel launches (bench/README.md, the GPU path). On a
    GPU a chunk that runs out of memory is halved, so the auto
    size finds what fits; the released update does not depend on the chunking.
    """

    size: int

    @classmethod
    def for_device(cls, physical_batch_size: int, device: torch.device) -> Chunking:
        if physical_batch_size == AUTO_CHUNK:
            return cls(CPU_CHUNK if device.type == "cpu" else 0)
        return cls(physical_batch_size)

    def shrink(self, batch: int) -> None:
        smaller = (self.size or batch) // 2
        if smaller < 1:
            raise DPTrainingError(
                "DP step: out of GPU memory with one example at a time; use a smaller max-length, "
                "model or compute-dtype = 'bfloat16'"
            )
        log.warning(
            "DP-SGD: out of GPU memory with chunks of %d examples; computing the logical batch again in "
            "chunks of %d (set dp-physical-batch-size to start there)",
            self.size or batch,
            smaller,
        )
        self.size = smaller


def _discard_partial_step(gsm: GradSampleModule, optimizer: DPOptimizer) -> None:
    """Forget a logical step that failed part-way, as if it never started: the clipped sums
    accumulated so far and a pending skip signal (DPOptimizer), the activations and forward counts
    of the interrupted pass (GradSampleModule). No noise was drawn: that is `_release`'s."""
    drop_pending_skips(optimizer)
    optimizer.zero_grad(set_to_none=True)  # with no step skipped, this clears the clipped sums too
    forget_activations(gsm)
    reset_forward_counters(optimizer)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _release(optimizer: DPOptimizer) -> None:
    """End a logical step: add the noise once to the clipped sum accumulated over its chunks
    (none for an empty Poisson batch, which still releases a noisy update, as the analysis
    assumes) and take the optimizer step. Every chunk only accumulated, so an out-of-memory error
    in one leaves the noise undrawn and the step can be computed again."""
    empty_grad_samples(optimizer)
    optimizer.step()


def _check_same_parameters(gsm: GradSampleModule, optimizer: DPOptimizer) -> None:
    model_params = {id(p) for p in gsm.parameters() if p.requires_grad}
    opt_params = {id(p) for p in optimizer.params}
    if model_params != opt_params:
        raise DPTrainingError(
            f"DP optimizer: expected to hold the model's {len(model_params)} trainable tensors, holds "
            f"{len(opt_params & model_params)} of them and {len(opt_params - model_params)} others "
            "(was the model moved to a device after the optimizer or PEFT wrapper was built?)"
        )


def _check_inputs(data, compute_dtype: str) -> None:
    if compute_dtype == "float16":
        raise DPTrainingError(
            "DP training: expected compute-dtype float32 or bfloat16, got float16 (loss scaling "
            "would scale the per-sample gradients before they are clipped)"
        )
    if len(data) == 0:
        raise DPTrainingError("DP training: expected at least one example, got none")


def _check_weights_moved(params: Sequence[torch.Tensor], before: Sequence[torch.Tensor]) -> None:
    if not all(torch.isfinite(p).all() for p in params):
        raise DPTrainingError("DP step: expected finite adapter weights, got NaN or Inf")
    if all(torch.equal(p, b) for p, b in zip(params, before, strict=True)):
        raise DPTrainingError("DP step: expected the adapter weights to change, they did not")
