"""Causal language models for instruction tuning: loading with LoRA, prompts, loss masks,
packing, generation and export (no Flower here).

An example is an instruction (plus optional input) and a response. The prompt is written
with the tokenizer's chat template when it has one (prompt-template = auto), else with the
Alpaca layout; the response follows it and ends with the EOS token. Token labels are -100 on
the prompt and on padding, so the loss covers only the response.

common/task.py's CausalLM reaches these; the apps reach them through it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from peft import PeftModel, TaskType
from transformers import AutoConfig, AutoModelForCausalLM

from common.data import TextDataset
from common.errors import ConfigError, DataError
from common.model import resolve_model_path, with_lora
from common.train import IGNORE_INDEX as IGNORE
from common.train import EncodedData

ALPACA = (
    "Below is an instruction that describes a task{with_input}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def check_causal_lm(model: str) -> None:
    """Refuse, before loading weights, a model that is not a causal LM (e.g. the packaged BERT)."""
    config = AutoConfig.from_pretrained(resolve_model_path(model))
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a.endswith(CAUSAL_SUFFIXES) for a in architectures):
        raise ConfigError(
            f"model: task = 'causal-lm' expects a causal language model (an architecture ending in "
            f"{' or '.join(CAUSAL_SUFFIXES)}, e.g. GPT-2, Llama, Qwen, Mistral), got {model!r} with "
            f"architectures {architectures}"
        )


def build_lora_causal_lm(
    model: str,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: tuple[str, ...],
    seed: int,
    freeze_a: bool = False,
    load_in: str = "none",
    device: str | None = None,
    compute_dtype: str = "float32",
) -> PeftModel:
    """The base causal LM, loaded once per process, wrapped with a LoRA adapter.

    LoRA targets PEFT's default modules for the architecture (c_attn for GPT-2, q_proj and
    v_proj for Llama, Qwen and Mistral) unless `target_modules` names others.

    With `load_in` = 8bit or 4bit (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314)
    the frozen base is quantized by bitsandbytes as it loads onto `device` (a CUDA device; 4-bit
    is NF4 with double quantization, computing in `compute_dtype`) and prepared by PEFT's
    `prepare_model_for_kbit_training` (norms in float32); the LoRA weights stay float32, so the
    adapter has the same names, shapes and dtype as over a full-precision base.
    """
    check_causal_lm(model)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if load_in == "none":
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(model), dtype=torch.float32)
    else:
        if device is None:
            raise ConfigError(f"load-in = {load_in}: expected a CUDA device to quantize onto, got none")
        base = quantized_base(model, load_in, torch.device(device), compute_dtype)
    torch.manual_seed(seed)  # LoRA's A matrices: the same whichever way the base was loaded (lora-freeze-a)
    peft_model = with_lora(
        base,
        model,
        task_type=TaskType.CAUSAL_LM,
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_modules=target_modules,
        freeze_a=freeze_a,
    )
    if load_in == "4bit":
        set_4bit_compute_dtype(peft_model, getattr(torch, compute_dtype))
    return peft_model


load_lora_causal_lm = functools.lru_cache(maxsize=2)(build_lora_causal_lm)  # once per process, as for classification


def quantized_base(model: str, load_in: str, device: torch.device, compute_dtype: str):
    """The frozen base in 8 or 4 bits on a CUDA device (checked by Task.device), ready for LoRA training."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    if load_in == "4bit":
        # Computing in float32 while LoRA is attached: PEFT rounds new LoRA weights through a 4-bit
        # layer's compute dtype, so a bfloat16 one would give other frozen A matrices than a
        # full-precision base (lora-freeze-a, export); set_4bit_compute_dtype switches it after.
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    base = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model),
        quantization_config=quantization,
        dtype=torch.float32,
        device_map={"": device.index or 0},
    )
    # Without gradient checkpointing: it would run each layer's forward twice under DP-SGD's
    # per-sample-gradient hooks; activation memory is bounded by batch-size and max-length.
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


def set_4bit_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The dtype bitsandbytes' 4-bit layers dequantize to and multiply in (compute-dtype)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype


def prompt_text(tokenizer, template: str, instruction: str, extra: str = "") -> str:
    """The prompt for one example, ending where the response begins."""
    if template == "auto" and getattr(tokenizer, "chat_template", None):
        content = instruction if not extra else f"{instruction}\n\n{extra}"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    if template == "plain":
        return f"{instruction}\n{extra}\n" if extra else f"{instruction}\n"
    return ALPACA.format(
        with_input=", paired with an input that provides further context" if extra else "",
        instruction=instruction,
        input_block=f"### Input:\n{extra}\n\n" if extra else "",
    )


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def eos_id(tokenizer) -> int:
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if token is None:
        raise ConfigError(
            f"model: expected a tokenizer with an EOS (or SEP) token, {tokenizer.name_or_path!r} has none"
        )
    return token


