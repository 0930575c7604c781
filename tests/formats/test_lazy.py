"""Lazy arrays (reader.array) and the Dask hand-off (tb.to_dask).

Exactness is checked by comparing bytes with NumPy indexing of the same array; "reads only
what the index needs" by counting the bytes the positioned reads fetch, and, for a 16 GiB
sparse file, by time and peak memory in a subprocess.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import struct

import ml_dtypes
import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.errors import ConversionError, FileFormatError
from tensorbridge.formats import lazy

from ..hostile.bounded import MIB, run_bounded

FORMATS = ["safetensors", "npy", "npz", "pt", "h5", "sharded"]


def _save(d, fmt, arr):
    if fmt == "npy":
        p = d / "m.npy"
        tb.save(arr, p)
        return p, "array"
    p = f"{d}/ckpt/" if fmt == "sharded" else d / f"m.{fmt}"
    tb.save({"w": arr}, p)
    return p, "w"


def _same(got, want):
    want = np.array(want, order="C")
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got.tobytes() == want.tobytes()


def _random_index(rng, shape):
    parts = []
    for size in shape[: rng.randint(0, len(shape))]:
        if rng.random() < 0.3:
            parts.append(rng.randint(-size, size - 1))
        else:
            parts.append(
                slice(
                    rng.choice([None, rng.randint(-size - 2, size + 2)]),
                    rng.choice([None, rng.randint(-size - 2, size + 2)]),
                    rng.choice([None, 1, 2, 3, -1, -2, -5]),
                )
            )
    if rng.random() < 0.2:
        parts.insert(rng.randint(0, len(parts)), None)
    if rng.random() < 0.2:
        parts.append(Ellipsis)  # after the indexed axes, so they keep their positions
    return tuple(parts)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bool", "int64", "complex64"])
def test_every_basic_index_matches_numpy(tmp_path, fmt, dtype):
    rng = np.random.default_rng(1)
    npdt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    arr = (rng.standard_normal((6, 5, 7)) * 4).astype(npdt)
    path, name = _save(tmp_path, fmt, arr)
    r = random.Random(fmt + dtype)
    with tb.open(path) as f:
        a = f.array(name)
        assert (a.shape, a.dtype, a.ndim, len(a)) == (arr.shape, arr.dtype, 3, 6)
        for index in [
            (),
            0,
            -1,
            Ellipsis,
            (Ellipsis, -1),
            (slice(None, None, -1),),
            (None, 2, Ellipsis, None),
            (slice(4, 4),),
            (1, 2, 3),
            (slice(5, 0, -2), slice(None), slice(1, 7, 3)),
        ]:
            _same(a[index], arr[index])
        for _ in range(60):
            index = _random_index(r, arr.shape)
            _same(a[index], arr[index])


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_d_and_empty_tensors(tmp_path, fmt):
    for arr in (np.float32(3.5).reshape(()), np.zeros((0, 4), np.int16)):
        d = tmp_path / f"{arr.ndim}"
        d.mkdir()
        path, name = _save(d, fmt, arr)
        with tb.open(path) as f:
            a = f.array(name)
            _same(a[()], arr[()] if arr.ndim else arr)
            _same(a[...], arr[...])
            if arr.ndim:
                _same(a[:, 1:3], arr[:, 1:3])


@pytest.mark.parametrize("fmt", FORMATS + ["zarr"])
def test_iterating_stops_at_the_end_like_numpy(tmp_path, fmt):
    """for row in a / list(a): an index past the end is an IndexError (as NumPy's), so
    iteration stops there (it raised a plain ConversionError after the last row)."""
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    path, name = _save(tmp_path, fmt, arr) if fmt != "zarr" else (tmp_path / "m.zarr", "w")
    if fmt == "zarr":
        tb.save({"w": arr}, path)
    with tb.open(path) as f:
        a = f.array(name)
        rows = list(a)
        assert [r.tobytes() for r in rows] == [r.tobytes() for r in arr]
        with pytest.raises(IndexError, match="out of range for axis 0"):
            a[3]
        with pytest.raises(IndexError, match="3 entries"):
            a[0, 0, 0]


def test_asarray_copy_false_is_refused(tmp_path):
    """NumPy 2's protocol: copy=False must raise when a copy cannot be avoided (a file's
    bytes always are a copy); it returned a copy silently."""
    path, name = _save(tmp_path, "safetensors", np.zeros((3, 4), np.float32))
    with tb.open(path) as f:
        a = f.array(name)
        with pytest.raises(ValueError, match="copy=False"):
            np.asarray(a, copy=False)
        assert np.asarray(a).shape == (3, 4) and np.asarray(a, dtype=np.float64).dtype == "f8"
    (tmp_path / "z").mkdir()
    path, name = _save(tmp_path / "z", "safetensors", np.float32(1).reshape(()))
    with tb.open(path) as f, pytest.raises(TypeError, match="0-d"):
        iter(f.array(name))


def test_refusals_name_the_problem(tmp_path):
    path, name = _save(tmp_path, "safetensors", np.zeros((3, 4), np.float32))
    with tb.open(path) as f:
        a = f.array(name)
        with pytest.raises(ConversionError, match="out of range for axis 1"):
            a[0, 4]
        with pytest.raises(ConversionError, match="3 entries"):
            a[0, 0, 0]
        with pytest.raises(ConversionError, match="basic indexes only"):
            a[[0, 1]]
        with pytest.raises(ConversionError, match="mask"):
            a[True]
        with pytest.raises(ConversionError, match="more than one"):
            a[..., 0, ...]
        with pytest.raises(FileFormatError, match="no tensor named"):
            f.array("nope")


def test_reads_only_the_bytes_the_index_needs(tmp_path, monkeypatch):
    """Count the bytes the positioned reads fetch: a row, a column with a step, a corner."""
    arr = np.arange(512 * 1024, dtype=np.float32).reshape(512, 1024)  # 2 MiB, 4 KiB rows
    path, name = _save(tmp_path, "safetensors", arr)
    monkeypatch.setattr(lazy, "COALESCE_BYTES", 8192)
    fetched = []
    real = os.preadv

    def counting(fd, buffers, offset):
        n = real(fd, buffers, offset)
        fetched.append(n)
        return n

    monkeypatch.setattr(os, "preadv", counting)
    with tb.open(path) as f:
        a = f.array(name)
        for index, most in [
            ((7,), 4096),
            ((slice(100, 103), slice(0, 8)), 3 * 4096),
            ((slice(None, None, 64), 5), 8 * 8192),
            ((-1, -1), 4),
        ]:
            fetched.clear()
            _same(a[index], arr[index])
            assert sum(fetched) <= most, (index, sum(fetched))
    assert sum(fetched) == 4


def test_a_replaced_or_truncated_file_is_refused_not_mixed(tmp_path):
    path, name = _save(tmp_path, "safetensors", np.arange(40, dtype=np.float32).reshape(4, 10))
    f = tb.open(path)
    a = f.array(name)
    _same(a[1], np.arange(10, 20, dtype=np.float32))
    with open(path, "r+b") as fh:  # same file, cut short
        fh.truncate(os.path.getsize(path) - 40)
    with pytest.raises(FileFormatError, match="truncated"):
        a[3]
    tb.save({"w": np.ones((4, 10), np.float32)}, path)  # atomically replaced: a new file
    with pytest.raises(FileFormatError, match="replaced"):
        a[0]
    f.close()


def test_pickles_as_path_and_reopens(tmp_path):
    arr = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    path, name = _save(tmp_path, "sharded", arr)
    with tb.open(path) as f:
        a = pickle.loads(pickle.dumps(f.array(name)))
    _same(a[1, ::-1], arr[1, ::-1])
    assert len(pickle.dumps(a)) < 500  # the data never travels


def _sparse_safetensors(path, rows, cols):
    header = json.dumps(
        {"big": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, rows * cols * 4]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.seek(8 + len(header) + 5 * cols * 4)
        fh.write(np.arange(cols, dtype=np.float32).tobytes())  # row 5
        fh.truncate(8 + len(header) + rows * cols * 4)


def test_a_few_rows_of_a_16_gib_tensor_are_quick_and_small(tmp_path):
    path = tmp_path / "huge.safetensors"
    _sparse_safetensors(path, 1 << 22, 1024)  # 16 GiB, almost all holes
    assert os.path.getsize(path) > 16 << 30
    r = run_bounded(
        """
        import time, tensorbridge as tb
        t0 = time.perf_counter()
        arrays = tb.to_dask(ARGS[0])
        rows = arrays["big"][4:7, ::2].compute()
        with tb.open(ARGS[0]) as f:
            one = f.array("big")[5, 10]
        RESULT = [rows.shape, float(rows[1].sum()), float(one), time.perf_counter() - t0]
    """,
        [str(path)],
        timeout=60,
        mem_limit=0,
    )
    assert r.outcome == "ok", r.detail
    shape, total, one, seconds = r.result
    assert shape == [3, 512] and one == 10.0
    assert total == float(np.arange(0, 1024, 2, dtype=np.float32).sum())
    assert r.peak_rss < 300 * MIB, r.peak_rss  # the interpreter, numpy and dask included
    assert seconds < 20  # generous: the bound is "not 16 GiB of reading", measured in bench


@pytest.mark.parametrize("fmt", FORMATS)
def test_to_dask_every_format_in_file_order(tmp_path, fmt):
    pytest.importorskip("dask")
    rng = np.random.default_rng(2)
    tree = {
        "b": rng.standard_normal((9, 4)).astype(np.float32),
        "a": rng.integers(0, 9, (5,), dtype=np.int64),
        "c": rng.standard_normal((3, 3)).astype(ml_dtypes.bfloat16),
    }
    if fmt == "npy":
        tree = {"array": tree["b"]}
        tb.save(tree["array"], tmp_path / "m.npy")
        path = tmp_path / "m.npy"
    else:
        path = f"{tmp_path}/ckpt/" if fmt == "sharded" else tmp_path / f"m.{fmt}"
        tb.save(tree, path)
    arrays = tb.to_dask(path, chunks=2)
    with tb.open(path) as f:
        assert list(arrays) == f.keys()
    for name, arr in tree.items():
        d = arrays[name]
        assert d.dtype == arr.dtype and d.shape == arr.shape
        _same(d.compute(), arr)
        _same(d[::-1][1:].compute(), arr[::-1][1:])


def test_to_dask_chunks_follow_h5_chunks_and_whole_rows(tmp_path):
    import h5py

    pytest.importorskip("dask")
    p = tmp_path / "c.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=np.zeros((100, 60), np.float32), chunks=(7, 60))
    d = tb.to_dask(p, chunks="auto")["x"]
    assert all(c % 7 == 0 for c in d.chunks[0][:-1])
    tb.save({"y": np.zeros((10, 6), np.float32)}, tmp_path / "r.safetensors")
    d = tb.to_dask(tmp_path / "r.safetensors")["y"]
    assert d.chunks[1] == (6,)  # whole rows: one contiguous read per chunk


def test_to_dask_reads_nothing_until_compute(tmp_path, monkeypatch):
    pytest.importorskip("dask")
    path, _ = _save(tmp_path, "safetensors", np.ones((64, 8), np.float32))
    calls = []
    real = lazy.read_index
    monkeypatch.setattr(lazy, "read_index", lambda *a: calls.append(a) or real(*a))
    arrays = tb.to_dask(path, chunks=16)
    s = (arrays["w"][10:20] * 2).sum()
    assert calls == []
    assert float(s.compute()) == 160.0 and calls


def test_to_dask_names_are_checked_first(tmp_path):
    pytest.importorskip("dask")
    path, _ = _save(tmp_path, "safetensors", np.ones(3, np.float32))
    with pytest.raises(FileFormatError, match="no tensor named 'x'"):
        tb.to_dask(path, names=["w", "x"])
    assert list(tb.to_dask(path, names=["w"])) == ["w"]


def test_dask_is_imported_only_when_used():
    r = run_bounded("""
        import sys, numpy as np, tensorbridge as tb
        RESULT = [m for m in ("dask", "distributed", "zarr") if m in sys.modules]
    """)
    assert r.outcome == "ok" and r.result == [], r
