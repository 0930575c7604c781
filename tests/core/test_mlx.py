"""MLX: every dtype both ways against every framework (bytes compared), memory sharing
proven by mutation, lazy arrays, copy=/device=/dtype=, and the refusals.

MLX arrays are built and read with MLX's own API (never tensorbridge)."""

from __future__ import annotations

import numpy as np
import pytest

import tensorbridge as tb
import tensorbridge.dtypes as D

from .frameworks import (
    FRAMEWORKS,
    SUPPORTS,
    bytes_of,
    dtype_of,
    framework_of,
    make,
    raw_bytes,
)

mx = pytest.importorskip("mlx.core")

MLX_DTYPES = {
    "bool",
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
}


def make_mlx(dtype: str, raw: bytes, shape=(4, 8)):
    """An MLX array holding exactly ``raw``: the bits go in as unsigned ints, then a view."""
    itemsize = D.lookup(dtype).itemsize
    bits = np.frombuffer(raw, np.dtype(f"u{itemsize}")).reshape(shape)
    target = getattr(mx, "bool_" if dtype == "bool" else dtype)
    return mx.array(bits).view(target)


def mlx_bytes(x) -> bytes:
    """The raw bytes of an MLX array, through MLX's own buffer export."""
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.asarray(x).tobytes()


def mlx_dtype(x) -> str:
    return str(x.dtype).rpartition(".")[2]


def mlx_writable_view(x) -> np.ndarray:
    """MLX's own view of its buffer (writable): the way to change an MLX array in place."""
    return np.asarray(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)


OTHERS = [f for f in FRAMEWORKS]
CASES = [(f, d) for f in OTHERS for d in D.DTYPES if d in SUPPORTS[f]]


@pytest.mark.parametrize("src,dtype", CASES, ids=[f"{s}-{d}" for s, d in CASES])
def test_into_mlx_is_bit_exact_or_refused(src, dtype):
    pytest.importorskip(src) if src != "numpy" else None
    raw = raw_bytes(dtype)
    x = make(src, dtype, raw, shape=(4, 8))
    if dtype not in MLX_DTYPES:
        with pytest.raises(tb.ConversionError, match=f"MLX has no {dtype}"):
            tb.to_mlx(x)
        return
    for copy in (None, True):
        y = tb.convert(x, to="mlx", copy=copy)
        assert isinstance(y, mx.array)
        assert mlx_dtype(y) == ("bool" if dtype == "bool" else dtype)
        assert tuple(y.shape) == (4, 8)
        assert mlx_bytes(y) == raw


OUT = [(t, d) for t in OTHERS for d in sorted(MLX_DTYPES)]


@pytest.mark.parametrize("tgt,dtype", OUT, ids=[f"{t}-{d}" for t, d in OUT])
def test_out_of_mlx_is_bit_exact(tgt, dtype):
    pytest.importorskip(tgt) if tgt != "numpy" else None
    raw = raw_bytes(dtype)
    x = make_mlx(dtype, raw)
    for copy in (None, True):
        y = tb.convert(x, to=tgt, copy=copy)
        assert framework_of(y) == tgt
        assert dtype_of(y) == dtype
        assert tuple(y.shape) == (4, 8)
        assert bytes_of(y) == raw
    assert mlx_bytes(tb.to_mlx(x, copy=True)) == raw


@pytest.mark.parametrize("tgt", ["numpy", "torch", "tensorflow", "jax", "mlx"])
def test_strided_and_flipped_mlx_arrays(tgt):
    pytest.importorskip(tgt) if tgt not in ("numpy", "mlx") else None
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    x = mx.array(base)
    for view, expect in ((x.T, base.T), (x[::-1, ::2], base[::-1, ::2]), (x[:, 1:3], base[:, 1:3])):
        y = tb.convert(view, to=tgt)  # torch aborts on DLPack memory with negative strides
        got = np.asarray(y) if tgt != "torch" else y.numpy()
        assert got.tobytes() == np.ascontiguousarray(expect).tobytes()


