"""A byte-swapped (big-endian) array is saved as its values, by every format: it loads
exactly as the same array in native order does, or is refused exactly as that one is."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import tensorbridge as tb

FORMATS = ["safetensors", "npz", "npy", "pt", "h5", "zarr", "gguf"]
DTYPES = ["float16", "bfloat16", "float32", "float64", "int16", "int64", "uint32", "complex64"]


def native(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    values = np.array([0.5, 1, 2, -3, 4, 6, -0.0, 1e-3][: max(1, int(np.prod(shape)))])
    if dtype.startswith(("int", "uint")):
        values = np.abs(values * 4).round()
    return values.astype(getattr(ml_dtypes, dtype, dtype)).reshape(shape)


def round_trip(arr: np.ndarray, path: str) -> np.ndarray:
    if path.endswith(".npy"):
        tb.save(arr, path)
        return np.asarray(tb.load(path))
    tb.save({"v": arr}, path)
    return np.asarray(tb.load(path)["v"])


@pytest.mark.parametrize("shape", [(), (8,), (2, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_byte_swapped_array_saves_as_its_native_twin(tmp_path, fmt, dtype, shape):
    a = native(dtype, shape)
    swapped = a.astype(a.dtype.newbyteorder(">"))
    assert not swapped.dtype.isnative and swapped.tobytes() != a.tobytes() or a.itemsize == 1
    try:
        want = round_trip(a, str(tmp_path / f"native.{fmt}"))
    except tb.TensorBridgeError as exc:
        with pytest.raises(type(exc)):
            round_trip(swapped, str(tmp_path / f"swapped.{fmt}"))
        return
    got = round_trip(swapped, str(tmp_path / f"swapped.{fmt}"))
    assert got.dtype == want.dtype and got.shape == want.shape == shape
    assert got.tobytes() == want.tobytes() == a.tobytes()
