"""common/fields.py: typed reads of a peer's record fields, each refusal naming the field, the
type expected and what arrived (RELIABILITY bad inputs: malformed client replies and server messages)."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from common.errors import FieldError
from common.fields import as_bytes, as_float, as_int, as_list, as_str

RECORD = ConfigRecord({"n": 3, "x": 0.5, "s": "a", "b": b"\x00", "flag": True, "ints": [1, 2], "floats": [1.5, 2.0],
                       "strs": ["a"], "flags": [True]})


def test_each_reader_returns_its_type():
    assert as_int(RECORD, "n") == 3 and as_float(RECORD, "x") == 0.5 and as_float(RECORD, "n") == 3.0
    assert isinstance(as_float(RECORD, "n"), float)
    assert as_str(RECORD, "s") == "a" and as_bytes(RECORD, "b") == b"\x00"
    assert as_list(RECORD, "ints", int) == [1, 2] and as_list(RECORD, "floats", float) == [1.5, 2.0]
    assert as_list(RECORD, "ints", float) == [1.0, 2.0]  # an int is a number
    assert as_list(RECORD, "absent", int, empty_if_absent=True) == []  # an empty list has no type on the wire


@pytest.mark.parametrize("read, message", [
    (lambda: as_int(RECORD, "x"), "expected 'x' as an integer, got 0.5"),
    (lambda: as_int(RECORD, "flag"), "expected 'flag' as an integer, got True"),  # a bool is not a count
    (lambda: as_float(RECORD, "s"), "expected 's' as a number, got 'a'"),
    (lambda: as_float(RECORD, "flag"), "expected 'flag' as a number, got True"),
    (lambda: as_str(RECORD, "b"), "expected 'b' as a string, got b'\\x00'"),
    (lambda: as_bytes(RECORD, "s"), "expected 's' as bytes, got 'a'"),
    (lambda: as_list(RECORD, "strs", int), "expected 'strs' as a list of int, got ['a']"),
    (lambda: as_list(RECORD, "flags", int), "expected 'flags' as a list of int, got [True]"),
    (lambda: as_list(RECORD, "n", int), "expected 'n' as a list of int, got 3"),
    (lambda: as_int(RECORD, "absent"), "expected a field 'absent', got none"),
    (lambda: as_int(None, "n"), "expected a field 'n', got none"),  # the record itself is missing
])
def test_a_wrong_or_missing_field_is_named_with_what_arrived(read, message):
    with pytest.raises(FieldError) as err:
        read()
    assert str(err.value) == message
