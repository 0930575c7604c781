"""h5 files that must end quickly, in bounded memory, with a tensor or a typed refusal.

Each file is built here, then read in a subprocess (tests/hostile/bounded.py) under a
wall-clock and an address-space limit; the test checks the outcome, the time and the peak
memory. The first test shows that plain h5py hangs on the corrupt global heap, so the
others prove something.
"""

from __future__ import annotations

import zlib

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .bounded import MIB, run_bounded

#: Peak RSS of a subprocess that imports tensorbridge, numpy and h5py and reads a small file.
BASE_RSS = 200 * MIB

LOAD = """
import tensorbridge.files as tbf
with tbf.open(ARGS[0]) as r:
    RESULT = {"keys": r.keys(), "skipped": r.skipped, "metadata": r.metadata,
              "nbytes": sum(r.read(k).nbytes for k in r.keys())}
"""


def corrupt_heap(path, *, attr_on="root") -> None:
    """An h5py file whose string attribute lives in a global heap collection whose free-space
    object has size 0: libhdf5 parses it in an endless loop (two bytes changed)."""
    with h5py.File(path, "w") as f:
        d = f.create_dataset("x", data=np.arange(10, dtype=np.float32))
        target = f if attr_on == "root" else d
        target.attrs["note" if attr_on == "root" else "tensorbridge_dtype"] = "hello world"
    data = bytearray(path.read_bytes())
    heap = data.find(b"GCOL")
    free = heap + 16 + 16 + 16  # collection header, object 1's header, its padded data
    assert data[free : free + 2] == b"\0\0" and data[free + 8 : free + 16] != bytes(8)
    data[free + 8 : free + 16] = bytes(8)
    path.write_bytes(bytes(data))


def test_plain_h5py_hangs_on_the_corrupt_heap(tmp_path):
    p = tmp_path / "hang.h5"
    corrupt_heap(p)
    r = run_bounded(
        "import h5py\nRESULT = str(h5py.File(ARGS[0], 'r').attrs['note'])", [str(p)], timeout=3
    )
    assert r.outcome == "timeout", r


@pytest.mark.parametrize("attr_on", ["root", "dataset"])
def test_tensorbridge_refuses_the_corrupt_heap_at_once(tmp_path, attr_on):
    p = tmp_path / "hang.h5"
    corrupt_heap(p, attr_on=attr_on)
    r = run_bounded(LOAD, [str(p)], timeout=30, mem_limit=2 << 30)
    assert r.outcome == "refused", r
    assert r.error_type == "FileFormatError"
    assert "the global heap collection at byte" in r.detail
    assert "free space) but size 0" in r.detail
    assert r.wall < 10 and r.peak_rss < BASE_RSS


def test_intact_heap_is_read(tmp_path):
    p = tmp_path / "fine.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=np.arange(10, dtype=np.float32))
        f.attrs["note"] = "hello world"
        f.attrs["fixed"] = np.bytes_(b"abc")
        f.attrs["epochs"] = 3
    r = run_bounded(LOAD, [str(p)], timeout=30)
    assert r.outcome == "ok", r
    assert r.result == {
        "keys": ["x"],
        "skipped": {},
        "nbytes": 40,
        "metadata": {"note": "hello world", "fixed": "abc"},
    }


# --- amplification: each must end in bounded time and memory ------------------------------


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> int:
    """Peak RSS of the same read of a one-tensor file: what every case is measured against."""
    p = tmp_path_factory.mktemp("base") / "tiny.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=np.zeros(4, np.float32))
    r = run_bounded(LOAD, [str(p)], timeout=60)
    assert r.outcome == "ok", r
    return r.peak_rss


def _bounded(path, baseline, returned: int, *, slack: int = 48 * MIB):
    r = run_bounded(LOAD, [str(path)], timeout=60, mem_limit=3 << 30)
    assert r.outcome in ("ok", "refused"), r
    # the result (and the copies a caller holds) plus a fixed slack, never the declared sizes
    assert r.peak_rss <= baseline + 3 * returned + slack, (r.peak_rss - baseline) / MIB
    assert r.wall < 30, r.wall
    return r


