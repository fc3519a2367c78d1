"""`fedtune audit RUN_DIR`: check a run's privacy ledger without trusting the run.

- verifies the hash chain (no entry edited, removed or reordered);
- checks the ledger against its anchors outside the file: the copy in the run's latest
  checkpoint (hash-checked; its length and head hash must be the ledger's) and the round ledger
  `rounds.jsonl` (every round that trained or refused a client under sample-level DP has that
  client's entry), so dropping the last entries, the last round or the whole file is caught;
- re-derives every client epsilon from the recorded mechanisms with Opacus' PRV and RDP
  accountants, an implementation independent of the dp-accounting library the run used;
- re-derives every federation epsilon with Flower's RDP accountant (a second code path;
  it wraps dp-accounting, so it is not independent of the run's own computation);
- under distributed DP, re-derives each Skellam epsilon with fedtune's own bound (the run's code:
  it catches a ledger that does not match its mechanisms) and holds it against Opacus' RDP epsilon
  of Gaussian noise with the same multipliers, which it can only exceed (an independent library);
  checks that every released round's mechanism is the plan's and that its sum carried at least
  the target noise (enough clients' shares);
- checks that each client's history only grows (nothing forgotten) and that no recorded
  epsilon exceeds its budget.

The binding epsilon is the one the run recorded and enforced: PLD (dp-accounting) for sample-level
DP, RDP for the federation. Opacus' PRV estimate carries its own error (eps_error 0.01 absolute);
where it lands above a budget that the binding value meets, the audit says so with the margin in a
note rather than hiding it or calling it an overspend. The RDP re-derivation uses the same grid of
orders as the run (Opacus' default grid starts at order 1.1 with few small orders and overstates
tiny epsilons: 0.10 instead of 0.012 at a noise multiplier of 170).

Writes audit.csv, audit.json, audit-epsilon.png and audit-accuracy.png into the run
directory and exits non-zero on any mismatch, overspend or broken chain.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import FedtuneError
from common.ledger import GENESIS, verify_chain
from common.privacy import SKELLAM

# How far an independent re-derivation may land from a recorded epsilon: Opacus' PRV estimate is
# asked for an error of at most PRV_ERROR (absolute), and beyond that 0.2% of the budget (of the
# epsilon itself when no budget is set), so an understatement of 1% of the budget is caught.
PRV_ERROR = 0.001
BUDGET_SHARE = 0.002
RDP_VS_RDP_REL = 0.01  # the Skellam bound against Opacus' Gaussian RDP (a lower bound, different orders)
ABS_SLACK = 0.02


@dataclass
class AuditResult:
    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # facts a reader should see that are not failures
    canaries: dict | None = None  # the empirical lower bound from the run's canaries (server/canaries.py)

    @property
    def ok(self) -> bool:
        return not self.problems


def tolerance(e: dict) -> float:
    """See PRV_ERROR: the slack of a re-derived epsilon for entry `e`, relative to its budget."""
    scale = e.get("epsilon_budget") or e.get("epsilon") or 0.0
    return PRV_ERROR + BUDGET_SHARE * abs(float(scale))


def agrees(check: float, e: dict, key: str = "epsilon") -> bool:
    return abs(check - e[key]) <= tolerance(e)


def opacus_epsilons(history: list[dict], delta: float) -> tuple[float, float]:
    """(PRV, RDP) epsilon of a Poisson-sampled DP-SGD history, with Opacus' accountants."""
    steps = _steps(history)
    return _opacus_prv(steps, delta), _opacus_rdp(steps, delta)


def _steps(history: list[dict]) -> tuple[tuple[float, float, int], ...]:
    """The history as Opacus' (noise multiplier, sample rate, steps), the steps of identical
    mechanisms added up in order of first appearance: composition does not depend on the order, so
    the epsilon is the same, and the accountants pay per distinct mechanism instead of per round."""
    steps: dict[tuple[float, float], int] = {}
    for h in history:
        if h["steps"] > 0:
            key = (h["noise_multiplier"], h["sample_rate"])
            steps[key] = steps.get(key, 0) + h["steps"]
    return tuple((z, q, n) for (z, q), n in steps.items())


