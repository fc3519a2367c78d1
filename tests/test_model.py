"""Model, adapter state and local training, with the packaged real weights.

RELIABILITY: I2 schema (keys, shapes, dtypes), only adapter keys leave a client (with
lora-freeze-a, not even the frozen A matrices),
bad inputs (wrong shape, dtype, missing/extra/base-model keys, object arrays).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import BertConfig, BertModel

from common.config import FedtuneConfig
from common.errors import AdapterMismatchError, ConfigError
from common.federation_data import federation_labels, simulated_client_data
from common.model import (
    PooledClassifier, base_classifier, frozen_fingerprint, get_adapter_state, load_lora_model, load_tokenizer,
    pool, resolve_model_path, save_adapter, sentence_pooling, set_adapter_state,
)
from common.task import task_for
from common.train import (
    cosine_lr, encode, evaluate, macro_f1, pad_batch, round_schedule, train,
)

CFG = FedtuneConfig(partitioner="iid")


@pytest.fixture(scope="module")
def setup():
    labels = federation_labels(CFG)
    cfg = CFG.replace(labels=labels.to_spec())
    model = task_for(cfg).model(len(labels))
    return cfg, labels, model, load_tokenizer(cfg.model)


def test_adapter_state_is_exactly_the_trainable_lora_and_head_weights(setup):
    _, labels, model, _ = setup
    state = get_adapter_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    assert all(("lora_" in k) or ("classifier" in k) for k in state)
    assert not any("embeddings" in k or k.endswith("query.base_layer.weight") for k in state)
    total = sum(p.numel() for p in model.parameters())
    assert sum(a.size for a in state.values()) < 0.02 * total
    head = [k for k in state if "classifier" in k and k.endswith("weight")]
    assert state[head[0]].shape == (len(labels), 384)


def test_adapter_round_trip(setup):
    _, _, model, _ = setup
    state = get_adapter_state(model)
    changed = {k: v + 0.5 for k, v in state.items()}
    set_adapter_state(model, changed)
    back = get_adapter_state(model)
    assert all(np.array_equal(back[k], changed[k]) for k in state)
    set_adapter_state(model, state)


def mutate(state, how):
    s = dict(state)
    key = next(k for k in s if "lora_A" in k)
    if how == "missing":
        del s[key]
    elif how == "extra":
        s["base_model.model.bert.embeddings.word_embeddings.weight"] = np.zeros((2, 2), np.float32)
    elif how == "renamed":
        s[key.replace("lora_A", "lora_Z")] = s.pop(key)
    elif how == "bigger-rank":
        s[key] = np.zeros((s[key].shape[0] * 2, s[key].shape[1]), np.float32)
    elif how == "transposed":
        s[key] = s[key].T.copy()
    elif how == "broadcastable":
        s[key] = np.zeros((1,), np.float32)
    elif how == "dtype":
        s[key] = s[key].astype(np.float64)
    elif how == "object":
        s[key] = np.array([object()] * 4, dtype=object)
    return s


@pytest.mark.parametrize("how, message", [
    ("missing", "missing"), ("extra", "unexpected"), ("renamed", "missing"),
    ("bigger-rank", "expected shape"), ("transposed", "expected shape"), ("broadcastable", "expected shape"),
    ("dtype", "expected dtype float32"), ("object", "numeric array|expected shape"),
])
def test_adapter_mismatch_raises_and_leaves_weights_untouched(setup, how, message):
    _, _, model, _ = setup
    before = get_adapter_state(model)
    with pytest.raises(AdapterMismatchError, match=message):
        set_adapter_state(model, mutate(before, how))
    after = get_adapter_state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_base_model_is_loaded_once_per_process(setup):
    cfg, labels, model, _ = setup
    loads = load_lora_model.cache_info().misses
    for _ in range(3):
        assert task_for(cfg).model(len(labels)) is model
    assert load_lora_model.cache_info().misses == loads


def test_training_lowers_the_loss_and_tokenizes_once(setup):
    cfg, labels, model, tok = setup
    data = simulated_client_data(cfg, 0, 3)
    initial = get_adapter_state(model)
    enc = encode(data.train, tok, labels, max_length=cfg.max_length, where="t")
    assert encode(data.train, tok, labels, max_length=cfg.max_length, where="t") is enc  # kept on the data set
    subset = encode(data.train.subset(range(64)), tok, labels, max_length=cfg.max_length, where="t")
    before = evaluate(model, subset, pad_id=tok.pad_token_id, batch_size=64, num_labels=len(labels))
    train(model, subset, pad_id=tok.pad_token_id, epochs=1, steps=12, batch_size=16, learning_rate=5e-3,
          weight_decay=0.0, max_grad_norm=1.0, seed=0)
    after = evaluate(model, subset, pad_id=tok.pad_token_id, batch_size=64, num_labels=len(labels))
    assert after["loss"] < before["loss"]
    assert all(np.isfinite(v).all() for v in get_adapter_state(model).values())
    set_adapter_state(model, initial)


def test_training_is_deterministic_for_a_seed(setup):
    cfg, labels, model, tok = setup
    data = encode(simulated_client_data(cfg, 1, 3).train.subset(range(32)), tok, labels, max_length=32, where="t")
    initial = get_adapter_state(model)
    states = []
    for _ in range(2):
        set_adapter_state(model, initial)
        train(model, data, pad_id=tok.pad_token_id, epochs=1, steps=3, batch_size=8, learning_rate=1e-3,
              weight_decay=0.0, max_grad_norm=1.0, seed=7)
        states.append(get_adapter_state(model))
    set_adapter_state(model, initial)
    assert all(np.array_equal(states[0][k], states[1][k]) for k in initial)


def test_cosine_schedule_spans_all_rounds_without_jumps():
    cfg = FedtuneConfig(learning_rate=1e-3, min_learning_rate=1e-5, lr_schedule="cosine", num_server_rounds=4)
    assert round_schedule(cfg.replace(lr_schedule="constant"), 1) is None
    rounds = [round_schedule(cfg, t) for t in range(1, 5)]
    assert rounds[0](0.0) == pytest.approx(1e-3)
    for this, following in zip(rounds, rounds[1:]):  # a round ends where the next one starts
        assert this(1.0) == pytest.approx(following(0.0))
    assert rounds[-1](1.0) == pytest.approx(1e-5)
    curve = [rounds[t](f) for t in range(4) for f in np.linspace(0, 1, 9)]
    assert all(a >= b for a, b in zip(curve, curve[1:]))  # never rises
    assert cosine_lr(1.0, 0.0, 0.5) == pytest.approx(0.5)


def test_warmup_rises_linearly_then_follows_the_schedule():
    """warmup-fraction: 0 at the first step, the peak at the end of the warm-up, then the
    cosine (or constant) over the rest; continuous across rounds; out-of-range values refused."""
    cfg = FedtuneConfig(learning_rate=1e-2, min_learning_rate=0.0, lr_schedule="cosine", num_server_rounds=5,
                        warmup_fraction=0.2)
    rounds = [round_schedule(cfg, t) for t in range(1, 6)]
    assert rounds[0](0.0) == 0.0
    assert rounds[0](0.5) == pytest.approx(5e-3)  # halfway through the warm-up
    assert rounds[0](1.0) == pytest.approx(1e-2) == rounds[1](0.0)
    assert rounds[2](1.0) == pytest.approx(5e-3)  # halfway through the decay: progress 0.6
    assert rounds[-1](1.0) == pytest.approx(0.0, abs=1e-12)
    for this, following in zip(rounds, rounds[1:]):
        assert this(1.0) == pytest.approx(following(0.0))
    flat = [round_schedule(cfg.replace(lr_schedule="constant"), t) for t in range(1, 6)]
    assert flat[0](0.5) == pytest.approx(5e-3) and flat[1](0.0) == flat[-1](1.0) == pytest.approx(1e-2)
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="warmup-fraction"):
            cfg.replace(warmup_fraction=bad)


def test_schedule_sets_each_steps_learning_rate(setup):
    """train() follows lr_at: a zero rate leaves the adapter where it was, a constant schedule
    equals no schedule, and a decaying one moves the weights less than the constant peak."""
    cfg, labels, model, tok = setup
    data = encode(simulated_client_data(cfg, 1, 3).train.subset(range(32)), tok, labels, max_length=32, where="t")
    initial = get_adapter_state(model)
    runs = {}
    for name, lr_at in (("none", None), ("constant", lambda f: 5e-3), ("zero", lambda f: 0.0),
                        ("decay", lambda f: cosine_lr(5e-3, 0.0, f))):
        set_adapter_state(model, initial)
        train(model, data, pad_id=tok.pad_token_id, epochs=1, steps=4, batch_size=8, learning_rate=5e-3,
              weight_decay=0.0, max_grad_norm=1.0, seed=7, lr_at=lr_at)
        runs[name] = get_adapter_state(model)
    set_adapter_state(model, initial)
    moved = {n: sum(float(np.sum((s[k] - initial[k]) ** 2)) for k in initial) for n, s in runs.items()}
    assert moved["zero"] == 0.0
    assert all(np.array_equal(runs["none"][k], runs["constant"][k]) for k in initial)
    assert 0.0 < moved["decay"] < moved["constant"]


def test_fedprox_term_pulls_towards_the_global_weights(setup):
    cfg, labels, model, tok = setup
    data = encode(simulated_client_data(cfg, 2, 3).train.subset(range(32)), tok, labels, max_length=32, where="t")
    initial = get_adapter_state(model)
    drift = {}
    for mu in (0.0, 50.0):
        set_adapter_state(model, initial)
        train(model, data, pad_id=tok.pad_token_id, epochs=1, steps=6, batch_size=8, learning_rate=5e-3,
              weight_decay=0.0, max_grad_norm=0.0, seed=3, proximal_mu=mu)
        now = get_adapter_state(model)
        drift[mu] = sum(float(np.sum((now[k] - initial[k]) ** 2)) for k in initial)
    set_adapter_state(model, initial)
    assert drift[50.0] < drift[0.0]


def test_saved_adapter_loads_with_peft_and_gives_the_same_logits(setup, tmp_path):
    cfg, labels, model, tok = setup
    state = {k: v + np.float32(0.01) for k, v in get_adapter_state(model).items()}
    save_adapter(model, state, tmp_path / "adapter")
    batch = tok(["how do I reset my password", "tell me a joke"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        ours = model(**batch).logits
    base = base_classifier(cfg.model, len(labels))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = loaded(**batch).logits
    torch.testing.assert_close(ours, theirs)


def test_a_merged_pooled_classifier_saves_and_loads_with_the_same_logits(setup, tmp_path):
    """`fedtune export --merged` of a mean-pooled model: encoder (transformers), head and pooling."""
    cfg, labels, model, tok = setup
    state = {k: v + np.float32(0.01) for k, v in get_adapter_state(model).items()}
    fresh = load_lora_model.__wrapped__(cfg.model, len(labels), r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0,
                                        target_modules=(), seed=cfg.seed)
    set_adapter_state(fresh, state)
    batch = tok(["how do I reset my password", "tell me a joke"], return_tensors="pt", padding=True)
    fresh.eval()
    with torch.no_grad():
        ours = fresh(**batch).logits
    fresh.merge_and_unload().save_pretrained(tmp_path / "merged")
    loaded = PooledClassifier.load(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ours, atol=1e-5, rtol=1e-4)
    (tmp_path / "merged" / "fedtune-head.json").write_text("{}")
    with pytest.raises(ConfigError, match="expected fedtune-head.json with pooling and num_labels"):
        PooledClassifier.load(tmp_path / "merged")


def test_macro_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 6, 300), rng.integers(0, 5, 300)
    assert macro_f1(y, p) == pytest.approx(f1_score(y, p, average="macro"))


@pytest.mark.parametrize("name, message", [
    ("packaged:nope", "expected one of"),
    ("./no/such/dir", "does not exist"),
])
def test_bad_model_names_are_clear_errors(name, message):
    with pytest.raises(ConfigError, match=message):
        resolve_model_path(name)


def test_length_grouped_batches_cover_each_example_once_and_pad_less():
    """Issue 6 regression check (counts, not timings): grouped batches are a permutation of
    the data, stay randomly ordered, and reach >= 0.85 padding efficiency where random
    batches of the same skewed lengths do not."""
    import numpy as np

    from common.train import batch_order, padding_efficiency

    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.lognormal(3.0, 0.6, size=4000).clip(3, 64)]
    grouped = batch_order(lengths, 32, np.random.default_rng(1))
    plain = batch_order(lengths, 32, np.random.default_rng(1), group_by_length=False)
    assert sorted(int(i) for b in grouped for i in b) == list(range(4000))
    assert padding_efficiency(lengths, grouped) >= 0.85 > padding_efficiency(lengths, plain)
    firsts = [max(lengths[i] for i in b) for b in grouped[:20]]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)  # not one long sorted sweep


def test_only_the_adapter_travels_and_it_stays_under_half_a_percent_of_the_model(setup):
    """Issue 6 regression check (counts, not timings): the exchanged state is the LoRA weights
    and the head only, and its bytes stay <= 0.5% of the base model's (measured 0.36%)."""
    cfg, labels, model, tok = setup
    from common.records import state_to_record

    state = get_adapter_state(model)
    assert all("lora_" in k or "classifier" in k for k in state)
    sent = sum(len(a.data) for a in state_to_record(state).values())
    full = sum(t.numel() * t.element_size() for t in model.base_model.model.state_dict().values())
    assert sent <= 0.005 * full, (sent, full)


