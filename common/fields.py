"""Typed reads of a message record's fields.

Flower's ConfigRecord and MetricRecord map a name to any of their value types (int, float, str,
bytes, bool or a list of one of them), so what a peer sent is only known once it is read. Each
function here returns the type it names or raises FieldError naming the field, the type expected
and what arrived; the callers catch it where a peer's reply is judged. Framework-free: a record
is read as the mapping it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from common.errors import FieldError

T = TypeVar("T")


def _get(record: Mapping[str, Any] | None, key: str) -> Any:
    if record is None or key not in record:
        raise FieldError(f"expected a field {key!r}, got none")
    return record[key]


def _wrong(key: str, expected: str, value: Any) -> FieldError:
    return FieldError(f"expected {key!r} as {expected}, got {value!r}"[:240])


def as_int(record: Mapping[str, Any] | None, key: str) -> int:
    value = _get(record, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(key, "an integer", value)
    return value


def as_float(record: Mapping[str, Any] | None, key: str) -> float:
    """A number (an int is one too) as a float."""
    value = _get(record, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong(key, "a number", value)
    return float(value)


def as_str(record: Mapping[str, Any] | None, key: str) -> str:
    value = _get(record, key)
    if not isinstance(value, str):
        raise _wrong(key, "a string", value)
    return value


def as_bytes(record: Mapping[str, Any] | None, key: str) -> bytes:
    value = _get(record, key)
    if not isinstance(value, bytes):
        raise _wrong(key, "bytes", value)
    return value


def as_list(record: Mapping[str, Any] | None, key: str, kind: type[T], *, empty_if_absent: bool = False) -> list[T]:
    """A list whose items are all `kind` (ints count as floats; bools as neither). An empty list
    has no type in a record, so senders leave it out: `empty_if_absent` reads that as []."""
    if empty_if_absent and (record is None or key not in record):
        return []
    value = _get(record, key)
    if not isinstance(value, list):
        raise _wrong(key, f"a list of {kind.__name__}", value)
    out = []
    for item in value:
        if kind is float and isinstance(item, int) and not isinstance(item, bool):
            item = float(item)
        if not isinstance(item, kind) or (isinstance(item, bool) and kind in (int, float)):
            raise _wrong(key, f"a list of {kind.__name__}", value)
        out.append(item)
    return out
