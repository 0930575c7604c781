"""h5 files that must end quickly, in bounded memory, with a tensor or a typed refusal.

Each file is built here, then read in a subprocess (tests/hostile/bounded.py) under a
wall-clock and an address-space limit; the test checks the outcome, the time and the peak
memory. The first test shows that plain h5py hangs on the corrupt global heap, so the
others prove something.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

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
    assert data[free:free + 2] == b"\0\0" and data[free + 8:free + 16] != bytes(8)
    data[free + 8:free + 16] = bytes(8)
    path.write_bytes(bytes(data))


def test_plain_h5py_hangs_on_the_corrupt_heap(tmp_path):
    p = tmp_path / "hang.h5"
    corrupt_heap(p)
    r = run_bounded("import h5py\nRESULT = str(h5py.File(ARGS[0], 'r').attrs['note'])",
                    [str(p)], timeout=3)
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
    assert r.result == {"keys": ["x"], "skipped": {}, "nbytes": 40,
                        "metadata": {"note": "hello world", "fixed": "abc"}}
