"""Express routes (Backend.express) give exactly what the planned route gives.

A call without dtype=/device= finds the cached plan of the commonest kinds by reading a
few attributes instead of the whole kind. These tests convert many kinds of tensors of
each type in one process, interleaved (so a table learnt for one kind is offered the
others), and compare every result with the plan explain() shows, run by hand: same type,
dtype, shape and bytes, the same sharing with the input (proven by mutation where the
source is mutable), the same writeable flag. They also prove the express route was the
one taken, and that tensors it must not take (flipped strides, neg/conj bits, deleted
arrays, variables) are declined.
"""

from __future__ import annotations

import os
import sys

import ml_dtypes
import numpy as np
import pytest

import tensorbridge as tb

torch = pytest.importorskip("torch")

CONVERT = sys.modules["tensorbridge.convert"]


def _bits(x) -> tuple:
    a = tb.to_numpy(x, copy=True)
    data = a.tolist() if a.dtype == object else a.tobytes()  # TF strings: bytes objects
    return a.dtype.str, a.dtype.name, a.shape, data


def _express(x, to: str, copy, dtype=None):
    """The express function the call took for ``x`` (None: the ordinary path)."""
    if dtype is not None:
        return CONVERT._EXPRESS_CAST[(to, copy, dtype)].get(type(x))
    tables = CONVERT._EXPRESS[CONVERT._TARGETS[to]]
    return tables[copy is True].get(type(x))


def _check(objs, to: str, copy, *, expect_express=None, dtype=None) -> None:
    """Convert all (filling the tables in this order), then check each result; without
    options, both spelt out (``copy=None``) and left out (convert's plain call)."""
    outs = [tb.convert(x, to=to, copy=copy, dtype=dtype) for x in objs]
    pairs = list(zip(objs, outs, strict=True))
    if copy is None and dtype is None:
        pairs += [(x, tb.convert(x, to=to)) for x in objs]
    for x, out in pairs:
        plan = tb.explain(x, to=to, copy=copy, dtype=dtype)
        ref = plan.run(x)
        assert type(out) is type(ref), (str(plan), type(out))
        assert _bits(out) == _bits(ref), str(plan)
        assert tb.shares_memory(out, x) == tb.shares_memory(ref, x), str(plan)
        if not isinstance(x, np.generic):  # a scalar is a value: nothing to share
            assert tb.shares_memory(out, x) == (not plan.copies), str(plan)
        if isinstance(ref, np.ndarray):
            assert out.flags.writeable == ref.flags.writeable, str(plan)
        if expect_express is not None:
            fn = _express(x, to, copy, dtype)
            took = fn is not None and fn(x) is not None
            assert took == expect_express(x), (str(plan), took)


DTYPES = [
    np.bool_,
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn,
]


def _numpy_kinds():
    out = []
    for dt in DTYPES:
        a = (np.arange(24) % 7).astype(dt).reshape(4, 6)
        ro = a.copy()
        ro.flags.writeable = False
        out += [a, ro, a.T, a[::-1], a[:, ::2], np.array(a[0, 0]), a[0, 0], ro.T]
    out.append(np.arange(6, dtype=">f4"))  # big-endian: byte-swapped, never shared
    out.append(np.arange(6, dtype=np.dtype("q")))
    out.append(np.arange(6, dtype=np.dtype("l")))
    out.append(np.ones((3, 1), np.float32)[:, ::-1])  # negative stride in a size-1 dim
    out.append(np.ones(1, np.float32)[::-1])
    return out


def _flipped(a: np.ndarray) -> bool:
    return any(s < 0 for s in a.strides)


@pytest.mark.parametrize("copy", [None, True])
def test_numpy_to_torch(copy):
    _check(
        _numpy_kinds(),
        "torch",
        copy,
        expect_express=lambda a: type(a) is np.ndarray and not _flipped(a),  # not scalars
    )


