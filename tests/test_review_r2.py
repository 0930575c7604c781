"""Inputs a new user tries that the GGUF and MLX/array-protocol tests did not cover."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import tensorbridge as tb


def test_quantize_overflowing_block_like_gguf_py_without_warnings(tmp_path):
    """A weight past float16's range times 127 overflows the Q8_0 scale to inf (as in
    gguf-py); with warnings as errors (pytest's filterwarnings=error, or -W error) the
    save must not fail on NumPy's RuntimeWarning, and the blocks stay gguf-py's."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    x = np.ones((2, 64), np.float32)
    x[0, :32] = 1e7  # scale 1e7/127 > float16 max: inf in gguf-py too
    x[1, 5] = np.nan
    for qt in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1"):
        p = tmp_path / f"{qt}.gguf"
        tb.save({"w": x}, p, quantize=qt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = quantize(x, gguf.GGMLQuantizationType[qt.upper()])
        (t,) = gguf.GGUFReader(p).tensors
        assert t.data.tobytes() == ref.tobytes(), qt
