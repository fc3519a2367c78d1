"""Where a process trains and evaluates: the `device` setting and its rules.

    auto      CUDA (the first GPU) when torch sees one, else the CPU
    cpu       the CPU
    cuda      the first GPU; refused where torch sees none
    cuda:N    GPU N; refused where torch sees fewer

With compute-dtype bfloat16 or float16 (CUDA only) the forward passes autocast to it; the
parameters and optimizer state stay float32.

Model, batches, optimizer state and DP per-sample gradients live on that device; what leaves a
process (adapters on the wire, checkpoints, metrics) is always CPU numpy, so CPU and GPU
clients join one federation with the same adapter format.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from common.config import check_device_spec
from common.errors import ConfigError


def resolve_device(spec: str, *, where: str = "device") -> torch.device:
    """The torch device `spec` names on this machine, or a ConfigError that says what is missing."""
    check_device_spec(spec, where=where)
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{where} = {spec!r}: expected a CUDA GPU, but torch sees none (torch.cuda.is_available() "
            "is False: a CPU-only torch build, or no driver); use device = 'auto' or 'cpu'"
        )
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"{where} = {spec!r}: expected a GPU index below {torch.cuda.device_count()} (the GPUs torch "
            f"sees), got {index}"
        )
    return torch.device(f"cuda:{index}")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def noise_generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded generator on the device the DP noise is drawn on (Opacus draws it beside the
    gradients; a CPU generator cannot draw CUDA noise)."""
    return torch.Generator(device=device).manual_seed(seed)


def check_precision(device: torch.device, compute_dtype: str, load_in: str = "none") -> None:
    """Mixed precision and 8/4-bit bases (QLoRA) are for CUDA devices: refuse them, saying so,
    where training runs on a CPU, and refuse QLoRA where bitsandbytes is missing."""
    if compute_dtype != "float32" and device.type != "cuda":
        raise ConfigError(
            f"compute-dtype = {compute_dtype!r}: expected a CUDA device for mixed precision, got "
            f"{device.type} (device resolves to it here); use compute-dtype = 'float32' on a CPU"
        )
    problems = quantization_problems(device, load_in)
    if problems:
        raise ConfigError(f"load-in = {load_in!r}: " + "; ".join(problems) + "; or use load-in = 'none'")


def quantization_problems(device: torch.device, load_in: str, *, bitsandbytes: bool | None = None) -> list[str]:
    """What this process lacks for an 8/4-bit base: a CUDA device and the bitsandbytes package
    (the `qlora` extra). `bitsandbytes` overrides the package lookup (tests)."""
    if load_in == "none":
        return []
    if bitsandbytes is None:
        bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    problems = []
    if device.type != "cuda":
        problems.append(
            f"expected a CUDA GPU for bitsandbytes' 8/4-bit kernels, but device resolves to "
            f"{device.type} here (torch.cuda.is_available() is {torch.cuda.is_available()})"
        )
    if not bitsandbytes:
        problems.append("expected the bitsandbytes package, which is not installed (pip install 'fedtune[qlora]')")
    return problems


def autocast(device: torch.device, compute_dtype: str):
    """The forward pass's precision: float32 as is, else torch.autocast to `compute_dtype` (the
    parameters, so the LoRA weights and the optimizer state, stay float32)."""
    if compute_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, compute_dtype))


def grad_scaler(device: torch.device, compute_dtype: str):
    """float16 gradients underflow without loss scaling; bfloat16 and float32 need none."""
    return torch.amp.GradScaler(device.type) if compute_dtype == "float16" else None


# Set by `fedtune simulate` when its clients share a GPU: the share of its memory each may use.
MEMORY_FRACTION_ENV = "FEDTUNE_GPU_MEMORY_FRACTION"


def bound_memory(device: torch.device) -> float | None:
    """Cap this process's share of a shared GPU's memory (simulation), so that one client cannot
    take the memory the others need; returns the share set, or None."""
    share = os.environ.get(MEMORY_FRACTION_ENV)
    if device.type != "cuda" or not share:
        return None
    torch.cuda.set_per_process_memory_fraction(float(share), device)
    return float(share)
