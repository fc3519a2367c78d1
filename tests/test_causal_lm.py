"""Causal-LM instruction tuning (issue 7), with tiny causal LMs built here from a config.

No pre-trained causal LM can be downloaded in this environment, so the models are a 2-layer
GPT-2 and a 2-layer Llama with random weights and the packaged MiniLM tokenizer, saved to a
temporary directory and loaded through the same `model` path users give. Covers: the loss
mask, packing, LoRA targets per architecture, refusals (not a causal LM; 4-bit or bf16
without a GPU), a 3-client federated run lowering held-out loss with generated samples, DP
on this task, and export (merged model and adapter give the same logits).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from common.config import FedtuneConfig
from common.data import TextDataset, load_instructions
from common.errors import ConfigError, DataError
from common.lm import IGNORE, build_lora_causal_lm, encode_example, encode_lm, pack, prompt_text
from common.task import task_for
from common.model import get_adapter_state, load_tokenizer
from common.train import batch_loss, collate, evaluate_lm
from tests.conftest import save_tiny_gpt2, save_tiny_llama
from tests.invariants import check_run_invariants
from tests.procs import fedtune

pytestmark = pytest.mark.minutes(3)  # two end-to-end federations; see tests/conftest.py



@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def lm_config(model: str, **changes) -> FedtuneConfig:
    return FedtuneConfig(task="causal-lm", model=model, max_length=48, **changes)


def test_loss_mask_covers_the_response_and_eos_only(tiny_gpt2):
    tokenizer = load_tokenizer(tiny_gpt2)
    ids, labels = encode_example(tokenizer, "alpaca", "What is AI?", "", "A field of science.", 64)
    prompt = tokenizer(prompt_text(tokenizer, "alpaca", "What is AI?"), add_special_tokens=False)["input_ids"]
    response = tokenizer("A field of science.", add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    assert ids == prompt + response
    assert labels == [IGNORE] * len(prompt) + response

    # The loss does not depend on the logits at positions that predict prompt tokens.
    data = TextDataset(texts=["What is AI?", "Hi"], labels=["all", "all"],
                       columns={"input": ["", ""], "response": ["A field of science.", "Hello there, friend."]})
    batch = collate(encode_lm(data, tokenizer, template="alpaca", max_length=64, packing=False), [0, 1],
                    tokenizer.pad_token_id)
    logits = torch.randn(*batch["input_ids"].shape, len(tokenizer), requires_grad=True)
    batch_loss(logits, batch["labels"]).backward()
    predicts_labelled = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_labelled[:, :-1] = batch["labels"][:, 1:] != IGNORE
    assert logits.grad[~predicts_labelled].abs().max() == 0
    assert (logits.grad[predicts_labelled].abs().sum(dim=-1) > 0).all()


def test_long_prompts_are_cut_from_the_left_and_keep_part_of_the_response(tiny_gpt2):
    tokenizer = load_tokenizer(tiny_gpt2)
    prompt = tokenizer(prompt_text(tokenizer, "plain", "word " * 200), add_special_tokens=False)["input_ids"]
    response = tokenizer("the answer is here", add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    ids, labels = encode_example(tokenizer, "plain", "word " * 200, "", "the answer is here", 32)
    assert ids == prompt[-(32 - len(response)):] + response  # the whole (short) response, the prompt's end
    assert labels == [IGNORE] * (32 - len(response)) + response
    long_response = "many words " * 100
    ids, labels = encode_example(tokenizer, "plain", "word " * 200, "", long_response, 32)
    assert len(ids) == 32 and sum(label != IGNORE for label in labels) == 32 - len(prompt[-(32 - 8):]) == 8


def test_packing_fills_blocks_and_keeps_every_label():
    ids = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    labels = [[IGNORE, 2, 3], [IGNORE, 5], [IGNORE, IGNORE, 8, 9]]
    packed_ids, packed_labels = pack(ids, labels, 4)
    assert packed_ids == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert packed_labels == [[IGNORE, 2, 3, IGNORE], [5, IGNORE, IGNORE, 8], [9]]


def test_lora_targets_follow_the_architecture_and_can_be_overridden(tiny_gpt2, tiny_llama):
    gpt2 = get_adapter_state(task_for(lm_config(tiny_gpt2)).model(0))
    assert gpt2 and all("lora_" in k and "c_attn" in k for k in gpt2)
    llama = get_adapter_state(task_for(lm_config(tiny_llama)).model(0))
    assert {k.split(".")[-4] for k in llama} == {"q_proj", "v_proj"}
    mlp = get_adapter_state(task_for(lm_config(tiny_llama, lora_target_modules="gate_proj,up_proj")).model(0))
    assert {k.split(".")[-4] for k in mlp} == {"gate_proj", "up_proj"}
    with pytest.raises(ConfigError, match="lora-target-modules"):
        task_for(lm_config(tiny_gpt2, lora_target_modules="no_such_module")).model(0)


def test_refusals_name_what_was_expected(tiny_gpt2):
    with pytest.raises(ConfigError, match="expects a causal language model.*BertModel"):
        task_for(FedtuneConfig(task="causal-lm")).model(0)
    for changes in ({"load_in": "4bit"}, {"load_in": "8bit"}, {"load_in": "4bit", "device": "cpu"}):
        if torch.cuda.is_available() and changes.get("device") != "cpu":
            continue  # tests/test_gpu.py loads them there
        with pytest.raises(ConfigError, match="expected a CUDA GPU for bitsandbytes"):
            task_for(lm_config(tiny_gpt2, **changes)).model(0)
    from common.device import check_precision, resolve_device  # compute-dtype: refused where training runs

    with pytest.raises(ConfigError, match="compute-dtype = 'bfloat16': expected a CUDA device for mixed precision"):
        check_precision(resolve_device("cpu"), lm_config(tiny_gpt2, compute_dtype="bfloat16").compute_dtype)
    with pytest.raises(ConfigError, match="only used with task = 'causal-lm'"):
        FedtuneConfig(load_in="4bit")
    with pytest.raises(ConfigError, match="packing: expected false with dp-sample"):
        lm_config(tiny_gpt2, packing=True, dp_sample=True, dp_noise_multiplier=1.0)


def test_instruction_files_and_the_packaged_pairs(tmp_path):
    pairs = load_instructions("packaged:chatterbot")
    assert len(pairs) > 1000 and len(set(pairs.labels)) >= 10  # categories: a natural non-IID split
    assert pairs.texts[0] == "What is AI?" and pairs.columns["response"][0].startswith("Artificial Intelligence")
    good = tmp_path / "good.jsonl"
    good.write_text('{"q": "Add 2 and 2", "ctx": "", "a": "4"}\n{"q": "Name a colour", "a": "Blue"}\n')
    data = load_instructions(str(good), instruction_column="q", input_column="ctx", response_column="a")
    assert data.texts == ["Add 2 and 2", "Name a colour"] and data.columns["response"] == ["4", "Blue"]
    assert data.columns["input"] == ["", ""] and data.labels == ["all", "all"]
    with pytest.raises(DataError, match=r"expected columns \['instruction', 'response'\].*found columns \['q', 'ctx', 'a'\]"):
        load_instructions(str(good))
    empty = tmp_path / "empty.csv"
    empty.write_text("instruction,response\nHello,\n")
    with pytest.raises(DataError, match="rows \\[1\\] have an empty one"):
        load_instructions(str(empty))


def test_dp_sgd_trains_the_causal_lm_adapter(tiny_gpt2):
    """RELIABILITY privacy checks on this task: a DP step changes the LoRA weights, leaves them
    finite, and the mechanism records the loader's real sample rate."""
    from common.dp_train import dp_train

    cfg = lm_config(tiny_gpt2)
    tokenizer = load_tokenizer(tiny_gpt2)
    data = load_instructions("packaged:chatterbot").subset(range(64))
    encoded = encode_lm(data, tokenizer, template="auto", max_length=48, packing=False)
    model = build_lora_causal_lm(tiny_gpt2, r=4, alpha=8.0, dropout=0.0, target_modules=(), seed=1)
    before = get_adapter_state(model)
    result, mechanism = dp_train(model, encoded, pad_id=tokenizer.pad_token_id, steps=3, batch_size=16,
                                 learning_rate=cfg.learning_rate, weight_decay=0.0, noise_multiplier=1.0,
                                 clipping_norm=1.0, seed=3)
    after = get_adapter_state(model)
    assert mechanism.sample_rate == pytest.approx(16 / 64) and mechanism.steps == 3
    assert all(np.isfinite(v).all() for v in after.values())
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert math.isfinite(result.loss)