def _ffa_model(seed: int, freeze_a: bool = True):
    return load_lora_model.__wrapped__(CFG.model, 3, r=4, alpha=8.0, dropout=0.0, target_modules=(),
                                       seed=seed, freeze_a=freeze_a)


def test_ffa_lora_trains_only_b_and_the_head_and_a_comes_from_the_seed(setup):
    """lora-freeze-a: A never changes and never travels; the fingerprint names it exactly."""
    cfg, labels, _, tok = setup
    model = _ffa_model(seed=3)
    state = get_adapter_state(model)
    assert state and not any("lora_A" in k for k in state)
    assert any("lora_B" in k for k in state) and any("classifier" in k for k in state)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    before = frozen_fingerprint(model)
    data = encode(simulated_client_data(cfg, 0, 3).train.subset(range(32)), tok, labels, max_length=32, where="t")
    train(model, data, pad_id=tok.pad_token_id, epochs=1, steps=3, batch_size=8, learning_rate=1e-2,
          weight_decay=0.0, max_grad_norm=1.0, seed=0)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "lora_A" in n)
    assert any(not np.array_equal(v, state[k]) for k, v in get_adapter_state(model).items())  # B trained
    assert frozen_fingerprint(model) == before and len(before) == 16
    assert frozen_fingerprint(_ffa_model(seed=3)) == before  # another process builds the same A
    assert frozen_fingerprint(_ffa_model(seed=4)) != before
    assert frozen_fingerprint(_ffa_model(seed=3, freeze_a=False)) == ""


