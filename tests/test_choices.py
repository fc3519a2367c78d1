"""Causal-LM multiple-choice scoring (`choices`, issue 41), on the tiny random causal LMs of
tests/test_causal_lm.py: the batched, cache-continuing scorer gives the log-likelihoods and greedy
answers that running each prompt alone gives; a response outside the choices, too few choices and
choices with another task or with packing are refused, naming what was expected.

RELIABILITY.md: bad input (config, data files); invariant: a score is what it says it is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import FedtuneConfig, parse_run_config
from common.data import TextDataset
from common.errors import ConfigError, DataError
from common.lm import _left_padded, build_lora_causal_lm, encode_choices, greedy_answers, score_choices
from common.model import load_tokenizer
from tests.conftest import save_tiny_gpt2, save_tiny_llama

CHOICES = ("yes", "no", "maybe later")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> str:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


def questions(n: int = 7) -> TextDataset:
    """Prompts of different lengths (so the batch is left-padded), each with a response among CHOICES."""
    words = "the quick brown fox jumps over a lazy dog while it rains on the old town".split()
    texts = [" ".join(words[: 2 + 3 * i]) + "?" for i in range(n)]
    return TextDataset(texts=texts, labels=["all"] * n,
                       columns={"input": [""] * n, "response": [CHOICES[i % 3] for i in range(n)]})


def model_of(path: str, seed: int = 3):
    model = build_lora_causal_lm(path, r=4, alpha=8.0, dropout=0.0, target_modules=(), seed=0)
    torch.manual_seed(seed)  # B away from zero, so the adapter takes part in what is scored
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_batched_choice_scores_are_each_sequences_own_log_likelihood(which, request):
    path = request.getfixturevalue(which)
    tokenizer, model = load_tokenizer(path), model_of(path)
    data = encode_choices(questions(), tokenizer, CHOICES, template="alpaca", max_length=80, where="test")
    assert len({len(p) for p in data.prompts}) > 3  # left padding is exercised
    assert len({len(o) for o in data.options}) > 1  # and choices of different lengths
    result = score_choices(model, data, tokenizer, pad_id=tokenizer.pad_token_id, batch_size=3)
    with torch.no_grad():
        for i, prompt in enumerate(data.prompts):
            for j, option in enumerate(data.options):
                logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + option])).logits[0].float(), -1)
                alone = sum(logp[len(prompt) - 1 + t, token].item() for t, token in enumerate(option))
                assert result["choice_log_likelihood"][i, j] == pytest.approx(alone, abs=1e-4)
    predicted = result["choice_log_likelihood"].argmax(axis=1)
    assert result["accuracy"] == pytest.approx(float(np.mean(predicted == data.gold)))
    assert result["confusion"].sum() == len(data.prompts)
    assert np.trace(result["confusion"]) == int(np.sum(predicted == data.gold))


def test_greedy_answers_are_what_generate_gives_each_prompt_alone(tiny_llama):
    tokenizer, model = load_tokenizer(tiny_llama), model_of(tiny_llama)
    data = encode_choices(questions(), tokenizer, CHOICES, template="alpaca", max_length=80, where="test")
    ids, mask = _left_padded(data.prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        batched = greedy_answers(model, out.past_key_values, first, mask, data, tokenizer, "float32")
        width = max(map(len, data.options))
        for prompt, answer in zip(data.prompts, batched, strict=True):
            alone = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                   dtype=torch.long), max_new_tokens=width, do_sample=False, eos_token_id=data.eos,
                                   pad_token_id=tokenizer.pad_token_id)
            assert answer == tokenizer.decode(alone[0, len(prompt):], skip_special_tokens=True)


def test_a_model_taught_the_answers_scores_one_and_a_shuffled_key_scores_what_still_matches(tiny_llama):
    """Teach the tiny model each question's response (its whole weights, Adam, 150 steps): its
    greedy answers are then the responses, ending with EOS, so exact_match and accuracy are 1; with the
    responses rotated, both fall to the share of examples whose response did not change."""
    from common.train import batch_loss, collate

    tokenizer, model = load_tokenizer(tiny_llama), model_of(tiny_llama)
    data = questions(6)
    encoded = encode_choices(data, tokenizer, CHOICES, template="alpaca", max_length=80, where="test")
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = collate(encoded, range(len(encoded)), tokenizer.pad_token_id)
    model.train()
    for _ in range(150):
        optimizer.zero_grad()
        batch_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                   batch["labels"]).backward()
        optimizer.step()
    result = score_choices(model, encoded, tokenizer, pad_id=tokenizer.pad_token_id, batch_size=4)
    assert (result["exact_match"], result["accuracy"]) == (1.0, 1.0)
    rotated = [CHOICES[(i + 1) % 3] if i % 2 else CHOICES[i % 3] for i in range(6)]  # odd rows change
    other = TextDataset(texts=data.texts, labels=data.labels, columns={"input": data.columns["input"],
                                                                        "response": rotated})
    encoded = encode_choices(other, tokenizer, CHOICES, template="alpaca", max_length=80, where="test")
    result = score_choices(model, encoded, tokenizer, pad_id=tokenizer.pad_token_id, batch_size=4)
    assert (result["exact_match"], result["accuracy"]) == (0.5, 0.5)


def test_a_response_outside_the_choices_is_refused_naming_it(tiny_llama):
    data = questions()
    data.columns["response"][2] = "perhaps"
    with pytest.raises(DataError, match=r"expected every response among the choices .*'perhaps'"):
        encode_choices(data, load_tokenizer(tiny_llama), CHOICES, template="alpaca", max_length=80, where="test")


@pytest.mark.parametrize("changes, message", [
    ({"choices": "yes"}, "at least 2 different"),
    ({"choices": "yes|no|yes"}, "at least 2 different"),
    ({"task": "classification", "choices": "yes|no"}, "only used with task = 'causal-lm'"),
    ({"choices": "yes|no", "packing": True}, "packing: expected false with choices"),
    ({"best-metric": "accuracy"}, "best-metric: expected loss or auto .* no choices"),
])
def test_choices_settings_that_cannot_work_are_refused(changes, message):
    run = {**FedtuneConfig(task="causal-lm").to_run_config(), **changes}
    with pytest.raises(ConfigError, match=message):
        parse_run_config(run)


def test_with_choices_the_best_round_can_be_picked_by_accuracy():
    cfg = parse_run_config({**FedtuneConfig(task="causal-lm").to_run_config(), "choices": "yes|no",
                            "best-metric": "macro-f1"})
    assert cfg.best_column == ("heldout_macro_f1", True)