# Clients that took part in the same rounds at the same rate share a history (every client of a
# distributed DP run does): each distinct history is accounted once per audit.
@functools.lru_cache(maxsize=4096)
def _opacus_prv(steps: tuple[tuple[float, float, int], ...], delta: float) -> float:
    from common.opacus import PRVAccountant, accountant_with_history

    return (
        float(accountant_with_history(PRVAccountant(), list(steps)).get_epsilon(delta, eps_error=PRV_ERROR))
        if steps
        else 0.0
    )


@functools.lru_cache(maxsize=4096)
def _opacus_rdp(steps: tuple[tuple[float, float, int], ...], delta: float, *, integer_orders: bool = False) -> float:
    from common.opacus import RDPAccountant, accountant_with_history
    from common.privacy import RDP_ORDERS

    if not steps:
        return 0.0
    orders = [a for a in RDP_ORDERS if not integer_orders or float(a).is_integer()]
    return float(accountant_with_history(RDPAccountant(), list(steps)).get_epsilon(delta, alphas=orders))


def rdp_agrees(history: list[dict], e: dict, rdp: float) -> bool:
    """Whether the recorded RDP epsilon (dp-accounting's) is what Opacus' RDP accountant allows.

    At integer orders the two libraries give the same RDP; at the fractional ones each sums its own
    series for the subsampled Gaussian, and dp-accounting's can come out higher (4.527 against 4.458 at
    order 2.5 for q 0.125, sigma 1, 120 steps, where the best order is fractional: epsilon 10.834
    against 10.788). So the recorded value must lie between Opacus' epsilon over all the orders (the
    tightest: below it the ledger understates) and over the integer orders alone (above it, no order
    the two share supports it), each with the usual tolerance.
    """
    if agrees(rdp, e, "epsilon_rdp"):
        return True
    ceiling = _opacus_rdp(_steps(history), e["delta"], integer_orders=True)
    return rdp - tolerance(e) <= e["epsilon_rdp"] <= ceiling + tolerance(e)


def flower_federation_epsilon(mechanisms: list[dict], delta: float) -> float:
    from common.flower import (
        federation_epsilon,
    )  # Flower's accountant, loaded only when a ledger has federation entries

    return federation_epsilon(mechanisms, delta)


def audit_entries(entries: list[dict], *, chain: bool = True) -> AuditResult:
    """Re-derive every (well-formed) entry, and verify the chain unless `chain` is false (run_audit
    verifies the whole file's chain, malformed lines included)."""
    result = AuditResult(problems=verify_chain(entries) if chain else [])
    histories: dict[str, list[dict]] = {}
    federation: list[dict] = []
    for e in entries:
        if e.get("kind") == "client":
            result.rows.append(_audit_client(e, histories, result.problems, result.notes))
        elif e.get("kind") == "federation":
            result.rows.append(_audit_federation(e, federation, result.problems))
        else:
            result.problems.append(f"entry {e.get('seq')}: unknown kind {e.get('kind')!r}")
    return result


def _audit_client(e: dict, histories: dict[str, list[dict]], problems: list[str], notes: list[str]) -> dict:
    where = f"entry {e.get('seq')} (round {e.get('round')}, {e.get('client_id')})"
    row = {
        "round": e["round"],
        "party": e["client_id"],
        "status": e["status"],
        "epsilon": e.get("epsilon"),
        "budget": e.get("epsilon_budget"),
        "delta": e.get("delta"),
    }
    if e["status"] == "trained":
        history = e["history"]
        last = history[-1] if history else {}
        if (last.get("noise_multiplier"), last.get("sample_rate"), last.get("steps")) != (
            e["noise_multiplier"],
            e["sample_rate"],
            e["steps"],
        ):
            problems.append(f"{where}: the round's mechanism is not the last one of its history")
        before = histories.get(e["fingerprint"], [])
        if history[: len(before)] != before:
            problems.append(f"{where}: history does not extend this client's previous entry (privacy forgotten)")
        histories[e["fingerprint"]] = history
        row.update(
            {
                "noise_multiplier": e["noise_multiplier"],
                "sample_rate": e["sample_rate"],
                "steps": e["steps"],
                "clipping_norm": e["clipping_norm"],
                "epsilon_rdp": e["epsilon_rdp"],
                "accountant": e["accountant"],
            }
        )
        if any(h.get("noise") == SKELLAM for h in history):
            row.update(_check_skellam(where, history, e["epsilon"], e["delta"], problems))
            return _check_budget(e, row, where, problems, notes)
        prv, rdp = opacus_epsilons(history, e["delta"])
        row.update({"check_prv": prv, "check_rdp": rdp})
        if not agrees(prv, e):
            problems.append(
                f"{where}: recorded epsilon {e['epsilon']:.4f} but the mechanisms give {prv:.4f} (PRV; "
                f"tolerance {tolerance(e):.4f})"
            )
        if not rdp_agrees(history, e, rdp):
            problems.append(f"{where}: recorded RDP epsilon {e['epsilon_rdp']:.4f} but Opacus RDP gives {rdp:.4f}")
        if e["epsilon_rdp"] + 1e-9 < e["epsilon"]:
            problems.append(f"{where}: RDP epsilon below the tight epsilon (impossible for honest accounting)")
    return _check_budget(e, row, where, problems, notes)