def test_ffa_lora_averaging_b_averages_the_weight_updates_exactly():
    """Why FFA-LoRA: with A fixed, the mean of the clients' B gives exactly the mean of their
    weight updates s*B*A; with A trained too, the mean of the factors is not the mean update."""
    rng = np.random.default_rng(0)

    def deltas(model):
        return [m.get_delta_weight("default").detach().clone() for m in model.modules() if hasattr(m, "lora_B")]

    for freeze_a, exact in ((True, True), (False, False)):
        model = _ffa_model(seed=5, freeze_a=freeze_a)
        clients = [{k: rng.normal(0, 0.05, v.shape).astype(v.dtype) for k, v in get_adapter_state(model).items()}
                   for _ in range(3)]
        per_client = []
        for state in clients:
            set_adapter_state(model, state)
            per_client.append(deltas(model))
        set_adapter_state(model, {k: np.mean([c[k] for c in clients], axis=0) for k in clients[0]})
        mean_update = [torch.stack(ds).mean(0) for ds in zip(*per_client)]
        close = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(deltas(model), mean_update))
        assert close is exact, freeze_a


def test_the_packaged_model_classifies_from_the_mean_pooling_it_was_trained_with(setup):
    """all-MiniLM-L6-v2's sentence-transformers config says mean pooling; the head reads the mean of
    the real tokens' states, so padding an example does not change its logits, and the adapter keys
    stay those of transformers' sequence-classification model (LoRA on bert.*, the classifier)."""
    cfg, labels, model, tok = setup
    assert sentence_pooling(cfg.model) == "mean"
    inner = model.base_model.model
    assert isinstance(inner, PooledClassifier) and inner.pooling == "mean"
    state = get_adapter_state(model)
    assert any(k.startswith("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A") for k in state)
    assert {k for k in state if "classifier" in k} == {"base_model.model.classifier.modules_to_save.default.weight",
                                                       "base_model.model.classifier.modules_to_save.default.bias"}
    model.eval()
    short = tok(["tell me a joke"], return_tensors="pt")
    padded = tok(["tell me a joke", "how do I reset the password of my account please"], return_tensors="pt",
                 padding=True)
    with torch.no_grad():
        alone = model(**short).logits[0]
        in_batch = model(**padded).logits[0]
        states = inner.bert(**short).last_hidden_state
        by_hand = inner.classifier(states.mean(dim=1))
    torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, by_hand[0])


