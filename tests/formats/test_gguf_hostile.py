"""Hostile and broken GGUF files: each refused by type and message, in bounded time and memory;
and a bounded byte/structure fuzz of the reader."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorbridge.files as tbf
from tensorbridge.errors import FileFormatError, TensorBridgeError, UnsafeContentError
from tests.hostile.bounded import MIB, run_bounded


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_u32(key: str, v: int) -> bytes:
    return s(key) + struct.pack("<II", 4, v)


def tinfo(name: str, ne: list[int], tid: int = 0, offset: int = 0) -> bytes:
    return (
        s(name)
        + struct.pack("<I", len(ne))
        + b"".join(struct.pack("<Q", d) for d in ne)
        + struct.pack("<IQ", tid, offset)
    )


def gguf_bytes(
    kvs: list[bytes],
    tensors: list[bytes],
    data: bytes = b"",
    version: int = 3,
    n_kv: int | None = None,
    n_t: int | None = None,
    align: int = 32,
) -> bytes:
    head = b"GGUF" + struct.pack(
        "<IQQ", version, len(tensors) if n_t is None else n_t, len(kvs) if n_kv is None else n_kv
    )
    head += b"".join(kvs) + b"".join(tensors)
    head += bytes(-len(head) % align)
    return head + data


def valid() -> bytes:
    return gguf_bytes(
        [kv_u32("n", 1)],
        [tinfo("a", [4]), tinfo("b", [2, 2], 0, 32)],
        np.arange(4, dtype="<f4").tobytes() + bytes(16) + np.ones(4, "<f4").tobytes() + bytes(16),
    )


def _write(tmp_path, data: bytes, name: str = "x.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_valid_baseline(tmp_path):
    out = tbf.load(_write(tmp_path, valid()))
    assert out["a"].tolist() == [0, 1, 2, 3] and out["b"].shape == (2, 2)


CASES = {
    "bad magic": (b"GGML" + valid()[4:], FileFormatError, "not b'GGUF'"),
    "version 1": (gguf_bytes([], [], version=1), FileFormatError, "version 1 is not supported"),
    "truncated header": (valid()[:30], FileFormatError, "truncated"),
    "huge kv count": (gguf_bytes([], [], n_kv=2**62), FileFormatError, "needs"),
    "huge tensor count": (gguf_bytes([], [], n_t=2**60), FileFormatError, "needs"),
    "huge string length": (
        gguf_bytes([s("k") + struct.pack("<IQ", 8, 2**63)], []),
        FileFormatError,
        "needs",
    ),
    "long key": (
        gguf_bytes([s("k" * 70000) + struct.pack("<II", 4, 1)], []),
        FileFormatError,
        "65535-byte limit",
    ),
    "huge array": (
        gguf_bytes([s("a") + struct.pack("<IIQ", 9, 0, 2**61)], []),
        FileFormatError,
        "items",
    ),
    "huge string array": (
        gguf_bytes([s("a") + struct.pack("<IIQ", 9, 8, 2**40)], []),
        FileFormatError,
        "items",
    ),
    "unknown value type": (
        gguf_bytes([s("a") + struct.pack("<I", 13)], []),
        FileFormatError,
        "unknown value type 13",
    ),
    "deep arrays": (
        gguf_bytes(
            [
                s("a")
                + struct.pack("<I", 9)
                + struct.pack("<IQ", 9, 1) * 12
                + struct.pack("<IQ", 4, 0)
            ],
            [],
        ),
        FileFormatError,
        "nests arrays",
    ),
    "many nested arrays": (
        gguf_bytes(
            [s("a") + struct.pack("<IIQ", 9, 9, 100_000) + struct.pack("<IQ", 4, 0) * 100_000], []
        ),
        FileFormatError,
        "inner arrays",
    ),
    "duplicate key": (
        gguf_bytes([kv_u32("k", 1), kv_u32("k", 2)], []),
        UnsafeContentError,
        "more than once",
    ),
    "duplicate tensor": (
        gguf_bytes([], [tinfo("a", [1]), tinfo("a", [1], 0, 32)], bytes(64)),
        UnsafeContentError,
        "more than once",
    ),
    "unknown tensor type": (
        gguf_bytes([], [tinfo("a", [1], 99)], bytes(32)),
        FileFormatError,
        "unknown ggml type 99",
    ),
    "five dims": (gguf_bytes([], [tinfo("a", [1] * 5)], bytes(32)), FileFormatError, "at most 4"),
    "dims overflow": (
        gguf_bytes([], [tinfo("a", [2**32, 2**32, 2**32])]),
        FileFormatError,
        "2\\*\\*62",
    ),
    "empty but huge dims": (
        gguf_bytes([], [tinfo("a", [0, 2**40, 2**40])]),
        FileFormatError,
        "2\\*\\*62",
    ),
    "block misfit": (
        gguf_bytes([], [tinfo("a", [33, 1], 8)], bytes(64)),
        FileFormatError,
        "block size",
    ),
    "misaligned": (
        gguf_bytes([], [tinfo("a", [1], 0, 4)], bytes(32)),
        FileFormatError,
        "not a multiple of the alignment",
    ),
    "past the end": (
        gguf_bytes([], [tinfo("a", [1000])], bytes(32)),
        FileFormatError,
        "ends past the end",
    ),
    "overlap": (
        gguf_bytes([], [tinfo("a", [16]), tinfo("b", [16], 0, 32)], bytes(128)),
        UnsafeContentError,
        "overlap",
    ),
    "bad alignment": (
        gguf_bytes([kv_u32("general.alignment", 3)], []),
        FileFormatError,
        "power of two",
    ),
    "string alignment": (
        gguf_bytes([s("general.alignment") + struct.pack("<I", 8) + s("32")], []),
        FileFormatError,
        "UINT32",
    ),
    "name not utf-8": (
        gguf_bytes([], [tinfo(b"\xff\xfe".decode("latin-1"), [1])], bytes(32)),
        None,
        None,
    ),
    "bad name": (gguf_bytes([], [tinfo("../x", [1])], bytes(32)), UnsafeContentError, "'..'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused(tmp_path, case):
    data, err, text = CASES[case]
    p = _write(tmp_path, data)
    if err is None:  # latin-1 text re-encoded as UTF-8 is valid: it must just load
        assert list(tbf.load(p)) == ["\xff\xfe"]
        return
    with pytest.raises(err, match=text) as exc:
        tbf.load(p)
    assert str(p) in str(exc.value)


@pytest.mark.parametrize(
    "case",
    [
        "huge kv count",
        "huge string length",
        "huge array",
        "many nested arrays",
        "huge string array",
        "dims overflow",
    ],
)
def test_refused_within_bounds(tmp_path, case):
    p = _write(tmp_path, CASES[case][0])
    # the clock limit is run_bounded's timeout (a hang would be outcome "timeout")
    r = run_bounded(
        "import tensorbridge as tb; tb.load(ARGS[0])", [str(p)], timeout=60, mem_limit=1 << 30
    )
    assert r.outcome == "refused", r.detail
    assert r.peak_rss < 400 * MIB


def test_invalid_utf8_name_refused(tmp_path):
    p = _write(tmp_path, gguf_bytes([], [s(b"\xff") + struct.pack("<IQIQ", 1, 1, 0, 0)], bytes(32)))
    with pytest.raises(FileFormatError, match="not valid UTF-8"):
        tbf.open(p)


def test_non_utf8_string_value_round_trips(tmp_path):
    p = _write(tmp_path, gguf_bytes([s("k") + struct.pack("<I", 8) + s(b"a\xffb")], []))
    with tbf.open(p) as r:
        v = r.metadata["k"]
    assert v == "a\ufffdb"
    q = tmp_path / "y.gguf"
    tbf.save({"w": np.zeros(1, np.float32)}, q, metadata={"k": v})
    assert b"\x03\x00\x00\x00\x00\x00\x00\x00a\xffb" in q.read_bytes()


def test_big_tokenizer_loads_in_proportion(tmp_path):
    """150k strings of metadata: loads, and memory stays a small multiple of the file."""
    tokens = b"".join(s(f"tok{i}") for i in range(150_000))
    p = _write(
        tmp_path, gguf_bytes([s("tokens") + struct.pack("<IIQ", 9, 8, 150_000) + tokens], [])
    )
    r = run_bounded(
        "import tensorbridge as tb\nwith tb.open(ARGS[0]) as r:\n"
        "    RESULT = [len(r.metadata['tokens']), len(repr(r.metadata))]",
        [str(p)],
        timeout=60,
        mem_limit=1 << 30,
    )
    assert r.outcome == "ok", r.detail
    assert r.result[1] < 1000 and r.peak_rss < 300 * MIB


def test_truncated_after_open_is_an_error(tmp_path):
    p = _write(tmp_path, valid())
    with tbf.open(p) as r:
        os.truncate(p, 100)
        with pytest.raises(FileFormatError, match="ended at byte"):
            r.read("b")


FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
_BASE = valid()


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, len(_BASE) - 1), st.integers(0, 255)), max_size=8),
    st.integers(0, len(_BASE)),
)
def test_fuzz_bytes(tmp_path_factory, edits, cut):
    data = bytearray(_BASE)
    for at, byte in edits:
        data[at] = byte
    p = tmp_path_factory.mktemp("fz") / "f.gguf"
    p.write_bytes(bytes(data[:cut]) if cut < len(data) // 2 else bytes(data))
    try:
        out = tbf.load(p)
    except TensorBridgeError:
        return
    assert sum(a.nbytes for a in out.values()) <= 64 * len(data)


@FUZZ
@given(
    st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=4),
    st.integers(0, 45),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
)
def test_fuzz_tensor_info(tmp_path_factory, ne, tid, offset, ndim):
    head = (
        s("t")
        + struct.pack("<I", ndim if ndim > 4 else len(ne))
        + b"".join(struct.pack("<Q", d) for d in ne)
        + struct.pack("<IQ", tid, offset)
    )
    p = tmp_path_factory.mktemp("fz") / "f.gguf"
    p.write_bytes(gguf_bytes([], [head], bytes(256)))
    try:
        out = tbf.load(p)
    except TensorBridgeError:
        return
    assert out["t"].nbytes <= 256 * 8


def test_long_numeric_array_costs_its_bytes_not_16_times(tmp_path):
    """A 10M-item FLOAT32 metadata array (40 MB): opening the file, printing and listing
    its metadata cost about the array's bytes once more (it was ~16x: a Python float and
    its text per item), in bounded time."""
    n = 10_000_000
    data = np.arange(n, dtype="<f4")
    kv = s("big") + struct.pack("<IIQ", 9, 6, n) + data.tobytes()
    p = _write(tmp_path, gguf_bytes([kv, kv_u32("n", 1)], [tinfo("a", [4])], bytes(16)))
    r = run_bounded(
        "import tensorbridge as tb, numpy as np\n"
        "rss = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmRSS:')]"
        "[0].split()[1]) * 1024\n"
        "base = rss()\n"
        "with tb.open(ARGS[0]) as r:\n"
        "    m = dict(r.metadata)\n"
        "    text = str(m['big']) + repr(m) + ' '.join(m.values())\n"
        "    v = m['big'].value\n"
        "    RESULT = [base, len(text), v.size, float(v[-1]), v.dtype.str, m['big'].complete]",
        [str(p)],
        timeout=60,
        mem_limit=1 << 30,
    )
    assert r.outcome == "ok", r.detail
    base, text_len, size, last, dtype, complete = r.result
    assert (size, last, dtype, complete) == (n, n - 1, "<f4", False)
    assert text_len < 2000
    assert r.peak_rss - base < 2.5 * data.nbytes, (r.peak_rss - base) / data.nbytes
