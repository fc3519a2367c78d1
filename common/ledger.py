"""An append-only, hash-chained ledger (the privacy ledger of a run).

Each entry carries `prev_hash` (the previous entry's hash, 64 zeros for the first) and
`hash` = SHA-256 of the entry's canonical JSON without its own hash. Editing, removing or
reordering any entry breaks every later link, which `verify_chain` reports.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.files import atomic_write

GENESIS = "0" * 64


def entry_hash(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Ledger:
    def __init__(self, entries: list[dict] | None = None) -> None:
        self.entries: list[dict] = list(entries or [])

    @property
    def head(self) -> str:
        return self.entries[-1]["hash"] if self.entries else GENESIS

    def append(self, entry: dict) -> dict:
        chained = {**entry, "seq": len(self.entries), "prev_hash": self.head}
        chained["hash"] = entry_hash(chained)
        self.entries.append(chained)
        return chained

    def write(self, path: Path) -> None:
        """Rewrite the JSONL file from the entries (atomic), so it always matches a checkpoint."""
        atomic_write(path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in self.entries).encode())

    @classmethod
    def read(cls, path: Path) -> Ledger:
        entries = []
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: expected one JSON entry per line ({err.msg})") from None
        return cls(entries)


def verify_chain(entries: list[dict]) -> list[str]:
    """Problems with the chain, empty when every link and hash holds."""
    problems, prev = [], GENESIS
    for i, entry in enumerate(entries):
        if entry.get("seq") != i:
            problems.append(f"entry {i}: expected seq {i}, found {entry.get('seq')!r}")
        if entry.get("prev_hash") != prev:
            problems.append(f"entry {i}: prev_hash does not match entry {i - 1}'s hash")
        if entry.get("hash") != entry_hash(entry):
            problems.append(f"entry {i}: hash does not match its content (edited)")
        prev = entry.get("hash", "")
    return problems
