"""MLX bfloat16 to NumPy on a CPU build: the array's own DLPack capsule is read (NumPy's
import refuses bfloat16), a read-only view of the same buffer with MLX's strides;
checked on strided, transposed and flipped views, lazy arrays, repeated calls (the
cached route) and inside mx.compile (refused with the fix)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import tensorbridge as tb

mx = pytest.importorskip("mlx.core")

if mx.metal.is_available():  # pragma: no cover - Apple silicon: the uint16 route is used
    pytest.skip(
        "Metal builds view bfloat16 as uint16 bits, not through DLPack", allow_module_level=True
    )


def _views():
    base = (mx.arange(48, dtype=mx.float32) * 0.25 - 3).astype(mx.bfloat16).reshape(6, 8)
    mx.eval(base)
    return base, [
        base,
        base.T,
        base[::2, 1::3],
        base[::-1],
        base[:, ::-2],
        base[3:4],
    ]  # (base[3] is a copy in MLX)


def test_bfloat16_views_are_read_only_shared_and_exact():
    base, views = _views()
    for _ in range(2):  # the second call runs the cached route
        for v in views:
            a = tb.to_numpy(v)
            assert a.dtype == np.dtype(ml_dtypes.bfloat16) and a.shape == tuple(v.shape)
            assert not a.flags.writeable and tb.shares_memory(base, a)
            assert np.array_equal(a.astype(np.float32), np.asarray(v.astype(mx.float32)))
    a = tb.to_numpy(base.T)
    np.asarray(base.view(mx.uint16))[0, 1] = 0x4000  # MLX's memory changes: 2.0
    assert float(a[1, 0]) == 2.0
    assert "through DLPack" in str(tb.explain(base.T, to="numpy"))


def test_lazy_bfloat16_is_computed_and_said():
    x = mx.arange(5).astype(mx.bfloat16) * 3
    assert "mx.eval" in str(tb.explain(x, to="numpy"))
    assert tb.to_numpy(x).astype(np.float32).tolist() == [0, 3, 6, 9, 12]


def test_bfloat16_inside_compile_is_refused_with_the_fix():
    def f(a):
        tb.to_numpy(a)
        return a

    with pytest.raises(tb.ConversionError, match="inside mx.compile or mx.vmap"):
        mx.compile(f)(mx.ones(3, dtype=mx.bfloat16))
