"""JAX inputs: tracers refused with the transform named, 64-bit honesty, shards gathered."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import tensorbridge as tb  # noqa: E402


@pytest.mark.parametrize(
    "transform,name", [(jax.jit, "jax.jit"), (jax.grad, "jax.grad"), (jax.vmap, "jax.vmap")]
)
def test_tracers_are_refused_naming_the_transform(transform, name):
    caught = []

    def f(x):
        try:
            tb.to_numpy(x)
        except tb.ConversionError as e:
            caught.append(str(e))
        return jnp.sum(x) if transform is jax.grad else x

    transform(f)(jnp.ones(3))
    assert caught, "the tracer was not refused"
    assert name in caught[0] and "Fix:" in caught[0]


def test_jax_to_numpy_is_a_read_only_view():
    j = jnp.arange(16.0)
    a = tb.to_numpy(j)
    assert not a.flags.writeable and tb.shares_memory(a, j)


def test_to_jax_places_on_device():
    j = tb.to_jax(np.arange(3.0), device="cpu")
    assert next(iter(j.devices())).platform == "cpu"
    with pytest.raises(tb.DeviceError, match="Fix"):
        tb.to_jax(np.arange(3.0), device="cuda")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_float64_is_refused_without_x64_instead_of_narrowed():
    r = _run("""
        import numpy as np, tensorbridge as tb
        try:
            tb.to_jax(np.ones(2))
        except tb.ConversionError as e:
            print("REFUSED", e)
        print(tb.to_jax(np.ones(2, np.float32)).dtype)
        print(tb.to_jax(np.ones(2), dtype="float32").dtype)
    """)
    assert r.returncode == 0, r.stderr
    assert "REFUSED" in r.stdout and "jax_enable_x64" in r.stdout
    assert r.stdout.strip().splitlines()[-2:] == ["float32", "float32"]


def test_sharded_arrays_are_gathered():
    r = _run("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import tensorbridge as tb
        mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
        x = jax.device_put(jnp.arange(16.0, dtype=jnp.float32), NamedSharding(mesh, P("x")))
        assert len(x.devices()) == 4
        a = tb.to_numpy(x)
        assert a.tolist() == list(range(16)), a
        print("gather" in str(tb.explain(x, to="numpy")), tb.to_torch(x).tolist() == list(range(16)))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]


def test_copies_of_a_sharded_array_are_independent_of_jaxs_cached_host_value():
    """The gather is JAX's own cached, read-only host copy: copy=True must copy again,
    and torch must never alias it (writing there would change what JAX reads)."""
    r = _run("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import warnings
        warnings.simplefilter("error")  # torch's "not writable" warning would fail this
        import jax, jax.numpy as jnp, numpy as np, torch
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import tensorbridge as tb
        mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
        x = jax.device_put(jnp.zeros((8, 2), jnp.float32), NamedSharding(mesh, P("x")))
        cached = np.asarray(x)
        for t in (tb.to_torch(x), tb.to_torch(x, copy=True)):
            t[0, 0] = 999.0
        a = tb.to_numpy(x, copy=True)
        assert a.flags.writeable and not np.shares_memory(a, cached)
        a[0, 0] = 7.0
        plain = tb.to_numpy(x)  # copy=None: JAX's read-only value, as np.asarray gives
        assert not plain.flags.writeable
        assert np.asarray(x)[0, 0] == 0.0 and float(jnp.sum(x)) == 0.0
        print(tb.explain(x, to="numpy"))
        print(tb.explain(x, to="numpy", copy=True))
    """)
    assert r.returncode == 0, r.stderr
    assert "copy=True makes it independent" in r.stdout
    assert "copy (copy=True)" in r.stdout and "independent memory (copied)" in r.stdout


@pytest.mark.parametrize("source", ["torch", "tensorflow"])
def test_64_bit_from_other_frameworks_is_refused_without_x64(source):
    make = {
        "torch": "import torch; x = torch.tensor([2**40, -1])",
        "tensorflow": "import tensorflow as tf; x = tf.constant([2**40, -1], dtype=tf.int64)",
    }[source]
    r = _run(f"""
        import tensorbridge as tb
        {make}
        try:
            print("NARROWED", tb.to_jax(x))
        except tb.ConversionError as e:
            print("REFUSED", e)
    """)
    assert r.returncode == 0, r.stderr
    assert "REFUSED" in r.stdout and "NARROWED" not in r.stdout


def test_jax_fast_path_matches_the_planned_route():
    j = jnp.arange(8.0)
    fast = tb.to_numpy(j)
    planned = tb.to_numpy({"j": j})["j"]
    slow = tb.convert(j, to="numpy", copy=None, ragged="list")
    for a in (fast, planned, slow):
        assert not a.flags.writeable and tb.shares_memory(a, j)
        assert a.tobytes() == np.asarray(j).tobytes()


