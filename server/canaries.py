"""The canary audit of a run (dp-audit-canaries; the method in common/canaries.py).

After the last round the server asks every client for its canary seed (`reveal_canaries`), scores
each client's canaries against the global adapter of every round (the run's checkpoints) and
writes canaries.json: per client its seed, canary count, inclusion bits and scores. `fedtune audit`
(`audit_canaries`) trusts none of it: it derives the bits from the seeds, scores the canaries again
from the checkpoints, and bounds epsilon from below, per client and over all canaries together,
against the epsilon the privacy ledger recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.canaries import CONFIDENCE, SCORES, Canaries, CanaryError, canary_scores, epsilon_lower_bound
from common.config import MAX_CANARIES
from common.errors import CheckpointError, FieldError
from common.fields import as_int, as_str
from common.records import REVEAL_CANARIES
from server.checkpoint import checkpoints_by_round, load_checkpoint
from server.state import ServerState

FILE = "canaries.json"
SCORE_TOLERANCE = 1e-6  # relative: the same float64 arithmetic on the same checkpoints


def reveal_canaries(grid: Grid, state: ServerState) -> None:
    """Ask each known client for its canary seed and write canaries.json (nothing without canaries)."""
    cfg = state.cfg
    if not cfg.dp_audit_canaries or not state.clients:
        return
    content = RecordDict({"config": state.message_config(), REVEAL_CANARIES: ConfigRecord({"reveal": True})})
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in sorted(state.clients)]
    revealed = []
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        if reply.has_error() or REVEAL_CANARIES not in reply.content.config_records:
            why = reply.error.reason if reply.has_error() else f"no {REVEAL_CANARIES} record"
            log(WARNING, "fedtune: node %d did not reveal its canaries: %s", reply.metadata.src_node_id, why)
            continue
        try:
            client, canaries = parse_reveal(reply.content.config_records[REVEAL_CANARIES], cfg.dp_audit_canaries)
        except (FieldError, CanaryError) as err:
            log(WARNING, "fedtune: node %d revealed unusable canaries: %s", reply.metadata.src_node_id, err)
            continue
        revealed.append((client, canaries))
    revealed.sort(key=lambda c: c[0])
    try:
        rounds = adapters(state.run.path)
    except CheckpointError as err:  # the run itself is done: keep the seeds, let the audit say what is missing
        log(WARNING, "fedtune: canaries revealed but not scored: %s", err)
        clients = [{"client_id": c, "seed": k.seed, "count": k.count, "scores": None} for c, k in revealed]
        state.run.write_json(FILE, {"rounds": None, "scores": list(SCORES), "clients": clients})
        return
    clients = score_clients(rounds, revealed)
    state.run.write_json(FILE, {"rounds": len(rounds) - 1, "scores": list(SCORES), "clients": clients})
    log(INFO, "fedtune: %d clients revealed their canaries; scores in %s", len(clients), state.run.path / FILE)


def parse_reveal(record, expected: int) -> tuple[str, Canaries]:
    """A client's revealed canaries: its id, the run's canary count and a non-negative 63-bit seed."""
    client, count, seed = as_str(record, "client-id"), as_int(record, "count"), as_int(record, "seed")
    if count != expected or not 0 <= seed < 2**63:
        raise CanaryError(
            f"client {client}: expected {expected} canaries and a seed in [0, 2^63), got {count} and {seed}"
        )
    return client, Canaries(seed=seed, count=count)


def adapters(run_dir: Path) -> list[dict[str, np.ndarray]]:
    """The global adapter after each round, round 0 first, from the run's checkpoints."""
    found = checkpoints_by_round(run_dir / "checkpoints")
    if not found or list(found) != list(range(len(found))):
        raise CheckpointError(
            f"canary audit: expected checkpoints of rounds 0 to {max(found, default=0)} in {run_dir / 'checkpoints'}, "
            f"found rounds {list(found)}"
        )
    return [load_checkpoint(path).adapter for path in found.values()]


def score_clients(rounds: list[dict[str, np.ndarray]], revealed: list[tuple[str, Canaries]]) -> list[dict]:
    """canaries.json's entry of each client: its seed, count, inclusion bits and scores."""
    out = []
    for client, canaries in revealed:
        scores = canary_scores(canaries, rounds)
        out.append(
            {
                "client_id": client,
                "seed": canaries.seed,
                "count": canaries.count,
                "included": "".join("1" if b else "0" for b in canaries.included),
                "scores": {name: [float(v) for v in scores[name]] for name in SCORES},
            }
        )
    return out


