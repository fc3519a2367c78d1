"""Counts for the reliability report, incremented by tests only after their assertions pass.

conftest.py writes them to build/reliability-report.json at the end of the session.
"""

from __future__ import annotations

REPORT: dict[str, dict[str, int]] = {"bad_inputs_rejected": {}, "faults_survived": {}, "invariant_checks_passed": {}}


def count(kind: str, name: str, n: int = 1) -> None:
    REPORT[kind][name] = REPORT[kind].get(name, 0) + n


def merge(other: dict[str, dict[str, int]]) -> None:
    """Add another process's counts (a pytest-xdist worker's) to this one's."""
    for kind, items in other.items():
        for name, n in items.items():
            count(kind, name, n)


def totals() -> dict[str, int]:
    return {kind: sum(items.values()) for kind, items in REPORT.items()}
