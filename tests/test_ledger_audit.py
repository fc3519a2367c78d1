"""Privacy ledger and audit (RELIABILITY privacy checks: audit detects an edited ledger;
a client whose budget would be exceeded does not train and says so)."""

from __future__ import annotations

import json

import pytest

from common.ledger import Ledger, entry_hash, verify_chain
from common.privacy import Mechanism, epsilon_pld, epsilon_rdp
from server.tools.audit import audit_entries, run_audit
from tests.reliability import count


def client_entry(round_: int, history: list[Mechanism], *, budget: float = 0.0, client: str = "c0") -> dict:
    last = history[-1]
    return {
        "round": round_, "kind": "client", "client_id": client, "status": "trained", "fingerprint": f"fp-{client}",
        "noise_multiplier": last.noise_multiplier, "clipping_norm": 1.0, "sample_rate": last.sample_rate,
        "steps": last.steps, "epsilon": epsilon_pld(history, delta=1e-5),
        "epsilon_rdp": epsilon_rdp(history, delta=1e-5), "delta": 1e-5, "accountant": "pld",
        "epsilon_budget": budget,
        "history": [{"noise_multiplier": m.noise_multiplier, "sample_rate": m.sample_rate, "steps": m.steps}
                    for m in history],
    }


def honest_ledger(rounds: int = 3, budget: float = 0.0) -> Ledger:
    ledger, history = Ledger(), []
    for r in range(1, rounds + 1):
        history = [*history, Mechanism(noise_multiplier=1.2, sample_rate=0.05, steps=30)]
        ledger.append(client_entry(r, history, budget=budget))
    return ledger


def test_honest_ledger_passes_and_the_chain_verifies():
    ledger = honest_ledger()
    assert verify_chain(ledger.entries) == []
    assert audit_entries(ledger.entries).ok


def test_edited_epsilon_breaks_the_hash():
    ledger = honest_ledger()
    ledger.entries[1]["epsilon"] = 0.1
    problems = audit_entries(ledger.entries).problems
    assert any("hash does not match" in p for p in problems)


def test_forged_entry_with_recomputed_hashes_is_caught_by_re_derivation():
    ledger = honest_ledger()
    forged = Ledger()
    for e in ledger.entries:  # a forger lowers epsilon and rebuilds the whole chain
        body = {k: v for k, v in e.items() if k not in ("hash", "prev_hash", "seq")}
        if body["round"] == 2:
            body["epsilon"] = body["epsilon"] / 2
        forged.append(body)
    assert verify_chain(forged.entries) == []
    problems = audit_entries(forged.entries).problems
    assert any("the mechanisms give" in p for p in problems)


def test_removed_entry_breaks_the_chain():
    ledger = honest_ledger()
    del ledger.entries[1]
    assert any("prev_hash" in p for p in verify_chain(ledger.entries))


def test_forgotten_history_is_caught():
    ledger = Ledger()
    m = Mechanism(noise_multiplier=1.2, sample_rate=0.05, steps=30)
    ledger.append(client_entry(1, [m, m]))
    ledger.append(client_entry(2, [m]))  # round 2 claims less history than round 1 had
    assert any("privacy forgotten" in p for p in audit_entries(ledger.entries).problems)


def test_overspend_is_caught():
    ledger = honest_ledger(rounds=3, budget=0.5)
    assert any("overspent" in p for p in audit_entries(ledger.entries).problems)


def test_an_overspend_of_one_percent_is_caught_and_spending_exactly_the_budget_is_not():
    """Hardening class 10 (a surviving planted mutant: an audit that tolerated overspend up to
    twice the budget passed every test, whose overspends were all large)."""
    spent = honest_ledger(rounds=3).entries[-1]["epsilon"]
    over = audit_entries(honest_ledger(rounds=3, budget=spent * 0.99).entries).problems
    assert [p for p in over if "overspent" in p] == [
        f"entry 2 (round 3, c0): overspent: epsilon {spent:.4f} > budget {spent * 0.99:.4f}"]
    assert audit_entries(honest_ledger(rounds=3, budget=spent).entries).ok
    count("bad_inputs_rejected", "ledger overspending its budget by 1%")