def _check_budget(e: dict, row: dict, where: str, problems: list[str], notes: list[str]) -> dict:
    budget = e.get("epsilon_budget") or 0.0
    if e["status"] == "trained" and budget > 0 and e["epsilon"] > budget + 1e-9:
        problems.append(f"{where}: overspent: epsilon {e['epsilon']:.4f} > budget {budget:.4f}")
    elif e["status"] == "trained" and budget > 0 and row.get("check_prv", 0.0) > budget:
        notes.append(
            f"{where}: the binding PLD epsilon {e['epsilon']:.4f} meets the budget {budget:.4f}; Opacus' "
            f"PRV estimate {row['check_prv']:.4f} is {row['check_prv'] - budget:.4f} above it, within "
            f"PRV's own error of {PRV_ERROR}"
        )
    return row


def _check_skellam(where: str, history: list[dict], recorded: float, delta: float, problems: list[str]) -> dict:
    """A history with distributed DP steps: epsilon again from its mechanisms (fedtune's Skellam
    bound, the same code as the run: this catches a ledger that does not match its mechanisms), and
    bounded below by Opacus' RDP of Gaussian noise with the same multipliers (an independent library:
    Skellam's bound can only be larger, so a smaller record understates the spend)."""
    from common.privacy import Mechanism

    again = _skellam_epsilon(tuple(Mechanism.from_dict(h) for h in history), delta)
    gaussian = _opacus_rdp(_steps(history), delta)  # RDP only: PRV of a long history is what took minutes
    if abs(again - recorded) > PRV_ERROR:  # the same bound, recomputed: only rounding may differ
        problems.append(f"{where}: recorded epsilon {recorded:.4f} but its mechanisms give {again:.4f} (Skellam RDP)")
    if recorded < gaussian * (1 - RDP_VS_RDP_REL) - ABS_SLACK:
        problems.append(
            f"{where}: recorded epsilon {recorded:.4f} is below {gaussian:.4f}, Opacus' RDP epsilon of "
            "Gaussian noise with the same multipliers, which a Skellam step can only exceed"
        )
    return {"check_rdp": again, "check_gaussian": gaussian}


@functools.lru_cache(maxsize=4096)
def _skellam_epsilon(mechanisms: tuple, delta: float) -> float:
    from common.privacy import epsilon_rdp

    return epsilon_rdp(list(mechanisms), delta=delta)


def _audit_distributed(e: dict, federation: list[dict], problems: list[str]) -> dict:
    """A distributed DP round: the released step's mechanism is the plan's, carried at least its
    noise (S3), and the federation's epsilon follows from every released step (S4)."""
    where = f"entry {e.get('seq')} (round {e.get('round')}, federation, distributed DP)"
    if e.get("mechanism"):
        m = e["mechanism"]
        federation.append(m)
        planned = (e["noise_multiplier"], e["sample_rate"], e["l2_sensitivity"], e["l1_sensitivity"], 1, SKELLAM)
        if (
            m.get("noise_multiplier"),
            m.get("sample_rate"),
            m.get("l2_sensitivity"),
            m.get("l1_sensitivity"),
            m.get("steps"),
            m.get("noise"),
        ) != planned:
            problems.append(f"{where}: the released mechanism {m} is not the round's plan {planned}")
        if e["summed"] < e["threshold"] or e["noise_variance_summed"] < e["noise_variance_target"] * (1 - 1e-9):
            problems.append(
                f"{where}: released a sum of {e['summed']} clients carrying noise variance "
                f"{e['noise_variance_summed']:.6g}, below the target {e['noise_variance_target']:.6g} "
                f"(threshold {e['threshold']})"
            )
    row = {
        "round": e["round"],
        "party": "federation",
        "status": f"{e['summed']}/{e['sampled']} summed",
        "epsilon": e["epsilon"],
        "budget": e.get("epsilon_budget") or 0.0,
        "delta": e["delta"],
        "noise_multiplier": e["noise_multiplier"],
        "sample_rate": e["sample_rate"],
        "steps": len(federation),
        "clipping_norm": e["clipping_norm"],
        "accountant": e["accountant"],
    }
    history = [{**m, "steps": m["steps"]} for m in federation]
    row.update(_check_skellam(where, history, e["epsilon"], e["delta"], problems) if history else {"check_rdp": 0.0})
    if row["budget"] > 0 and e["epsilon"] > row["budget"] + 1e-9:
        problems.append(f"{where}: overspent: epsilon {e['epsilon']:.4f} > budget {row['budget']:.4f}")
    return row


