"""Routes are planned once per kind of tensor and cached (plan.cached_plan). These tests
prove the cache never hands one tensor the route of another: tensors of the same type in
different states (grad, read-only, strided, dtype, size, alignment) each get the route a
fresh plan gives them (what explain() shows), and what happens (shared or copied memory,
proven by mutation) is what explain() says."""

from __future__ import annotations

import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.frameworks import backend_of
from tensorbridge.frameworks.base import SHARE_MIN_BYTES
from tensorbridge.plan import _PLANS, cached_plan, plan_leaf

torch = pytest.importorskip("torch")

SMALL = 256  # float32 values: 1 KiB, below SHARE_MIN_BYTES
LARGE = SHARE_MIN_BYTES // 4 * 2  # float32 values: twice the threshold


def _route(plan) -> list[tuple[str, bool]]:
    return [(s.text, s.copies) for s in plan.steps]


def _aligned(n: int, dtype=np.float32) -> np.ndarray:
    return torch.zeros(n, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype).numpy()


def _check_each(objs, target: str, **opts) -> None:
    """Convert every object (filling the cache in this order), then check that the
    cached route of each is its fresh route, and that the result has its values."""
    for x in objs:
        out = tb.convert(x, to=target, **opts)
        src = backend_of(type(x))
        fresh = plan_leaf(x, src, target, **opts)
        cached = cached_plan(
            x, src, target, opts.get("device"), opts.get("dtype"), opts.get("copy")
        )
        assert _route(cached) == _route(fresh), (x, str(fresh))
        assert _route(tb.explain(x, to=target, **opts)) == _route(fresh)
        want = tb.to_numpy(x, copy=True)
        kind = np.complex128 if want.dtype.kind == "c" else np.float64
        assert np.array_equal(tb.to_numpy(out, copy=True).astype(kind), want.astype(kind))


def _torch_states():
    base = torch.arange(SMALL, dtype=torch.float32)
    square = torch.arange(SMALL, dtype=torch.float32).reshape(16, 16)
    return [
        base.clone(),
        base.clone().requires_grad_(),
        torch.nn.Parameter(base.clone()),
        base.to(torch.float64),
        base.to(torch.bfloat16),
        base.to(torch.float8_e4m3fn),
        square.T,  # transposed
        base.clone()[::2],  # strided
        torch.arange(4.0).to(torch.complex64).conj(),  # lazy conjugate bit
        torch.arange(4.0).to(torch.complex64).conj().imag,  # lazy negation bit
        torch.arange(LARGE, dtype=torch.float32),
        torch.arange(LARGE + 1, dtype=torch.float32)[1:],  # not 64-byte aligned
    ]


@pytest.mark.parametrize("target", ["numpy", "jax", "tensorflow"])
def test_torch_kinds_get_their_own_routes(target):
    pytest.importorskip({"numpy": "numpy", "jax": "jax", "tensorflow": "tensorflow"}[target])
    objs = _torch_states()
    if target != "numpy":  # complex bits are checked to NumPy
        objs = [o for o in objs if not o.is_complex()]
    if target == "tensorflow":  # TF takes no float8 from NumPy arrays
        objs = [o for o in objs if o.dtype != torch.float8_e4m3fn]
    _check_each(objs, target)
    _check_each(list(reversed(objs)), target, copy=True)


def test_numpy_kinds_get_their_own_routes():
    writable = np.arange(SMALL, dtype=np.float32)
    readonly = writable.copy()
    readonly.flags.writeable = False
    big = _aligned(LARGE)
    objs = [
        writable,
        readonly,
        writable[::-1],
        writable.reshape(16, 16).T,
        writable.astype(">f4"),
        writable.astype(np.float16),
        big,
        big[1:],
        np.arange(3, dtype=np.longlong),
        np.zeros((1, 4), np.float32)[::-1],
    ]
    for target in ("torch", "numpy"):
        _check_each(objs, target)
    jax = pytest.importorskip("jax")
    del jax
    _check_each([o for o in objs if o.dtype.isnative and o.dtype != np.longlong], "jax")


