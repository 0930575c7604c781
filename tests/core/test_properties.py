"""Property tests: any bit pattern, any dtype, any framework pair, compared as bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorbridge as tb
import tensorbridge.dtypes as D

from .frameworks import FRAMEWORKS, SUPPORTS, bytes_of, make

DTYPES = [d for d in D.DTYPES if d != "bool"]


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    src = draw(st.sampled_from([f for f in FRAMEWORKS if dtype in SUPPORTS[f]]))
    tgt = draw(st.sampled_from([f for f in FRAMEWORKS if dtype in SUPPORTS[f]]))
    size = D.lookup(dtype).itemsize
    n = draw(st.integers(0, 16))
    raw = draw(st.binary(min_size=n * size, max_size=n * size))
    return src, tgt, dtype, raw


@settings(max_examples=300, deadline=None)
@given(cases(), st.sampled_from([None, True]))
def test_raw_bits_survive_every_pair(case, copy):
    src, tgt, dtype, raw = case
    x = make(src, dtype, raw)
    y = tb.convert(x, to=tgt, copy=copy)
    assert bytes_of(y) == raw


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=0, max_size=64).map(lambda b: b[: len(b) // 4 * 4]))
def test_round_trip_through_every_framework(raw):
    x = make("numpy", "float32", raw)
    y = x
    for fw in FRAMEWORKS[1:] + ["numpy"]:
        y = tb.convert(y, to=fw)
    assert bytes_of(y) == raw


@pytest.mark.parametrize("dtype", ["bool"])
def test_bool_values_survive(dtype):
    x = make("numpy", dtype, bytes([0, 1, 1, 0]))
    for fw in FRAMEWORKS:
        assert bytes_of(tb.convert(x, to=fw)) == bytes([0, 1, 1, 0])