def _audit_federation(e: dict, federation: list[dict], problems: list[str]) -> dict:
    if e.get("mode") == "distributed":
        return _audit_distributed(e, federation, problems)
    where = f"entry {e.get('seq')} (round {e.get('round')}, federation)"
    if e.get("mechanism"):
        federation.append(e["mechanism"])
    check = flower_federation_epsilon(federation, e["delta"])
    if not agrees(check, e):
        problems.append(f"{where}: recorded epsilon {e['epsilon']:.4f} but the mechanisms give {check:.4f}")
    budget = e.get("epsilon_budget") or 0.0
    if budget > 0 and e["epsilon"] > budget + 1e-9:
        problems.append(f"{where}: overspent: epsilon {e['epsilon']:.4f} > budget {budget:.4f}")
    return {
        "round": e["round"],
        "party": "federation",
        "status": f"{e['accepted']}/{e['sampled']} aggregated",
        "epsilon": e["epsilon"],
        "budget": budget,
        "delta": e["delta"],
        "noise_multiplier": e["effective_noise_multiplier"],
        "clipping_norm": e["clipping_norm"],
        "check_rdp": check,
        "accountant": e["accountant"],
    }


def run_audit(run_dir: Path, *, records: Sequence[Path] = ()) -> AuditResult:
    """Audit a run directory's ledger; `records` are folders of the clients' own privacy records
    (a simulation's privacy dir, or what a node hands over) to hold the ledger against too."""
    ledger_path = run_dir / "privacy-ledger.jsonl"
    if not ledger_path.is_file():
        return AuditResult(problems=[f"expected a privacy ledger at {ledger_path}, found none (was DP enabled?)"])
    lines, problems = read_jsonl(ledger_path)
    entries = [e for _, e in lines]
    result = AuditResult(problems=[*problems, *verify_chain([e if isinstance(e, dict) else {} for e in entries])])
    sound: list[dict] = []
    for line, e in lines:
        shape = shape_problem(e)
        if shape:
            result.problems.append(f"{ledger_path.name}:{line}: {shape}")
        elif isinstance(e, dict):  # shape_problem says so; the check tells the type checker
            sound.append(e)
    checked = audit_entries(sound, chain=False)
    result.rows, result.notes = checked.rows, checked.notes
    result.problems.extend(checked.problems)
    dicts = [e for e in entries if isinstance(e, dict)]
    result.problems.extend(anchor_problems(run_dir, dicts))
    result.problems.extend(adapter_problems(run_dir, dicts))
    from server.canaries import audit_canaries

    canaries = audit_canaries(run_dir, sound)
    result.canaries = canaries.summary
    result.problems.extend(canaries.problems)
    result.notes.extend(canaries.notes)
    for folder in records:
        result.problems.extend(record_problems(Path(folder), sound))
    write_outputs(run_dir, result)
    return result