def test_zero_d_empty_and_flipped_numpy_into_mlx():
    for a in (
        np.float32(2.5),
        np.zeros((0, 3), np.int8),
        np.arange(5.0)[::-2],
        np.arange(4, dtype=">i4"),
        np.ones((3, 2), np.float16, order="F"),
    ):
        y = tb.to_mlx(a)
        assert tuple(y.shape) == np.shape(a)
        assert (
            mlx_bytes(y)
            == np.ascontiguousarray(a, dtype=np.asarray(a).dtype.newbyteorder("=")).tobytes()
        )


# -- memory: claims proven by mutation ------------------------------------------------------
def test_to_numpy_is_a_read_only_view_of_the_mlx_buffer():
    for dtype in ("float32", "bfloat16"):
        x = make_mlx(dtype, raw_bytes(dtype, 8), shape=(8,))
        v = tb.to_numpy(x)
        assert not v.flags.writeable
        assert tb.shares_memory(x, v)
        mlx_writable_view(x)[0] = 0  # a write into MLX's memory shows through the view
        assert v.view(f"u{v.itemsize}")[0] == 0
        assert "zero-copy" in str(tb.explain(x, to="numpy")).splitlines()[-1]
        c = tb.to_numpy(x, copy=True)
        assert c.flags.writeable and not tb.shares_memory(x, c)
        mlx_writable_view(x)[1] = 0
        assert (
            c.view(f"u{c.itemsize}")[1] == np.frombuffer(raw_bytes(dtype, 8), f"u{c.itemsize}")[1]
        )


def test_to_torch_copies_because_mlx_arrays_are_immutable():
    torch = pytest.importorskip("torch")
    x = mx.arange(4, dtype=mx.float32)
    t = tb.to_torch(x)  # torch.from_dlpack(x) would give a tensor that writes into x
    t[0] = 7.0
    assert x.tolist()[0] == 0.0 and not tb.shares_memory(x, t) and t.dtype == torch.float32
    assert tb.explain(x, to="torch").independent
    with pytest.raises(tb.CopyError, match="torch tensors are always writable"):
        tb.to_torch(x, copy=False)


def test_into_mlx_always_copies_and_copy_false_says_why():
    a = np.arange(4, dtype=np.float32)
    y = tb.to_mlx(a)
    a[0] = 100
    assert y.tolist()[0] == 0 and not tb.shares_memory(a, y)
    with pytest.raises(tb.CopyError, match="MLX copies host memory on import"):
        tb.to_mlx(a, copy=False)
    x = mx.arange(3)
    assert tb.to_mlx(x) is x
    assert tb.to_mlx(x, copy=False) is x
    c = tb.to_mlx(x, copy=True)
    assert c is not x and not tb.shares_memory(x, c)


@pytest.mark.parametrize("tgt", ["jax", "tensorflow"])
def test_copying_targets_are_independent(tgt):
    pytest.importorskip(tgt)
    x = mx.arange(8, dtype=mx.float32)
    y = tb.convert(x, to=tgt)
    plan = tb.explain(x, to=tgt)
    if plan.independent:
        mlx_writable_view(x)[0] = 5
        assert bytes_of(y) == np.arange(8, dtype=np.float32).tobytes()
    else:  # an aligned buffer handed over by DLPack: then it is shared
        mlx_writable_view(x)[0] = 5
        assert tb.shares_memory(x, y) and float(np.asarray(y)[0]) == 5.0


def test_shares_memory_between_mlx_arrays():
    x = mx.arange(6, dtype=mx.float32)
    r = x.reshape(2, 3)
    assert tb.shares_memory(x, r)
    assert not tb.shares_memory(x, mx.array(x))


