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


def test_tf_function_error_reaches_the_caller_as_conversion_error(tmp_path):
    """AutoGraph rewrites code in .py files; the refusal must still arrive as ours."""
    import subprocess
    import sys

    script = tmp_path / "user_code.py"
    script.write_text(
        "import tensorflow as tf, tensorbridge as tb\n"
        "@tf.function\n"
        "def f(x):\n"
        "    return tb.to_numpy(x)\n"
        "try:\n"
        "    f(tf.constant([1.0]))\n"
        "except tb.ConversionError as e:\n"
        "    print('CAUGHT', 'tf.function' in str(e))\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "CAUGHT True", r.stdout + r.stderr[-2000:]


def test_shares_memory_sees_bfloat16_tf_buffers():
    x = tf.cast(tf.zeros(1 << 16), tf.bfloat16)  # 128 KiB: smaller ones are copied by cost
    jax = pytest.importorskip("jax")
    j = tb.to_jax(x)  # DLPack between two immutable frameworks: shared
    assert isinstance(j, jax.Array) and tb.shares_memory(x, j) and tb.shares_memory(j, x)
    assert tb.shares_memory(x, x)
    assert not tb.shares_memory(x, tb.to_torch(x))  # torch tensors are writable: a copy
    assert tb.explain(x, to="torch").independent


def test_variable_snapshot_is_explained():
    v = tf.Variable([1.0, 2.0])
    assert "snapshot" in str(tb.explain(v, to="numpy"))


def _big_endian(n: int, dtype: str, offset: int) -> np.ndarray:
    """A big-endian array whose data starts ``offset`` bytes past a 64-byte boundary."""
    raw = np.zeros(n * 8 + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    a = raw[start : start + n * np.dtype(dtype).itemsize].view(np.dtype(dtype).newbyteorder(">"))
    a[...] = np.arange(n)
    return a


@pytest.mark.parametrize("target", ["tensorflow", "jax", "torch"])
@pytest.mark.parametrize("offset", [0, 8])
@pytest.mark.parametrize("dtype", ["float32", "int32", "float64"])
def test_big_endian_arrays_reach_every_framework(target, offset, dtype):
    a = _big_endian(6, dtype, offset)
    if target == "jax" and dtype == "float64":
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("x64 off")
    out = tb.convert(a, to=target)
    back = tb.to_numpy(out)
    assert back.dtype == np.dtype(dtype) and back.tobytes() == a.astype(dtype).tobytes()
    assert "byte-swap to native order" in str(tb.explain(a, to=target))


@pytest.mark.parametrize("make", ["conj_T", "neg_T", "cast_T"])
def test_copies_that_keep_a_transposed_layout_reach_tensorflow(make):
    z = torch.randn(3, 2, dtype=torch.complex64)
    x, kw = {
        "conj_T": (z.conj().T, {}),
        "neg_T": (z.conj().imag.T, {}),
        "cast_T": (np.arange(12.0).reshape(3, 4).T, {"dtype": "float32"}),
    }[make]
    want = np.asarray(tb.to_numpy(x, **kw))
    got = tb.to_tf(x, **kw)
    assert got.numpy().tobytes() == np.ascontiguousarray(want).tobytes()


def test_a_variable_handle_is_refused_naming_the_variable_to_convert():
    v = tf.Variable([1.0, 2.0])
    for x in (v.handle, {"h": v.handle}):
        with pytest.raises(tb.ConversionError, match="resource.*Fix: convert the variable itself"):
            tb.to_numpy(x)


def test_a_variant_tensor_is_refused_naming_what_it_holds():
    variant = tf.data.experimental.to_variant(tf.data.Dataset.range(3))
    for x in (variant, {"d": variant}):
        with pytest.raises(tb.ConversionError, match="variant.*opaque container.*Fix: convert"):
            tb.to_numpy(x)
        with pytest.raises(tb.ConversionError) as info:
            tb.to_numpy(x)
        assert "v.handle" not in str(info.value)


def test_a_0d_string_tensor_becomes_a_0d_array_of_bytes():
    a = tb.to_numpy(tf.constant("hello"))
    assert isinstance(a, np.ndarray) and a.shape == () and a.dtype == object
    assert a.item() == b"hello"
    assert tb.to_numpy(tf.constant(["a", "bc"])).tolist() == [b"a", b"bc"]


@pytest.mark.parametrize("device", ["cpu", "cpu:0", "CPU:0", "CPU"])
def test_host_device_spellings_are_all_the_host(device):
    t = tf.constant([1.0, 2.0])
    assert tb.convert(t, to="numpy", device=device).tolist() == [1.0, 2.0]
    assert tb.convert(torch.ones(2), to="numpy", device=device).tolist() == [1.0, 1.0]
    assert tb.to_tf(np.ones(2, np.float32), device=device).numpy().tolist() == [1.0, 1.0]