@pytest.mark.slow
def test_three_clients_two_rounds_lower_heldout_loss_and_export_round_trips(tiny_gpt2, tmp_path):
    run = tmp_path / "run"
    result = fedtune("simulate", "--num-clients", "3", "-c", "task=causal-lm", "-c", f'model={tiny_gpt2}',
                     "-c", "num-server-rounds=2", "-c", "local-steps=15", "-c", "batch-size=16",
                     "-c", "learning-rate=0.01", "-c", "max-length=48", "-c", "max-heldout-examples=120",
                     "-c", "partitioner=natural", "-c", "partition-column=category", "-c", "lora-r=8",
                     "-c", "max-new-tokens=8", "-c", f"run-dir={run}", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    rows = check_run_invariants(run, 2)
    losses = [r["heldout_loss"] for r in rows]
    print(f"causal-LM held-out loss per round: {[round(x, 4) for x in losses]}")
    assert losses[2] < losses[1] < losses[0]
    assert all(r["heldout_perplexity"] == pytest.approx(math.exp(r["heldout_loss"])) for r in rows)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["round"] for s in samples}) == [0, 1, 2] and all(isinstance(s["response"], str) for s in samples)

    # Export: the merged model (transformers only) and the adapter (PEFT) give the same logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for flag, name in (("--merged", "merged"), (None, "adapter")):
        done = fedtune("export", str(run), str(tmp_path / name), *([flag] if flag else []), timeout=120)
        assert done.returncode == 0, done.stdout[-2000:]
    again = fedtune("export", str(run), str(tmp_path / "merged"), "--merged", timeout=120)
    assert again.returncode == 2 and "refusing to overwrite" in again.stdout  # nothing of the first export lost
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2),
                                             tmp_path / "adapter").eval()
    ids = load_tokenizer(tiny_gpt2)("What is AI?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, base, atol=1e-4)  # the adapter changed something


def test_perplexity_is_the_exponential_of_the_token_mean_loss(tiny_gpt2):
    tokenizer = load_tokenizer(tiny_gpt2)
    data = load_instructions("packaged:chatterbot").subset(range(20))
    encoded = encode_lm(data, tokenizer, template="auto", max_length=48, packing=False)
    model = task_for(lm_config(tiny_gpt2)).model(0)
    res = evaluate_lm(model, encoded, pad_id=tokenizer.pad_token_id, batch_size=8)
    assert res["tokens"] == sum(sum(1 for t in lab[1:] if t != IGNORE) for lab in encoded.labels)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    assert res["loss"] == pytest.approx(math.log(len(tokenizer)), rel=0.1)  # a random model: near uniform


@pytest.mark.slow
def test_sample_level_dp_federated_causal_lm_run_passes_the_audit(tiny_gpt2, tmp_path):
    """DP on this task end to end: DP-SGD on every client, the privacy ledger, `fedtune audit`."""
    run = tmp_path / "run"
    result = fedtune("simulate", "--num-clients", "2", "-c", "task=causal-lm", "-c", f"model={tiny_gpt2}",
                     "-c", "num-server-rounds=1", "-c", "local-steps=3", "-c", "batch-size=16", "-c", "max-length=32",
                     "-c", "max-train-examples=300", "-c", "max-heldout-examples=40", "-c", "partitioner=iid",
                     "-c", "dp-sample=true", "-c", "dp-noise-multiplier=1.0", "-c", "fraction-evaluate=0.0",
                     "-c", "max-new-tokens=4", "-c", f"run-dir={run}", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    check_run_invariants(run, 1)
    entries = [json.loads(line) for line in (run / "privacy-ledger.jsonl").read_text().splitlines()]
    assert len([e for e in entries if e.get("status") == "trained"]) == 2, entries
    audit = fedtune("audit", str(run), timeout=120)
    assert audit.returncode == 0, audit.stdout[-3000:]
    assert (run / "audit-accuracy.png").is_file()


def test_evaluate_scores_a_causal_lm_run_per_response_token(tiny_gpt2, tmp_path):
    """`fedtune evaluate` on a causal-LM run: loss per response token and perplexity, as the
    server's evaluation computes them, and the perturbation of the instructions."""
    from common.task import task_for
    from server.checkpoint import Checkpoint, save_checkpoint
    from server.tools.scoring import evaluate_run

    cfg = lm_config(tiny_gpt2, data="packaged:chatterbot", instruction_column="instruction")
    model = task_for(cfg).model(0)
    save_checkpoint(tmp_path / "run" / "checkpoints", Checkpoint(
        server_round=1, adapter=get_adapter_state(model), strategy={}, meta={"config": cfg.to_run_config()}))
    data = tmp_path / "pairs.jsonl"
    pairs = [("What is AI?", "A field of science."), ("Say hello", "Hello there."), ("Name a colour", "Blue.")]
    data.write_text("".join(json.dumps({"instruction": i, "response": r}) + "\n" for i, r in pairs))
    folder, report = evaluate_run(tmp_path / "run", str(data), out=tmp_path / "out", perturbations=["typo"])
    tokenizer = load_tokenizer(cfg.model)
    direct = evaluate_lm(model, task_for(cfg).encode(load_instructions(str(data)), tokenizer, None, where="x"),
                         pad_id=tokenizer.pad_token_id, batch_size=8)
    assert report["task"] == "causal-lm" and report["examples"] == 3 and report["tokens"] == direct["tokens"]
    assert report["loss"] == pytest.approx(direct["loss"]) and report["perplexity"] == pytest.approx(math.exp(direct["loss"]))
    assert set(report["perturbations"]["typo"]) == {"loss", "perplexity", "loss_change", "perplexity_change"}
    assert sorted(p.name for p in folder.iterdir()) == ["evaluation.json"]