def test_one_dataset_under_256_names_is_read_once(tmp_path, baseline):
    p = tmp_path / "links.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("w", data=np.ones(1 << 20, np.float32))  # 4 MiB
        for i in range(255):
            f[f"alias{i:03d}"] = f["w"]
    r = _bounded(p, baseline, 4 * MIB)
    assert r.outcome == "ok" and r.result["keys"] == ["alias000"]
    assert r.result["nbytes"] == 4 * MIB and len(r.result["skipped"]) == 255


def test_2000_unallocated_datasets_materialise_nothing(tmp_path, baseline):
    p = tmp_path / "unalloc.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("real", data=np.arange(10.0))
        for i in range(2000):
            f.create_dataset(f"u{i}", shape=(500_000,), dtype="u1")  # never written
    assert p.stat().st_size < 2 * MIB
    r = _bounded(p, baseline, 80)
    assert r.outcome == "ok" and r.result["keys"] == ["real"]
    assert set(r.result["skipped"].values()) == {
        "never written: no storage is allocated for its 500000 bytes"
    }


@pytest.fixture(scope="module")
def zeros_256mib() -> bytes:
    """A 256 KB deflate stream of 256 MiB of zeros."""
    z = zlib.compressobj(9)
    piece = bytes(16 * MIB)
    out = [z.compress(piece) for _ in range(16)]
    return b"".join(out) + z.flush()


def test_a_4_byte_dataset_with_a_256_mib_chunk_is_not_inflated(tmp_path, baseline, zeros_256mib):
    p = tmp_path / "bigchunk.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("ok", data=np.arange(3.0))
        d = f.create_dataset(
            "x", shape=(1,), maxshape=(None,), chunks=(1 << 26,), dtype="f4", compression="gzip"
        )
        d.id.write_direct_chunk((0,), zeros_256mib)
    r = _bounded(p, baseline, 24)
    assert r.outcome == "ok" and r.result["keys"] == ["ok"]
    assert "chunks hold 268435456 bytes each, for a tensor of 4 bytes" in r.result["skipped"]["x"]


def test_a_small_chunk_with_a_huge_deflate_stream_is_not_inflated(tmp_path, baseline, zeros_256mib):
    p = tmp_path / "inflate.h5"
    with h5py.File(p, "w") as f:  # plain h5py allocates the whole 256 MiB to read 4 KiB
        d = f.create_dataset("x", shape=(1024,), chunks=(1024,), dtype="f4", compression="gzip")
        d.id.write_direct_chunk((0,), zeros_256mib)
    r = _bounded(p, baseline, 4096)
    assert r.outcome == "refused" and r.error_type == "UnsafeContentError", r


def test_4000_groups_open_in_linear_time(tmp_path, baseline):
    p = tmp_path / "groups.h5"
    with h5py.File(p, "w") as f:
        for i in range(4000):
            f.create_group(f"g{i}").create_dataset("b", data=np.float32(i))
    # 4000 names, infos and open dataset handles are Python objects: a larger fixed slack
    r = _bounded(p, baseline, 16_000, slack=80 * MIB)
    assert r.outcome == "ok" and len(r.result["keys"]) == 4000


