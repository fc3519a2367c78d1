"""`fedtune supernode ARGS...`: check a node's setup, then exec `flower-supernode ARGS...`.

Flower starts a SuperNode even when its data file is missing and fails only when the first
message arrives. This refuses to start, with a message, when the node config's data file is
missing or unreadable or lacks the named columns, or when a certificate or key is unreadable.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tomllib
from pathlib import Path

from common.data import load_source
from common.errors import ConfigError, DataError

FILE_FLAGS = ("--root-certificates", "--auth-supernode-private-key", "--auth-supernode-public-key")


def parse_node_config(text: str) -> dict:
    """Flower's node-config string 'k1="v" k2=3' -> mapping (TOML values)."""
    out = {}
    for pair in shlex.split(text):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--node-config: expected key=value pairs, got {pair!r}")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def check_node(args: list[str]) -> dict:
    """Validate what a SuperNode will need; returns the parsed node config."""
    for flag in FILE_FLAGS:
        path = _flag(args, flag)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"{flag}: expected a readable file, got {path!r} (missing or unreadable)")
    if _flag(args, "--root-certificates"):
        from cryptography import x509

        pem = Path(_flag(args, "--root-certificates")).read_bytes()
        try:
            x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise ConfigError(f"--root-certificates: expected a PEM certificate, got {_flag(args, '--root-certificates')!r}"
                              " which is not one") from None
    text = _flag(args, "--node-config")
    if text is None:
        raise ConfigError("--node-config: expected data-path=\"...\" (the node's own data file), got none")
    node = parse_node_config(text)
    if "data-path" not in node:
        raise ConfigError(f"--node-config: expected a data-path key, got keys {sorted(node)}")
    path = str(node["data-path"])
    if not os.access(path, os.R_OK):
        raise DataError(f"data-path: expected a readable file, got {path!r} (missing or unreadable)")
    data = load_source(path, data_format=str(node.get("data-format", "auto")),
                       text_column=str(node.get("text-column", "text")),
                       label_column=str(node.get("label-column", "label")),
                       column_names=str(node.get("column-names", "")))
    if len(data) == 0:
        raise DataError(f"data-path {path!r}: expected at least one example, got none")
    return node


def exec_supernode(args: list[str]) -> None:
    check_node(args)
    binary = shutil.which("flower-supernode")
    if binary is None:
        raise ConfigError("flower-supernode: expected it on PATH (activate the environment fedtune is installed in)")
    os.execv(binary, [binary, *args])
