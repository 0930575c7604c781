"""Reference matrices: what np.save / np.savez / np.savez_compressed and h5py write is read by
tensorbridge bit for bit as the reference reads it, and what tensorbridge writes is read by
np.load and h5py bit for bit. Every comparison is of dtype, shape and bytes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from tensorbridge.dtypes import DTYPES, lookup
from tensorbridge.formats.h5 import DTYPE_ATTR
from tensorbridge.formats.h5 import FORMAT as H5
from tensorbridge.formats.npy import FORMAT as NPY
from tensorbridge.formats.npy import MARKED_DTYPES
from tensorbridge.formats.npz import FORMAT as NPZ

from .samples import read_all_with, same, sample, write_with

PLAIN = [n for n in DTYPES if n not in MARKED_DTYPES]
LAYOUTS = ["c", "fortran", "big-endian", "0-d", "empty", "empty-inner", "strided"]


def layout(name: str, how: str) -> np.ndarray:
    a = sample(name, (4, 6), seed=len(how))
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "big-endian":
        return a.astype(a.dtype.newbyteorder(">")) if a.dtype.itemsize > 1 else a
    if how == "0-d":
        return a[1, 2].copy().reshape(())
    if how == "empty":
        return a[:0]
    if how == "empty-inner":
        return a[:, :0]
    if how == "strided":
        return a[::-1, ::2]
    return a


def native(a: np.ndarray) -> np.ndarray:
    """What a reader returns for ``a``: C order, this machine's byte order, same values."""
    return np.array(a, dtype=a.dtype.newbyteorder("="), order="C")


# --- NumPy writes, tensorbridge reads ---------------------------------------------------------


@pytest.mark.parametrize("how", LAYOUTS)
@pytest.mark.parametrize("name", PLAIN)
def test_np_save_read_bit_exact(tmp_path, name, how):
    a = layout(name, how)
    p = tmp_path / "a.npy"
    np.save(p, a)
    got, _ = read_all_with(NPY, p)
    assert same(got["array"], native(np.load(p)))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_np_savez_read_bit_exact(tmp_path, save):
    arrays = {f"{name}.{how}": layout(name, how) for name in PLAIN for how in LAYOUTS}
    p = tmp_path / "a.npz"
    save(p, **arrays)
    got, _ = read_all_with(NPZ, p)
    with np.load(p) as ref:
        assert sorted(got) == sorted(ref.files)
        for k in ref.files:
            assert same(got[k], native(ref[k])), k


# --- tensorbridge writes, NumPy reads -----------------------------------------------------------


def _ours(name: str, how: str) -> np.ndarray:
    return layout(name, how) if name in PLAIN else sample(name, (4, 6) if how == "c" else (0,))


@pytest.mark.parametrize("how", ["c", "0-d", "empty"])
@pytest.mark.parametrize("name", list(DTYPES))
def test_np_load_reads_our_npy_bit_exact(tmp_path, name, how):
    a = _ours(name, how) if how != "0-d" else sample(name, ())
    p = tmp_path / "a.npy"
    write_with(NPY, p, {"array": a})
    ref = np.load(p, allow_pickle=False)
    if name in MARKED_DTYPES:
        ref = ref[name].view(lookup(name).numpy)  # the documented raw-bits layout
    assert same(ref, native(a))


@pytest.mark.parametrize("compress", [False, True])
def test_np_load_reads_our_npz_bit_exact(tmp_path, compress):
    arrays = {
        f"{name}.{how}": (_ours(name, how) if how != "0-d" else sample(name, ()))
        for name in DTYPES
        for how in ("c", "0-d", "empty")
    }
    p = tmp_path / "a.npz"
    write_with(NPZ, p, arrays, compress=compress)
    with np.load(p, allow_pickle=False) as ref:
        for k, a in arrays.items():
            name = k.split(".")[0]
            got = ref[k][name].view(lookup(name).numpy) if name in MARKED_DTYPES else ref[k]
            assert same(got, native(a)), k


# --- h5py writes, tensorbridge reads; tensorbridge writes, h5py reads --------------------------

STORAGE = {
    "contiguous": {},
    "compact": {"compact": True},
    "chunked": {"chunks": (3, 4)},
    "gzip": {"chunks": (3, 4), "compression": "gzip"},
    "gzip+shuffle+fletcher32": {
        "chunks": (2, 5),
        "compression": "gzip",
        "shuffle": True,
        "fletcher32": True,
    },
    "lzf": {"chunks": (4, 6), "compression": "lzf"},
}


@pytest.mark.parametrize("storage", list(STORAGE))
def test_h5py_files_read_bit_exact(tmp_path, storage):
    opts = dict(STORAGE[storage])
    p = tmp_path / "ref.h5"
    with h5py.File(p, "w") as f:
        for name in PLAIN:
            for how in ("c", "big-endian"):
                a = np.array(layout(name, how), order="C")
                kw = dict(opts)
                if kw.pop("compact", False):
                    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                    dcpl.set_layout(h5py.h5d.COMPACT)
                    space = h5py.h5s.create_simple(a.shape)
                    tid = h5py.h5t.py_create(a.dtype, logical=True)
                    f.require_group(f"g/{how}")
                    dsid = h5py.h5d.create(f.id, f"g/{how}/{name}".encode(), tid, space, dcpl=dcpl)
                    dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, a)
                else:
                    f.create_dataset(f"g/{how}/{name}", data=a, **kw)
        f.create_dataset("scalar", data=np.float64(-0.0))
        f.create_dataset("empty", data=np.zeros((0, 3), np.int16))
    with h5py.File(p, "r") as f:
        want = {}
        f.visititems(
            lambda k, v: (
                want.__setitem__(k.replace("/", "."), v[()])
                if isinstance(v, h5py.Dataset)
                else None
            )
        )
    got, _ = read_all_with(H5, p)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert same(got[k], native(np.asarray(v))), k


@pytest.mark.parametrize("name", list(DTYPES))
def test_h5py_reads_our_h5_bit_exact(tmp_path, name):
    arrays = {"c": sample(name, (4, 6)), "0-d": sample(name, ()), "empty": sample(name, (0, 2))}
    p = tmp_path / "ours.h5"
    write_with(H5, p, arrays, {"k": "v"})
    with h5py.File(p, "r") as f:
        assert dict(f.attrs) == {"k": "v"}
        for k, a in arrays.items():
            ref = f[k][()]
            if name in MARKED_DTYPES:
                assert f[k].attrs[DTYPE_ATTR] == name.encode()
                ref = np.asarray(ref).view(lookup(name).numpy)
            assert same(np.asarray(ref), a), k
