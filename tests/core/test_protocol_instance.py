"""Array protocols found on the instance, as NumPy finds them: ``np.asarray`` reads
``__array_interface__`` and ``__array__`` from the instance, ``np.from_dlpack`` calls the
instance's ``__dlpack__``. tensorbridge converts such objects to every target (sharing
proven by mutation where claimed), and refuses incomplete ones with a fix."""

from __future__ import annotations

import numpy as np
import pytest

import tensorbridge as tb

from .frameworks import bytes_of, dtype_of, framework_of

TARGETS = ["numpy", "torch", "tensorflow", "jax", "mlx"]


class Bag:
    """A plain object: protocols are assigned to it as attributes."""


def interface_on_instance(a):
    o = Bag()
    o.__array_interface__ = a.__array_interface__
    o.keep = a
    return o


def array_on_instance(a):
    o = Bag()
    o.__array__ = lambda dtype=None, copy=None: a
    o.shape, o.dtype = a.shape, a.dtype
    return o


def dlpack_on_instance(a):
    o = Bag()
    o.__dlpack__, o.__dlpack_device__ = a.__dlpack__, a.__dlpack_device__
    return o


class Forwarding:
    """A wrapper whose ``__getattr__`` forwards to an array (numba's simulated CUDA arrays
    are built like this): its type speaks no protocol, its instances speak every one."""

    def __init__(self, a):
        self._a = a

    def __getattr__(self, name):
        return getattr(self._a, name)


MAKERS = [interface_on_instance, array_on_instance, dlpack_on_instance, Forwarding]


def test_numpy_itself_reads_these_protocols_from_the_instance():
    """The rule followed, checked against the NumPy installed."""
    a = np.arange(4, dtype=np.float32)
    for make in (interface_on_instance, array_on_instance, Forwarding):
        assert np.asarray(make(a)).tobytes() == a.tobytes()
    assert np.shares_memory(np.asarray(interface_on_instance(a)), a)
    assert np.shares_memory(np.from_dlpack(dlpack_on_instance(a)), a)


@pytest.mark.parametrize("make", MAKERS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("tgt", TARGETS)
def test_instance_protocols_convert_to_every_target(make, tgt):
    if tgt != "numpy":
        pytest.importorskip("mlx.core" if tgt == "mlx" else tgt)
    for dtype in ("bool", "int8", "uint16", "int64", "float16", "float32", "complex64"):
        a = (np.arange(32) % 7 - 3).astype(dtype).reshape(4, 8)
        y = tb.convert(make(a), to=tgt)
        if tgt == "mlx":
            assert np.asarray(y).tobytes() == a.tobytes(), dtype
        else:
            assert framework_of(y) == tgt and dtype_of(y) == dtype, dtype
            assert bytes_of(y) == a.tobytes(), dtype


@pytest.mark.parametrize("make", [interface_on_instance, dlpack_on_instance, Forwarding])
def test_views_share_memory_proven_by_mutation(make):
    torch = pytest.importorskip("torch")
    a = np.arange(4, dtype=np.float32)
    o = make(a)
    plan = tb.explain(o, to="torch")
    assert not plan.copies, str(plan)
    assert type(o).__name__ in str(plan)  # the plan names the object's own type
    t = tb.to_torch(o, copy=False)
    a[0] = 42
    assert t[0].item() == 42 and isinstance(t, torch.Tensor)
    c = tb.to_torch(o, copy=True)
    a[1] = 43
    assert c[1].item() == 1


def test_array_on_the_instance_may_copy_so_copy_false_refuses():
    o = array_on_instance(np.arange(3.0))
    assert "__array__" in str(tb.explain(o, to="numpy"))
    with pytest.raises(tb.CopyError, match="__array__"):
        tb.to_numpy(o, copy=False)
    assert tb.to_numpy(o, copy=True).tolist() == [0.0, 1.0, 2.0]


def test_trees_saving_and_paths():
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    out = tb.to_numpy({"i": interface_on_instance(a), "l": [Forwarding(a)], "s": "text"})
    assert out["i"].tobytes() == a.tobytes() and out["l"][0].tobytes() == a.tobytes()
    assert out["s"] == "text"
    plans = tb.explain({"i": interface_on_instance(a), "s": "text"}, to="numpy")
    assert [str(p) for p, _ in plans] == ["('i',)"]


def test_saving_instance_protocol_objects(tmp_path):
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    p = tmp_path / "p.safetensors"
    tb.save({"w": dlpack_on_instance(a), "v": interface_on_instance(a.T)}, p)
    back = tb.load(p)
    assert back["w"].tobytes() == a.tobytes() and back["v"].tobytes() == a.T.tobytes()


def test_incomplete_protocols_on_the_instance_are_refused_with_a_fix(tmp_path):
    a = np.arange(4.0)
    half_dlpack = Bag()
    half_dlpack.__dlpack__ = a.__dlpack__
    bare_array = Bag()
    bare_array.__array__ = lambda dtype=None, copy=None: a  # no shape, no dtype
    for o, why in ((half_dlpack, "has no __dlpack_device__"), (bare_array, "not clearly")):
        with pytest.raises(tb.ConversionError, match=why) as info:
            tb.to_numpy(o)
        assert "Fix: pass np.asarray(x)" in str(info.value)
        with pytest.raises(tb.ConversionError, match=r"^at \['k'\].*" + why):
            tb.to_torch({"k": o})
        with pytest.raises(tb.ConversionError, match=why):
            tb.explain({"k": o}, to="numpy")
        with pytest.raises(tb.ConversionError, match=why):
            tb.save({"k": o}, tmp_path / "x.safetensors")


def test_a_lookup_that_raises_is_reported_not_leaked():
    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("backend gone")

    with pytest.raises(tb.ConversionError, match="raised RuntimeError: backend gone"):
        tb.to_numpy(Broken())


def test_objects_that_speak_nothing_stay_leaves():
    class Plain:
        pass

    p = Plain()
    assert tb.to_numpy({"p": p, "n": None, "s": "x"}) == {"p": p, "n": None, "s": "x"}
