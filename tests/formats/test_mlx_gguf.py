"""GGUF between MLX and tensorbridge: ``mx.save_gguf`` files (the dtypes it writes: int8,
int16, int32, float16, float32) read by tensorbridge, and tensorbridge's GGUF read by
``mx.load``, compared as bytes. MLX 0.32's ``mx.load`` reads a GGUF BF16 tensor as
float16 *values* (1e30 becomes inf), so bfloat16 goes to MLX through ``tb.load``."""

from __future__ import annotations

import numpy as np
import pytest

import tensorbridge as tb

mx = pytest.importorskip("mlx.core")
pytest.importorskip("gguf")

GGUF_DTYPES = ["int8", "int16", "int32", "float16", "float32"]


def _tree() -> dict:
    rng = np.random.default_rng(3)
    out = {}
    for name in GGUF_DTYPES:
        dt = getattr(mx, name)
        raw = rng.integers(0, 256, 12 * dt.size, dtype=np.uint8)
        out[name] = mx.array(raw.view(f"u{dt.size}").reshape(3, 4)).view(dt)
    return out


def _bits(x) -> bytes:
    return np.ascontiguousarray(np.asarray(x)).tobytes()


def test_mx_save_gguf_files_read_bit_exact(tmp_path):
    tree = _tree()
    p = tmp_path / "mx.gguf"
    mx.save_gguf(str(p), tree)
    back = tb.load(p, to="mlx")
    assert sorted(back) == sorted(tree)
    for k, x in tree.items():
        assert back[k].dtype == x.dtype and back[k].shape == x.shape, k
        assert _bits(back[k]) == _bits(x), k


def test_tensorbridge_gguf_read_by_mx_load(tmp_path):
    tree = _tree()
    p = tmp_path / "tb.gguf"
    tb.save(tree, p)
    back = mx.load(str(p))
    for k, x in tree.items():
        assert back[k].dtype == x.dtype and back[k].shape == x.shape, k
        assert _bits(back[k]) == _bits(x), k


def test_bfloat16_gguf_reaches_mlx_through_tb_load(tmp_path):
    b = mx.array([1e30, 3.14159, -2.5e-20, 1.0]).astype(mx.bfloat16)
    p = tmp_path / "b.gguf"
    tb.save({"b": b}, p)
    back = tb.load(p, to="mlx")["b"]
    assert back.dtype == mx.bfloat16
    assert _bits(back.view(mx.uint16)) == _bits(b.view(mx.uint16))
