"""MLX's own files (mx.save_safetensors, mx.savez, mx.save) read by tensorbridge, and
tensorbridge's files read by mx.load, for every MLX dtype, compared as bytes; MLX arrays
saved; load(..., to="mlx")."""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest

import tensorbridge as tb

mx = pytest.importorskip("mlx.core")

DTYPES = [
    "bool_",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex64",
]


def _bits(x) -> bytes:
    """Raw bytes of an MLX array in C order, by MLX's own means."""
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.ascontiguousarray(np.asarray(x)).tobytes()


def _tree() -> dict:
    """One tensor per MLX dtype from random bits (NaN payloads and all), one transposed."""
    rng = np.random.default_rng(7)
    out = {}
    for i, name in enumerate(DTYPES):
        dt = getattr(mx, name)
        size = dt.size
        raw = rng.integers(0, 256, 12 * size, dtype=np.uint8)
        if name == "bool_":
            raw = raw % 2
        x = mx.array(raw.view(f"u{size}").reshape(3, 4)).view(dt)
        out[name] = x.T if i % 3 == 0 else x  # MLX writes a transposed array in Fortran order
    return out


def _check(loaded: dict, tree: dict) -> None:
    assert sorted(loaded) == sorted(tree)
    for k, x in tree.items():
        y = loaded[k]
        assert tuple(y.shape) == tuple(x.shape), k
        assert y.dtype == x.dtype, k
        assert _bits(y) == _bits(x), k


def test_safetensors_both_ways(tmp_path):
    tree = _tree()
    theirs, ours = os.fspath(tmp_path / "mx.safetensors"), os.fspath(tmp_path / "tb.safetensors")
    with pytest.raises(RuntimeError, match="invalid dtype"):  # MLX writes no F64 (mlx 0.32)
        mx.save_safetensors(theirs, {"f": tree["float64"]})
    tree_mx = {k: v for k, v in tree.items() if k != "float64"}
    mx.save_safetensors(theirs, tree_mx)
    tb.save(tree, ours)
    with pytest.raises(RuntimeError, match="unsupported dtype F64"):  # nor reads it
        mx.load(ours)
    _check(tb.load(ours, to="mlx"), tree)  # float64 round-trips through tensorbridge alone
    tree = tree_mx
    tb.save(tree, ours)
    _check(tb.load(theirs, to="mlx"), tree)  # MLX's file, read by tensorbridge into MLX
    _check(mx.load(ours), tree)  # tensorbridge's file, read by MLX
    host = tb.load(theirs)
    for k, x in tree.items():  # and into NumPy, as the raw bits
        assert np.ascontiguousarray(host[k]).tobytes() == _bits(x)


def test_saving_mlx_writes_the_same_bytes_as_saving_numpy(tmp_path):
    tree = _tree()
    host = {k: tb.to_numpy(v) for k, v in tree.items()}
    for suffix in ("safetensors", "npz", "h5", "pt"):
        a, b = tmp_path / f"a.{suffix}", tmp_path / f"b.{suffix}"
        tb.save(tree, a)
        tb.save(host, b)
        assert a.read_bytes() == b.read_bytes(), suffix


def test_npz_and_npy_both_ways(tmp_path):
    tree = {k: v for k, v in _tree().items() if k != "float64"}  # MLX's npy has no f8
    theirs, ours = os.fspath(tmp_path / "mx.npz"), os.fspath(tmp_path / "tb.npz")
    mx.savez(theirs, **tree)
    tb.save(tree, ours, void=True)
    _check(tb.load(theirs, to="mlx"), tree)
    _check(mx.load(ours), tree)
    for k, x in tree.items():
        p, q = os.fspath(tmp_path / f"mx_{k}.npy"), os.fspath(tmp_path / f"tb_{k}.npy")
        mx.save(p, x)
        tb.save(x, q, void=True)
        _check({k: tb.load(p, to="mlx")}, {k: x})
        _check({k: mx.load(q)}, {k: x})


def _bf16(shape) -> mx.array:
    """A bfloat16 MLX array of random bits (NaN payloads, -0.0, subnormals included)."""
    n = int(np.prod(shape))
    bits = np.random.default_rng(3).integers(0, 1 << 16, n, dtype=np.uint16).reshape(shape)
    return mx.array(bits).view(mx.bfloat16)


def _data(raw: bytes) -> bytes:
    """The data of a .npy file's bytes (after its header)."""
    hlen = int.from_bytes(raw[8:10], "little")
    return raw[10 + hlen :]