def test_pooling_modes_ignore_padding_and_a_plain_model_keeps_its_own_head(tmp_path):
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, -100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[2.0, 4.0]]))
    torch.testing.assert_close(pool(hidden, mask, "max"), torch.tensor([[3.0, 6.0]]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(pool(hidden, mask, "mean_sqrt_len"), torch.tensor([[4.0, 8.0]]) / 2 ** 0.5)
    plain = tmp_path / "plain-bert"  # no sentence-transformers files: transformers' head on the [CLS] pooler
    BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(plain)
    assert sentence_pooling(str(plain)) is None
    assert type(base_classifier(str(plain), 3)).__name__ == "BertForSequenceClassification"
    (plain / "modules.json").write_text("not json")  # a damaged config is not a sentence-transformers model
    assert sentence_pooling(str(plain)) is None
    with pytest.raises(ConfigError, match="pooling: expected one of"):
        PooledClassifier(BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=16)), 2, "median")


@pytest.mark.parametrize("token_labels", [False, True])
def test_padded_batches_equal_a_row_by_row_reference(token_labels):
    """pad_batch builds batches in numpy (one hand-over to torch): the same tensors as padding
    row by row, with token labels -100 past each example's end; a token-label row of the wrong
    length is refused, naming the row."""
    rng = np.random.default_rng(0)
    seqs = [[int(t) for t in rng.integers(1, 1000, size=n)] for n in rng.integers(1, 40, size=50)]
    labels = [[int(t) for t in rng.integers(-100, 5, size=len(s))] for s in seqs] if token_labels else list(range(50))
    width = max(map(len, seqs))
    ids, mask = torch.full((50, width), 7), torch.zeros((50, width), dtype=torch.long)
    targets = torch.full((50, width), -100) if token_labels else torch.tensor(labels)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
        if token_labels:
            targets[row, : len(seq)] = torch.tensor(labels[row])
    batch = pad_batch(seqs, labels, 7, token_labels=token_labels)
    assert all(t.dtype == torch.long for t in batch.values())
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert torch.equal(batch["labels"], targets)
    if token_labels:
        labels[3] = labels[3][:-1]
        with pytest.raises(ValueError, match=f"got {len(seqs[3]) - 1} labels for {len(seqs[3])} tokens in row 3"):
            pad_batch(seqs, labels, 7, token_labels=True)