@dataclass
class CanaryAudit:
    """What the audit found: the bounds (for audit.json) and any problem."""

    summary: dict | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def audit_canaries(run_dir: Path, entries: list[dict], *, confidence: float = CONFIDENCE) -> CanaryAudit:
    """Check canaries.json against the seeds and checkpoints and bound epsilon from below, per client
    (against its recorded epsilon) and over all canaries (against the largest); the bounds share
    1 - `confidence` (Bonferroni), so a correct run fails this audit with probability at most that."""
    path = run_dir / FILE
    if not path.is_file():
        return CanaryAudit(notes=[f"no {FILE}: the run had no canaries (dp-audit-canaries = 0) or did not finish"])
    try:
        recorded = json.loads(path.read_text())
        clients = [_client(c) for c in recorded["clients"]]
        rounds = adapters(run_dir)
    except (ValueError, KeyError, TypeError, CanaryError, CheckpointError) as err:
        return CanaryAudit(problems=[f"{FILE}: expected seeds, bits and scores fedtune wrote, got {err}"])
    epsilons = recorded_epsilons(entries)
    result = CanaryAudit()
    checked = []
    for client, canaries, bits, scores in clients:
        again = canary_scores(canaries, rounds)
        if bits != "".join("1" if b else "0" for b in canaries.included):
            result.problems.append(f"{FILE}: {client}'s inclusion bits are not the ones its seed gives")
        for name in SCORES:
            mine = np.asarray(scores.get(name, []), dtype=float)
            if mine.shape != again[name].shape or not np.allclose(mine, again[name], rtol=SCORE_TOLERANCE, atol=1e-12):
                result.problems.append(f"{FILE}: {client}'s {name} scores do not match the checkpoints")
        if client not in epsilons:
            result.notes.append(f"canaries of {client}: no epsilon recorded for it in the ledger (it never trained)")
            continue
        checked.append((client, canaries, again))
    if not checked:
        return result
    tests = len(checked) + 1
    each = 1 - (1 - confidence) / tests
    per_client = {}
    for client, canaries, fresh in checked:
        bound = epsilon_lower_bound(fresh, canaries.included, delta=epsilons[client][1], confidence=each)
        per_client[client] = {**bound.to_json(), "recorded_epsilon": epsilons[client][0]}
        if bound.epsilon > epsilons[client][0]:
            result.problems.append(
                f"canaries of {client}: empirical epsilon lower bound {bound.epsilon:.3f} (confidence {each:.4f}, "
                f"{bound.correct} of the {bound.guesses} highest {bound.score} scores included) exceeds the "
                f"recorded epsilon {epsilons[client][0]:.3f}: the mechanism that ran leaks more than the ledger says"
            )
    pooled_scores = {name: np.concatenate([s[name] for _, _, s in checked]) for name in SCORES}
    pooled_bits = np.concatenate([c.included for _, c, _ in checked])
    largest = max(epsilons[c][0] for c, _, _ in checked)
    delta = max(epsilons[c][1] for c, _, _ in checked)
    pooled = epsilon_lower_bound(pooled_scores, pooled_bits, delta=delta, confidence=each)
    if pooled.epsilon > largest:
        result.problems.append(
            f"canaries of all clients: empirical epsilon lower bound {pooled.epsilon:.3f} exceeds the largest "
            f"recorded client epsilon {largest:.3f}"
        )
    result.summary = {
        **pooled.to_json(),
        "recorded_epsilon": largest,
        "family_confidence": confidence,
        "delta": delta,
        "per_client": per_client,
    }
    return result


def _client(c: dict) -> tuple[str, Canaries, str, dict[str, list[float]]]:
    canaries = Canaries(seed=int(c["seed"]), count=int(c["count"]))
    if not 0 < canaries.count <= MAX_CANARIES or not 0 <= canaries.seed < 2**63:
        raise CanaryError(
            f"{c['client_id']}: expected 1 to {MAX_CANARIES} canaries and a seed in [0, 2^63), got "
            f"{canaries.count} and {canaries.seed}"
        )
    return str(c["client_id"]), canaries, str(c["included"]), dict(c["scores"])


def recorded_epsilons(entries: list[dict]) -> dict[str, tuple[float, float]]:
    """Each client's largest recorded (epsilon, delta) in the ledger: its whole history on that data,
    earlier runs included, which covers this run's canaries and may exceed what this run spent."""
    out: dict[str, tuple[float, float]] = {}
    for e in entries:
        if e.get("kind") == "client" and e.get("status") == "trained":
            client = str(e["client_id"])
            out[client] = max(out.get(client, (0.0, 0.0)), (float(e["epsilon"]), float(e["delta"])))
    return out
