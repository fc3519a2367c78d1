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
from pathlib import Path

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
