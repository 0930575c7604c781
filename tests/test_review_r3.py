"""Review findings on the scale-out features (lazy arrays, to_dask, zarr, convert --workers):
each test is an input the feature tests did not use, compared against NumPy or the reference."""

from __future__ import annotations

import numpy as np
import pytest

import tensorbridge as tb

h5py = pytest.importorskip("h5py")


def test_h5_compressed_lazy_integer_index_is_0d(tmp_path):
    # deflate-chunked datasets are decoded by tensorbridge's own chunk plan: an index of ints
    # only must give a 0-d array, as NumPy and the uncompressed path do (it gave shape (1,))
    a = np.arange(60, dtype=np.float32).reshape(5, 4, 3)
    p = tmp_path / "c.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("a", data=a, chunks=(2, 3, 2), compression="gzip")
    with tb.open(p) as r:
        lazy = r.array("a")
        for ix in [(2, 3, 1), (0, 0, 0), (-1, -1, -1), (Ellipsis, 1, 1, 1), (1, None, 2, 0)]:
            got = lazy[ix]
            assert got.shape == a[ix].shape
            np.testing.assert_array_equal(got, a[ix])
