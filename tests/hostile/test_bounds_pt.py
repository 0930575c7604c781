"""Hostile .pt files must end (read or refused) within bounded time and memory.

Each file of make_hostile_pt is loaded with ``tb.load`` in a subprocess (run_bounded:
wall-clock limit and RLIMIT_AS), and the test checks the outcome, the message, the wall
time and the peak RSS above a baseline (the same subprocess loading a small real
checkpoint). The limits are generous multiples of what was measured (docs/reliability.md)
so that a loaded CI machine does not fail them, yet each is far below what the same file
cost before the guards (seconds to minutes, gigabytes).

Two bounded fuzz campaigns (hypothesis, fixed seed) run in one subprocess each: random
pickle programs over the memo/stack opcodes, and compressed storage records of every
method with mutated bytes and declared sizes.
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from .bounded import MIB, run_bounded
from .make_hostile_pt import GENERATORS, checkpoint, s, tensor

LOAD = """
import tensorbridge as tb
out = tb.load(ARGS[0])
RESULT = [len(out), sum(a.nbytes for a in out.values())]
"""

#: name -> (outcome, regex the refusal matches (or the result), extra peak RSS allowed)
CASES: dict[str, tuple[str, object, int]] = {
    "memo-billion-laughs": ("refused", "reuses its containers so often", 96 * MIB),
    "memo-billion-laughs-of-tensors": ("refused", "reuses its containers so often", 96 * MIB),
    "repr-of-laughs-in-refusal": (
        "refused",
        r"sets state \[\[\[.{0,80}\.\.\. on a _Tensor",
        32 * MIB,
    ),
    "repr-of-laughs-as-dict-key": (
        "refused",
        r"a dict key is a list \(\[\[\[.{0,60}\.\.\.\)",
        32 * MIB,
    ),
    "data-pkl-deflate-bomb": ("refused", "inflates 65.* more than 64:1", 32 * MIB),
    "metadata-json-bomb": (
        "refused",
        "tensorbridge_metadata.json' inflates .* more than 64:1",
        32 * MIB,
    ),
    "metadata-json-nesting-stored": ("refused", "is not a JSON object of strings", 48 * MIB),
    "record-bzip2-bomb": ("ok", [1, 4096], 16 * MIB),
    "record-lzma-bomb": ("ok", [1, 4096], 16 * MIB),
    "record-deflate-bomb": ("ok", [1, 4096], 16 * MIB),
    "record-declared-ratio-over-1032": ("refused", "a ratio over 1032:1", 32 * MIB),
    "corrupt-deflate-record": ("refused", "fails its CRC check|decompressing .* failed", 32 * MIB),
    "corrupt-lzma-record": ("refused", r"decompressing .* failed \(LZMAError", 32 * MIB),
    "names-sharing-one-storage": ("refused", r"more than 4x its size \+ 67108864 bytes", 192 * MIB),
    "zero-stride-views": ("refused", r"more than 4x its size", 192 * MIB),
    "stride-2-62": (
        "refused",
        r"shape \[2, 2\], stride \[4611686018427387904, 1\].*needs",
        32 * MIB,
    ),
    "long-name-repeated": ("refused", "reuses its containers so often", 96 * MIB),
    # refused at the work budget (32 units per pickle byte)
    "data-pkl-many-tiny-objects": ("refused", "units of work and memory", 160 * MIB),
}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> int:
    """Peak RSS of the same subprocess loading a small real checkpoint."""
    d = tmp_path_factory.mktemp("baseline")
    p = checkpoint(
        d / "ok.pt",
        b"\x80\x02}" + s("w") + tensor("0", 4, (4,), (1,)) + b"s.",
        {"0": np.arange(4, dtype=np.float32).tobytes()},
    )
    r = run_bounded(LOAD, [str(p)])
    assert r.outcome == "ok" and r.result == [1, 16], r.detail
    return r.peak_rss


def test_every_generator_has_a_case():
    assert set(GENERATORS) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_pt_ends_within_bounds(tmp_path, baseline, name):
    outcome, expect, extra_rss = CASES[name]
    p = GENERATORS[name](tmp_path)
    r = run_bounded(LOAD, [str(p)], timeout=60, mem_limit=2 << 30)
    assert r.outcome == outcome, (r.outcome, r.detail)
    if outcome == "refused":
        assert r.error_type in ("FileFormatError", "UnsafeContentError")
        assert str(p) in r.detail
        import re

        assert re.search(expect, r.detail), r.detail
        assert len(r.detail) < 1500  # no huge repr in the message
    else:
        assert r.result == expect
    assert r.wall < 20, r.wall
    assert r.peak_rss < baseline + extra_rss, (r.peak_rss >> 20, baseline >> 20)


def test_reads_race_close_with_typed_errors_only(tmp_path):
    """Reads hold the lock close() takes: a read concurrent with close() either returns
    the right bytes or says the file is closed, never a raw OSError/ValueError."""
    import threading

    from tensorbridge.errors import FileFormatError
    from tensorbridge.formats.pt import FORMAT

    a = np.arange(1 << 16, dtype=np.float32)
    items = b"".join(s(f"w{i}") + tensor("0", a.size, (a.size,), (1,)) for i in range(4))
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        p = checkpoint(
            tmp_path / f"race{method}.pt",
            b"\x80\x02}(" + items + b"u.",
            {"0": a.tobytes()},
            method=method,
        )
        for _ in range(20):
            r = FORMAT.open(str(p))
            errors: list[BaseException] = []

            def reader(r=r, errors=errors) -> None:
                try:
                    for k in r.keys() * 3:
                        assert r.read(k).tobytes() == a.tobytes()
                except FileFormatError as exc:
                    if "closed" not in str(exc):
                        errors.append(exc)
                except BaseException as exc:  # noqa: BLE001 - any other error is the bug
                    errors.append(exc)

            t = threading.Thread(target=reader)
            t.start()
            r.close()
            t.join()
            assert errors == []


FUZZ_MEMO = r"""
import io, struct, zipfile
from hypothesis import given, settings, strategies as st, HealthCheck
from tensorbridge.errors import TensorBridgeError
from tensorbridge.formats.pt import FORMAT

