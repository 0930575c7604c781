"""Array-protocol objects that misbehave, and the C-level ``__array_struct__``: each is
converted, or refused with a ``ConversionError`` that names the object, says which of its
protocols failed and how to fix it (never a framework's pages-long error, never a generic
"deleted or donated tensor" text)."""

from __future__ import annotations

import numpy as np
import pytest

import tensorbridge as tb

from .frameworks import bytes_of, framework_of

TARGETS = ["numpy", "torch", "tensorflow", "jax", "mlx"]


class OnlyStruct:
    """Speaks only ``__array_struct__`` (the C-level array interface NumPy also reads)."""

    def __init__(self, a):
        self._a = a

    @property
    def __array_struct__(self):
        return self._a.__array_struct__


class StructOnInstance:
    def __init__(self, a):
        self.__array_struct__ = a.__array_struct__
        self._a = a  # the capsule does not keep the array alive on its own


@pytest.mark.parametrize("tgt", TARGETS)
def test_array_struct_objects_convert_to_every_target(tgt):
    pytest.importorskip("mlx.core" if tgt == "mlx" else tgt) if tgt != "numpy" else None
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    for make in (OnlyStruct, StructOnInstance):
        y = tb.convert({"w": [make(a)]}, to=tgt)["w"][0]
        assert tuple(y.shape) == (3, 4)
        if tgt == "mlx":
            assert type(y).__module__ == "mlx.core" and np.asarray(y).tobytes() == a.tobytes()
        else:
            assert framework_of(y) == tgt and bytes_of(y) == a.tobytes()


def test_array_struct_is_a_view_proven_by_mutation():
    a = np.arange(4, dtype=np.float32)
    for make in (OnlyStruct, StructOnInstance):
        o = make(a)
        plan = tb.explain(o, to="numpy")
        assert "__array_struct__" in str(plan) and not plan.copies, str(plan)
        v = tb.to_numpy(o)
        a[0] += 1
        assert v[0] == a[0] and tb.shares_memory(o, v)


class ArrayGives:
    shape = (2,)
    dtype = np.dtype(np.float32)

    def __init__(self, gives):
        self._gives = gives

    def __array__(self, dtype=None, copy=None):
        if isinstance(self._gives, Exception):
            raise self._gives
        return self._gives


@pytest.mark.parametrize("gives", [[1.0, 2.0], None, "text", RuntimeError("boom")])
def test_an_array_method_that_fails_is_named_with_a_fix(gives):
    with pytest.raises(tb.ConversionError) as e:
        tb.to_torch({"x": ArrayGives(gives)})
    text = str(e.value)
    assert text.startswith("at ['x']") and "ArrayGives" in text
    assert "through its __array__" in text and "Fix: fix the object's array protocol" in text
    assert "deleted, donated" not in text  # not the text for dead framework tensors


class Interface:
    def __init__(self, d):
        self._d = d

    @property
    def __array_interface__(self):
        return self._d


@pytest.mark.parametrize(
    "d",
    [5, {}, {"shape": (1,), "typestr": "zz", "data": (0, False), "version": 3}],
    ids=["not-a-dict", "empty", "bad-typestr"],
)
def test_a_broken_array_interface_is_named_with_a_fix(d):
    with pytest.raises(tb.ConversionError, match=r"Interface: NumPy could not read it through"):
        tb.to_numpy(Interface(d))


class DLPack:
    def __init__(self, capsule, device=(1, 0)):
        self._capsule = capsule
        self._device = device

    def __dlpack__(self, **kwargs):
        return self._capsule() if callable(self._capsule) else self._capsule

    def __dlpack_device__(self):
        return self._device


@pytest.mark.parametrize("gives", [None, 5, "capsule", np.arange(3)], ids=repr)
def test_a_dlpack_method_that_returns_no_capsule_is_named(gives):
    with pytest.raises(tb.ConversionError) as e:
        tb.to_torch(DLPack(gives))
    text = str(e.value)
    assert f"its __dlpack__ returned a {type(gives).__qualname__}, not a DLPack capsule" in text
    assert "Fix: fix the producer's __dlpack__" in text


@pytest.mark.parametrize("device", [None, "cpu", (), ("x", 0)], ids=repr)
def test_a_dlpack_device_that_is_not_a_pair_is_named(device):
    a = np.arange(3.0)
    with pytest.raises(tb.ConversionError, match=r"its __dlpack_device__\(\) did not give"):
        tb.to_numpy(DLPack(a.__dlpack__, device))


class CudaInterface:
    __cuda_array_interface__ = {
        "shape": (4,),
        "typestr": "<f4",
        "data": (1 << 40, False),
        "version": 3,
        "strides": None,
    }


class CudaDLPack:
    def __dlpack__(self, **kwargs):
        raise AssertionError("never asked: there is no CUDA to take it over")

    def __dlpack_device__(self):
        return (2, 0)


@pytest.mark.parametrize("make", [CudaInterface, CudaDLPack])
@pytest.mark.parametrize("tgt", ["numpy", "torch", "mlx"])
def test_cuda_memory_without_cuda_is_refused_with_the_fix(make, tgt, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # any machine: no CUDA
    with pytest.raises(tb.ConversionError) as e:
        tb.convert(make(), to=tgt)
    text = str(e.value)
    assert "its memory is on a CUDA device" in text and "torch here has no CUDA" in text
    assert "copy it to the host in its own library first" in text
    assert len(text) < 600  # not the framework's pages-long CUDA initialisation error
