"""JAX (and CuPy) CUDA arrays join the torch staging ring through DLPack.

Without a GPU the route is rehearsed with real JAX CPU arrays that are said to
live on CUDA, and a stand-in for the ring's transfer that records what it was
handed and returns the exact bytes. The real CUDA runs are in test_gpu.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
import ml_dtypes  # noqa: E402

import tensorbridge as tb  # noqa: E402
from tensorbridge.frameworks import foreign_cuda as fc  # noqa: E402
from tensorbridge.frameworks import torch_staging as ts  # noqa: E402


def _host_bytes(t):
    """What the ring returns for ``t``: fresh memory, the same bits, the NumPy dtype."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().copy()
    return flat.view(ts._numpy_dtype(t.dtype)).reshape(tuple(t.shape))


@pytest.fixture
def staged(monkeypatch):
    """Every JAX array and torch tensor counts as a CUDA one; the transfer is recorded."""
    monkeypatch.setattr(fc, "jax_cuda_running", lambda: True)
    monkeypatch.setattr(fc, "_on_one_cuda_device", lambda x: isinstance(x, jax.Array))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    calls: list[list] = []

    def transfer(tensors, *, pinned=False):
        calls.append(list(tensors))
        return [_host_bytes(t) for t in tensors]

    monkeypatch.setattr(ts, "batch_to_host", transfer)
    _forget_express()  # routes learnt for host arrays (these ones say they are on CUDA)
    yield calls
    _forget_express()


def _forget_express():
    sys.modules["tensorbridge.convert"].forget_express()


def _bits(x) -> bytes:
    return np.asarray(x).tobytes()


def _jax_pointer(x) -> int:
    return x.unsafe_buffer_pointer()


def test_jax_arrays_join_the_one_transfer_zero_copy(staged):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 2**16, 64, dtype=np.uint16)
    raw[:4] = [0x7FC1, 0x8000, 0x0001, 0xFF81]  # a NaN payload, -0.0, a subnormal, -NaN
    tree = {
        "j16": jnp.asarray(raw.view(ml_dtypes.bfloat16)),
        "j32": jnp.arange(12, dtype=jnp.int32).reshape(3, 4),
        "t": torch.arange(5, dtype=torch.float64),
        "n": np.ones(3),
    }
    out = tb.to_numpy(tree)
    assert len(staged) == 1  # one transfer for the torch tensor and both JAX arrays
    sent = staged[0]
    assert len(sent) == 3
    pointers = {t.data_ptr() for t in sent}
    assert _jax_pointer(tree["j16"]) in pointers and _jax_pointer(tree["j32"]) in pointers
    assert out["j16"].dtype == ml_dtypes.bfloat16 and _bits(out["j16"]) == raw.tobytes()
    assert out["j32"].tolist() == np.arange(12).reshape(3, 4).tolist()
    assert out["j32"].dtype == np.int32
    assert _bits(out["t"]) == _bits(tree["t"].numpy()) and out["n"] is tree["n"]
    # the results are the ring's fresh host memory, not views of JAX's buffers
    assert out["j16"].flags.writeable and out["j16"].ctypes.data != _jax_pointer(tree["j16"])


def test_a_lone_jax_array_is_staged_too(staged):
    x = jnp.linspace(-1, 1, 7, dtype=jnp.float32)
    out = tb.to_numpy(x)
    assert len(staged) == 1 and _bits(out) == _bits(x)


def test_arrays_dlpack_cannot_hand_to_torch_keep_their_own_path(staged):
    odd = jnp.asarray(np.arange(4, dtype=np.float32)).astype(ml_dtypes.float8_e4m3b11fnuz)
    plain = jnp.arange(3, dtype=jnp.float32)
    out = tb.to_numpy({"odd": odd, "plain": plain})
    assert [len(c) for c in staged] == [1]  # only the one torch can hold
    assert staged[0][0].data_ptr() == _jax_pointer(plain)
    assert out["odd"].dtype == ml_dtypes.float8_e4m3b11fnuz and _bits(out["odd"]) == _bits(odd)


def test_copy_false_and_dtype_never_stage(staged):
    x = jnp.arange(3, dtype=jnp.float32)
    assert tb.to_numpy({"x": x}, dtype="float64")["x"].dtype == np.float64
    assert staged == []


def test_a_refused_transfer_retries_torch_alone_and_jax_takes_its_own_path(monkeypatch, staged):
    sent = []

    def refuse_with_jax(tensors, *, pinned=False):
        sent.append(len(tensors))
        if len(tensors) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 64.00 MiB")
        return [_host_bytes(t) for t in tensors]

    monkeypatch.setattr(ts, "batch_to_host", refuse_with_jax)
    tree = {"t": torch.arange(4, dtype=torch.int16), "j": jnp.arange(6, dtype=jnp.float32)}
    out = tb.to_numpy(tree)
    assert sent == [2, 1]
    assert out["t"].tolist() == [0, 1, 2, 3] and out["j"].tolist() == list(range(6))


def test_a_refused_transfer_of_torch_tensors_still_says_so(monkeypatch, staged):
    def refuse(tensors, *, pinned=False):
        raise RuntimeError("CUDA out of memory. Tried to allocate 64.00 MiB")

    monkeypatch.setattr(ts, "batch_to_host", refuse)
    with pytest.raises(tb.ConversionError, match="out of memory.*Fix:"):
        tb.to_numpy({"t": torch.ones(2), "j": jnp.ones(2)})


def test_cpu_jax_arrays_are_not_cuda_arrays():
    assert not fc._on_one_cuda_device(jnp.ones(3))
    assert fc.cuda_arrays([jnp.ones(3), np.ones(2)], (jax.Array,)) == []


def _run(code: str) -> None:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_asking_never_starts_jax_or_imports_torch():
    _run("""
        import sys
        import jax, numpy as np
        import tensorbridge as tb
        from jax._src import xla_bridge
        from tensorbridge.frameworks import foreign_cuda as fc
        assert tb.to_numpy({"a": np.ones(2)})["a"].tolist() == [1.0, 1.0]
        assert fc.live_types() == ()
        assert not xla_bridge.backends_are_initialized(), "JAX was started"
        x = jax.numpy.ones(3)  # JAX on the CPU now
        assert tb.to_numpy(x).tolist() == [1.0, 1.0, 1.0]
        assert fc.live_types() == () and "torch" not in sys.modules
    """)


def test_torch_is_imported_only_for_big_transfers():
    _run("""
        import sys
        from types import SimpleNamespace
        from tensorbridge.frameworks import foreign_cuda as fc
        small = SimpleNamespace(nbytes=fc.IMPORT_TORCH_BYTES - 1)
        assert fc._load_torch([small]) is None and "torch" not in sys.modules
        big = SimpleNamespace(nbytes=fc.IMPORT_TORCH_BYTES)
        assert fc._load_torch([big]) is None  # no CUDA on this machine
        assert "torch" in sys.modules
    """)
