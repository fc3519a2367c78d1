"""Every reach of fedtune into Opacus beyond its documented API, in one place (as common/flower.py
is for Flower), each checked against the installed Opacus by tests/test_opacus_adapter.py, so an
upgrade that changes one fails there, by name, instead of as a wrong DP step.

fedtune drives DPOptimizer step by step: a logical (Poisson) batch is clipped and accumulated in
chunks (Opacus' skipped steps), noised once, and a chunk that failed part-way is forgotten as if it
never started. That needs what Opacus keeps private: the queue of skip signals, the per-parameter
forward counters and per-sample gradient attributes, the activations its hooks saved on each
module, and its hooks' removal. Importing Opacus also calls logging.basicConfig(), which this module
undoes, and Opacus warns about an empty first Poisson batch that fedtune handles as any other step.
"""

from __future__ import annotations

import logging

import torch

_root_handlers = logging.root.handlers[:]
from opacus import GradSampleModule  # noqa: E402
from opacus.accountants import PRVAccountant, RDPAccountant  # noqa: E402
from opacus.data_loader import DPDataLoader  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402
from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # noqa: E402

logging.root.handlers[:] = _root_handlers  # Opacus calls logging.basicConfig() on import: undone
logging.getLogger("opacus.data_loader").addFilter(lambda rec: not rec.getMessage().startswith("First batch is empty"))

__all__ = [
    "DPDataLoader",
    "DPOptimizer",
    "GradSampleModule",
    "PRVAccountant",
    "RDPAccountant",
    "UniformWithReplacementSampler",
    "clipped_sum",
    "drop_clipped_sums",
    "drop_pending_skips",
    "empty_grad_samples",
    "forget_activations",
    "grad_samples_in_param_dtype",
    "remove_hooks",
    "reset_forward_counters",
    "set_grad_sample",
    "accountant_with_history",
]


def drop_pending_skips(optimizer: DPOptimizer) -> None:
    """Forget the skip signals of chunks already accumulated, so the next zero_grad clears the clipped sums."""
    optimizer._step_skip_queue.clear()
    optimizer._is_last_step_skipped = False


def reset_forward_counters(optimizer: DPOptimizer) -> None:
    """The forward passes GradSampleModule counted per parameter for a backward pass that never came."""
    for p in optimizer.params:
        p._forward_counter = 0


def forget_activations(gsm: GradSampleModule) -> None:
    """Drop the activations Opacus saved for a backward pass that never came, and the batch size
    it inferred from them; left on the modules, they would size a later pass's per-sample
    gradients (Opacus' own cleanup removes its hooks and parameter attributes, not these). They
    sit in each module's own __dict__: PEFT wrappers forward attribute look-ups."""
    for module in gsm.modules():
        module.__dict__.pop("activations", None)
        module.__dict__.pop("max_batch_len", None)


def grad_samples_in_param_dtype(optimizer: DPOptimizer) -> None:
    """Under autocast Opacus computes per-sample gradients in the activations' dtype; clipping,
    accumulation and noise then run in the parameters' float32."""
    for p in optimizer.params:
        if getattr(p, "grad_sample", None) is not None and p.grad_sample.dtype != p.dtype:
            p.grad_sample = p.grad_sample.to(p.dtype)


def empty_grad_samples(optimizer: DPOptimizer) -> None:
    """Per-sample gradients of no example, for the step that only noises and applies what the
    chunks accumulated."""
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def set_grad_sample(p: torch.Tensor, rows: torch.Tensor) -> None:
    """Per-sample gradients computed outside the model (canaries, common/canaries.py), for DPOptimizer
    to clip and sum as it does the examples'."""
    p.grad_sample = rows  # type: ignore[attr-defined]


def clipped_sum(p: torch.nn.Parameter) -> torch.Tensor | None:
    """The sum of clipped per-sample gradients DPOptimizer accumulated on `p` (None: nothing yet)."""
    return getattr(p, "summed_grad", None)


def drop_clipped_sums(params) -> None:
    """No clipped sum or gradient may outlive a call on a model the process reuses."""
    for p in params:
        p.summed_grad = None
        p.grad = None


def remove_hooks(gsm: GradSampleModule) -> None:
    """Remove GradSampleModule's hooks and parameter attributes, leaving the wrapped model as it was."""
    gsm._close()


def accountant_with_history(accountant, steps: list[tuple[float, float, int]]):
    """An Opacus accountant that has seen `steps` (noise multiplier, sample rate, steps), without
    replaying them step by step."""
    accountant.history = list(steps)
    return accountant
