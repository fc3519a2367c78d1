"""A client's own privacy record: every DP mechanism ever run on its data, kept on its disk.

The record is keyed by a fingerprint of the client's training data, so it composes across
rounds, restarts of either side, and separate runs on the same data. The client checks it
before training and refuses a round whose epsilon would exceed its budget.

    <privacy-dir>/<fingerprint>.json    (privacy-dir: node config `privacy-dir`,
                                          else $FEDTUNE_PRIVACY_DIR, else ~/.fedtune/privacy)
    <privacy-dir>/node-secret           32 random bytes, readable by the node's user only

The node secret keys every random choice DP rests on (which records a Poisson sample takes, the
noise, the rounding): the server knows the run's seed, so randomness derived from it alone would
let the server redraw the sample and subtract the noise. `private_seed` mixes the secret with what
the round is computed from, so a repeated round on the same input repeats exactly (a resumed run
ends bit for bit as an uninterrupted one, and a replay teaches the server nothing), while any
other input gets fresh, independent randomness.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.data import TextDataset
from common.errors import PrivacyBudgetError
from common.files import atomic_write
from common.privacy import Mechanism, epsilon, epsilon_rdp

RECORD_VERSION = 1
SECRET_NAME, SECRET_BYTES = "node-secret", 32


def privacy_dir(node_config: dict | None = None) -> Path:
    if node_config and node_config.get("privacy-dir"):
        return Path(str(node_config["privacy-dir"])).expanduser()
    return Path(os.environ.get("FEDTUNE_PRIVACY_DIR", "~/.fedtune/privacy")).expanduser()


def node_secret(directory: Path) -> bytes:
    """This node's secret (see the module docstring), made on first use with mode 0600; processes that
    race to make it all read the one that won."""
    path = directory / SECRET_NAME
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{SECRET_NAME}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, os.urandom(SECRET_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process made it first: theirs is kept
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise PrivacyBudgetError(
            f"node secret {path}: expected {SECRET_BYTES} bytes, got {len(secret)}; remove the file to make a new one"
        )
    return secret


def private_seed(secret: bytes, *parts: object) -> int:
    """A 63-bit seed from the node secret and `parts` (HMAC-SHA256): unpredictable without the secret."""
    digest = hmac.new(secret, "|".join(map(str, parts)).encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def data_fingerprint(data: TextDataset) -> str:
    """SHA-256 over the (text, label) pairs in order and, for instruction data, each example's input and
    response; the data never leaves the client.

    Instruction data keeps its instruction in `texts` and its group in `labels`, which many examples
    share (one instruction for a whole task): without the input and response, clients holding different
    examples of one task got one fingerprint, hence one privacy record, and each was charged the
    others' rounds (bench/README.md, issue 41). Classification data hashes as before, so existing
    records keep their names.
    """
    digest = hashlib.sha256()
    extra = [data.columns["input"], data.columns["response"]] if "response" in data.columns else []
    for i, (text, label) in enumerate(zip(data.texts, data.labels, strict=True)):
        digest.update(text.encode("utf-8"))
        digest.update(b"\x1f")
        digest.update(label.encode("utf-8"))
        for column in extra:
            digest.update(b"\x1f")
            digest.update(column[i].encode("utf-8"))
        digest.update(b"\x1e")
    return digest.hexdigest()


@dataclass
class PrivacyRecord:
    path: Path
    fingerprint: str
    delta: float
    entries: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, directory: Path, fingerprint: str, *, delta: float) -> PrivacyRecord:
        path = directory / f"{fingerprint}.json"
        if not path.exists():
            return cls(path=path, fingerprint=fingerprint, delta=delta)
        try:
            doc = json.loads(path.read_text())
            entries = list(doc["entries"])
            recorded_delta = float(doc["delta"])
        except (ValueError, KeyError, TypeError) as err:
            raise PrivacyBudgetError(
                f"privacy record {path}: expected fedtune's JSON record, got an unreadable file ({err}); "
                "refusing to train rather than forget privacy already spent"
            ) from None
        if recorded_delta != delta:
            raise PrivacyBudgetError(f"privacy record {path}: expected delta {recorded_delta} as recorded, got {delta}")
        return cls(path=path, fingerprint=fingerprint, delta=delta, entries=entries)

    def mechanisms(self) -> list[Mechanism]:
        return [Mechanism.from_dict(e["mechanism"]) for e in self.entries]

    def spent(self) -> float:
        return epsilon(self.mechanisms(), delta=self.delta)[0]

    def projected(self, mechanism: Mechanism) -> float:
        return epsilon([*self.mechanisms(), mechanism], delta=self.delta)[0]

    def append(self, *, run: str, server_round: int, mechanism: Mechanism, clipping_norm: float) -> dict:
        """Record a mechanism that ran; written atomically before the update leaves the client."""
        history = [*self.mechanisms(), mechanism]
        eps, accountant = epsilon(history, delta=self.delta)
        entry = {
            "run": run,
            "round": server_round,
            "mechanism": mechanism.to_dict(),
            "clipping_norm": clipping_norm,
            "epsilon": eps,
            "epsilon_rdp": epsilon_rdp(history, delta=self.delta),
            "accountant": accountant,
        }
        self.entries.append(entry)
        self._write()
        return entry

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"version": RECORD_VERSION, "fingerprint": self.fingerprint, "delta": self.delta, "entries": self.entries}
        atomic_write(self.path, json.dumps(doc, indent=1).encode())