def test_a_call_like_the_last_one_takes_its_route_and_options_still_count():
    """convert() keeps the express route of its last plain call (no options) and takes it
    for the next call of the same type and ``to``; anything else looks up its own."""
    CONVERT.forget_express()
    a = np.arange(4, dtype=np.float32)
    ro = a.copy()
    ro.flags.writeable = False
    for _ in range(2):
        t = tb.convert(a, to="torch")
        e = _express(a, "torch", None)
        assert ("torch", np.ndarray, e, e.memo) == CONVERT._LAST
        assert t.data_ptr() == a.ctypes.data  # shared
        c = tb.convert(a, to="torch", copy=True)
        assert c.data_ptr() != a.ctypes.data and c.tolist() == a.tolist()
        h = tb.convert(a, to="torch", dtype="float16")
        assert h.dtype == torch.float16 and h.tolist() == a.tolist()
        r = tb.convert(ro, to="torch")  # the same type: read-only is asked per call
        assert r.data_ptr() != ro.ctypes.data
        f = tb.convert(a[::-1], to="torch")  # and flipped strides
        assert f.tolist() == a[::-1].tolist()
        back = tb.convert(t, to="numpy")  # another type and target
        assert back.ctypes.data == a.ctypes.data
        assert CONVERT._LAST[:2] == ("numpy", torch.Tensor)
        assert tb.convert([a], to="torch")[0].data_ptr() == a.ctypes.data  # a tree
        assert tb.convert(a, to="numpy") is a  # no express route: the memo stays
        assert CONVERT._LAST[:2] == ("numpy", torch.Tensor)
    a[0] = 9  # zero-copy proven by mutation
    assert t[0].item() == 9 and back[0] == 9 and c[0].item() == 0
    CONVERT.forget_express()
    assert CONVERT._LAST == (None, None, None, None)
    assert _express(a, "torch", None) is None


@pytest.mark.parametrize("to", ["torch", "mlx"])
def test_the_last_dtype_seen_is_never_applied_to_another(to):
    """NumPy's express route remembers the route of the last writable dtype and takes it
    when the next array's dtype is the same object; any other dtype (an equal one of
    another identity, another byte order, a read-only array of the same dtype) looks its
    own up. Interleaved, and from threads, every result is what its own plan gives (for
    MLX the routes differ by dtype: float64 and int64 keep their width, which mx.array
    alone would narrow)."""
    import threading

    if to == "mlx":
        _mlx()
    CONVERT.forget_express()
    f32 = np.arange(6, dtype=np.float32)
    same = np.arange(6, dtype=np.dtype("float32").newbyteorder("<"))
    assert same.dtype is not f32.dtype and same.dtype == f32.dtype
    big = np.arange(6, dtype=">f4")
    ro = f32.copy()
    ro.flags.writeable = False
    f64 = np.arange(6, dtype=np.float64)
    i64 = np.arange(6, dtype=np.int64)
    bf = np.arange(6).astype(ml_dtypes.bfloat16)
    kinds = [f32, same, big, ro, f64, i64, bf, f32.reshape(2, 3).T, f32[::-1], f32, f64, bf]
    spellings = [lambda a: tb.convert(a, to=to)]
    spellings.append(tb.to_torch if to == "torch" else tb.to_mlx)
    for convert in spellings:
        for _ in range(3):
            for a in kinds:
                got = convert(a)
                plan = tb.explain(a, to=to)
                ref = plan.run(a)
                assert got.dtype == ref.dtype and _bits(got) == _bits(ref), str(plan)
                if to == "torch":
                    assert tb.shares_memory(got, a) == (not plan.copies), str(plan)

    for copy in (None, True):  # a tree: one leaf function meets every kind in turn
        outs = tb.convert(kinds * 3, to=to, copy=copy)
        for a, got in zip(kinds * 3, outs, strict=True):
            plan = tb.explain(a, to=to, copy=copy)
            ref = plan.run(a)
            assert got.dtype == ref.dtype and _bits(got) == _bits(ref), str(plan)
            if to == "torch":
                assert tb.shares_memory(got, a) == (not plan.copies), str(plan)

    errors: list[str] = []

    def hammer(a: np.ndarray) -> None:
        want = tb.explain(a, to=to).run(a).dtype
        for i in range(2000):
            got = spellings[i % 2](a)
            if got.dtype != want:
                errors.append(f"{a.dtype}: {got.dtype}")
                return

    threads = [threading.Thread(target=hammer, args=(a,)) for a in (f32, f64, i64, bf)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("spelling", ["convert", "to_torch", "tree"])
def test_the_dtype_memo_is_asked_only_for_what_it_may_take(spelling):
    """The route remembered for the last dtype runs only for a writable array of that
    very dtype with no flipped stride: flipped, read-only and other arrays never reach it
    (no exception is raised and caught on their way either)."""
    convert = {
        "convert": lambda x: tb.convert(x, to="torch"),
        "to_torch": tb.to_torch,
        # the first leaf finds the route (the express function), the second the memo
        "tree": lambda x: tb.convert({"a": x, "b": x}, to="torch")["b"],
    }[spelling]
    twice = 2 if spelling == "tree" else 1
    CONVERT.forget_express()
    f32 = np.arange(6, dtype=np.float32)
    convert(f32)
    convert(f32)
    memo = _express(f32, "torch", None).memo
    dt, route = memo[0]
    assert dt is f32.dtype
    calls: list[tuple] = []

    def spy(a: np.ndarray):
        calls.append((a.shape, a.strides))
        return route(a)

    memo[0] = (dt, spy)
    view = f32.reshape(2, 3).T
    for a in (f32[::-1], f32.reshape(2, 3)[:, ::-1], np.ones((1, 3), np.float32)[::-1]):
        assert convert(a).tolist() == a.tolist()
    ro = f32.copy()
    ro.flags.writeable = False
    assert convert(ro).tolist() == ro.tolist()
    assert convert(f32.astype(np.float64)).dtype == torch.float64
    assert calls == []
    memo[0] = (dt, spy)
    assert convert(view).data_ptr() == f32.ctypes.data
    assert convert(f32).data_ptr() == f32.ctypes.data
    assert calls == [(view.shape, view.strides)] * twice + [(f32.shape, f32.strides)] * twice
    CONVERT.forget_express()


def test_to_numpy_options_interleaved_take_their_own_tables():
    """to_numpy keeps the table of its last options; other options (another dtype, an
    equal dtype name of another identity, copy=True, a dtype object) take their own."""
    CONVERT.forget_express()
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    g = t.clone().requires_grad_(True)
    a = np.arange(6, dtype=np.float64)
    other = "".join(["bfloat", "16"])  # equal to "bfloat16", another object
    assert other == "bfloat16" and other is not "bfloat16"  # noqa: F632 - identity on purpose
    options = [
        {"dtype": "bfloat16"},
        {"dtype": "float16"},
        {"dtype": other},
        {"copy": True},
        {"copy": True, "dtype": "float16"},
        {"dtype": np.dtype("int32")},
        {"dtype": "bfloat16"},
        {"copy": False},
    ]
    for _ in range(2):
        for opts in options:
            for x in (t, g, a, t.T):
                got = tb.to_numpy(x, **opts)
                plan = tb.explain(x, to="numpy", **opts)
                ref = plan.run(x)
                assert got.dtype == ref.dtype and _bits(got) == _bits(ref), (opts, str(plan))
                assert tb.shares_memory(got, x) == tb.shares_memory(ref, x), (opts, str(plan))


def test_convert_takes_exactly_its_options():
    """convert's options are keyword-only, each once, and nothing else: as its signature
    (the one help() and inspect show) says."""
    import inspect

    a = np.arange(3, dtype=np.float32)
    params = inspect.signature(tb.convert).parameters
    assert list(params) == ["x", "to", "device", "dtype", "copy", "ragged", "pinned"]
    assert params["device"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError, match=r"convert\(\) got an unexpected keyword argument 'cpoy'"):
        tb.convert(a, to="torch", cpoy=True)
    with pytest.raises(TypeError, match=r"positional-only arguments passed as keyword.*'x'"):
        tb.convert(a, to="torch", x=a)
    with pytest.raises(TypeError, match=r"takes 2 positional arguments but 3 were given"):
        tb.convert(a, "torch", None)  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"multiple values for argument 'to'"):
        tb.convert(a, "torch", to="numpy")  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"missing 1 required positional argument: 'to'"):
        tb.convert(a)  # type: ignore[call-arg]
    every = {"device": "cpu", "dtype": "float64", "copy": True, "ragged": "error", "pinned": False}
    out = tb.convert(a, to="numpy", **every)
    assert out.dtype == np.float64 and out.tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(tb.ConversionError, match="copy takes None, True or False"):
        tb.convert(a, to="torch", copy="yes")
    for to in (["torch"], {"a": 1}, None, b"torch", 1.5):  # unhashable ones too
        for opts in ({}, {"copy": True}):
            with pytest.raises(tb.ConversionError, match="not a framework tensorbridge knows"):
                tb.convert(a, to=to, **opts)  # type: ignore[arg-type]


