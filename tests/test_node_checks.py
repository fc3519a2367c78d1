"""`fedtune supernode`'s checks before Flower starts: data for either task, keys that are one pair.

RELIABILITY bad inputs (data files, keys; hardening class 9): a causal-LM node's valid
instruction data used to be refused (the check knew only classification columns); a private key
paired with another node's public key used to pass. Nothing starts and nothing is written.
"""

from __future__ import annotations

import json

import pytest

from client.node import check_node
from common.errors import ConfigError, DataError
from server.tools.pki import make_node_keys
from tests.reliability import count


def node_args(data, *extra: str) -> list[str]:
    return ["--superlink", "127.0.0.1:9093", "--node-config", f'data-path="{data}" client-id="site-a"', *extra]


def test_instruction_data_passes_and_data_for_neither_task_is_refused_naming_both(tmp_path):
    lm = tmp_path / "instructions.jsonl"
    lm.write_text("".join(json.dumps({"instruction": f"say {i}", "response": f"{i}"}) + "\n" for i in range(3)))
    assert check_node(node_args(lm))["data-path"] == str(lm)
    classification = tmp_path / "labelled.csv"
    classification.write_text("text,label\ngreat,pos\nawful,neg\n")
    assert check_node(node_args(classification))
    neither = tmp_path / "neither.csv"
    neither.write_text("sentence,stars\ngreat,5\n")
    with pytest.raises(DataError, match="fits neither task: classification: .*text.*causal-lm: .*instruction"):
        check_node(node_args(neither))
    count("bad_inputs_rejected", "supernode data with the columns of neither task")


def test_a_private_key_with_another_nodes_public_key_is_refused(tmp_path):
    data = tmp_path / "labelled.csv"
    data.write_text("text,label\ngreat,pos\nawful,neg\n")
    make_node_keys(tmp_path, "site-a")
    make_node_keys(tmp_path, "site-b")
    pair = ["--auth-supernode-private-key", str(tmp_path / "site-a"), "--auth-supernode-public-key"]
    assert check_node(node_args(data, *pair, str(tmp_path / "site-a.pub")))
    with pytest.raises(ConfigError, match="expected the public key of .*site-a'.*belongs to another key pair"):
        check_node(node_args(data, *pair, str(tmp_path / "site-b.pub")))
    (tmp_path / "garbage").write_text("not a key")
    with pytest.raises(ConfigError, match="expected an OpenSSH private key"):
        check_node(node_args(data, "--auth-supernode-private-key", str(tmp_path / "garbage"),
                             "--auth-supernode-public-key", str(tmp_path / "site-a.pub")))
    count("bad_inputs_rejected", "supernode keys that are not one pair")


def test_a_directory_where_a_certificate_or_data_file_belongs_is_refused(tmp_path):
    """Hardening class 7: a directory passed os.access() and then failed with IsADirectoryError."""
    data = tmp_path / "labelled.csv"
    data.write_text("text,label\ngreat,pos\nawful,neg\n")
    with pytest.raises(ConfigError, match="--root-certificates: expected a readable file, got .*a directory"):
        check_node(node_args(data, "--root-certificates", str(tmp_path)))
    with pytest.raises(DataError, match="data-path: expected a readable file, got .*a directory"):
        check_node(node_args(tmp_path))
    count("bad_inputs_rejected", "supernode given a directory for a file")


def test_export_onto_an_existing_file_is_refused(tmp_path):
    from server.tools.export import export_run

    target = tmp_path / "adapter.bin"
    target.write_text("the user's file")
    with pytest.raises(ConfigError, match="expected a new or empty output directory, got .*which is a file"):
        export_run(tmp_path / "run", target, merged=False)
    assert target.read_text() == "the user's file"
    count("bad_inputs_rejected", "export onto an existing file")
