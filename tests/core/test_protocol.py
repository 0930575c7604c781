"""Objects of frameworks tensorbridge does not know, read through an array protocol:
hand-written minimal classes that speak only one protocol each, converted to every
target, every dtype, bytes compared; sharing proven by mutation where it is claimed."""

from __future__ import annotations

import numpy as np
import pytest

import tensorbridge as tb
import tensorbridge.dtypes as D

from .frameworks import SUPPORTS, bytes_of, dtype_of, framework_of, raw_bytes


class OnlyDLPack:
    """Speaks DLPack and nothing else (the producer is a NumPy array, torch or MLX)."""

    def __init__(self, inner):
        self._inner = inner

    def __dlpack__(self, **kwargs):
        return self._inner.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._inner.__dlpack_device__()


class LegacyDLPack(OnlyDLPack):
    """A producer from before DLPack 1.0: ``__dlpack__`` takes no max_version."""

    def __dlpack__(self, stream=None):
        return self._inner.__dlpack__()


class OnlyInterface:
    def __init__(self, a):
        self._a = a

    @property
    def __array_interface__(self):
        return self._a.__array_interface__


class OnlyArray:
    """``__array__`` with the shape and dtype that make it clearly an array."""

    def __init__(self, a):
        self._a = a

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)

    def __array__(self, dtype=None, copy=None):
        return self._a


class Table:
    """``__array__`` without one dtype (like a DataFrame): not clearly an array."""

    shape = (2, 2)

    def __array__(self, dtype=None, copy=None):
        return np.zeros((2, 2))


class FakeCuda:
    """``__cuda_array_interface__`` only (numba's DeviceNDArray speaks this)."""

    __cuda_array_interface__ = {
        "shape": (4,),
        "typestr": "<f4",
        "data": (1 << 40, False),
        "version": 3,
        "strides": None,
    }


def _producer(dtype: str, raw: bytes):
    """A DLPack producer holding ``raw``: NumPy for its own dtypes, JAX for bf16/float8
    (NumPy cannot export those)."""
    a = np.frombuffer(raw, D.numpy_dtype(dtype)).copy().reshape(4, 8)
    if dtype in D.NUMPY_NATIVE:
        return a
    jnp = pytest.importorskip("jax.numpy")
    return jnp.asarray(a)


TARGETS = ["numpy", "torch", "tensorflow", "jax"]
CASES = [(t, d) for t in TARGETS for d in D.DTYPES if d in SUPPORTS[t]]


@pytest.mark.parametrize("tgt,dtype", CASES, ids=[f"{t}-{d}" for t, d in CASES])
def test_dlpack_only_objects_convert_bit_exactly(tgt, dtype):
    pytest.importorskip(tgt) if tgt != "numpy" else None
    raw = raw_bytes(dtype)
    src = _producer(dtype, raw)
    for wrap in (OnlyDLPack, LegacyDLPack):
        y = tb.convert(wrap(src), to=tgt)
        assert framework_of(y) == tgt and dtype_of(y) == dtype and tuple(y.shape) == (4, 8)
        assert bytes_of(y) == raw


@pytest.mark.parametrize("wrap", [OnlyInterface, OnlyArray])
@pytest.mark.parametrize("tgt", TARGETS + ["mlx"])
def test_interface_objects_convert_to_every_target(wrap, tgt):
    pytest.importorskip("mlx.core" if tgt == "mlx" else tgt) if tgt != "numpy" else None
    for dtype in ("bool", "int8", "uint16", "int64", "float16", "float32", "float64", "complex64"):
        raw = raw_bytes(dtype)
        a = np.frombuffer(raw, D.numpy_dtype(dtype)).copy().reshape(4, 8)
        y = tb.convert(wrap(a), to=tgt)
        if tgt == "mlx":
            assert np.asarray(y).tobytes() == raw
        else:
            assert dtype_of(y) == dtype and bytes_of(y) == raw


def test_sharing_is_proven_by_mutation_where_it_is_claimed():
    torch = pytest.importorskip("torch")
    for wrap in (OnlyDLPack, OnlyInterface):
        a = np.arange(4, dtype=np.float32)
        o = wrap(a)
        plan = tb.explain(o, to="torch")
        assert not plan.copies, str(plan)
        t = tb.to_torch(o)
        a[0] = 42  # the producer's memory changes: the tensor sees it
        assert t[0].item() == 42 and tb.shares_memory(o, t)
        c = tb.to_torch(o, copy=True)
        a[1] = 43
        assert c[1].item() == 1 and not tb.shares_memory(o, c)
    bf = torch.zeros(3, dtype=torch.bfloat16)
    view = tb.to_numpy(OnlyDLPack(bf))  # bfloat16 viewed in place: NumPy's own import refuses it
    bf[2] = 1.5
    assert float(view[2]) == 1.5 and tb.shares_memory(bf, view)


def test_array_objects_may_copy_so_copy_false_refuses():
    o = OnlyArray(np.arange(3.0))
    plan = tb.explain(o, to="numpy")
    assert "__array__" in str(plan) and plan.copies
    with pytest.raises(tb.CopyError, match="__array__"):
        tb.to_numpy(o, copy=False)
    assert tb.to_numpy(o, copy=True).tolist() == [0.0, 1.0, 2.0]


def test_read_only_producers_stay_read_only():
    a = np.arange(4, dtype=np.float32)
    a.flags.writeable = False
    for wrap in (OnlyInterface, OnlyDLPack):
        v = tb.to_numpy(wrap(a))
        assert not v.flags.writeable and tb.shares_memory(a, v)


def test_trees_and_what_stays_a_leaf():
    a = np.ones(2, np.float32)
    out = tb.to_numpy({"d": OnlyDLPack(a), "i": [OnlyInterface(a)], "t": Table(), "s": "text"})
    assert isinstance(out["d"], np.ndarray) and isinstance(out["i"][0], np.ndarray)
    assert isinstance(out["t"], Table) and out["s"] == "text"  # no dtype: not clearly an array
    assert [str(p) for p, _ in tb.explain({"d": OnlyDLPack(a), "t": Table()}, to="numpy")] == [
        "('d',)"
    ]


def test_refusals_name_the_object():
    with pytest.raises(tb.ConversionError, match="not a framework tensorbridge knows"):
        tb.convert(OnlyDLPack(np.ones(1)), to="protocol")
    with pytest.raises(tb.ConversionError, match=r"at \['x'\].*Python objects"):
        tb.to_numpy({"x": OnlyInterface(np.array([object()]))})
    with pytest.raises(
        tb.ConversionError
    ):  # no CUDA here (or a bogus pointer): refused, not returned
        tb.to_numpy(FakeCuda())


def test_saving_protocol_objects(tmp_path):
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    p = tmp_path / "p.safetensors"
    tb.save({"w": OnlyDLPack(a), "v": OnlyInterface(a.T)}, p)
    back = tb.load(p)
    assert back["w"].tobytes() == a.tobytes() and back["v"].tobytes() == a.T.tobytes()