def test_strides_set_by_hand_on_an_owning_array_go_the_planned_way():
    """An array that owns its memory is not asked for its strides; NumPy still lets a
    size-1 dim's stride be set negative by hand (deprecated). The express route's plan
    then refuses it, and the ordinary path converts it as explain says."""
    a = np.zeros((1, 3), np.float32)
    a[0] = [1, 2, 3]
    with pytest.warns(DeprecationWarning):
        a.strides = (-12, 4)
    assert a.flags.owndata and a.base is None
    plan = tb.explain(a, to="torch")
    assert "rewrite the strides" in str(plan)
    for convert in (lambda x: tb.convert(x, to="torch"), tb.to_torch):
        for _ in range(2):  # the second call finds float32 as the last dtype seen
            convert(np.zeros(2, np.float32))  # the express route has learnt float32
            t = convert(a)
            assert t.tolist() == [[1.0, 2.0, 3.0]] and t.data_ptr() == a.ctypes.data
            a[0, 0] = 9  # shared, as the plan says
            assert t[0, 0].item() == 9
            a[0, 0] = 1


def test_numpy_to_torch_shares_by_mutation():
    a = np.arange(8, dtype=np.float32)
    t = tb.to_torch(a)
    assert _express(a, "torch", None) is not None
    a[3] = 99.0
    assert t[3].item() == 99.0
    ro = np.arange(8, dtype=np.float32)
    ro.flags.writeable = False
    t2 = tb.to_torch(ro)  # read-only: copied, so a write to the tensor cannot reach it
    t2[0] = 5.0
    assert ro[0] == 0.0