def anchored_run(run_dir, ledger: Ledger) -> None:
    """A run directory as the server leaves it: the ledger, its copy in the last checkpoint, the round ledger."""
    from common.config import FedtuneConfig
    from server.checkpoint import Checkpoint, save_checkpoint

    ledger.write(run_dir / "privacy-ledger.jsonl")
    rounds = sorted({e["round"] for e in ledger.entries})
    config = FedtuneConfig(dp_sample=True, dp_target_epsilon=3.0).to_run_config()
    save_checkpoint(run_dir / "checkpoints", Checkpoint(server_round=rounds[-1], adapter={}, strategy={},
                                                        meta={"config": config, "ledger": ledger.entries}))
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps({
        "round": r, "aggregated": sorted({e["client_id"] for e in ledger.entries if e["round"] == r}),
        "refused": []}) + "\n" for r in rounds))


def test_run_audit_writes_its_exports_and_flags_a_missing_ledger(tmp_path):
    assert not run_audit(tmp_path).ok
    anchored_run(tmp_path, honest_ledger())
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "heldout_accuracy": 0.5 + r / 10}) + "\n"
                                                    for r in range(4)))
    result = run_audit(tmp_path)
    assert result.ok, result.problems
    for name in ("audit.csv", "audit.json", "audit-epsilon.png", "audit-accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "audit.json").read_text())["ok"] is True


def test_entry_hash_ignores_only_its_own_hash():
    e = {"a": 1, "hash": "x"}
    assert entry_hash(e) == entry_hash({"a": 1})
    assert entry_hash(e) != entry_hash({"a": 2})


def test_a_tiny_calibrated_epsilon_passes_its_own_audit():
    """Hardening class 2 (the audit's verdict at the edges): a run calibrated to epsilon 0.01
    (noise multiplier ~170) failed its audit because Opacus' default RDP orders overstate tiny
    epsilons (0.103 against the run's 0.0117); the re-derivation now uses the run's order grid."""
    from common.privacy import calibrate_noise

    z = calibrate_noise(target_epsilon=0.01, delta=1e-5, sample_rate=1 / 8, steps=24)
    ledger = Ledger()
    ledger.append(client_entry(1, [Mechanism(noise_multiplier=z, sample_rate=1 / 8, steps=24)], budget=0.01))
    result = audit_entries(ledger.entries)
    assert result.ok, result.problems
    assert abs(result.rows[0]["check_rdp"] - ledger.entries[0]["epsilon_rdp"]) < 1e-6  # same orders, same value


def test_an_independent_estimate_above_the_budget_is_reported_with_its_margin():
    """Hardening class 2: PLD (binding) meets the budget, Opacus' PRV estimate lands above it by less
    than its own error: a note with both values and the margin, not a silent pass or an overspend."""
    history = [Mechanism(noise_multiplier=0.7625, sample_rate=0.125, steps=24)]
    pld = epsilon_pld(history, delta=1e-5)
    ledger = Ledger()
    ledger.append(client_entry(3, history, budget=pld + 1e-6))  # the budget the calibration just met
    result = audit_entries(ledger.entries)
    assert result.ok, result.problems
    prv = result.rows[0]["check_prv"]  # 8.0062 against PLD's 7.9956: PRV's estimate sits about 0.01 higher
    assert prv > pld + 1e-6
    assert len(result.notes) == 1 and "binding PLD epsilon 7.9956" in result.notes[0] and f"{prv:.4f}" in result.notes[0]
    roomy = Ledger()
    roomy.append(client_entry(3, history, budget=9.0))  # above both: nothing to note
    assert audit_entries(roomy.entries).notes == []


def two_clients_three_rounds() -> Ledger:
    ledger, history = Ledger(), {"c0": [], "c1": []}
    for r in range(1, 4):
        for c in ("c0", "c1"):
            history[c] = [*history[c], Mechanism(noise_multiplier=1.2, sample_rate=0.05, steps=30)]
            ledger.append(client_entry(r, history[c], client=c))
    return ledger


def test_removing_ledger_entries_is_caught_by_the_ledgers_anchors(tmp_path):
    """Hardening class 1: dropping the last entry, the whole last round, or every entry leaves a chain
    that verifies on its own; the checkpoint's copy (its length and head hash) and rounds.jsonl do not
    agree with it, and the audit says so. So does an entry appended beyond the checkpoint."""
    honest = two_clients_three_rounds()
    anchored_run(tmp_path, honest)
    assert run_audit(tmp_path).ok, run_audit(tmp_path).problems
    path = tmp_path / "privacy-ledger.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    cases = {"last entry": lines[:-1], "last round": lines[:-2], "every entry": [],
             "an appended entry": [*lines, json.dumps(Ledger(honest.entries).append(
                 client_entry(4, [Mechanism(noise_multiplier=1.2, sample_rate=0.05, steps=30)]))) + "\n"]}
    for case, kept in cases.items():
        path.write_text("".join(kept))
        result = run_audit(tmp_path)
        assert not result.ok, case
        assert any("ledger: expected the 6 entries" in p for p in result.problems), (case, result.problems)
        if case in ("last entry", "last round", "every entry"):
            assert any("of rounds.jsonl trained or refused" in p for p in result.problems), (case, result.problems)
        count("bad_inputs_rejected", f"privacy ledger with {case} removed or added")


