"""Where a process trains and evaluates: the `device` setting and its rules.

    auto      CUDA (the first GPU) when torch sees one, else the CPU
    cpu       the CPU
    cuda      the first GPU; refused where torch sees none
    cuda:N    GPU N; refused where torch sees fewer

Model, batches, optimizer state and DP per-sample gradients live on that device; what leaves a
process (adapters on the wire, checkpoints, metrics) is always CPU numpy, so CPU and GPU
clients join one federation with the same adapter format.
"""

from __future__ import annotations

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
        raise ConfigError(f"{where} = {spec!r}: expected a CUDA GPU, but torch sees none (torch.cuda.is_available() "
                          "is False: a CPU-only torch build, or no driver); use device = 'auto' or 'cpu'")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{where} = {spec!r}: expected a GPU index below {torch.cuda.device_count()} (the GPUs torch "
                          f"sees), got {index}")
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
