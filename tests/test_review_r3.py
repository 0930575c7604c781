"""Review findings on the scale-out features (lazy arrays, to_dask, zarr, convert --workers):
each test is an input the feature tests did not use, compared against NumPy or the reference."""

from __future__ import annotations

import os

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


def test_zarr_store_whose_root_is_an_array(tmp_path):
    # dask.array.to_zarr(x, "x.zarr") and zarr.open_array write the array at the store's root;
    # it was refused ("tensor name '' is refused: it is empty")
    zarr = pytest.importorskip("zarr")
    da = pytest.importorskip("dask.array")
    a = np.arange(91, dtype=np.float32).reshape(13, 7)
    p = str(tmp_path / "x.zarr")
    da.to_zarr(da.from_array(a, chunks=(4, 7)), p, zarr_format=3)
    assert zarr.open(p, mode="r").shape == a.shape  # the reference's own reading
    loaded = tb.load(p)
    assert list(loaded) == ["array"]
    np.testing.assert_array_equal(loaded["array"], a)
    with tb.open(p) as r:
        np.testing.assert_array_equal(r.array("array")[::-3, 2], a[::-3, 2])
        assert r.metadata == {}
    np.testing.assert_array_equal(tb.to_dask(p)["array"][5:].compute(), a[5:])


def test_a_cluster_worker_reads_a_replaced_source_afresh(tmp_path):
    # dask workers outlive the command: a reader cached by source path in a worker read the
    # OLD file of a source replaced since, and the output was "verified" with stale values
    distributed = pytest.importorskip("distributed")
    from tensorbridge.cli.convert_cmd import convert_file

    src = str(tmp_path / "src.safetensors")
    with distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        scheduler_port=0,
        silence_logs=50,
    ) as cluster:
        tb.save({"a": np.ones((4, 4), np.float32)}, src)
        convert_file(
            src,
            str(tmp_path / "o1.safetensors"),
            dtype="float16",
            scheduler=cluster.scheduler_address,
        )
        tb.save({"a": np.full((2, 3), 2, np.float32)}, src)  # replaced: a new file
        convert_file(
            src,
            str(tmp_path / "o2.safetensors"),
            dtype="float16",
            scheduler=cluster.scheduler_address,
        )
    np.testing.assert_array_equal(
        tb.load(tmp_path / "o2.safetensors")["a"], np.full((2, 3), 2, np.float16)
    )


_DIES = """
import os, sys
import tensorbridge.parallel as par
from tensorbridge.cli.convert_cmd import convert_file
from tensorbridge.errors import ConversionError
real = par._reader
def dying(src, fmt, token):  # the worker process dies (killed, out of memory) on one tensor
    reader = real(src, fmt, token)
    class Dies:
        def __getattr__(self, name):
            return getattr(reader, name)
        def read(self, name):
            if name == "l3":
                os._exit(9)
            return reader.read(name)
    return Dies()
par._reader = dying
assert par.start_method() == "fork"  # the patch reaches the workers
try:
    convert_file(sys.argv[1], sys.argv[2], dtype="float16", workers=2)
except ConversionError as e:
    print("REFUSED", e)
"""


def test_a_worker_process_that_dies_is_a_conversion_error(tmp_path):
    # the refill after a failed task submitted to the broken pool, and its BrokenProcessPool
    # (no TensorBridgeError, no fix) replaced the message
    import subprocess
    import sys

    src = tmp_path / "src"
    tb.save(
        {f"l{i}": np.full((64, 64), i, np.float32) for i in range(8)},
        f"{src}/",
        max_shard_size="20KB",
    )
    dst = tmp_path / "out.npz"
    tb.save({"old": np.arange(3)}, dst)
    before = dst.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-c", _DIES, f"{src}/", str(dst)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("REFUSED") and "worker failed" in proc.stdout
    assert dst.read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if ".tb-" in n]


def test_a_retried_task_replaces_the_spool_its_lost_attempt_left(tmp_path):
    # dask retries a task whose worker was lost with the same arguments; a worker killed while
    # writing its spool leaves the file (SIGKILL runs no cleanup), and the retry's O_EXCL open
    # failed with FileExistsError on every attempt, so a lost worker failed the command
    from tensorbridge.parallel import spool_one

    src = tmp_path / "s.safetensors"
    tb.save({"a": np.arange(12, dtype=np.float32).reshape(3, 4)}, src)
    spool = tmp_path / ".out.safetensors.tb-spool-1-ab"
    spool.write_bytes(b"partial bytes of the lost attempt")
    nbytes, _ = spool_one(str(src), "safetensors", "a", "float16", str(spool), False, "t")
    assert nbytes == 24
    assert spool.read_bytes() == np.arange(12, dtype="<f2").tobytes()