# --- Hardening, second pass (issue 39): malformed files, a consistent rollback, every verdict -------

def released(run_dir, ledger: Ledger, upto: int) -> None:
    """adapters/round-NNNN (and final) as the server writes them: each names the ledger it was trained through."""
    from server.rundir import ADAPTER_RECORD

    for r in range(1, upto + 1):
        count_ = sum(1 for e in ledger.entries if e["round"] <= r)
        head = ledger.entries[count_ - 1]["hash"]
        for name in (f"round-{r:04d}", *(["final"] if r == upto else [])):
            (run_dir / "adapters" / name).mkdir(parents=True, exist_ok=True)
            (run_dir / "adapters" / name / ADAPTER_RECORD).write_text(json.dumps(
                {"round": r, "ledger_entries": count_, "ledger_head": head}))


def test_malformed_ledger_and_round_lines_are_problems_with_their_line_never_a_traceback(tmp_path):
    anchored_run(tmp_path, honest_ledger())
    path = tmp_path / "privacy-ledger.jsonl"
    good = path.read_text().splitlines()
    missing = json.loads(good[1])
    del missing["epsilon"]
    cases = {"[1, 2]": "privacy-ledger.jsonl:2: expected a JSON object, got list",
             "{\"kind\": \"client\"": "privacy-ledger.jsonl:2: expected one JSON object per line, got broken JSON",
             json.dumps(missing): "privacy-ledger.jsonl:2: expected the fields ['epsilon'] of a client (trained) entry",
             json.dumps({**missing, "epsilon": "high"}): "privacy-ledger.jsonl:2: expected numbers in ['epsilon']"}
    for line, expected in cases.items():
        path.write_text("\n".join([good[0], line, good[2]]) + "\n")
        result = run_audit(tmp_path)
        assert not result.ok and any(p.startswith(expected) for p in result.problems), (line, result.problems)
        count("bad_inputs_rejected", f"ledger line {line[:30]}")
    path.write_text("\n".join(good) + "\n")
    rounds = tmp_path / "rounds.jsonl"
    rounds.write_text(rounds.read_text() + "[]\n{broken\n")
    problems = run_audit(tmp_path).problems
    assert any(p.startswith("rounds.jsonl:4: expected a round object") for p in problems), problems
    assert any(p.startswith("rounds.jsonl:5: expected one JSON object per line") for p in problems), problems
    rounds.unlink()
    assert "rounds.jsonl: expected the round ledger of this DP run beside its privacy ledger, found none (removed)" \
        in run_audit(tmp_path).problems
    count("bad_inputs_rejected", "malformed or missing rounds.jsonl in a DP run")