def anchor_problems(run_dir: Path, entries: list[dict]) -> list[str]:
    """The ledger against what the run recorded outside it: the latest checkpoint's copy of the
    ledger and the round ledger."""
    from server.checkpoint import latest_checkpoint, load_checkpoint

    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        return [f"expected checkpoints in {run_dir / 'checkpoints'} to anchor the ledger, found none"]
    try:
        ckpt = load_checkpoint(path)
        dp_sample = ckpt.run_config().dp_sample
    except (FedtuneError, KeyError) as err:
        return [f"cannot anchor the ledger on {path.name}: {err}"]
    anchored = ckpt.meta.get("ledger", [])
    problems = []

    def head(es: list[dict]) -> str:
        return str(es[-1].get("hash", "?"))[:16] if es else GENESIS[:16]

    if [e.get("hash") for e in entries] != [e.get("hash") for e in anchored]:
        problems.append(
            f"ledger: expected the {len(anchored)} entries (head {head(anchored)}) that checkpoint "
            f"{path.name} (round {ckpt.server_round}) records, got {len(entries)} (head {head(entries)}): "
            f"entries {'removed' if len(entries) < len(anchored) else 'added or replaced'}"
        )
    rounds_file = run_dir / "rounds.jsonl"
    if dp_sample and not rounds_file.is_file():
        problems.append(
            "rounds.jsonl: expected the round ledger of this DP run beside its privacy ledger, found none (removed)"
        )
    elif dp_sample:
        clients_in: dict[object, set[object]] = {}
        for e in entries:
            if e.get("kind") == "client":
                clients_in.setdefault(e.get("round"), set()).add(e.get("client_id"))
        lines, bad = read_jsonl(rounds_file)
        problems.extend(bad)
        for number, r in lines:
            if not (
                isinstance(r, dict)
                and isinstance(r.get("round"), int)
                and isinstance(r.get("aggregated"), list)
                and isinstance(r.get("refused", []), list)
            ):
                problems.append(
                    f"rounds.jsonl:{number}: expected a round object with round, aggregated and refused, "
                    f"got {str(r)[:80]}"
                )
                continue
            missing = sorted((set(r["aggregated"]) | set(r.get("refused", []))) - clients_in.get(r["round"], set()))
            if missing:
                problems.append(
                    f"ledger: round {r['round']} of rounds.jsonl trained or refused {missing}, but the "
                    "ledger has no entry for them (entries removed)"
                )
    return problems


def read_jsonl(path: Path) -> tuple[list[tuple[int, object]], list[str]]:
    """(line number, value) of every line of a JSONL file that parses, and a problem for each that does not."""
    values, problems = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            problems.append(f"{path.name}:{number}: expected one JSON object per line, got broken JSON ({err.msg})")
    return values, problems


# The fields each kind of ledger entry must carry, and those that must be numbers.
FIELDS = {
    ("client", "trained"): (
        "round",
        "client_id",
        "fingerprint",
        "noise_multiplier",
        "clipping_norm",
        "sample_rate",
        "steps",
        "epsilon",
        "epsilon_rdp",
        "delta",
        "accountant",
        "history",
    ),
    ("client", "refused"): ("round", "client_id", "fingerprint", "epsilon", "epsilon_budget", "delta"),
    ("client", "failed"): ("round", "client_id"),
    ("federation", "distributed"): (
        "round",
        "mechanism",
        "noise_multiplier",
        "sample_rate",
        "clipping_norm",
        "l2_sensitivity",
        "l1_sensitivity",
        "sampled",
        "threshold",
        "summed",
        "noise_variance_target",
        "noise_variance_summed",
        "epsilon",
        "delta",
        "accountant",
    ),
    ("federation", "client-level"): (
        "round",
        "mechanism",
        "noise_multiplier",
        "effective_noise_multiplier",
        "clipping_norm",
        "sampled",
        "accepted",
        "epsilon",
        "delta",
        "accountant",
    ),
}
TEXT_FIELDS = ("client_id", "fingerprint", "accountant", "mechanism", "history")


def shape_problem(e: object) -> str | None:
    """Why a ledger line cannot be audited (not an object, a field missing or not a number), or None."""
    if not isinstance(e, dict):
        return f"expected a JSON object, got {type(e).__name__}"
    kind = e.get("kind")
    status = (
        e.get("status") if kind == "client" else ("distributed" if e.get("mode") == "distributed" else "client-level")
    )
    fields = FIELDS.get((str(kind), str(status)))
    if fields is None:
        return f"expected a client (trained, refused, failed) or federation entry, got kind {kind!r} status {status!r}"
    missing = [f for f in fields if f not in e]
    if missing:
        return f"expected the fields {missing} of a {kind} ({status}) entry, found none"
    bad = [
        f
        for f in fields
        if f not in TEXT_FIELDS
        and (isinstance(e[f], bool) or not isinstance(e[f], (int, float)) or not math.isfinite(e[f]))
    ]
    if bad:
        return f"expected numbers in {bad}, got {[e[f] for f in bad]}"
    if status == "trained" and (
        not isinstance(e["history"], list)
        or not e["history"]
        or not all(
            isinstance(h, dict)
            and all(isinstance(h.get(k), (int, float)) for k in ("noise_multiplier", "sample_rate", "steps"))
            for h in e["history"]
        )
    ):
        return "expected a history of mechanisms (noise_multiplier, sample_rate, steps), got a malformed one"
    if kind == "federation" and e["mechanism"] is not None and not isinstance(e["mechanism"], dict):
        return f"expected a mechanism object or null, got {e['mechanism']!r}"
    return None


