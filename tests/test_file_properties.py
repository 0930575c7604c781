"""Exactness as a property: any bit pattern, any dtype, any framework, any file format.

A tensor made from raw bytes in one framework is saved, loaded back into a
framework, and compared as bytes. Formats that cannot hold a dtype must refuse it
with ConversionError before writing anything.
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

import tensorbridge as tb
import tensorbridge.dtypes as D

from .core.frameworks import FRAMEWORKS, SUPPORTS, TORCH_DTYPES, bytes_of, make

FORMATS = {
    ".npy": set(D.DTYPES),
    ".npz": set(D.DTYPES),
    ".h5": set(D.DTYPES),
    ".safetensors": {n for n, d in D.DTYPES.items() if d.safetensors},
    ".pt": TORCH_DTYPES,
}


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(sorted(D.DTYPES)))
    suffix = draw(st.sampled_from(sorted(FORMATS)))
    src = draw(st.sampled_from([f for f in FRAMEWORKS if dtype in SUPPORTS[f]]))
    dst = draw(st.sampled_from([f for f in FRAMEWORKS if dtype in SUPPORTS[f]]))
    n = draw(st.integers(0, 12))
    size = D.lookup(dtype).itemsize
    if dtype == "bool":
        raw = bytes(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    else:
        raw = draw(st.binary(min_size=n * size, max_size=n * size))
    return dtype, suffix, src, dst, raw


@settings(max_examples=250, deadline=None)
@given(cases())
def test_save_load_round_trip_is_bit_exact(case):
    dtype, suffix, src, dst, raw = case
    x = make(src, dtype, raw)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t" + suffix)
        if dtype not in FORMATS[suffix]:
            try:
                tb.save({"t": x} if suffix != ".npy" else x, path)
            except tb.ConversionError:
                assert not os.listdir(d)  # refused before writing
                return
            raise AssertionError(f"{suffix} accepted {dtype}")
        tb.save({"t": x} if suffix != ".npy" else x, path)
        loaded = tb.load(path, to=dst)
        y = loaded if suffix == ".npy" else loaded["t"]
        assert bytes_of(y) == raw
        assert tuple(y.shape) == (len(raw) // D.lookup(dtype).itemsize,)
