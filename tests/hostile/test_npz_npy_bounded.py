"""npz and npy files that must end quickly, in bounded memory, with tensors or a typed
refusal (each read in a subprocess under tests/hostile/bounded.py), and a bounded fuzz of
overlapping zip members."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorbridge.files as tbf
from tensorbridge.errors import FileFormatError, TensorBridgeError
from tensorbridge.formats.npz import FORMAT as NPZ

from .bounded import MIB, run_bounded
from .zipcraft import nested_npz, payload

LOAD = """
import tensorbridge.files as tbf
with tbf.open(ARGS[0]) as r:
    RESULT = {"count": len(r.keys()), "nbytes": sum(r.read(k).nbytes for k in r.keys())}
"""


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> int:
    p = tmp_path_factory.mktemp("base") / "tiny.npz"
    np.savez(p, a=np.zeros(4, np.float32))
    r = run_bounded(LOAD, [str(p)], timeout=60)
    assert r.outcome == "ok", r
    return r.peak_rss


def test_nested_members_are_refused_before_inflating_anything(tmp_path, baseline):
    p = tmp_path / "nested.npz"
    p.write_bytes(nested_npz(300, payload(1 * MIB)))  # 1.1 MB declaring 300 MiB of members
    assert p.stat().st_size < 2 * MIB
    with np.load(p) as plain:  # numpy reads all 300 members, each holding the next ones
        assert sum(plain[k].nbytes for k in plain.files) > 300 * MIB
    r = run_bounded(LOAD, [str(p)], timeout=60)
    assert r.outcome == "refused" and r.error_type == "UnsafeContentError", r
    assert "overlaps member" in r.detail
    assert r.peak_rss < baseline + 16 * MIB and r.wall < 10


def test_50k_members_open_and_read_in_bounded_time(tmp_path, baseline):
    p = tmp_path / "many.npz"
    np.savez(p, **{f"m{i}": np.arange(i % 7, dtype=np.float32) for i in range(50_000)})
    r = run_bounded(LOAD, [str(p)], timeout=120)
    assert r.outcome == "ok" and r.result["count"] == 50_000, r
    assert r.peak_rss < baseline + 200 * MIB


@pytest.mark.parametrize(
    "header",
    [
        "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 18446744073709551616), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (0x" + "f" * 9000 + ",), }",
        "{'descr': '|a5', 'fortran_order': False, 'shape': (1,), }",
    ],
)
def test_absurd_npy_headers_are_refused_quickly(tmp_path, baseline, header):
    body = header.encode() + b"\n"
    p = tmp_path / "h.npy"
    p.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body)
    r = run_bounded(LOAD, [str(p)], timeout=60)
    assert r.outcome == "refused" and r.error_type == "FileFormatError", r
    assert r.wall < 5 and r.peak_rss < baseline + 16 * MIB


# --- fuzz: zip geometry ---------------------------------------------------------------------


def _central_entries(data: bytes) -> list[int]:
    """Offsets of the central directory entries of ``data``."""
    out, at = [], data.find(b"PK\x01\x02")
    while at >= 0:
        out.append(at)
        at = data.find(b"PK\x01\x02", at + 4)
    return out


@pytest.fixture(scope="module")
def seeds() -> list[bytes]:
    out = []
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        buf = io.BytesIO()
        arrays = {f"a{i}": np.full(500 + 300 * i, i, np.uint8) for i in range(4)}
        with zipfile.ZipFile(buf, "w", compression) as z:
            for k, v in arrays.items():
                member = io.BytesIO()
                np.save(member, v)
                z.writestr(f"{k}.npy", member.getvalue())
        out.append(buf.getvalue())
    out.append(nested_npz(4, payload(2000)))
    return out


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2),
    edits=st.lists(
        st.tuples(
            st.integers(0, 7),
            st.sampled_from(["offset", "csize", "usize"]),
            st.integers(-4000, 4000),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_fuzzed_zip_geometry_is_read_within_the_file_or_refused(tmp_path, seeds, seed, edits):
    data = bytearray(seeds[seed])
    entries = _central_entries(bytes(data))
    for which, field, delta in edits:
        at = entries[which % len(entries)] + {"offset": 42, "csize": 20, "usize": 24}[field]
        (value,) = struct.unpack_from("<L", data, at)
        struct.pack_into("<L", data, at, max(0, min(value + delta, 0xFFFFFFFE)))
    p = tmp_path / "fz.npz"
    p.write_bytes(bytes(data))
    try:
        with NPZ.open(str(p)) as r:
            spans = sorted(
                (zi.header_offset, zi.header_offset + zi.compress_size)
                for zi in r._members.values()
            )
            total = sum(r.read(k).nbytes for k in r.keys())
    except TensorBridgeError:
        return
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start  # no two members share bytes
    assert total <= 1032 * len(data)


def test_bytes_before_the_archive_are_refused_and_after_it_ignored_like_np_load(tmp_path):
    p = tmp_path / "g.npz"
    np.savez(p, a=np.arange(5.0))
    archive = p.read_bytes()
    p.write_bytes(archive + b"trailing bytes")  # np.load reads it; so do we
    with np.load(p) as plain:
        assert tbf.load(p)["a"].tobytes() == plain["a"].tobytes()
    p.write_bytes(b"#!/bin/sh\nexit 0\n" + archive)  # np.load does not take it for a zip
    with pytest.raises(ValueError):
        np.load(p)
    with pytest.raises(FileFormatError, match="does not start with a zip member"):
        tbf.load(p)
