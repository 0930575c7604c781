"""GGUF cases found by a review against gguf-py: inputs the main GGUF tests do not have."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import tensorbridge.files as tbf
from tensorbridge.formats.gguf_types import TYPES_BY_NAME

gguf = pytest.importorskip("gguf")
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402 - after importorskip

RNG = np.random.default_rng(1212)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _ref_dequantize(raw: np.ndarray, name: str) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gguf.quants.dequantize(raw, Q[name])


def _write(path, tensors: dict) -> None:
    w = gguf.GGUFWriter(str(path), "test")
    for name, (arr, raw_dtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K", "IQ4_NL", "TQ1_0"])
def test_slices_of_a_quantised_vector_start_inside_a_block(tmp_path, type_name):
    """A 1-D quantised tensor's rows are elements: a slice starting or ending inside a block
    (``a[1:]``, ``a[-1]``, ``a[..., 3]``) used to dequantise from the block's start, giving
    the wrong values shifted by up to a block."""
    t = TYPES_BY_NAME[type_name]
    n = 3 * t.block_size
    raw = RNG.integers(0, 256, n // t.block_size * t.type_size, dtype=np.uint8)
    if type_name == "Q8_0":  # finite scales, so every value is a number
        raw = gguf.quants.quantize(RNG.standard_normal(n).astype(np.float32), Q.Q8_0)
    p = tmp_path / "v.gguf"
    _write(p, {"v": (raw, Q[type_name])})
    full = _ref_dequantize(raw, type_name)
    assert full.shape == (n,)
    bs = t.block_size
    with tbf.open(p) as r:
        a = r.array("v")
        assert _bits(r.read("v")) == _bits(full)
        for s in (slice(1, None), slice(bs - 1, bs + 1), slice(5, 2 * bs + 7), slice(bs, 2 * bs)):
            assert _bits(r.read_slice("v", s)) == _bits(full[s]), s
            assert _bits(a[s]) == _bits(full[s]), s
        for i in (0, 1, bs - 1, bs, n - 1, -1, -bs - 1):
            got = r.read_slice("v", i)
            assert got.shape == () and _bits(got) == _bits(full[i]), i
            assert _bits(a[i]) == _bits(full[i]), i
        assert _bits(a[..., 3]) == _bits(full[..., 3])
        assert _bits(a[::-1]) == _bits(full[::-1])
        assert a[7:7].shape == (0,)
