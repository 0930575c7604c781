"""Every (source framework, target framework, dtype) on the CPU, compared as bytes.

Where the target cannot hold the dtype, the conversion must raise
ConversionError instead of widening, narrowing or guessing.
"""

from __future__ import annotations

import pytest

import tensorbridge as tb
import tensorbridge.dtypes as D

from .frameworks import FRAMEWORKS, SUPPORTS, bytes_of, dtype_of, framework_of, make, raw_bytes

CASES = [(s, t, d) for s in FRAMEWORKS for t in FRAMEWORKS for d in D.DTYPES if d in SUPPORTS[s]]


@pytest.mark.parametrize("src,tgt,dtype", CASES, ids=[f"{s}-{t}-{d}" for s, t, d in CASES])
def test_conversion_is_bit_exact_or_refused(src, tgt, dtype):
    pytest.importorskip(src) if src != "numpy" else None
    pytest.importorskip(tgt) if tgt != "numpy" else None
    raw = raw_bytes(dtype)
    x = make(src, dtype, raw, shape=(4, 8))
    if dtype not in SUPPORTS[tgt]:
        with pytest.raises(tb.ConversionError, match=dtype):
            tb.convert(x, to=tgt)
        return
    for copy in (None, True):
        y = tb.convert(x, to=tgt, copy=copy)
        assert framework_of(y) == tgt
        assert dtype_of(y) == dtype
        assert tuple(y.shape) == (4, 8)
        assert bytes_of(y) == raw


@pytest.mark.parametrize("src,tgt", [(s, t) for s in FRAMEWORKS for t in FRAMEWORKS])
def test_zero_d_and_empty_keep_their_shape(src, tgt):
    for shape, raw in (((), raw_bytes("float32", 1)), ((0, 3), b"")):
        x = make(src, "float32", raw, shape=shape)
        y = tb.convert(x, to=tgt)
        assert tuple(y.shape) == shape
        assert bytes_of(y) == raw