def test_deleted_arrays_are_refused_with_the_reason():
    x = jnp.arange(4.0)
    x.delete()
    for call in (
        lambda: tb.to_numpy(x),
        lambda: tb.to_torch(x),
        lambda: tb.to_numpy({"x": x}),
        lambda: tb.explain(x, to="numpy"),
    ):
        with pytest.raises(tb.ConversionError, match="deleted JAX array.*Fix:"):
            call()


def test_dtype_casts_other_frameworks_64_bit_ints_for_jax_without_x64():
    r = _run("""
        import torch, tensorflow as tf
        import tensorbridge as tb
        for x in (torch.arange(3), tf.constant([0, 1, 2], dtype=tf.int64)):
            y = tb.to_jax(x, dtype="int32")
            print(y.dtype, y.tolist())
            try:
                tb.to_jax(x)
            except tb.ConversionError as e:
                print("REFUSED" if "dtype=" in str(e) else e)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["int32", "[0,", "1,", "2]", "REFUSED"] * 2


def test_a_cpu_index_places_the_array_on_that_cpu_device():
    r = _run("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import numpy as np, jax, tensorbridge as tb
        print(tb.to_jax(np.ones(2, np.float32), device="cpu:2").devices())
        print(tb.to_jax(np.ones(2, np.float32), device="CPU:0").devices())
        try:
            tb.to_jax(np.ones(2, np.float32), device="cpu:7")
        except tb.DeviceError as e:
            print("REFUSED", "cpu:3" in str(e))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:3] == ["{CpuDevice(id=2)}", "{CpuDevice(id=0)}", "REFUSED True"]


def test_python_scalars_become_what_jax_makes_of_them():
    r = _run("""
        import tensorbridge as tb
        print(tb.to_jax(1.5).dtype, tb.to_jax(3).dtype, tb.to_jax(True).dtype,
              tb.to_jax(1 + 2j).dtype, tb.to_jax(2.5, dtype="float16").dtype)
        try:
            tb.to_jax(2**40)
        except tb.ConversionError as e:
            print("REFUSED", "jax_enable_x64" in str(e))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [
        "float32",
        "int32",
        "bool",
        "complex64",
        "float16",
        "REFUSED",
        "True",
    ]


def test_explain_plans_a_python_scalar_as_convert_converts_it():
    r = _run("""
        import tensorbridge as tb
        print(tb.explain(1.5, to="jax").source)
        try:
            tb.explain(2**70, to="torch")
        except tb.ConversionError as e:
            print("REFUSED", "64 bits" in str(e))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "Python float 1.5 as jax ArrayImpl float32[] on cpu",
        "REFUSED True",
    ]


def _aligned(shape):
    n = int(np.prod(shape))
    buf = np.empty(n + 16, np.float32)
    off = (-buf.ctypes.data % 64) // 4  # JAX shares only 64-byte aligned host memory
    a = buf[off : off + n].reshape(shape)
    a[...] = np.arange(n).reshape(shape)
    return a


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[None],  # stride 0 on the new size-1 dim
        lambda a: a[:1][::-1],  # a negative stride on a size-1 dim
        lambda a: a.reshape(1, 1, -1)[:, ::-1],
        lambda a: a[:1],
    ],
)
def test_copy_false_into_jax_stays_shared_all_the_way_back(view):
    # JAX shares a DLPack buffer whatever the strides of its size-1 dims, but copies an
    # array imported with strides other than row-major there on every np.asarray: so
    # to_numpy(copy=False) of it copied and shares_memory said False
    x = view(_aligned((4, 6)))
    j = tb.to_jax(x, copy=False)
    assert tb.shares_memory(j, x)
    back = tb.to_numpy(j, copy=False)
    assert back.ctypes.data == j.unsafe_buffer_pointer() == x.ctypes.data
    x.flat[0] = 100.0  # proven by mutation, through both
    assert float(j.ravel()[0]) == 100.0 and back.flat[0] == 100.0


@pytest.mark.parametrize(
    "make",
    [
        lambda torch: (
            torch.arange(2000.0).reshape(40, 1, 50).permute(1, 0, 2)
        ),  # stride 50 on dim 0
        lambda torch: torch.arange(2000.0).as_strided((1, 40, 50), (7, 50, 1)),
    ],
)
def test_copy_false_from_torch_into_jax_stays_shared_all_the_way_back(make):
    torch = pytest.importorskip("torch")
    t = make(torch)
    j = tb.to_jax(t, copy=False)
    assert tb.shares_memory(j, t)
    back = tb.to_numpy(j, copy=False)
    assert back.ctypes.data == j.unsafe_buffer_pointer() == t.data_ptr()
    with torch.no_grad():
        t.view(-1)[0] = 100.0
    assert float(j.ravel()[0]) == 100.0 and back.flat[0] == 100.0
