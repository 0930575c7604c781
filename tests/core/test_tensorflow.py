"""TensorFlow inputs: eager tensors, variables, strings, sparse, ragged, tf.function."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import torch  # noqa: E402

import tensorbridge as tb  # noqa: E402


def test_eager_tensor_and_variable():
    t = tf.constant([[1.0, 2.0]])
    assert tb.to_numpy(t).tolist() == [[1.0, 2.0]]
    v = tf.Variable([3, 4], dtype=tf.int64)
    assert tb.to_numpy(v).tolist() == [3, 4]
    assert tb.to_torch(v).tolist() == [3, 4]


def test_numpy_view_of_tf_is_read_only_zero_copy():
    t = tf.constant(np.arange(64, dtype=np.float32))
    a = tb.to_numpy(t)
    assert not a.flags.writeable
    assert tb.shares_memory(a, t)
    w = tb.to_numpy(t, copy=True)
    assert w.flags.writeable and not tb.shares_memory(w, t)


def test_strings_become_bytes_and_are_refused_by_torch():
    s = tf.constant(["héllo", "x"])
    a = tb.to_numpy(s)
    assert a.tolist() == ["héllo".encode(), b"x"]
    with pytest.raises(tb.ConversionError, match="string.*Fix"):
        tb.to_torch(s)


def test_sparse_becomes_dense():
    sp = tf.sparse.SparseTensor(indices=[[0, 1], [1, 0]], values=[1.5, 2.5], dense_shape=[2, 2])
    assert tb.to_numpy(sp).tolist() == [[0.0, 1.5], [2.5, 0.0]]
    assert tb.to_torch(sp).tolist() == [[0.0, 1.5], [2.5, 0.0]]


def test_ragged_is_refused_unless_lists_are_asked_for():
    r = tf.ragged.constant([[1, 2], [3]])
    with pytest.raises(tb.ConversionError, match="ragged='list'"):
        tb.to_numpy(r)
    assert tb.to_numpy(r, ragged="list") == [[1, 2], [3]]


def test_symbolic_tensor_inside_tf_function_names_the_fix():
    caught = []

    @tf.function
    def f(x):
        try:
            tb.to_numpy(x)
        except tb.ConversionError as e:
            caught.append(str(e))
        return x

    f(tf.constant([1.0]))
    assert caught and "tf.function" in caught[0] and "Fix:" in caught[0]


def test_seed_tutorial_multiply_in_tensorflow():
    t = tf.multiply(np.ones([4, 4]), 5)
    a = tb.to_numpy(t)
    assert a.dtype == np.float64 and (a == 5).all()


def test_unaligned_memory_is_copied_not_crashing_tf():
    """TF aborts the process on unaligned DLPack memory; tensorbridge must copy instead."""
    buf = torch.zeros(1025)
    view = buf[1:]  # 4-byte offset: never 64-byte aligned
    plan = tb.explain(view, to="tensorflow")
    assert plan.copies and "aligned" in str(plan)
    g = tb.to_tf(view)
    assert float(g[0]) == 0.0  # TF reads it without aborting


def test_float8_crosses_to_torch_and_jax_through_the_host():
    a = np.array([1.0, -2.0], dtype="float32")
    t = tf.cast(tf.constant(a), tf.dtypes.experimental.float8_e4m3fn)
    assert tb.to_torch(t).float().tolist() == [1.0, -2.0]
