"""A .npy header is Python literal syntax, where a shape is ASCII digits: a version-3
(UTF-8) header whose shape uses another script's digits ('٣', ARABIC-INDIC THREE) is
refused by NumPy, and must be refused by tensorbridge's fast header paths too (Python's
``int()`` would take it, and ``\\d`` matches it unless the pattern is ASCII-only)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.errors import FileFormatError


def _v3(header: str, data: bytes) -> bytes:
    h = header.encode("utf-8")
    return b"\x93NUMPY\x03\x00" + struct.pack("<I", len(h)) + h + data


@pytest.mark.parametrize(
    "header",
    [
        "{'descr': '<f4', 'fortran_order': False, 'shape': (\u0663,), }\n",  # np.save's layout
        "{'descr': '<f4', 'fortran_order': False, 'shape': (\u0663, )}\n",  # mx.save's layout
        "{'descr': '<V2', 'fortran_order': False, 'shape': (\u0663, )}\n",  # ... as bfloat16
        "{'descr': '<f4', 'fortran_order': False, 'shape': (\uff13,), }\n",  # FULLWIDTH THREE
    ],
)
def test_non_ascii_digits_in_a_shape_are_refused_as_numpy_refuses_them(tmp_path, header):
    p = tmp_path / "x.npy"
    p.write_bytes(_v3(header, bytes(12)))
    with pytest.raises(ValueError):
        np.load(p)
    with pytest.raises(FileFormatError, match="is not a Python literal"):
        tb.load(p)


def test_the_same_headers_with_ascii_digits_are_read(tmp_path):
    p = tmp_path / "x.npy"
    p.write_bytes(_v3("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }\n", bytes(12)))
    assert tb.load(p).tolist() == [0.0, 0.0, 0.0]
    p.write_bytes(_v3("{'descr': '<V2', 'fortran_order': False, 'shape': (3, )}\n", bytes(6)))
    assert str(tb.load(p).dtype) == "bfloat16"  # MLX's layout: '<V2' is bfloat16
