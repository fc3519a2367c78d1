"""The reliability report: what the passing tests rejected, survived and checked.

A test calls `count(kind, name)` after the assertion that shows it; the count is held for that
test and enters the report only if the whole test passes (conftest.py's report hook), so a
case counted before a later assertion fails is not reported. Bad inputs and faults are
reported as distinct named cases (one input exercised in two orders is one case); invariant
checks as the number of checks made. conftest.py writes build/reliability-report.json at the
end of the session with the session's outcome and the tests whose counts were left out.
"""

from __future__ import annotations

KINDS = ("bad_inputs_rejected", "faults_survived", "invariant_checks_passed")
REPORT: dict[str, dict[str, int]] = {kind: {} for kind in KINDS}
FAILED: list[str] = []  # tests whose counts were discarded because they did not pass
_pending: dict[str, dict[str, int]] = {kind: {} for kind in KINDS}


def count(kind: str, name: str, n: int = 1) -> None:
    if kind not in KINDS:
        raise ValueError(f"reliability count: expected one of {KINDS}, got {kind!r}")
    _pending[kind][name] = _pending[kind].get(name, 0) + n


def settle(test: str, passed: bool) -> None:
    """Move the test's pending counts into the report if it passed; otherwise drop them."""
    if passed:
        merge(_pending)
    elif any(_pending.values()):
        FAILED.append(test)
    for items in _pending.values():
        items.clear()


def merge(other: dict[str, dict[str, int]]) -> None:
    """Add counts (a passed test's, or a pytest-xdist worker's report) to the report."""
    for kind in KINDS:
        for name, n in other.get(kind, {}).items():
            REPORT[kind][name] = REPORT[kind].get(name, 0) + n


def totals() -> dict[str, int]:
    return {"bad_inputs_rejected": len(REPORT["bad_inputs_rejected"]),
            "faults_survived": len(REPORT["faults_survived"]),
            "invariant_checks_passed": sum(REPORT["invariant_checks_passed"].values())}