def adapter_problems(run_dir: Path, entries: list[dict]) -> list[str]:
    """Every released adapter (adapters/<name>) against the ledger: it names the ledger's length and head
    hash when it was trained; a ledger shorter than that, or holding another entry there, was rolled back."""
    from server.rundir import ADAPTER_RECORD

    folder, problems = run_dir / "adapters", list[str]()
    if not folder.is_dir():
        return problems
    for adapter in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.endswith((".tmp", ".old"))):
        where = f"adapters/{adapter.name}"
        try:
            record = json.loads((adapter / ADAPTER_RECORD).read_text())
            count, head, trained = int(record["ledger_entries"]), str(record["ledger_head"]), int(record["round"])
        except FileNotFoundError:
            problems.append(
                f"{where}: expected {ADAPTER_RECORD} (the round and ledger head it was trained through), found none"
            )
            continue
        except (ValueError, KeyError, TypeError):
            problems.append(
                f"{where}/{ADAPTER_RECORD}: expected the round, ledger_entries and ledger_head, got a malformed record"
            )
            continue
        at = entries[count - 1].get("hash") if 0 < count <= len(entries) else GENESIS if count == 0 else None
        if at != head:
            now = f"has {len(entries)}" if count > len(entries) else "holds another entry"
            problems.append(
                f"{where} was trained through round {trained}, when the ledger had {count} entries (head "
                f"{head[:16]}), but the ledger now {now} "
                "there: the ledger was rolled back behind a released adapter"
            )
    return problems


def record_problems(folder: Path, entries: list[dict]) -> list[str]:
    """The ledger against the clients' own privacy records: for every client record of this run's runs, the
    rounds it says it trained are the rounds the ledger says, with the same epsilon."""
    runs = {str(e["run_id"]) for e in entries if e.get("kind") == "client" and "run_id" in e}
    ledger: dict[str, dict] = {}
    for e in entries:
        if e.get("kind") == "client" and e.get("status") == "trained" and "run_id" in e:
            ledger.setdefault(e["fingerprint"], {})[(str(e["run_id"]), int(e["round"]))] = e["epsilon"]
    problems = []
    if not runs:
        return [
            f"{folder}: the ledger names no run ids to match the clients' records against (written before "
            "fedtune recorded them)"
        ]
    files = sorted(folder.glob("*.json"))
    if not files:
        return [f"{folder}: expected clients' privacy records (<fingerprint>.json), found none"]
    for path in files:
        try:
            doc = json.loads(path.read_text())
            mine = {
                (str(x["run"]), int(x["round"])): float(x["epsilon"]) for x in doc["entries"] if str(x["run"]) in runs
            }
            fingerprint = str(doc["fingerprint"])
        except (ValueError, KeyError, TypeError):
            problems.append(f"{path}: expected a client's privacy record, got an unreadable file")
            continue
        theirs = ledger.get(fingerprint, {})
        extra, lost = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        if extra:
            problems.append(
                f"client record {path.name}: it trained in (run, round) {extra}, which the ledger does not "
                "show (the ledger was rolled back, or entries removed)"
            )
        if lost:
            problems.append(
                f"client record {path.name}: the ledger shows (run, round) {lost}, which the client's own "
                "record does not"
            )
        wrong = [k for k in set(mine) & set(theirs) if abs(mine[k] - theirs[k]) > 1e-9]
        if wrong:
            problems.append(
                f"client record {path.name}: epsilon differs from the ledger's in (run, round) {sorted(wrong)}"
            )
    return problems


