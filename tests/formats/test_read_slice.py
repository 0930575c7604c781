"""``Reader.read_slice``: rows of the first axis, in every format, byte for byte."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import tensorbridge as tb

FILES = ["m.npy", "m.npz", "m.safetensors", "m.pt", "m.h5", "shards/"]


@pytest.fixture(params=FILES)
def written(request, tmp_path):
    rng = np.random.default_rng(0)
    w = rng.integers(0, 2**16, (7, 3), dtype=np.uint16).view(ml_dtypes.bfloat16)
    tree = (
        {"w": w}
        if request.param == "m.npy"
        else {"w": w, "b": np.arange(5, dtype=np.float32), "s": np.array(2.5)}
    )
    path = str(tmp_path / request.param) + ("/" if request.param.endswith("/") else "")
    if request.param.endswith("/"):
        tb.save(tree, path, max_shard_size="40B")
    else:
        tb.save(tree, path)
    name = "array" if request.param == "m.npy" else "w"
    return path, name, w, tree


@pytest.mark.parametrize(
    "index", [0, 3, -1, slice(2, 5), slice(None), slice(5, 2), slice(-3, None), np.int64(4)]
)
def test_rows_are_the_same_bytes_as_indexing_the_whole_tensor(written, index):
    path, name, w, _ = written
    with tb.open(path) as r:
        got = r.read_slice(name, index)
    want = w[index]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()
    assert got.flags.writeable


@pytest.mark.parametrize(
    "index, match",
    [
        (7, "out of range"),
        (-8, "out of range"),
        (slice(0, 4, 2), "step of 1"),
        (True, "int or a slice"),
        ("1", "int or a slice"),
        (2.0, "int or a slice"),
    ],
)
def test_bad_indexes_are_refused_with_a_fix(written, index, match):
    path, name, _, _ = written
    with tb.open(path) as r:
        with pytest.raises(tb.ConversionError, match=f"{match}.*Fix:"):
            r.read_slice(name, index)


@pytest.mark.parametrize("dest", FILES[1:])  # a .npy file holds one array: see above
def test_a_0d_tensor_cannot_be_sliced(tmp_path, dest):
    path = str(tmp_path / dest) + ("/" if dest.endswith("/") else "")
    tb.save({"s": np.array(2.5), "v": np.ones(2)}, path)
    with tb.open(path) as r:
        with pytest.raises(tb.ConversionError, match="0-d.*Fix: use read"):
            r.read_slice("s", 0)


@pytest.mark.parametrize("dest", FILES[1:])
def test_an_int_index_of_a_1d_tensor_is_a_0d_array(tmp_path, dest):
    path = str(tmp_path / dest) + ("/" if dest.endswith("/") else "")
    tb.save({"v": np.arange(4, dtype=np.int16)}, path)
    with tb.open(path) as r:
        got = r.read_slice("v", 2)
    assert isinstance(got, np.ndarray) and got.shape == () and got.dtype == np.int16
    assert got.item() == 2