def zip_of(pkl):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", b"\0" * 16)
    return buf.getvalue()

T = (b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
     b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00K\x04\x85K\x01\x85\x89"
     b"ccollections\nOrderedDict\n)RtR")
ATOMS = [b"]", b"}", b")", b"(", b"e", b"a", b"s", b"u", b"t", b"\x85", b"\x86", b"\x87",
         b"K\x01", b"X\x01\x00\x00\x00k", b"0", b"1", b"2", b"N", T, b"\x88", b"l", b"d"]
op = st.one_of(st.sampled_from(ATOMS),
               st.integers(0, 7).map(lambda i: b"q" + bytes([i])),
               st.integers(0, 7).map(lambda i: b"h" + bytes([i])))
count = [0, 0]
path = ARGS[0]

@settings(max_examples=ARGS[1], derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.lists(op, max_size=120), st.booleans())
def fuzz(ops, wrap):
    body = b"".join(ops)
    pkl = b"\x80\x02" + (b"}X\x01\x00\x00\x00x" + body + b"s." if wrap else body + b".")
    with open(path, "wb") as f:
        f.write(zip_of(pkl))
    try:
        with FORMAT.open(path) as r:
            for k in r.keys():
                r.read(k)
        count[0] += 1
    except TensorBridgeError:
        count[1] += 1

fuzz()
RESULT = count
"""

FUZZ_RECORDS = r"""
import io, zipfile, struct
from hypothesis import given, settings, strategies as st, HealthCheck
from tensorbridge.errors import TensorBridgeError
from tensorbridge.formats.pt import FORMAT

PKL = (b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00"
       b"storagectorch\nByteStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuM\x00\x10tQK\x00"
       b"M\x00\x10\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs.")
METHODS = [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
count = [0, 0]
path = ARGS[0]

@settings(max_examples=ARGS[1], derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.sampled_from(METHODS), st.binary(min_size=1, max_size=64), st.integers(1, 64),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
       st.sampled_from([None, 0, 1, 4095, 4097, 1 << 20, (1 << 32) - 1]), st.booleans())
def fuzz(method, unit, reps, flips, declared, cut):
    data = (unit * (4096 // len(unit) + 1))[:4096] if reps > 1 else (unit * 4096)[:4096]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", PKL)
        z.writestr("archive/data/0", data, compress_type=method)
    raw = bytearray(buf.getvalue())
    info = zipfile.ZipFile(io.BytesIO(bytes(raw))).getinfo("archive/data/0")
    n, e = struct.unpack_from("<HH", raw, info.header_offset + 26)
    start = info.header_offset + 30 + n + e
    for pos, val in flips:
        raw[start + pos % max(info.compress_size, 1)] = val
    if declared is not None:  # lie about the size in both headers
        struct.pack_into("<I", raw, info.header_offset + 22, declared)
        cd = raw.rfind(b"PK\x01\x02")
        struct.pack_into("<I", raw, cd + 24, declared)
    if cut:
        raw = raw[:start + info.compress_size // 2] + raw[start + info.compress_size:]
    with open(path, "wb") as f:
        f.write(bytes(raw))
    try:
        with FORMAT.open(path) as r:
            got = r.read("w")
        assert got.tobytes() == data or declared is not None or flips
        count[0] += 1
    except TensorBridgeError:
        count[1] += 1

fuzz()
RESULT = count
"""


@pytest.mark.parametrize(
    "campaign, examples",
    [(FUZZ_MEMO, 250), (FUZZ_RECORDS, 200)],
    ids=["pickle-memo", "compressed-records"],
)
def test_fuzz_campaign_ends_typed_and_bounded(tmp_path, baseline, campaign, examples):
    r = run_bounded(campaign, [str(tmp_path / "f.pt"), examples], timeout=240, mem_limit=3 << 30)
    assert r.outcome == "ok", r.detail
    ok, refused = r.result
    assert ok + refused >= examples and ok > 0 and refused > 0, r.result
    assert r.peak_rss < baseline + 256 * MIB, r.peak_rss >> 20
