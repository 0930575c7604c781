"""The safetensors header entry parse has a one-pass path for common entries; it must
accept exactly what the full checks accept, with the same result, and leave every other
entry to them (same error type and message)."""

from __future__ import annotations

import itertools

from tensorbridge.errors import TensorBridgeError
from tensorbridge.formats import safetensors as st


class Int(int):
    """An int subclass (JSON never gives one; the full checks accept it)."""


def outcome(fn, name, entry):
    try:
        return ("ok", fn(name, entry, "f.safetensors"))
    except TensorBridgeError as exc:
        return (type(exc).__name__, str(exc))


CODES = ["F32", "BF16", "BOOL", "U8", "F64", "I64", "nope", 3, None]
SHAPES = [
    [],
    [0],
    [4],
    [2, 3],
    [0, 2**62],  # empty, but its byte span overflows NumPy's limit
    [2**31, 2**31],  # 2**62 elements: bytes over 2**63 for F32
    [2**62, 1],
    [2**63],
    [-1, 2],
    [-1, 0],
    [0, -3],
    [-2, -2],
    [True, 2],
    [2.0, 3],
    [Int(2), 3],
    [1] * 64,
    [1] * 65,
    (2, 3),
    "2,3",
    None,
]
OFFSETS = [
    [0, 0],
    [0, 1],
    [0, 4],
    [0, 16],
    [8, 24],
    [0, 24],
    [0, 48],
    [5, 4],
    [-1, 3],
    [0, True],
    [0.0, 16],
    [Int(0), 24],
    [0, 24, 1],
    (0, 24),
    [0],
    None,
]


def entries():
    for code, shape, offsets in itertools.product(CODES, SHAPES, OFFSETS):
        yield {"dtype": code, "shape": shape, "data_offsets": offsets}
    good = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    yield {**good, "extra": 1}
    yield {"dtype": "F32", "shape": [2, 3]}
    yield dict(reversed(list(good.items())))  # key order does not matter
    yield [good]
    yield "F32"
    yield None


def test_one_pass_parse_agrees_with_the_full_checks():
    seen = {"ok": 0, "refused": 0}
    differ = []
    for entry in entries():
        got, want = outcome(st._parse_entry, "w", entry), outcome(st._check_entry, "w", entry)
        seen["ok" if want[0] == "ok" else "refused"] += 1
        if got != want:
            differ.append((entry, got, want))
    assert not differ, differ[:5]
    assert seen["ok"] > 20 and seen["refused"] > 1000  # both kinds are exercised


def test_the_one_pass_path_is_taken_for_common_entries(monkeypatch):
    def fail(*args):
        raise AssertionError("the full checks ran")

    monkeypatch.setattr(st, "_check_entry", fail)
    info, begin, end = st._parse_entry(
        "w", {"dtype": "BF16", "shape": [3, 0, 5], "data_offsets": [7, 7]}, "f"
    )
    assert (info.name, info.dtype, info.shape, begin, end) == ("w", "bfloat16", (3, 0, 5), 7, 7)
    info, begin, end = st._parse_entry(
        "w", {"data_offsets": [8, 32], "shape": [2, 3], "dtype": "F32"}, "f"
    )
    assert (info.dtype, info.shape, begin, end) == ("float32", (2, 3), 8, 32)