def test_a_consistent_rollback_is_caught_by_the_released_adapters_and_the_clients_own_records(tmp_path):
    """Deleting the last round from the ledger, its checkpoint and its line of rounds.jsonl leaves a ledger
    that agrees with every anchor it had; the adapters released after that round (round-0003, final) name
    the ledger they were trained through, and the clients' own records name the rounds they trained."""
    from common.budget import PrivacyRecord
    from server.checkpoint import Checkpoint, save_checkpoint

    full = two_clients_three_rounds()
    for e in full.entries:
        e["run_id"] = 7
    full = Ledger(rechained(full.entries))
    anchored_run(tmp_path, full)
    released(tmp_path, full, 3)
    records = tmp_path / "records"
    for client in ("c0", "c1"):
        record = PrivacyRecord(path=records / f"fp-{client}.json", fingerprint=f"fp-{client}", delta=1e-5)
        for e in (x for x in full.entries if x["client_id"] == client):
            record.append(run="7", server_round=e["round"], mechanism=Mechanism.from_dict(e["history"][-1]),
                          clipping_norm=1.0)
    assert run_audit(tmp_path, records=[records]).ok, run_audit(tmp_path, records=[records]).problems

    rolled = Ledger(full.entries[:4])  # rounds 1 and 2 only, with the checkpoint and rounds.jsonl to match
    rolled.write(tmp_path / "privacy-ledger.jsonl")
    (tmp_path / "checkpoints" / "round-0003.safetensors").unlink()
    (tmp_path / "checkpoints" / "round-0003.sha256").unlink()
    from common.config import FedtuneConfig

    save_checkpoint(tmp_path / "checkpoints", Checkpoint(server_round=2, adapter={}, strategy={}, meta={
        "config": FedtuneConfig(dp_sample=True, dp_target_epsilon=3.0).to_run_config(), "ledger": rolled.entries}))
    rounds = (tmp_path / "rounds.jsonl").read_text().splitlines()
    (tmp_path / "rounds.jsonl").write_text("\n".join(rounds[:2]) + "\n")
    result = run_audit(tmp_path)
    rollback = [p for p in result.problems if "rolled back behind a released adapter" in p]
    assert sorted(p.split(" ")[0] for p in rollback) == ["adapters/final", "adapters/round-0003"], result.problems
    with_records = run_audit(tmp_path, records=[records]).problems
    assert any("it trained in (run, round) [('7', 3)], which the ledger does not show" in p for p in with_records)
    count("bad_inputs_rejected", "a consistent rollback of the last round (ledger, checkpoint, rounds.jsonl)")


def rechained(entries: list[dict]) -> list[dict]:
    ledger = Ledger()
    for e in entries:
        ledger.append({k: v for k, v in e.items() if k not in ("seq", "prev_hash", "hash")})
    return ledger.entries


@pytest.mark.parametrize("field, factor, expected", [
    ("epsilon", 0.99, "the mechanisms give"),  # understated by 1% of the budget: the PRV accountant
    ("epsilon", 1.01, "the mechanisms give"),  # overstated likewise
    ("epsilon_rdp", 0.99, "Opacus RDP gives"),  # the RDP cross-check
])
def test_a_client_epsilon_off_by_one_percent_of_its_budget_is_caught_by_each_accountant(field, factor, expected):
    history = [Mechanism(noise_multiplier=1.2, sample_rate=0.05, steps=30)] * 3
    entry = client_entry(3, history)
    entry["epsilon_budget"] = entry["epsilon"]
    honest = Ledger()
    honest.append(dict(entry))
    assert audit_entries(honest.entries).ok, audit_entries(honest.entries).problems
    entry[field] = entry[field] + (factor - 1) * entry["epsilon_budget"]
    forged = Ledger()
    forged.append(entry)
    assert any(expected in p for p in audit_entries(forged.entries).problems)
    count("bad_inputs_rejected", f"client {field} off by 1% of its budget")


def test_an_rdp_figure_below_the_tight_one_and_a_round_not_at_the_end_of_its_history_are_caught():
    m1, m2 = Mechanism(noise_multiplier=1.2, sample_rate=0.05, steps=30), Mechanism(noise_multiplier=2.0,
                                                                                     sample_rate=0.05, steps=30)
    low = client_entry(1, [m1])
    low["epsilon_rdp"] = low["epsilon"] * 0.9
    ledger = Ledger()
    ledger.append(low)
    assert any("RDP epsilon below the tight epsilon" in p for p in audit_entries(ledger.entries).problems)
    wrong = client_entry(2, [m1, m2])
    wrong["noise_multiplier"] = 1.2  # the round claims another mechanism than its history's last
    ledger = Ledger()
    ledger.append(wrong)
    assert any("not the last one of its history" in p for p in audit_entries(ledger.entries).problems)


