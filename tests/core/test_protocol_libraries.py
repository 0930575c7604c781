"""Real libraries tensorbridge has no backend for, as sources through their array
protocols: pyarrow (``Tensor``, numeric ``Array``, ``FixedShapeTensorArray``: DLPack) and
numba (CUDA device arrays: ``__cuda_array_interface__``; on a machine without CUDA, numba's
CUDA simulator, whose arrays forward every attribute to a host array). Every target, bytes
compared; what each plan claims about sharing is checked by mutation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tensorbridge as tb

from .frameworks import bytes_of, dtype_of, framework_of

TARGETS = ["numpy", "torch", "tensorflow", "jax", "mlx"]


def _need(tgt: str) -> None:
    if tgt != "numpy":
        pytest.importorskip("mlx.core" if tgt == "mlx" else tgt)


def _bytes(y, tgt: str) -> bytes:
    if tgt == "mlx":
        return np.ascontiguousarray(np.asarray(y)).tobytes()
    assert framework_of(y) == tgt
    return bytes_of(y)


def _claims_hold(o, base: np.ndarray, tgt: str) -> None:
    """Convert ``o`` (whose memory is ``base``'s), write into ``base``, and check the result
    changed exactly when the plan said memory is shared."""
    plan = tb.explain(o, to=tgt)
    y = tb.convert(o, to=tgt)
    before = _bytes(y, tgt)
    base.reshape(-1)[0] += 1
    changed = _bytes(y, tgt) != before
    base.reshape(-1)[0] -= 1
    assert changed == (not plan.copies), f"{tgt}: {plan}"


# --- pyarrow ------------------------------------------------------------------------------

TENSOR_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"] + [
    "float16",
    "float32",
    "float64",
]


@pytest.mark.parametrize("tgt", TARGETS)
def test_pyarrow_tensors_to_every_target(tgt):
    pa = pytest.importorskip("pyarrow")
    _need(tgt)
    for dtype in TENSOR_DTYPES:
        raw = np.random.default_rng(1).integers(0, 256, 6 * 8 * 8, dtype=np.uint8)
        a = raw.view(dtype)[:24].reshape(4, 6)
        for src in (a, a.T):  # pyarrow keeps the strides of a transposed array
            t = pa.Tensor.from_numpy(src)
            y = tb.convert(t, to=tgt)
            if tgt != "mlx":
                assert dtype_of(y) == dtype
            assert tuple(y.shape) == src.shape
            assert _bytes(y, tgt) == np.ascontiguousarray(src).tobytes(), (dtype, src.shape)
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    _claims_hold(pa.Tensor.from_numpy(a), a, tgt)


@pytest.mark.parametrize("tgt", TARGETS)
def test_pyarrow_arrays_and_fixed_shape_tensors_to_every_target(tgt):
    pa = pytest.importorskip("pyarrow")
    _need(tgt)
    a = np.arange(10, dtype=np.int32)
    arr = pa.array(a).slice(3, 5)  # an offset into the buffer
    assert _bytes(tb.convert(arr, to=tgt), tgt) == a[3:8].tobytes()
    _claims_hold(pa.array(a), a, tgt)
    cells = np.arange(16, dtype=np.float32)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(cells), 4)
    fst = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), (2, 2)), storage)
    y = tb.convert(fst, to=tgt)
    assert tuple(y.shape) == (4, 2, 2) and _bytes(y, tgt) == cells.tobytes()


def test_pyarrow_refusals_say_why_and_how_to_fix():
    pa = pytest.importorskip("pyarrow")
    cases = [
        (pa.array([1.0, None]), "no nulls"),
        (pa.array([True, False]), "Bit-packed boolean"),
        (pa.array(["a", "b"]), "not compatible with DLPack"),
    ]
    for arr, why in cases:
        with pytest.raises(tb.ConversionError, match="refused to export") as info:
            tb.to_torch({"c": arr})
        text = str(info.value)
        assert why in text and "np.asarray(x)" in text and text.startswith("at ['c']")
    # a ChunkedArray has __array__ but no shape/dtype: not clearly an array, so a leaf
    chunked = pa.chunked_array([[1, 2], [3]])
    assert tb.to_numpy({"c": chunked})["c"] is chunked


# --- numba --------------------------------------------------------------------------------

_SIMULATED = textwrap.dedent(
    """
    import numpy as np
    from numba import cuda
    import tensorbridge as tb

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    d = cuda.to_device(a)
    assert type(d).__name__ == "FakeCUDAArray" and not hasattr(type(d), "__array__")
    for tgt in ("numpy", "torch", "jax", "mlx"):
        y = tb.convert(d, to=tgt)
        assert np.asarray(y).tobytes() == a.tobytes(), tgt
    view = tb.to_numpy(d, copy=False)  # the simulated device memory, viewed in place
    d[0, 0] = 42.0  # written through numba
    assert view[0, 0] == 42.0 and "FakeCUDAArray" in str(tb.explain(d, to="numpy"))
    print("ok")
    """
)


def test_numba_simulated_cuda_arrays_convert():
    """numba's CUDA simulator (no GPU needed): its arrays speak the protocols only through
    ``__getattr__``, on the instance, as numba's real device arrays speak
    ``__cuda_array_interface__``."""
    pytest.importorskip("numba")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", _SIMULATED],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def _numba_cuda():
    pytest.importorskip("numba")
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("needs a CUDA device: numba's device arrays live in GPU memory")
    return cuda


def test_numba_device_arrays_are_taken_over_on_the_gpu():
    cuda = _numba_cuda()
    torch = pytest.importorskip("torch")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    d = cuda.to_device(a)
    t = tb.to_torch(d)  # __cuda_array_interface__: the same device memory
    assert t.is_cuda and t.cpu().numpy().tobytes() == a.tobytes()
    d[0, 0] = 42.0
    cuda.synchronize()
    assert t[0, 0].item() == 42.0
    assert tb.to_numpy(d).tobytes() == d.copy_to_host().tobytes()
    assert isinstance(t, torch.Tensor)