COLUMNS = [
    "round",
    "party",
    "status",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "clipping_norm",
    "epsilon",
    "epsilon_rdp",
    "check_prv",
    "check_rdp",
    "budget",
    "delta",
    "accountant",
]


def write_outputs(run_dir: Path, result: AuditResult) -> None:
    with open(run_dir / "audit.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.rows)
    (run_dir / "audit.json").write_text(
        json.dumps(
            {
                "ok": result.ok,
                "problems": result.problems,
                "notes": result.notes,
                "empirical_epsilon_lower_bound": result.canaries,
                "rows": result.rows,
            },
            indent=1,
        )
    )
    if result.rows:
        plot_epsilon(run_dir, result.rows)
        plot_accuracy(run_dir, result.rows)


def plot_epsilon(run_dir: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for party in sorted({r["party"] for r in rows}):
        pts = [(r["round"], r["epsilon"]) for r in rows if r["party"] == party and r.get("epsilon") is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=party)
    budgets = {r["budget"] for r in rows if r.get("budget")}
    for b in budgets:
        ax.axhline(b, color="red", ls="--", lw=1)
    if budgets:
        ax.plot([], [], color="red", ls="--", label="budget")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon (cumulative)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Privacy spent per client and for the federation")
    fig.tight_layout()
    fig.savefig(run_dir / "audit-epsilon.png", dpi=110)
    plt.close(fig)


def plot_accuracy(run_dir: Path, rows: list[dict]) -> None:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = [json.loads(line) for line in metrics.read_text().splitlines()]
    key, label = (
        ("heldout_accuracy", "held-out accuracy")
        if "heldout_accuracy" in history[0]
        else ("heldout_loss", "held-out loss")
    )  # a causal-LM run
    acc = {m["round"]: m[key] for m in history}
    eps_by_round: dict[int, float] = {}
    for r in rows:
        if r.get("epsilon") is not None and not math.isnan(r["epsilon"]):
            eps_by_round[r["round"]] = max(eps_by_round.get(r["round"], 0.0), r["epsilon"])
    pts = sorted((eps_by_round[k], acc[k]) for k in eps_by_round if k in acc)
    fig, ax = plt.subplots(figsize=(6, 4))
    if 0 in acc:
        pts = [(0.0, acc[0]), *pts]
    ax.plot(*zip(*pts, strict=True), marker="o")
    ax.set_xlabel("largest cumulative epsilon in the round")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.set_title(f"{label.capitalize()} against privacy spent")
    fig.tight_layout()
    fig.savefig(run_dir / "audit-accuracy.png", dpi=110)
    plt.close(fig)


def render_table(result: AuditResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fedtune privacy audit")
    for col in ("round", "party", "status", "noise", "q", "steps", "C", "epsilon", "eps RDP", "check", "budget"):
        table.add_column(col, justify="right" if col not in ("party", "status") else "left")

    def f(v, spec=".4f"):
        return "" if v is None else format(v, spec) if isinstance(v, float) else str(v)

    for r in result.rows:
        check = r.get("check_prv", r.get("check_rdp"))
        table.add_row(
            str(r["round"]),
            r["party"],
            r["status"],
            f(r.get("noise_multiplier")),
            f(r.get("sample_rate")),
            f(r.get("steps")),
            f(r.get("clipping_norm")),
            f(r.get("epsilon")),
            f(r.get("epsilon_rdp")),
            f(check),
            f(r.get("budget") or None),
        )
    console = Console(width=None if sys.stdout.isatty() else 160)  # full columns in files and CI logs
    console.print(table)
    if result.ok:
        console.print(
            "[green]audit passed[/green]: chain intact, every epsilon re-derived, no overspend "
            "(binding: PLD for local DP-SGD, RDP for client-level DP, Skellam RDP for distributed DP)"
        )
    if result.canaries:
        b = result.canaries
        console.print(
            f"canaries: empirical epsilon lower bound {b['epsilon']:.3f} over {b['canaries']} canaries "
            f"(confidence {b['family_confidence']:.2f} for all bounds together; recorded epsilon up to "
            f"{b['recorded_epsilon']:.3f}); per client: "
            + ", ".join(f"{c} {v['epsilon']:.3f} / {v['recorded_epsilon']:.3f}" for c, v in b["per_client"].items())
        )
    for note in result.notes:
        console.print(f"note: {note}")
    for p in result.problems:
        console.print(f"[red]problem[/red]: {p}")