def test_bfloat16_from_mlx_files(tmp_path):
    """mx.save/mx.savez write bfloat16 as descr '<V2' in MLX's own header layout:
    tensorbridge reads it as bfloat16, bit-exactly, with no option."""
    tree = {"v": _bf16((5,)), "m": _bf16((3, 4)), "t": _bf16((3, 4)).T, "s": _bf16(())}
    for save in (mx.savez, mx.savez_compressed):
        p = os.fspath(tmp_path / f"{save.__name__}.npz")
        save(p, **tree)
        _check(tb.load(p, to="mlx"), tree)
        host = tb.load(p)
        for k, x in tree.items():
            assert host[k].dtype == "bfloat16"
            assert np.ascontiguousarray(host[k]).tobytes() == _bits(x), k
    for k, x in tree.items():
        p = os.fspath(tmp_path / f"{k}.npy")
        mx.save(p, x)
        with open(p, "rb") as f:
            assert b"'descr': '<V2'" in f.read(64)
        _check({k: tb.load(p, to="mlx")}, {k: x})
        with tb.open(p) as r:
            assert r.info("array").dtype == "bfloat16"


def test_bfloat16_written_for_mlx(tmp_path):
    """void=True writes what np.save writes for an ml_dtypes.bfloat16 array, byte for
    byte, and mx.load reads it as bfloat16; the default marker layout mx.load refuses."""
    tree = {"v": _bf16((5,)), "m": _bf16((3, 4)), "t": _bf16((3, 4)).T, "s": _bf16(())}
    ours = os.fspath(tmp_path / "tb.npz")
    tb.save(tree, ours, void=True)
    _check(mx.load(ours), tree)
    with zipfile.ZipFile(ours) as z:
        for k, x in tree.items():
            buf = io.BytesIO()
            np.save(buf, tb.to_numpy(x).copy(order="C"))  # tensorbridge writes C order
            assert z.read(f"{k}.npy") == buf.getvalue(), k
    theirs = os.fspath(tmp_path / "mx.npz")
    mx.savez(theirs, **tree)
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        for k in ("v", "m", "s"):  # C order in both: the same data bytes as MLX's
            assert _data(a.read(f"{k}.npy")) == _data(b.read(f"{k}.npy")), k
    for k, x in tree.items():
        p = os.fspath(tmp_path / f"{k}.npy")
        tb.save(x, p, void=True)
        _check({k: mx.load(p)}, {k: x})
    # the file no longer says which dtype it holds: reading it back needs void_as
    with pytest.raises(tb.FileFormatError, match="void_as='bfloat16'"):
        tb.load(ours)
    _check(tb.load(ours, to="mlx", void_as="bfloat16"), tree)
    # tensorbridge's default layout (the dtype recorded) is refused by mx.load, as found
    tb.save(tree, ours)
    with pytest.raises(ValueError, match="array protocol type-string"):
        mx.load(ours)
    _check(tb.load(ours, to="mlx"), tree)


def test_big_endian_mlx_bfloat16_agrees_with_mx_load(tmp_path):
    """MLX on a big-endian machine writes '>V2'; mx.load swaps it, so does tensorbridge."""
    x = _bf16((2, 3))
    p = tmp_path / "be.npy"
    mx.save(os.fspath(p), x)
    raw = p.read_bytes()
    hlen = int.from_bytes(raw[8:10], "little")
    head = raw[10 : 10 + hlen].replace(b"'<V2'", b"'>V2'")
    swapped = np.frombuffer(_data(raw), np.uint16).byteswap().tobytes()
    p.write_bytes(raw[:10] + head + swapped)
    _check({"x": tb.load(os.fspath(p), to="mlx")}, {"x": mx.load(os.fspath(p))})
    _check({"x": tb.load(os.fspath(p), to="mlx")}, {"x": x})


def test_load_to_mlx_gives_mlx_arrays(tmp_path):
    p = os.fspath(tmp_path / "m.safetensors")
    tb.save({"enc": {"w": np.ones((2, 3), np.float32), "layers": [np.arange(3)]}}, p)
    out = tb.load(p, to="mlx", nested=True)
    assert isinstance(out["enc"]["w"], mx.array) and out["enc"]["w"].dtype == mx.float32
    assert out["enc"]["layers"][0].dtype == mx.int64
    with pytest.raises(tb.DeviceError, match="MLX arrays have no device"):
        tb.load(p, to="mlx", device="cuda")