# --- fuzz: link and chunk geometry (in process: small files, every outcome checked) -----------


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shape=st.lists(st.integers(0, 9), min_size=1, max_size=3),
    chunk=st.lists(st.integers(1, 12), min_size=3, max_size=3),
    written=st.sampled_from(["all", "part", "none"]),
    gzip=st.booleans(),
    hard=st.integers(0, 4),
    soft=st.integers(0, 2),
    group_alias=st.booleans(),
)
def test_fuzzed_link_and_chunk_geometry(
    tmp_path, shape, chunk, written, gzip, hard, soft, group_alias
):
    import tensorbridge.formats.h5 as tbh5
    from tensorbridge.errors import TensorBridgeError

    shape = tuple(shape)
    chunk = tuple(chunk[: len(shape)])
    p = tmp_path / "geo.h5"
    a = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    with h5py.File(p, "w") as f:
        g = f.create_group("g")
        d = g.create_dataset(
            "d",
            shape=shape,
            dtype="f4",
            chunks=chunk if a.size else None,
            maxshape=(None,) * len(shape),
            compression="gzip" if gzip else None,
        )
        if written == "all" and a.size:
            d[...] = a
        elif written == "part" and a.size:
            d[(0,) * len(shape)] = 1
        for i in range(hard):
            f[f"h{i}"] = d
        for i in range(soft):
            f[f"s{i}"] = h5py.SoftLink("/g/d")
        if group_alias:
            f["galias"] = g
    with h5py.File(p, "r") as f:
        want = f["g/d"][()]
    try:
        r = tbh5.FORMAT.open(str(p))
    except TensorBridgeError:
        assert written != "all" and a.size  # only a file with nothing readable is refused
        return
    with r:
        names = r.keys()
        assert len(names) == 1  # one dataset, read once whatever its number of names
        got = r.read(names[0])
        assert got.tobytes() == want.tobytes() and got.shape == shape
        fully = written == "all" or a.size == 0 or want.size == 0
        grid = int(np.prod([-(-s // c) for s, c in zip(shape, chunk, strict=True)]))
        assert fully or (written == "part" and grid == 1), r.skipped
        assert len(r.skipped) == hard + soft + group_alias


def corrupt_big_heap(path) -> None:
    """A collection over 4096 bytes whose endless free-space object lies past the first 4096:
    libhdf5 reads those 4096 first, then the rest from where it stopped."""
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(10, dtype=np.float32))
        f.attrs["note"] = "x" * 10_000
    data = bytearray(path.read_bytes())
    heap = data.find(b"GCOL")
    assert int.from_bytes(data[heap + 8 : heap + 16], "little") > 8192
    data[heap + 24 : heap + 32] = (5000).to_bytes(8, "little")  # object 1 now ends at 5032
    data[heap + 5032 : heap + 5048] = bytes(16)  # where a free-space object of size 0 begins
    path.write_bytes(bytes(data))


def test_a_corrupt_heap_past_its_first_4096_bytes_is_refused_too(tmp_path):
    p = tmp_path / "bighang.h5"
    corrupt_big_heap(p)
    plain = run_bounded(
        "import h5py\nRESULT = str(h5py.File(ARGS[0], 'r').attrs['note'])[:9]", [str(p)], timeout=3
    )
    assert plain.outcome == "timeout", plain
    r = run_bounded(LOAD, [str(p)], timeout=30, mem_limit=2 << 30)
    assert r.outcome == "refused" and "free space) but size 0" in r.detail, r
    assert r.wall < 10


@pytest.fixture(scope="module")
def heap_file(tmp_path_factory) -> tuple[bytes, int]:
    p = tmp_path_factory.mktemp("heap") / "h.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=np.arange(10, dtype=np.float32))
        f.attrs["a"] = "hello world"
        f.attrs["b"] = "y" * 300
        f.attrs["c"] = "z" * 5000  # the collection is over 4096 bytes
    data = p.read_bytes()
    return data, data.find(b"GCOL")


# in process: a hang would stop the whole run (pytest-timeout's thread method), not pass
@pytest.mark.timeout(300, method="thread")
@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 9000), st.sampled_from([0, 255, 1, 8, 16])), min_size=1, max_size=3
    )
)
def test_fuzzed_global_heaps_never_hang(tmp_path, heap_file, edits):
    import tensorbridge.formats.h5 as tbh5
    from tensorbridge.errors import TensorBridgeError

    data, heap = heap_file
    d = bytearray(data)
    for offset, value in edits:
        d[min(heap + offset, len(d) - 1)] = value
    p = tmp_path / "fz.h5"
    p.write_bytes(bytes(d))
    try:
        with tbh5.FORMAT.open(str(p)) as r:
            for k in r.keys():
                r.read(k)
    except TensorBridgeError:
        pass