def test_a_subclass_is_not_taken_for_an_ndarray(tmp_path):
    m = np.memmap(tmp_path / "m.bin", dtype=np.float32, mode="w+", shape=(4,))
    _check([m], "torch", None)
    assert _express(m, "torch", None) is None
    masked = np.ma.masked_array([1.0, 2.0], mask=[0, 1])
    with pytest.raises(tb.ConversionError, match="masked"):
        tb.to_torch(masked)
    assert _express(masked, "torch", None) is None


def _torch_kinds():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    out = []
    for dt in [
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint16,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.float8_e4m3fn,
    ]:
        t = base.to(dt)
        out += [t, t.T, t[:, ::2], t[1, 2].clone()]
        if dt.is_floating_point or dt.is_complex:
            out += [t.clone().requires_grad_(), torch.nn.Parameter(t.clone())]
    out.append(torch._neg_view(base))  # the neg bit on a real tensor
    out.append(torch.arange(4.0).to(torch.complex64).conj())  # the conj bit
    out.append(torch._neg_view(torch.arange(4.0).to(torch.complex64)))
    return out


def _plain_torch(t) -> bool:
    return not t.is_neg() and not t.is_conj()


@pytest.mark.parametrize("copy", [None, True])
def test_torch_to_numpy(copy):
    _check(_torch_kinds(), "numpy", copy, expect_express=_plain_torch)


def test_torch_to_numpy_shares_by_mutation():
    t = torch.zeros(5, requires_grad=True)
    a = tb.to_numpy(t)
    assert _express(t, "numpy", None) is not None
    with torch.no_grad():
        t[2] = 7.0
    assert a[2] == 7.0
    c = tb.to_numpy(t, copy=True)
    with torch.no_grad():
        t[1] = 3.0
    assert c[1] == 0.0


def test_to_numpy_and_to_torch_take_the_same_routes():
    a = np.arange(6, dtype=np.float32)
    t = torch.arange(6.0, requires_grad=True)
    assert tb.to_torch(a).data_ptr() == a.ctypes.data
    assert tb.to_numpy(t).ctypes.data == t.data_ptr()
    assert tb.to_numpy(t, copy=True).ctypes.data != t.data_ptr()
    # copy=True: the copy=True table, the same one convert() uses; copies proven by mutation
    c = tb.to_torch(a, copy=True)
    n = tb.to_numpy(t, copy=True)
    assert _express(a, "torch", True) is not None and _express(t, "numpy", True) is not None
    a[0] = 5
    with torch.no_grad():
        t[0] = 5
    assert c[0].item() == 0 and n[0] == 0 and c.tolist()[1:] == a.tolist()[1:]
    assert tb.to_torch(a, copy=True)[0].item() == 5 and tb.to_numpy(t, copy=True)[0] == 5
    # a cast takes its own express table; copy=False never does
    assert tb.to_torch(a, dtype="float16").dtype == torch.float16
    with pytest.raises(tb.CopyError):
        tb.to_numpy(torch._neg_view(t.detach()), copy=False)


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


def _tf_kinds(tf):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    out = [
        tf.constant(base.astype(dt))
        for dt in [np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_]
    ]
    out += [
        tf.constant(base.astype(np.complex64)),
        tf.cast(tf.constant(base), tf.bfloat16),
        tf.constant(3.5),  # 0-d
        tf.cast(tf.constant(3.5), tf.bfloat16),  # 0-d, copied by Tensor.numpy(): a scalar
        tf.constant([b"a", b"bc"]),  # strings
        tf.Variable(base),
    ]
    return out


@pytest.mark.parametrize("to,copy", [("numpy", None), ("numpy", True), ("torch", None)])
def test_tensorflow(to, copy):
    tf = _tf()
    kinds = _tf_kinds(tf)
    if to == "torch":
        kinds = [k for k in kinds if k.dtype != tf.string]
    _check(
        kinds,
        to,
        copy,
        expect_express=lambda t: not isinstance(t, tf.Variable),
    )


def test_tensorflow_view_is_read_only_and_shared():
    tf = _tf()
    x = tf.constant(np.arange(6, dtype=np.float32))
    a = tb.to_numpy(x)
    assert _express(x, "numpy", None) is not None
    assert not a.flags.writeable and tb.shares_memory(a, x)


