"""No route hands out a writable alias of read-only memory or of an immutable framework's
memory, and with copy=None no immutable result shares a buffer that can still be written
(docs/guide.md, "Immutable frameworks"). Every claim is proven by a write."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tensorbridge as tb

jax = pytest.importorskip("jax")
tf = pytest.importorskip("tensorflow")
jnp = jax.numpy


def aligned(n: int = 64) -> np.ndarray:
    buf = np.empty(n + 16, np.float32)
    off = (-buf.ctypes.data % 64) // 4
    a = buf[off : off + n]
    a[:] = np.arange(n)
    return a


def first(x) -> float:
    return float(
        np.asarray(
            x.numpy() if hasattr(x, "numpy") and not isinstance(x, np.ndarray) else x
        ).reshape(-1)[0]
    )


def test_read_only_memmap_to_torch_copies_or_refuses(tmp_path):
    p = tmp_path / "m.bin"
    np.arange(16, dtype=np.float32).tofile(p)
    m = np.memmap(p, dtype=np.float32, mode="r")
    with pytest.raises(tb.CopyError, match=r"copy=False.*read-only.*Fix: pass copy=None"):
        tb.to_torch(m, copy=False)
    with pytest.raises(tb.CopyError):
        tb.to_torch({"w": m}, copy=False)
    t = tb.to_torch(m)
    assert not tb.shares_memory(m, t)
    t[0] = 99.0  # would be SIGSEGV on a shared read-only page
    assert m[0] == 0.0 and np.fromfile(p, np.float32)[0] == 0.0


def test_bytes_are_never_mutated_through_torch():
    b = np.arange(4, dtype=np.float32).tobytes()
    a = np.frombuffer(b, np.float32)
    with pytest.raises(tb.CopyError, match="torch tensors are always writable"):
        tb.to_torch(a, copy=False)
    t = tb.to_torch(a)
    t += 1
    assert b == np.arange(4, dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    "make",
    [
        lambda: jnp.arange(8.0),
        lambda: tf.constant(np.arange(8.0, dtype=np.float32)),
        lambda: tf.Variable(np.arange(8.0, dtype=np.float32)),
    ],
)
def test_immutable_sources_into_torch_are_copies_and_copy_false_refuses(make):
    x = make()
    t = tb.to_torch(x)
    t[0] = 42.0
    assert first(x) == 0.0  # to_torch(tf.constant) used to write into the constant
    assert not tb.shares_memory(x, t)
    with pytest.raises(tb.CopyError, match=r"copy=False.*(immutable|read-only)"):
        tb.to_torch(x, copy=False)
    assert tb.explain(x, to="torch").copies
    assert "independent" in str(tb.explain(x, to="torch"))


@pytest.mark.parametrize("src", ["numpy", "torch"])
@pytest.mark.parametrize("tgt", ["jax", "tensorflow"])
def test_mutable_sources_into_immutable_frameworks_copy_by_default_share_with_copy_false(src, tgt):
    def source():
        a = aligned()
        return a if src == "numpy" else torch.from_numpy(a)

    x = source()
    out = tb.convert(x, to=tgt)
    x[0] = 7.0  # a data loader reusing its buffer
    assert first(out) == 0.0
    assert "later write" in str(tb.explain(source(), to=tgt))
    x = source()
    shared = tb.convert(x, to=tgt, copy=False)
    assert not tb.explain(x, to=tgt, copy=False).copies
    x[0] = 7.0
    assert first(shared) == 7.0  # zero-copy stays available
    x = source()
    independent = tb.convert(x, to=tgt, copy=True)
    x[0] = 7.0
    assert first(independent) == 0.0


def test_a_route_shares_the_memory_it_made_itself():
    """A byte-swapped (fresh) host copy is handed to JAX without a second copy."""
    a = np.arange(64, dtype=">f4")
    plan = tb.explain(a, to="jax")
    assert sum(s.copies for s in plan.steps) == 1 and plan.independent


def test_immutable_to_immutable_and_to_numpy_share_read_only():
    j = jnp.arange(64.0)
    a = tb.to_numpy(j)
    assert tb.shares_memory(j, a) and not a.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        a[0] = 1.0
    c = tf.constant(np.arange(1 << 15, dtype=np.float32))  # 128 KiB: smaller ones copy by cost
    v = tb.to_numpy(c)
    assert tb.shares_memory(c, v) and not v.flags.writeable
    assert not tb.explain(c, to="jax").copies


def test_the_frameworks_own_calls_disagree_and_the_rule_picks_the_safe_side():
    """What jnp.asarray, tf.convert_to_tensor, jax.dlpack.from_dlpack and torch.from_dlpack
    do for the same inputs (the evidence in the guide); tensorbridge's default matches the
    copying entry points, copy=False the sharing ones."""
    a = aligned()
    by_asarray, by_tf, by_dlpack = (
        jnp.asarray(a),
        tf.convert_to_tensor(a),
        jax.dlpack.from_dlpack(a),
    )
    ours, ours_shared = tb.to_jax(a), tb.to_jax(a, copy=False)
    a[0] = 5.0
    assert (first(by_asarray), first(by_tf), first(by_dlpack)) == (0.0, 0.0, 5.0)
    assert (first(ours), first(ours_shared)) == (0.0, 5.0)
    j = jnp.arange(8.0)
    torch.from_dlpack(j)[0] = 9.0  # torch's own call writes into an immutable JAX array
    assert float(j[0]) == 9.0
    j2 = jnp.arange(8.0)
    tb.to_torch(j2)[0] = 9.0
    assert float(j2[0]) == 0.0


SOURCES = {
    "numpy": lambda: aligned(),
    "numpy read-only": lambda: np.frombuffer(aligned().tobytes(), np.float32),
    "torch": lambda: torch.from_numpy(aligned()),
    "jax": lambda: jnp.asarray(aligned()),
    "tensorflow": lambda: tf.constant(aligned()),
}
MUTABLE = {"numpy", "torch"}


def _writable(r) -> bool:
    return isinstance(r, torch.Tensor) or (isinstance(r, np.ndarray) and r.flags.writeable)


@pytest.mark.parametrize("src", list(SOURCES))
@pytest.mark.parametrize("tgt", ["numpy", "torch", "jax", "tensorflow"])
@pytest.mark.parametrize("copy", [None, False])
def test_no_route_aliases_memory_it_must_not(src, tgt, copy):
    x = SOURCES[src]()
    try:
        r = tb.convert(x, to=tgt, copy=copy)
    except tb.CopyError:
        assert copy is False
        return
    if not tb.shares_memory(x, r):
        return
    src_writable = src in MUTABLE
    if _writable(r):  # a writable alias: only of memory that was writable to begin with
        assert src_writable, (src, tgt)
    if tgt in ("jax", "tensorflow") and src_writable:  # an immutable result on a live buffer
        assert copy is False, (src, tgt)