# -- lazy arrays and transforms -------------------------------------------------------------
def test_lazy_arrays_are_evaluated_and_explain_says_so():
    x = mx.arange(4, dtype=mx.float32) * 2  # not yet computed
    plan = tb.explain(x, to="numpy")
    assert "computes pending MLX operations" in str(plan)
    assert tb.to_numpy(mx.arange(3) + 1).tolist() == [1, 2, 3]
    assert tb.to_torch(mx.arange(3) + 1).tolist() == [1, 2, 3]
    assert tb.to_numpy({"a": [mx.ones(2) * 3]})["a"][0].tolist() == [3.0, 3.0]


def test_inside_a_transform_is_refused_with_the_fix():
    seen = []

    @mx.compile
    def f(x):
        try:
            tb.to_numpy(x)
        except tb.ConversionError as exc:
            seen.append(str(exc))
        return x + 1

    f(mx.ones(2))
    assert seen and "mx.compile" in seen[0] and "outside" in seen[0]


# -- dtype=, device=, refusals --------------------------------------------------------------
def test_dtype_casts():
    import ml_dtypes

    a = np.array([1.0, 2.5, -3.0e38, np.nan], np.float32)
    y = tb.to_mlx(a, dtype="bfloat16")
    assert mlx_bytes(y) == a.astype(ml_dtypes.bfloat16).tobytes()
    assert (
        tb.to_numpy(y, dtype="float32").tobytes()
        == a.astype(ml_dtypes.bfloat16).astype(np.float32).tobytes()
    )
    z = tb.to_mlx(mx.array([1, 2, 3], dtype=mx.int32), dtype="float16")
    assert z.dtype == mx.float16 and z.tolist() == [1.0, 2.0, 3.0]
    assert tb.to_mlx(np.zeros(2, np.complex128), dtype="complex64").dtype == mx.complex64
    assert tb.to_mlx(np.arange(3.0)).dtype == mx.float64  # not narrowed as mx.array(a) would


def test_devices():
    a = np.ones(2, np.float32)
    assert tb.to_mlx(a, device="cpu").tolist() == [1.0, 1.0]
    assert tb.to_mlx(a, device="CPU:0").tolist() == [1.0, 1.0]
    for device in ("cuda", "mps", "gpu:1"):
        with pytest.raises(
            tb.DeviceError, match=r"MLX arrays have no device of their own.*set_default_device"
        ):
            tb.to_mlx(a, device=device)
    with pytest.raises(tb.DeviceError, match="set_default_device"):
        tb.to_mlx(mx.ones(2), device="cuda")


def test_refusals_name_the_dtype_and_the_fix():
    import ml_dtypes

    with pytest.raises(tb.ConversionError, match=r"MLX has no complex128.*dtype='complex64'"):
        tb.to_mlx(np.zeros(2, np.complex128))
    with pytest.raises(tb.ConversionError, match=r"at \['w'\]\[1\].*MLX has no float8_e4m3fn"):
        tb.to_mlx({"w": [np.zeros(1), np.zeros(2, ml_dtypes.float8_e4m3fn)]})
    with pytest.raises(tb.ConversionError, match="MLX has no such dtype"):
        tb.to_mlx(mx.ones(2), dtype="float8_e5m2")
    with pytest.raises(tb.CopyError, match=r"cannot be shared: cast float32 -> float16"):
        tb.to_mlx(mx.ones(2), dtype="float16", copy=False)


def test_trees_keep_their_types():
    torch = pytest.importorskip("torch")
    tree = {"a": mx.ones(2), "b": [mx.zeros(1, dtype=mx.bfloat16), 3], "c": (np.ones(1), None)}
    out = tb.to_torch(tree)
    assert isinstance(out["a"], torch.Tensor) and out["b"][0].dtype == torch.bfloat16
    assert out["b"][1] == 3 and isinstance(out["c"], tuple) and out["c"][1] is None
    back = tb.to_mlx({"t": torch.arange(3), "n": [np.ones(2, np.float16)]})
    assert isinstance(back["t"], mx.array) and back["t"].dtype == mx.int64
    assert back["n"][0].dtype == mx.float16
    assert isinstance(tb.explain(tree, to="numpy"), tb.convert.__globals__["TreePlan"])