def test_tensorflow_bfloat16_is_copied_as_tensor_numpy_copies():
    tf = _tf()
    x = tf.cast(tf.constant(np.arange(6, dtype=np.float32)), tf.bfloat16)
    a = tb.to_numpy(x)
    assert _express(x, "numpy", None) is not None
    assert "Tensor.numpy() [copy]" in str(tb.explain(x, to="numpy"))
    assert a.dtype == ml_dtypes.bfloat16 and a.flags.writeable
    assert a.tobytes() == x.numpy().tobytes()
    a[0] = 7  # a copy of its own: the tensor, and the next conversion, keep their values
    assert x.numpy()[0] == 0 and tb.to_numpy(x)[0] == 0


def test_tensorflow_express_keeps_a_plan_per_device():
    """The first device met per dtype is compared by value; others have plans of their own."""
    tf = _tf()
    from tensorbridge.frameworks.tensorflow import BACKEND

    t = tf.constant(np.arange(3, dtype=np.float32))
    learnt = []

    def learn(x):
        learnt.append(x.device)
        return lambda y, dev=x.device: ("plan of", dev)

    run = BACKEND.express(type(t), "numpy", learn)

    class OnAnotherDevice:  # what the express route reads of an eager tensor
        device = "/job:localhost/replica:0/task:0/device:GPU:0"

        def _datatype_enum(self):
            return t._datatype_enum()

    other = OnAnotherDevice()
    for _ in range(2):
        assert run(t) == ("plan of", t.device)
        assert run(other) == ("plan of", other.device)
    assert learnt == [t.device, other.device]  # each learnt once


def _jax():
    return pytest.importorskip("jax")


@pytest.mark.parametrize("to,copy", [("numpy", None), ("numpy", True), ("torch", None)])
def test_jax(to, copy):
    jax = _jax()
    jnp = jax.numpy
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    kinds = [
        jnp.asarray(base.astype(dt))
        for dt in [np.float32, np.int32, np.int8, np.uint8, np.bool_, np.float16, np.complex64]
    ]
    kinds += [
        jnp.asarray(base.astype(ml_dtypes.bfloat16)),
        jnp.asarray(base.astype(ml_dtypes.float8_e4m3fn)),
        jnp.float32(2.5),
        jnp.asarray(base).T,
    ]
    _check(kinds, to, copy, expect_express=lambda x: True)


def test_a_deleted_jax_array_is_declined_and_refused():
    jax = _jax()
    x = jax.numpy.arange(4.0)
    tb.to_numpy(x)
    x.delete()
    e = _express(x, "numpy", None)
    with pytest.raises(Exception):  # noqa: B017 - JAX's own error: the caller then plans it
        e(x)
    with pytest.raises(tb.ConversionError, match="deleted"):
        tb.to_numpy(x)
    with pytest.raises(tb.ConversionError, match="deleted"):
        tb.to_torch(x)


def test_jax_express_reads_what_the_properties_say_or_declines():
    """x.aval.dtype and x._sharding are read for x.dtype and x.sharding; an array whose
    properties say otherwise is left to the planner, and nothing is learnt from it."""
    jax = _jax()
    from tensorbridge.frameworks.jax import BACKEND

    x = jax.numpy.arange(4.0)
    assert x.aval.dtype is x.dtype and x._sharding is x.sharding
    learnt = []

    def learn(y):
        learnt.append(y)
        return np.asarray

    run = BACKEND.express(type(x), "numpy", learn)

    class Odd:  # the attributes read agree with x, the properties do not
        aval = x.aval
        _sharding = x._sharding
        dtype = np.dtype(np.int8)
        sharding = x.sharding

    assert run(Odd()) is None and learnt == []
    assert run(x).tobytes() == np.asarray(x).tobytes() and learnt == [x]