def test_read_only_after_writable_is_copied_for_torch():
    """The case the cache must never get wrong: a writable array's route (share) must not
    reach a read-only array of the same dtype and shape (torch would write into it)."""
    w = np.zeros(SMALL, np.float32)
    r = np.zeros(SMALL, np.float32)
    r.flags.writeable = False
    tw, tr = tb.to_torch(w), tb.to_torch(r)
    tw[0], tr[0] = 1.0, 1.0
    assert w[0] == 1.0 and r[0] == 0.0
    assert "copy the read-only array" in str(tb.explain(r, to="torch"))


def test_requires_grad_after_plain_tensor_is_detached():
    plain = torch.zeros(SMALL)
    grad = torch.zeros(SMALL, requires_grad=True)
    assert tb.to_numpy(plain).flags.writeable
    a = tb.to_numpy(grad)
    assert "detach" in str(tb.explain(grad, to="numpy"))
    grad.data[0] = 5.0
    assert a[0] == 5.0  # a view, as explain says (zero-copy)


def test_small_tensors_copy_between_immutable_frameworks_large_ones_share():
    """copy=None chooses by cost where sharing is allowed (TF -> JAX, both immutable):
    below SHARE_MIN_BYTES a copy (cheaper than JAX's DLPack handshake), above it a
    zero-copy hand-over; explain says which, and shares_memory proves it."""
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("jax")
    small = tf.constant(np.arange(SMALL, dtype=np.float32))
    large = tf.constant(np.arange(LARGE, dtype=np.float32))
    for x, shares in ((small, False), (large, True), (small, False), (large, True)):
        plan = tb.explain(x, to="jax")
        out = tb.to_jax(x)
        assert plan.copies is not shares, str(plan)
        assert tb.shares_memory(x, out) is shares
        assert _route(cached_plan(x, backend_of(type(x)), "jax", None, None, None)) == _route(plan)
    shared = tb.to_jax(small, copy=False)  # copy=False still shares the small one
    assert tb.shares_memory(small, shared)
    assert not tb.explain(small, to="jax", copy=False).copies


def test_tf_views_are_read_only_and_shared():
    tf = pytest.importorskip("tensorflow")
    x = tf.constant(np.arange(SMALL, dtype=np.float32))
    v = tf.Variable(np.arange(SMALL, dtype=np.float32))
    for obj in (x, v, x, tf.cast(x, tf.bfloat16), tf.constant(2.0)):
        a = tb.to_numpy(obj)
        plan = tb.explain(obj, to="numpy")
        assert _route(cached_plan(obj, backend_of(type(obj)), "numpy", None, None, None)) == _route(
            plan
        )
        if not plan.copies:
            assert not a.flags.writeable and tb.shares_memory(obj, a)


def test_jax_kinds_include_x64_and_deleted_arrays_are_refused():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    a = jnp.arange(4.0)
    assert tb.to_numpy(a).tolist() == [0.0, 1.0, 2.0, 3.0]
    b = jnp.arange(4.0)
    b.delete()
    with pytest.raises(tb.ConversionError, match="deleted JAX array"):
        tb.to_numpy(b)
    assert any(k[1] == "numpy" for k in _PLANS)  # the live array's plan was cached
    del jax


def test_copy_true_to_numpy_uses_the_frameworks_own_copy_once():
    """copy=True from TF and JAX: one copy (the framework's own), writable and independent,
    as explain says; the cached route is the fresh one for every kind met."""
    tf = pytest.importorskip("tensorflow")
    jax = pytest.importorskip("jax")
    objs = [
        tf.constant(np.arange(SMALL, dtype=np.float32)),
        tf.Variable(np.zeros(3, np.float32)),
        tf.constant(1.5),
        jax.numpy.arange(4.0),
        jax.numpy.asarray(2.0),
        tf.cast(tf.constant([1.0, 2.0]), tf.bfloat16),
    ]
    for x in objs:
        plan = tb.explain(x, to="numpy", copy=True)
        a = tb.to_numpy(x, copy=True)
        assert plan.independent and sum(s.copies for s in plan.steps) == 1, str(plan)
        assert a.flags.writeable and not tb.shares_memory(x, a)
        assert _route(cached_plan(x, backend_of(type(x)), "numpy", None, None, True)) == _route(
            plan
        )
