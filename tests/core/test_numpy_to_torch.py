"""NumPy inputs into torch: the traps torch.from_numpy sets, each handled."""

from __future__ import annotations

import mmap
import warnings

import ml_dtypes
import numpy as np
import pytest
import torch

import tensorbridge as tb


def test_negative_strides_work_and_copy():
    a = np.arange(12).reshape(3, 4)[::-1, ::-2]
    t = tb.to_torch(a)
    assert t.tolist() == a.tolist()
    assert not tb.shares_memory(a, t)


def test_flipped_size_one_dims_share_memory():
    a = np.arange(5.0).reshape(1, 5)[::-1]  # stride -40 on a size-1 dim
    assert a.strides[0] < 0
    t = tb.to_torch(a)
    a[0, 0] = 9.0
    assert t[0, 0].item() == 9.0  # zero-copy, proven by mutation


def test_read_only_copies_by_default_and_copy_false_refuses():
    buf = bytearray(np.arange(4, dtype=np.float32).tobytes())
    a = np.frombuffer(bytes(buf), np.float32)
    assert not a.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = tb.to_torch(a)
    assert not tb.shares_memory(a, t)
    with pytest.raises(
        tb.CopyError, match="copy=False.*read-only.*torch tensors are always writable"
    ):
        tb.to_torch(a, copy=False)
    t[0] = 5  # writable copy; the bytes object is untouched
    assert a[0] == 0


def test_memory_mapped_arrays_work_without_warnings(tmp_path):
    p = tmp_path / "x.bin"
    np.arange(8, dtype=np.int32).tofile(p)
    with open(p, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        a = np.frombuffer(m, np.int32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert tb.to_torch(a).tolist() == list(range(8))
        del a
        m.close()
    mm = np.memmap(p, np.int32, mode="r")
    assert tb.to_torch(mm).tolist() == list(range(8))


@pytest.mark.parametrize("order", [">", "<"])
def test_byte_order_is_swapped_to_native(order):
    values = np.array([1.5, -0.0, np.inf, 3e-45], dtype="f4")
    a = values.astype(order + "f4")
    t = tb.to_torch(a)
    assert t.dtype == torch.float32
    assert t.numpy().tobytes() == values.tobytes()


@pytest.mark.parametrize(
    "np_dtype,torch_dtype",
    [
        (ml_dtypes.bfloat16, torch.bfloat16),
        (ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn),
        (ml_dtypes.float8_e5m2, torch.float8_e5m2),
        (ml_dtypes.float8_e8m0fnu, torch.float8_e8m0fnu),
    ],
)
def test_ml_dtypes_map_to_torch_dtypes_zero_copy(np_dtype, torch_dtype):
    a = np.ones(4, np_dtype)
    t = tb.to_torch(a)
    assert t.dtype == torch_dtype
    a[0] = 2
    assert t[0].float().item() == 2.0


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "uint64"])
def test_unsigned_stay_unsigned(dtype):
    a = np.array([0, 1, np.iinfo(dtype).max], dtype=dtype)
    t = tb.to_torch(a)
    assert t.dtype == getattr(torch, dtype)
    assert t.view(getattr(torch, dtype)).numpy().tobytes() == a.tobytes()


@pytest.mark.parametrize(
    "a",
    [
        np.array(["a", "b"]),
        np.array([object(), 1], dtype=object),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
    ],
    ids=["str", "object", "datetime"],
)
def test_object_and_string_arrays_are_refused_with_a_fix(a):
    with pytest.raises(tb.ConversionError) as err:
        tb.to_torch(a)
    assert "Fix:" in str(err.value) and "astype" in str(err.value)
    assert isinstance(err.value, TypeError)


def test_python_scalars_and_numpy_scalars():
    assert tb.to_torch(3.0).dtype == torch.float64
    assert tb.to_torch(np.float32(2.5)).item() == 2.5
    assert tb.to_numpy(True).dtype == np.bool_


def test_non_tensor_leaves_are_left_alone():
    tree = {"lr": 0.1, "name": "run", "raw": b"x", "w": np.ones(2)}
    out = tb.to_torch(tree)
    assert out["lr"] == 0.1 and out["name"] == "run" and out["raw"] == b"x"
    assert isinstance(out["w"], torch.Tensor)


