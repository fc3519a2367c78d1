"""The ClientApp handlers, called directly with real messages (no federation).

RELIABILITY security checks: only adapter keys leave a client (no base weights), no raw
text in metrics; deployment path: a node reads its own file named in its node config; bad
input: a server whose frozen LoRA A (lora-freeze-a) differs from the node's.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import evaluate_handler, query, train_handler
from common.config import FedtuneConfig
from common.federation_data import federation_labels
from common.model import get_adapter_state
from common.task import task_for
from common.records import record_to_state, state_to_record
from tests.reliability import count

pytestmark = pytest.mark.usefixtures("task_identity")
CFG = FedtuneConfig(partitioner="iid", local_steps=2, batch_size=8, max_length=32)


def message(kind: str, cfg: FedtuneConfig, arrays=None) -> Message:
    content = {"config": ConfigRecord({**cfg.to_run_config(), "server-round": 1})}
    if arrays is not None:
        content["arrays"] = state_to_record(arrays)
    return Message(content=RecordDict(content), message_type=kind, dst_node_id=1)


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


@pytest.fixture(scope="module")
def setup():
    cfg = CFG.replace(labels=federation_labels(CFG).to_spec())
    model = task_for(cfg).model(len(federation_labels(cfg)))
    return cfg, get_adapter_state(model)


def test_train_reply_carries_only_the_adapter_and_numeric_metrics(setup):
    cfg, initial = setup
    reply = train_handler(message(MessageType.TRAIN, cfg, initial), context({"partition-id": 0, "num-partitions": 3}))
    sent = record_to_state(reply.content["arrays"])
    assert set(sent) == set(initial)  # adapter keys only, never base weights
    assert not any("base_layer" in k or "embeddings" in k for k in sent)
    assert any(not np.array_equal(sent[k], initial[k]) for k in initial)  # it trained
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == {"num-examples", "train-loss", "train-steps", "train-seconds"}
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics["train-steps"] == 2
    assert dict(reply.content["client"]) == {"client-id": "partition-0", "round": 1}


def test_evaluate_and_query_replies(setup):
    cfg, initial = setup
    node = context({"partition-id": 1, "num-partitions": 3})
    metrics = dict(evaluate_handler(message(MessageType.EVALUATE, cfg, initial), node).content["metrics"])
    assert metrics["num-examples"] > 0 and 0.0 <= metrics["val-accuracy"] <= 1.0
    info = dict(query(message(MessageType.QUERY, cfg), node).content["client"])
    assert info["client-id"] == "partition-1" and sum(info["label-counts"]) == info["train-examples"] + info["val-examples"]


def test_deployed_node_reads_its_own_file(setup, tmp_path):
    cfg, _ = setup
    path = tmp_path / "local.jsonl"
    names = cfg.labels.split(",")
    path.write_text("".join(f'{{"utterance": "example {i}", "topic": "{names[i % 3]}"}}\n' for i in range(20)))
    node = context({"data-path": str(path), "text-column": "utterance", "label-column": "topic", "client-id": "site-a"})
    info = dict(query(message(MessageType.QUERY, cfg), node).content["client"])
    assert info["client-id"] == "site-a" and info["train-examples"] + info["val-examples"] == 20


def test_node_without_data_settings_is_a_clear_error(setup):
    cfg, _ = setup
    with pytest.raises(ValueError, match="expected 'data-path'"):
        query(message(MessageType.QUERY, cfg), context({}))


def test_client_over_budget_does_not_train_and_says_so(setup, tmp_path):
    cfg, initial = setup
    private = cfg.replace(dp_sample=True, dp_noise_multiplier=0.5, dp_epsilon_budget=1.0)
    node = context({"partition-id": 0, "num-partitions": 3, "privacy-dir": str(tmp_path)})
    reply = train_handler(message(MessageType.TRAIN, private, initial), node)
    assert "arrays" not in reply.content.array_records  # nothing trained, nothing sent
    privacy = dict(reply.content["privacy"])
    assert privacy["status"] == "budget-exhausted"
    assert privacy["epsilon-projected"] > privacy["epsilon-budget"] == 1.0
    assert not list(tmp_path.glob("*.json"))  # no spend recorded for a round that did not run


def test_private_client_records_its_spend_before_replying(setup, tmp_path):
    cfg, initial = setup
    private = cfg.replace(dp_sample=True, dp_noise_multiplier=1.0)
    node = context({"partition-id": 0, "num-partitions": 3, "privacy-dir": str(tmp_path), "epsilon-budget": 50.0})
    first = dict(train_handler(message(MessageType.TRAIN, private, initial), node).content["privacy"])
    second = dict(train_handler(message(MessageType.TRAIN, private, initial), node).content["privacy"])
    assert first["status"] == second["status"] == "trained"
    assert second["epsilon"] > first["epsilon"]  # composes across rounds
    assert len(second["history-steps"]) == 2 and first["epsilon-budget"] == 50.0
    record = next(tmp_path.glob("*.json"))
    assert len(__import__("json").loads(record.read_text())["entries"]) == 2


def test_ffa_client_refuses_a_server_whose_frozen_a_differs(setup):
    """lora-freeze-a: A never travels, so a client checks the server's fingerprint of it and
    refuses (clear error, nothing trained) when its own A differs; with the same A it trains."""
    from common.errors import ConfigError
    from common.model import frozen_fingerprint
    from common.records import FROZEN_KEY

    cfg, _ = setup
    cfg = cfg.replace(lora_freeze_a=True)
    model = task_for(cfg).model(len(cfg.labels.split(",")))
    initial = get_adapter_state(model)
    assert not any("lora_A" in k for k in initial)
    node = context({"partition-id": 0, "num-partitions": 3})
    msg = message(MessageType.TRAIN, cfg, initial)
    msg.content["config"][FROZEN_KEY] = "0123456789abcdef"
    with pytest.raises(ConfigError, match=r"expected the frozen LoRA A matrices of the server \(fingerprint 0123456789abcdef\), got [0-9a-f]{16}"):
        train_handler(msg, node)
    msg = message(MessageType.TRAIN, cfg, initial)
    with pytest.raises(ConfigError, match=r"fingerprint missing"):
        train_handler(msg, node)
    count("bad_inputs_rejected", "server-with-another-frozen-lora-a", 2)
    msg = message(MessageType.TRAIN, cfg, initial)
    msg.content["config"][FROZEN_KEY] = frozen_fingerprint(model)
    sent = record_to_state(train_handler(msg, node).content["arrays"])
    assert set(sent) == set(initial) and any(not np.array_equal(sent[k], initial[k]) for k in initial)