def test_trees_take_the_express_route_per_leaf():
    a = np.arange(4, dtype=np.float32)
    ro = a.copy()
    ro.flags.writeable = False
    t = torch.arange(3.0, requires_grad=True)
    tree = {"a": a, "ro": ro, "flip": a[::-1], "t": t, "n": 3, "s": "text"}
    out = tb.convert(tree, to="torch")
    assert out["a"].data_ptr() == a.ctypes.data  # shared
    assert out["ro"].data_ptr() != ro.ctypes.data  # copied
    assert out["flip"].tolist() == [3.0, 2.0, 1.0, 0.0]
    assert out["t"] is t and out["n"] == 3 and out["s"] == "text"
    back = tb.to_numpy(out)
    assert back["t"].ctypes.data == t.data_ptr() and back["a"].ctypes.data == a.ctypes.data


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int32"])
@pytest.mark.parametrize("copy", [None, True])
def test_casts(dtype, copy):
    torch_kinds = [t for t in _torch_kinds() if not t.dtype.is_complex]
    _check(torch_kinds, "numpy", copy, dtype=dtype, expect_express=_plain_torch)
    numpy_kinds = [a for a in _numpy_kinds() if a.dtype.kind != "c"]
    _check(
        numpy_kinds,
        "torch",
        copy,
        dtype=dtype,
        expect_express=lambda a: type(a) is np.ndarray and not _flipped(a),
    )
    for a in numpy_kinds[:3]:  # the same calls through to_torch/to_numpy
        assert _bits(tb.to_torch(a, dtype=dtype, copy=copy)) == _bits(
            tb.explain(a, to="torch", dtype=dtype, copy=copy).run(a)
        )


def _mlx():
    return pytest.importorskip("mlx.core")


def _mlx_kinds(mx):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    out = [
        mx.array(base.astype(dt))
        for dt in [
            np.float32,
            np.float16,
            np.int32,
            np.uint32,
            np.int64,
            np.uint64,
            np.int8,
            np.uint8,
            np.int16,
            np.bool_,
        ]
    ]
    out += [
        mx.array(base).astype(mx.bfloat16),
        mx.array(base).astype(mx.complex64),
        mx.array(base).T,  # a transposed view
        mx.array(base) * 2 + 1,  # pending: not computed yet
        mx.array(2.5),  # 0-d
    ]
    return out


@pytest.mark.parametrize("to,copy", [("numpy", None), ("numpy", True), ("torch", None)])
def test_mlx(to, copy):
    mx = _mlx()
    _check(_mlx_kinds(mx), to, copy, expect_express=lambda x: True)


def test_mlx_int64_keeps_numpys_own_dtype():
    mx = _mlx()
    for dt, want in [(mx.int64, np.int64), (mx.uint64, np.uint64)]:
        a = tb.to_numpy(mx.arange(3, dtype=dt))
        assert a.dtype.char == np.dtype(want).char and not a.flags.writeable
        assert tb.to_torch(mx.arange(3, dtype=dt)).tolist() == [0, 1, 2]


@pytest.mark.parametrize("copy", [None, True])
def test_numpy_to_mlx(copy):
    _mlx()
    kinds = [a for a in _numpy_kinds() if a.dtype not in (np.complex128, ml_dtypes.float8_e4m3fn)]
    _check(
        kinds,
        "mlx",
        copy,
        expect_express=lambda a: type(a) is np.ndarray and not _flipped(a),
    )