def test_python_int_too_large_for_64_bits_is_refused_clearly():
    with pytest.raises(tb.ConversionError, match="does not fit in 64 bits"):
        tb.to_torch(2**70)


@pytest.mark.parametrize("code", ["q", "Q"])
def test_longlong_arrays_are_the_64_bit_integers_they_are(code):
    a = np.array([-(2**62) if code == "q" else 2**63, 1, 2], dtype=code)
    assert a.dtype.type in (np.longlong, np.ulonglong)
    for target in ("tensorflow", "jax"):
        if target == "jax":
            import jax

            if not jax.config.jax_enable_x64:
                continue
        out = tb.to_numpy(tb.convert(a, to=target))
        assert out.tobytes() == a.tobytes(), target
    t = tb.to_torch(a, copy=True)
    assert t.dtype == (torch.int64 if code == "q" else torch.uint64)
    assert t.numpy().tobytes() == a.tobytes()
    back = tb.to_numpy(a, copy=True)
    assert back.tobytes() == a.tobytes() and back.dtype.itemsize == 8
    assert "int64" in str(tb.explain(a, to="torch"))
    assert tb.to_torch(2**63).dtype == torch.uint64


def test_long_double_is_refused_with_a_cast_to_suggest():
    a = np.ones(3, np.longdouble)
    if a.dtype.itemsize == 8:
        assert tb.to_torch(a).dtype == torch.float64  # a long double that is a double
        return
    with pytest.raises(tb.ConversionError, match="extended precision.*Fix: cast it first"):
        tb.to_torch(a)


@pytest.mark.parametrize("name", ["bfloat16", "float8_e5m2", "float8_e4m3fn"])
def test_flipped_size_one_dims_of_ml_dtypes_share_memory(name):
    dt = getattr(ml_dtypes, name)
    a = np.arange(6, dtype=np.float32).astype(dt).reshape(1, 6)[::-1]
    assert a.strides[0] < 0
    t = tb.to_torch(a)
    assert str(t.dtype) == f"torch.{name}"
    assert t.view(torch.uint8 if a.itemsize == 1 else torch.int16).numpy().tobytes() == a.tobytes()
    a[0, 1] = dt(5.0)
    assert t[0, 1].item() == 5.0  # zero-copy, proven by mutation


def test_masked_arrays_are_refused_rather_than_losing_the_mask():
    a = np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False])
    for target in ("torch", "jax", "tensorflow"):
        with pytest.raises(tb.ConversionError, match="mask.*Fix: fill the gaps"):
            tb.convert({"a": a}, to=target)
    assert tb.to_numpy(a) is a  # NumPy keeps the mask: nothing is lost
    assert tb.to_torch(a.filled(0)).tolist() == [1.0, 0.0, 3.0]


def test_dtype_accepts_the_frameworks_own_dtype_objects():
    import tensorflow as tf

    t = torch.arange(3, dtype=torch.float32)
    assert tb.to_numpy(t, dtype=torch.bfloat16).dtype == ml_dtypes.bfloat16
    assert tb.to_torch(np.ones(2), dtype=tf.float16).dtype == torch.float16
    assert tb.to_torch(np.ones(2), dtype=np.int8).dtype == torch.int8
    with pytest.raises(tb.ConversionError, match="not a known tensor dtype"):
        tb.to_torch(np.ones(2), dtype=object())


def test_quantized_tensors_are_refused_with_dequantize_as_the_fix():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized creation functions are deprecated
        q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    with pytest.raises(tb.ConversionError, match=r"t\.dequantize\(\)"):
        tb.to_numpy(q)


@pytest.mark.skipif(
    torch.backends.mps.is_available() or torch.cuda.is_available(),
    reason="the machine has the device",
)
@pytest.mark.parametrize("device", ["mps", "cuda", "cuda:1"])
def test_a_device_this_machine_lacks_is_a_device_error(device):
    with pytest.raises(tb.DeviceError, match="this machine has no.*Fix: leave device unset"):
        tb.to_torch(np.ones(2, np.float32), device=device)