def encode_example(
    tokenizer, template: str, instruction: str, extra: str, response: str, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example; the prompt is cut from the left if the response
    would otherwise keep fewer than a quarter of max_length tokens."""
    prompt = _ids(tokenizer, prompt_text(tokenizer, template, instruction, extra))
    answer = _ids(tokenizer, response) + [eos_id(tokenizer)]
    keep_answer = min(len(answer), max(max_length - len(prompt), max_length // 4, 1))
    keep_prompt = min(len(prompt), max_length - keep_answer)
    prompt = prompt[len(prompt) - keep_prompt :] if keep_prompt else []
    answer = answer[:keep_answer]
    return prompt + answer, [IGNORE] * len(prompt) + answer


def encode_lm(data: TextDataset, tokenizer, *, template: str, max_length: int, packing: bool) -> EncodedData:
    """Tokenize once per (data set, tokenizer, template, max_length, packing); kept on the data set."""
    key = ("encoded-lm", tokenizer.name_or_path, template, max_length, packing)
    if key not in data.cache:
        if "response" not in data.columns:
            raise DataError(f"{data.source}: expected instruction data (a response column) for task = 'causal-lm'")
        pairs = [
            encode_example(tokenizer, template, instruction, extra, response, max_length)
            for instruction, extra, response in zip(
                data.texts, data.columns["input"], data.columns["response"], strict=True
            )
        ]
        ids, labels = [p[0] for p in pairs], [p[1] for p in pairs]
        if packing:
            ids, labels = pack(ids, labels, max_length)
        data.cache[key] = EncodedData(input_ids=ids, labels=labels, token_labels=True)
    return data.cache[key]


def pack(ids: list[list[int]], labels: list[list[int]], block: int) -> tuple[list[list[int]], list[list[int]]]:
    """Concatenate examples and cut the stream into blocks of `block` tokens (the last may be
    shorter). Each token keeps its label, so prompts stay masked; attention spans example
    boundaries within a block, as in the usual naive packing."""
    flat_ids = [t for seq in ids for t in seq]
    flat_labels = [t for seq in labels for t in seq]
    # The first token of each block has no predecessor in it: that label is never used.
    blocks = range(0, len(flat_ids), block)
    return [flat_ids[i : i + block] for i in blocks], [flat_labels[i : i + block] for i in blocks]


@torch.no_grad()
def generate(
    model: PeftModel, tokenizer, prompts: list[str], *, template: str, max_new_tokens: int, max_length: int
) -> list[str]:
    """Greedy continuations of each prompt (one at a time, so no left-padding is needed)."""
    model.eval()
    eos = eos_id(tokenizer)
    outputs = []
    for text in prompts:
        prompt = _ids(tokenizer, prompt_text(tokenizer, template, text))[-max(1, max_length - max_new_tokens) :]
        ids = torch.tensor([prompt], dtype=torch.long)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        outputs.append(tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip())
    return outputs


def export_model(peft_model: PeftModel, tokenizer, out: str | Path, *, merged: bool) -> Path:
    """Save the adapter alone (PEFT format), or the base with the adapter merged into it as a
    standard transformers model directory; the tokenizer goes alongside either way."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if merged:
        peft_model.merge_and_unload().save_pretrained(str(out))
    else:
        peft_model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def sample_prompts(spec: str, heldout: TextDataset) -> list[str]:
    prompts = [p.strip() for p in spec.split("|") if p.strip()]
    return prompts or list(dict.fromkeys(heldout.texts))[:3]


def choice_list(spec: str) -> tuple[str, ...]:
    """The closed set of responses a `choices` setting names ('|'-separated)."""
    return tuple(c.strip() for c in spec.split("|") if c.strip())


@dataclass
class ChoiceData(EncodedData):
    """Encoded instruction data whose responses come from a closed set: besides the training encoding,
    each example's prompt alone (cut from the left to leave room for the longest choice), the token ids
    of each choice followed by EOS, and the index of each example's own response among the choices."""

    prompts: list[list[int]] = field(default_factory=list)
    choices: tuple[str, ...] = ()
    options: list[list[int]] = field(default_factory=list)
    eos: int = 0
    gold: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def encode_choices(
    data: TextDataset, tokenizer, choices: tuple[str, ...], *, template: str, max_length: int, where: str
) -> ChoiceData:
    """`encode_lm` plus the prompts and choices `score_choices` reads; a response outside the
    choices is refused, naming it."""
    key = ("encoded-choices", tokenizer.name_or_path, template, max_length, choices)
    if key not in data.cache:
        base = encode_lm(data, tokenizer, template=template, max_length=max_length, packing=False)
        index = {c: i for i, c in enumerate(choices)}
        unknown = sorted({r.strip() for r in data.columns["response"]} - set(index))
        if unknown:
            raise DataError(
                f"{where}: expected every response among the choices {list(choices)}, got "
                f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
            )
        options = [_ids(tokenizer, c) + [eos_id(tokenizer)] for c in choices]
        room = max(1, max_length - max(map(len, options)))
        prompts = [
            _ids(tokenizer, prompt_text(tokenizer, template, instruction, extra))[-room:]
            for instruction, extra in zip(data.texts, data.columns["input"], strict=True)
        ]
        gold = np.array([index[r.strip()] for r in data.columns["response"]], dtype=np.int64)
        data.cache[key] = ChoiceData(
            input_ids=base.input_ids,
            labels=base.labels,
            token_labels=True,
            prompts=prompts,
            choices=choices,
            options=options,
            eos=eos_id(tokenizer),
            gold=gold,
        )
    return data.cache[key]


def _cache_keyword(model: torch.nn.Module) -> str:
    """The forward argument that takes a KV cache: `cache` from transformers 5.2x, `past_key_values` before."""
    import inspect

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@torch.no_grad()
def score_choices(
    model: torch.nn.Module,
    data: ChoiceData,
    tokenizer,
    *,
    pad_id: int,
    batch_size: int,
    compute_dtype: str = "float32",
    progress=None,
) -> dict:
    """Multiple-choice scoring of a causal LM, the usual way: each choice's log-likelihood (its tokens
    and the EOS after them) given the prompt; the prediction is the most likely choice. Besides,
    `exact_match`: the share of examples whose greedy answer (up to the longest choice's length) is
    their own response, after trimming whitespace and case.

    Each batch runs its prompts once, left-padded with explicit positions, and continues the cache
    with every choice, so k choices cost one prompt pass and k short continuations.
    """
    from common.device import autocast, model_device
    from common.metrics import confusion_matrix
    from common.train import macro_f1

    model.eval()
    device, k = model_device(model), len(data.options)
    n = len(data.prompts)
    width = max(map(len, data.options))
    option_ids = torch.full((k, width), pad_id, dtype=torch.long)
    option_mask = torch.zeros((k, width), dtype=torch.long)
    for j, option in enumerate(data.options):
        option_ids[j, : len(option)] = torch.tensor(option)
        option_mask[j, : len(option)] = 1
    targets = option_ids.clone()
    targets[option_mask == 0] = 0
    scores = np.zeros((n, k))
    greedy = np.zeros(n, dtype=bool)
    order = np.argsort([len(p) for p in data.prompts], kind="stable")
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        ids, mask = _left_padded([data.prompts[i] for i in rows], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        b = len(rows)
        with autocast(device, compute_dtype):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True,
                logits_to_keep=1,  # the last position only: projecting every token onto the vocabulary is a fifth
            )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (b, vocab): each choice's first token
        answers = greedy_answers(model, out.past_key_values, first, mask, data, tokenizer, compute_dtype)
        own = [data.choices[data.gold[r]].casefold() for r in rows]
        greedy[rows] = [a.strip().casefold() == o for a, o in zip(answers, own, strict=True)]
        cache = out.past_key_values
        cache.batch_repeat_interleave(k)
        lengths = mask.sum(-1).repeat_interleave(k)
        with autocast(device, compute_dtype):
            cont = model(
                input_ids=option_ids.repeat(b, 1).to(device),
                attention_mask=torch.cat([mask.repeat_interleave(k, 0), option_mask.repeat(b, 1).to(device)], dim=1),
                position_ids=lengths[:, None] + torch.arange(width, device=device),
                **{_cache_keyword(model): cache},
                use_cache=False,
            )
        rest = torch.log_softmax(cont.logits[:, :-1].float(), dim=-1)  # (b*k, width-1, vocab): tokens 2..
        picked = rest.gather(-1, targets.repeat(b, 1)[:, 1:, None].to(device)).squeeze(-1)
        total = picked.mul(option_mask.repeat(b, 1)[:, 1:].to(device)).sum(-1).view(b, k)
        total += first.gather(-1, option_ids[:, 0].repeat(b, 1).to(device))
        scores[rows] = total.cpu().numpy()
        if progress is not None:
            progress(min(start + batch_size, n), n)
    preds = scores.argmax(axis=1)
    return {
        "accuracy": float((preds == data.gold).mean()) if n else float("nan"),
        "macro_f1": macro_f1(data.gold, preds) if n else float("nan"),
        "exact_match": float(greedy.mean()) if n else float("nan"),
        "confusion": confusion_matrix(data.gold, preds, k),
        "choice_log_likelihood": scores,
    }


def greedy_answers(model, cache, first, mask, data: ChoiceData, tokenizer, compute_dtype: str) -> list[str]:
    """Each prompt's greedy answer, up to the longest choice's length and cut at EOS, decoded. It continues
    a copy of the prompts' cache from `first` (the last position's log-probabilities), so the prompts are
    not run again; the same tokens as `model.generate` on each prompt alone."""
    import copy

    from common.device import autocast, model_device

    device, width = model_device(model), max(map(len, data.options))
    cache = copy.deepcopy(cache)
    token = first.argmax(-1)
    answer, done = [token], token == data.eos
    position = mask.sum(-1)
    for _ in range(width - 1):
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        with autocast(device, compute_dtype):
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=position[:, None],
                **{_cache_keyword(model): cache},
                use_cache=True,
            )
        cache, position = out.past_key_values, position + 1
        token = torch.where(done, torch.full_like(token, data.eos), out.logits[:, -1].argmax(-1))
        answer.append(token)
        done = done | (token == data.eos)
    return tokenizer.batch_decode(torch.stack(answer, dim=1).cpu(), skip_special_tokens=True)
