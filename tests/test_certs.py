"""`fedtune certs`: names are file names, nothing is overwritten, keys are private from the start.

RELIABILITY bad inputs (certificates and keys; hardening class 3): node names that are paths,
files that exist, a second run into a deployment folder whose ca.key was moved offline. Each
is refused with what was expected and what arrived, and every existing file keeps its bytes.
"""

from __future__ import annotations

import stat

import pytest

from simulation.cli import main as cli_main
from tests.reliability import count


def certs(*args: str) -> int:
    return cli_main(["certs", *args])


def snapshot(folder) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_deployment_folder_has_private_keys_from_the_start(tmp_path):
    assert certs(str(tmp_path / "pki"), "--nodes", "site-a,site-b") == 0
    for key in ("ca.key", "server.key", "nodes/site-a", "nodes/site-b"):
        assert stat.S_IMODE((tmp_path / "pki" / key).stat().st_mode) == 0o600, key
    assert (tmp_path / "pki" / "nodes" / "site-a.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


@pytest.mark.parametrize("name", ["../x", "/tmp/evil", "a/b", "..", ".hidden", "x" * 65, "site a"])
def test_node_names_that_are_paths_are_refused_and_nothing_is_written(tmp_path, capsys, name):
    target = tmp_path / "x"
    target.write_text("the user's file")
    assert certs(str(tmp_path / "pki"), "--nodes", name) == 2
    assert "expected node names of letters, digits" in capsys.readouterr().err
    assert not (tmp_path / "pki").exists() and target.read_text() == "the user's file"
    count("bad_inputs_rejected", f"certs node name {name!r}")


def test_a_second_run_never_replaces_a_deployment_even_with_ca_key_offline(tmp_path, capsys):
    pki = tmp_path / "pki"
    assert certs(str(pki), "--nodes", "site-a") == 0
    (pki / "ca.key").rename(tmp_path / "offline-ca.key")  # as docs/deployment.md advises
    before = snapshot(pki)
    assert certs(str(pki), "--nodes", "site-a,site-b") == 2
    assert "refusing to replace a deployment's CA (add nodes to it with --keys-only)" in capsys.readouterr().err
    assert snapshot(pki) == before
    count("bad_inputs_rejected", "certs into a deployment folder whose ca.key is offline")


def test_keys_only_adds_a_node_and_touches_nothing_else(tmp_path, capsys):
    pki = tmp_path / "pki"
    assert certs(str(pki), "--nodes", "site-a") == 0
    before = snapshot(pki)
    assert certs(str(pki), "--nodes", "site-b", "--keys-only") == 0
    after = snapshot(pki)
    assert {p: b for p, b in after.items() if p in before} == before
    assert sorted(p.name for p in after if p not in before) == ["site-b", "site-b.pub"]
    assert stat.S_IMODE((pki / "nodes" / "site-b").stat().st_mode) == 0o600
    capsys.readouterr()
    assert certs(str(pki), "--nodes", "site-a", "--keys-only") == 2  # an existing pair stays as it is
    assert "expected new node names" in capsys.readouterr().err and snapshot(pki) == after
    count("bad_inputs_rejected", "certs --keys-only onto an existing node key")