def test_a_cast_is_quiet_and_leaves_numpys_error_state_as_it_was():
    import warnings

    big = torch.tensor([1e10, float("nan"), -3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="warn", invalid="warn"):
            before = np.geterr()
            assert tb.to_numpy(big, dtype="float16").tolist()[0] == float("inf")
            assert tb.to_numpy(big, dtype="int32")[2] == -3
            assert np.geterr() == before
            with pytest.raises(RuntimeWarning, match="overflow"):
                np.array([1e10], np.float32).astype(np.float16)  # the caller's own cast warns
        with np.errstate(over="raise"):
            tb.to_numpy(big, dtype="float16")
            with pytest.raises(FloatingPointError):
                np.array([1e10], np.float32).astype(np.float16)


@pytest.mark.parametrize("to", ["numpy", "torch", "jax", "tensorflow"])
def test_a_complex_to_real_cast_keeps_the_real_parts_and_warns_as_numpy_does(to):
    """Dropping the imaginary parts is data lost, which NumPy warns about: a cast to
    NumPy's own dtypes warns too, NumPy's quiet error state notwithstanding; one to
    bfloat16 (ml_dtypes) does not (both as convert's docstring says)."""
    pytest.importorskip({"numpy": "numpy", "torch": "torch", "jax": "jax"}.get(to, "tensorflow"))
    x = np.array([1 + 2j, 3 - 4j], np.complex64)
    with pytest.warns(np.exceptions.ComplexWarning, match="imaginary"):
        got = tb.convert(x, to=to, dtype="float32")
    assert np.asarray(got).tolist() == [1.0, 3.0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (ml_dtypes' casts do not warn)
        got = tb.convert(x, to=to, dtype="bfloat16")
    assert np.asarray(tb.to_numpy(got)).astype(np.float32).tolist() == [1.0, 3.0]


@pytest.mark.parametrize(
    "dtype,first,other",
    [
        ("float32", "float32", "int32"),
        ("int32", "int32", "float32"),
        ("uint32", "uint32", "int32"),
        ("uint8", "uint8", "bool_"),
        ("int8", "int8", "uint8"),
    ],
)
def test_mlx_cast_tables_never_skip_the_cast(dtype, first, other):
    # A cast whose source already has the dtype is a bare view; the view must not be
    # taken for every MLX dtype of that item size (an int32 array came back as int32
    # from to_numpy(x, dtype="float32") after a float32 array had been converted so)
    mx = _mlx()
    x = mx.zeros(3, dtype=getattr(mx, first))
    y = mx.array([1, 0, 1], dtype=getattr(mx, other))
    for copy in (None, True):
        assert tb.to_numpy(x, dtype=dtype, copy=copy).dtype == np.dtype(dtype)
        for out in (tb.to_numpy(y, dtype=dtype, copy=copy), tb.to_numpy([y], dtype=dtype)[0]):
            assert out.dtype == np.dtype(dtype)
            assert out.tolist() == [1, 0, 1]
            assert not tb.shares_memory(out, y)
        _check([x, y, x], "numpy", copy, dtype=dtype)


def test_mlx_plain_table_still_views_each_item_size_once_planned():
    mx = _mlx()
    ys = [mx.array([1, 0], dtype=d) for d in (mx.float32, mx.int32, mx.uint32, mx.uint8, mx.int8)]
    ys.append(mx.array([True, False]))
    _check(ys, "numpy", None, expect_express=lambda x: True)
    fn = _express(ys[0], "numpy", None)
    fast = dict(zip(fn.__code__.co_freevars, fn.__closure__, strict=True))["fast"].cell_contents
    assert fast == {1, 4}


def test_a_refusal_inside_the_bounce_is_worded_for_the_source():
    # TF/JAX/MLX -> torch composes the source's own copy to NumPy with NumPy's route to
    # torch: a refusal of the NumPy half spoke of NumPy object arrays for a TF string
    tf = _tf()
    x = tf.constant([b"a", b"bc"])
    for _ in range(2):
        with pytest.raises(tb.ConversionError, match="tensorflow string tensor for torch"):
            tb.to_torch(x)
        with pytest.raises(tb.ConversionError, match="tensorflow string tensor for torch"):
            tb.convert({"s": x}, to="torch")
    assert tb.to_torch(tf.constant([1.5])).tolist() == [1.5]  # the bounce still runs


def _record_fields():
    """Views of one field of a packed record array: strides of part of an item (13 bytes
    for float64 and int32), which torch.from_numpy and mx.array refuse."""
    rec = np.zeros(4, [("a", "u1"), ("x", "<f8"), ("y", "<i4")])
    rec["x"] = [1.5, 2.5, 3.5, 4.5]
    rec["y"] = [5, 6, 7, 8]
    # rec[:1]["x"]: NumPy calls a size-1 view C-contiguous whatever its stride
    return [rec["x"], rec["y"], rec[:1]["x"], rec[::-1]["y"]]


@pytest.mark.parametrize("first", ["whole", "part"])
@pytest.mark.parametrize("to", ["torch", "mlx"])
def test_strides_of_part_of_an_item_are_copied_and_never_taught(to, first):
    if to == "mlx":
        _mlx()
    CONVERT.forget_express()
    sys.modules["tensorbridge.plan"]._PLANS.clear()
    whole = [np.arange(4.0), np.arange(4, dtype=np.int32), np.arange(8.0)[::2]]
    part = _record_fields()
    objs = whole + part if first == "whole" else part + whole
    for copy in (None, True):
        # explain says copy, the result is that copy; the arrays of whole items that
        # come after (same dtype, same writeable flag) still share, on the express route
        _check(objs, to, copy)
        for a in whole[:2]:
            assert _express(a, to, copy)(a) is not None
        for a in part:
            plan = tb.explain(a, to=to, copy=copy)
            assert plan.copies
            if copy is None:
                assert "strides of whole items" in str(plan) or "positive strides" in str(plan)
            out = tb.convert(a, to=to, copy=copy)
            assert tb.to_numpy(out).tolist() == a.tolist()
    for a in part[:2]:
        with pytest.raises(tb.CopyError, match="part of one"):
            tb.convert(a, to=to, copy=False)
    # one call's own table of plans by kind (device= takes no express route) too
    tree = [part[0], whole[0], part[1], whole[1]]
    for out in (tb.convert(tree, to=to, device="cpu"), tb.convert(tree, to=to)):
        assert [tb.shares_memory(o, a) for o, a in zip(out, tree, strict=True)] == [
            False,
            to == "torch",
            False,
            to == "torch",
        ]
        assert [tb.to_numpy(o).tolist() for o in out] == [a.tolist() for a in tree]
    out = tb.convert({"x": part[0], "ys": [part[1]]}, to=to)
    assert tb.to_numpy(out["x"]).tolist() == [1.5, 2.5, 3.5, 4.5]
    assert tb.to_numpy(out["ys"][0]).tolist() == [5, 6, 7, 8]
    if to == "torch":
        t = tb.to_torch(whole[0])
        t[0] = 9.0
        assert whole[0][0] == 9.0  # still shared after the record fields


def _routable(objs, to: str, copy, dtype=None) -> list:
    """The kinds the planned route converts (each framework lacks some dtypes)."""
    out = []
    for x in objs:
        try:
            tb.explain(x, to=to, copy=copy, dtype=dtype).run(x)
        except tb.TensorBridgeError:
            continue
        out.append(x)
    return out


def _numpy_layouts():
    """Writable arrays the express route to JAX/TF takes alike: 64-byte aligned or not,
    C order or not, small or past SHARE_MIN_BYTES."""
    buf = bytearray(4 * 20000 + 64)
    base = np.frombuffer(buf, np.uint8)
    off = (-base.ctypes.data) % 64
    aligned = base[off : off + 4 * 20000].view(np.float32)
    unaligned = base[off + 4 : off + 4 + 4 * 256].view(np.float32)
    aligned[:] = np.arange(20000)
    unaligned[:] = np.arange(256) * 3
    return [aligned, aligned[:256], unaligned, aligned[:600].reshape(20, 30).T, aligned[::3]]


@pytest.mark.parametrize("to", ["jax", "tensorflow"])
@pytest.mark.parametrize("copy", [None, True])
def test_numpy_to_jax_and_tensorflow(to, copy):
    """A writable array's route to an immutable framework copies whatever its layout,
    address or size: the express route takes it by dtype alone (read-only and flipped
    arrays, whose routes may share or depend on the flipped dims, take the planned way)."""
    pytest.importorskip(to)
    kinds = _routable(_numpy_kinds() + _numpy_layouts(), to, copy)
    assert len(kinds) > 60
    _check(
        kinds,
        to,
        copy,
        expect_express=lambda a: type(a) is np.ndarray and a.flags.writeable and not _flipped(a),
    )


@pytest.mark.parametrize("to", ["jax", "tensorflow"])
def test_numpy_casts_to_jax_and_tensorflow(to):
    pytest.importorskip(to)
    kinds = [a for a in _numpy_kinds() + _numpy_layouts() if a.dtype.kind != "c"]
    _check(
        _routable(kinds, to, None, "float16"),
        to,
        None,
        dtype="float16",
        expect_express=lambda a: type(a) is np.ndarray and a.flags.writeable and not _flipped(a),
    )


def test_numpy_to_jax_follows_the_64_bit_flag(tmp_path):
    """The express table of a 64-bit dtype learnt with JAX's x64 flag on is not used once
    it is off: the call is refused (JAX would narrow it), not narrowed."""
    import subprocess
    import textwrap

    code = """
        import jax, numpy as np, tensorbridge as tb
        jax.config.update("jax_enable_x64", True)
        a = np.arange(4.0)
        print(tb.to_jax(a).dtype, tb.to_jax(a).dtype)
        jax.config.update("jax_enable_x64", False)
        try:
            print(tb.to_jax(a).dtype)
        except tb.ConversionError as exc:
            print("refused", "64-bit" in str(exc))
        jax.config.update("jax_enable_x64", True)
        print(tb.to_jax(a).dtype)
        """
    pytest.importorskip("jax")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:3] == ["float64 float64", "refused True", "float64"]


def test_numpy_to_jax_before_jax_is_imported_keeps_to_the_64_bit_flag():
    """JAX_ENABLE_X64=1 and a first call before ``import jax``: the route learnt then (x64
    on) is not kept as the route of x64 off; once the flag is off, 64-bit arrays are
    refused, not narrowed."""
    import subprocess
    import textwrap

    pytest.importorskip("jax")
    code = """
        import sys, numpy as np, tensorbridge as tb
        assert "jax" not in sys.modules
        a = np.arange(4.0)
        i = np.arange(4, dtype=np.int32)
        print(tb.to_jax(a).dtype, tb.convert(i, to="jax", dtype="float64").dtype)
        import jax
        with jax.enable_x64(False):
            for call in (lambda: tb.to_jax(a), lambda: tb.convert(i, to="jax", dtype="float64")):
                try:
                    print(call().dtype)
                except tb.ConversionError as exc:
                    print("refused", "64-bit" in str(exc))
        print(tb.to_jax(a).dtype)
        """
    env = {**os.environ, "JAX_ENABLE_X64": "1"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:4] == [
        "float64 float64",
        "refused True",
        "refused True",
        "float64",
    ], done.stdout