def federation_ledger(budget: float = 0.0, rounds: int = 3) -> Ledger:
    from common.config import FedtuneConfig
    from server.privacy import federation_entry

    cfg = FedtuneConfig(dp_client="server-fixed", dp_client_noise_multiplier=1.5, dp_client_epsilon_budget=budget)
    ledger = Ledger()
    for r in range(1, rounds + 1):
        ledger.append(federation_entry(ledger, cfg, server_round=r, population=10, sampled=5, accepted=5,
                                       clipping_norm=0.5, noise_denominator=5))
    return ledger


def test_federation_verdicts_honest_understated_overspent_and_met_exactly():
    honest = federation_ledger()
    assert audit_entries(honest.entries).ok, audit_entries(honest.entries).problems
    spent = honest.entries[-1]["epsilon"]
    assert audit_entries(federation_ledger(budget=spent).entries).ok  # met exactly
    over = audit_entries(federation_ledger(budget=spent * 0.99).entries).problems
    assert any("overspent" in p for p in over)
    under = [dict(e) for e in honest.entries]
    under[-1]["epsilon"] = spent * 0.98
    assert any("the mechanisms give" in p for p in audit_entries(rechained(under)).problems)
    count("bad_inputs_rejected", "federation epsilon understated, and overspent by 1%")


def test_the_audit_composes_identical_mechanisms_once_with_the_same_epsilon():
    """A 200-round run's audit re-derived every client's growing history mechanism by mechanism
    (30 minutes for a distributed DP run); identical mechanisms are now added up first, which
    composition allows: Opacus' RDP gives the same epsilon, PRV the same within its error."""
    from common.opacus import PRVAccountant, RDPAccountant, accountant_with_history
    from common.privacy import RDP_ORDERS
    from server.tools.audit import PRV_ERROR, _opacus_prv, _opacus_rdp, _steps

    history = [{"noise_multiplier": 0.9, "sample_rate": 0.015, "steps": 1}] * 150 + \
        [{"noise_multiplier": 1.2, "sample_rate": 0.02, "steps": 3}] * 20 + \
        [{"noise_multiplier": 0.9, "sample_rate": 0.015, "steps": 1}] * 30
    grouped = _steps(history)
    assert grouped == ((0.9, 0.015, 180), (1.2, 0.02, 60))
    flat = [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in history]
    rdp = accountant_with_history(RDPAccountant(), flat).get_epsilon(1e-5, alphas=list(RDP_ORDERS))
    assert _opacus_rdp(grouped, 1e-5) == pytest.approx(rdp, rel=1e-9)
    prv = accountant_with_history(PRVAccountant(), flat[:40]).get_epsilon(1e-5, eps_error=PRV_ERROR)
    assert abs(_opacus_prv(_steps(history[:40]), 1e-5) - prv) <= 2 * PRV_ERROR


def test_the_rdp_cross_check_accepts_dp_accountings_fractional_orders_and_nothing_outside_opacus_bounds():
    """Found by a deployed run (tests/test_deployment.py): 3 rounds of 40 DP-SGD steps at q 0.125, sigma 1
    record an RDP epsilon of 10.834 (dp-accounting), where Opacus gives 10.788 over the same orders: the
    best order is fractional (2.8) and there the two libraries' series differ. An honest entry passes; one
    below Opacus' tightest value, or above its integer-order value, is still caught."""
    from server.tools.audit import _opacus_rdp, _steps, tolerance

    entry = client_entry(3, [Mechanism(noise_multiplier=1.0, sample_rate=0.125, steps=40)] * 3)
    assert entry["epsilon_rdp"] == pytest.approx(10.8336, abs=1e-3)
    honest = Ledger()
    honest.append(dict(entry))
    assert audit_entries(honest.entries).ok, audit_entries(honest.entries).problems
    floor = _opacus_rdp(_steps(entry["history"]), 1e-5)
    ceiling = _opacus_rdp(_steps(entry["history"]), 1e-5, integer_orders=True)
    assert floor < entry["epsilon_rdp"] < ceiling
    for forged_value in (floor - 2 * tolerance(entry), ceiling + 2 * tolerance(entry)):
        forged = Ledger()
        forged.append({**entry, "epsilon_rdp": forged_value})
        assert any("Opacus RDP gives" in p for p in audit_entries(forged.entries).problems), forged_value
    count("bad_inputs_rejected", "RDP epsilon outside Opacus' bounds (fractional-order gap allowed)", 2)
