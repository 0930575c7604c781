"""safejson's nesting limit: JSON with no more containers than the limit cannot nest
deeper than it, so its depth is not measured; one container more is measured and
refused when it nests past the limit."""

from __future__ import annotations

import pytest

from tensorbridge.errors import FileFormatError
from tensorbridge.formats import safejson


def nested(levels: int) -> bytes:
    return b"[" * levels + b"1" + b"]" * levels + b" " * 400  # room in the size budget


def test_few_containers_are_not_measured(monkeypatch):
    def fail(*args):
        raise AssertionError("depth measured")

    monkeypatch.setattr(safejson, "_max_depth", fail)
    value = safejson.loads(nested(safejson.MAX_DEPTH), "f", "x")  # at the limit
    for _ in range(safejson.MAX_DEPTH):
        (value,) = value
    assert value == 1
    got = safejson.loads(b'{"a": [1, {"b": [2]}], "c": {}}', "f", "x")
    assert got == {"a": [1, {"b": [2]}], "c": {}}


def test_one_level_over_the_limit_is_still_refused():
    deep = safejson.MAX_DEPTH + 1
    with pytest.raises(FileFormatError, match=f"nests at least {deep} levels deep"):
        safejson.loads(nested(deep), "f", "x")
