"""Dequantising and quantising GGUF blocks with NumPy, bit-exact to gguf-py.

Every function here works on whole blocks: ``blocks`` is a ``(n, type_size)``
uint8 array, the result ``(n, block_size)`` float32. Each float operation is
the one gguf-py's ``gguf.quants`` does, in the same order and precision (the
reference is llama.cpp's ``ggml-quants.c``), so results match bit for bit; what
differs is that the integers stay uint8/int8 (unpacked with shifts on whole rows,
or with 256-entry byte-spreading tables) until one mixed-type multiply turns them
into float32 (exactly) and scales them in the same pass, and that results are
written straight into the caller's output, a cache-sized piece at a time
(:func:`dequantize_into`).

The codebook IQ types (IQ1_S, IQ1_M, IQ2_*, IQ3_*) and NVFP4 use a port of
gguf-py's own code and grids (:mod:`.gguf_iq`), so no type needs gguf-py to be
read. Q8_1 and Q1_0 have no dequantisation in gguf-py, so they are read as raw
blocks only. Quantising to TQ1_0, TQ2_0 and MXFP4 goes through gguf-py
(``pip install 'tensorbridge[gguf]'``).

>>> import numpy as np
>>> x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
>>> q = quantize(x, "Q8_0")
>>> q.shape, q.dtype
((2, 34), dtype('uint8'))
>>> float(abs(dequantize(q, "Q8_0", (2, 32)) - x).max()) < 0.01
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ConversionError, FrameworkNotInstalledError, message
from .gguf_types import QK_K, TYPES_BY_NAME

__all__ = [
    "CHUNK_ELEMENTS",
    "DEQUANTIZERS",
    "CODEBOOK_TYPES",
    "QUANTIZERS",
    "can_dequantize",
    "can_quantize",
    "dequantize",
    "dequantize_blocks",
    "dequantize_into",
    "quantize",
    "quantize_blocks",
]

#: float32 outputs per piece: small enough for the temporaries to stay in cache
CHUNK_ELEMENTS = 1 << 16

_F32 = np.float32
#: shifts of the four 2-bit fields of a byte, broadcast over (n, k, 4, 32)
_SHIFT2 = np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]


def _spread(f: Callable[[np.ndarray, int], np.ndarray], fields: int, dtype: Any) -> np.ndarray:
    """A 256-entry table: byte v -> one integer whose i-th byte is ``f(v, i)``, so that
    gathering it spreads each byte's bit fields over ``fields`` bytes in one pass (a
    broadcast shift runs NumPy's inner loop 32 elements at a time; this does not)."""
    v = np.arange(256, dtype=np.uint64)
    word = np.zeros(256, np.uint64)
    for i in range(fields):
        word |= f(v, i).astype(np.uint64) << np.uint64(8 * i)
    return word.astype(dtype)


_U64 = np.uint64
#: byte -> 8 bytes: bit i, shifted to 0x10 (the 5th bit of Q5_K)
_BIT4 = _spread(lambda v, i: ((v >> _U64(i)) & _U64(1)) << _U64(4), 8, np.uint64)
#: byte -> 8 bytes: 4 where bit i is clear, else 0 (Q3_K's "minus 4 unless the high bit")
_NOT_BIT_4 = _spread(lambda v, i: (((v >> _U64(i)) & _U64(1)) ^ _U64(1)) << _U64(2), 8, np.uint64)
#: byte -> 4 bytes: its 2-bit fields, lowest first
_CRUMBS = _spread(lambda v, i: (v >> _U64(2 * i)) & _U64(3), 4, np.uint32)


def _bytes_of(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``table[idx]`` as bytes with the fields first: ``(n, fields, k)`` from ``(n, k)``."""
    n, k = idx.shape
    return table[idx].view(np.uint8).reshape(n, k, -1).transpose(0, 2, 1)


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian float16 at byte ``start`` of each block, as a (n, 1) float32."""
    return blocks[:, start : start + 2].view(np.float16).astype(_F32)


# --- the legacy 32-element types ------------------------------------------------------


def _q8_0(b: np.ndarray, out: np.ndarray) -> None:
    d = _half(b, 0)
    np.multiply(b[:, 2:].view(np.int8), d, out=out)  # int8 -> float32 is exact: x * d


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``(n, k)`` bytes -> ``(n, 2, k)`` uint8: the low nibbles, then the high ones."""
    q = np.empty((qs.shape[0], 2, qs.shape[1]), np.uint8)
    np.bitwise_and(qs, 15, out=q[:, 0])
    np.right_shift(qs, 4, out=q[:, 1])
    return q


# The integers are unpacked in uint8/int8, then one mixed-type multiply converts them to
# float32 (exactly) and scales them: the same float operation gguf-py does, in one pass.


def _q4_0(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    q = _nibbles(b[:, 2:]).view(np.int8)
    q -= np.int8(8)
    np.multiply(_half(b, 0), q.reshape(n, 32), out=out)  # d * (q - 8)


def _q4_1(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    np.multiply(_half(b, 0), _nibbles(b[:, 4:]).reshape(n, 32), out=out)  # (d * q) + m
    np.add(out, _half(b, 2), out=out)


def _q5_index(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """The 5-bit values 0..31 of Q5_0/Q5_1 blocks, element order, as uint8 (n, 32)."""
    n = qs.shape[0]
    hi = np.unpackbits(qh, axis=1, bitorder="little")  # bit j of the u32 is element j's 5th bit
    q = np.empty((n, 32), np.uint8)
    np.bitwise_and(qs, 15, out=q[:, :16])
    np.right_shift(qs, 4, out=q[:, 16:])
    q |= hi << 4
    return q


def _q5_0(b: np.ndarray, out: np.ndarray) -> None:
    q = _q5_index(b[:, 2:6], b[:, 6:]).view(np.int8)
    q -= np.int8(16)
    np.multiply(_half(b, 0), q, out=out)


def _q5_1(b: np.ndarray, out: np.ndarray) -> None:
    q = _q5_index(b[:, 4:8], b[:, 8:])
    np.multiply(_half(b, 0), q, out=out)
    np.add(out, _half(b, 2), out=out)


def _q8_k(b: np.ndarray, out: np.ndarray) -> None:
    # ggml's dequantize_row_q8_K: y = d * q, d a float32 (gguf-py has no Q8_K)
    d = b[:, :4].view("<f4").astype(_F32)
    np.multiply(b[:, 4 : 4 + QK_K].view(np.int8), d, out=out)


# --- K-quants ---------------------------------------------------------------------------


def _q2_k(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    sc = b[:, :16]
    qs = b[:, 16:80]
    dl = _half(b, 80) * (sc & 0xF).astype(_F32)
    ml = _half(b, 82) * (sc >> 4).astype(_F32)
    q = _bytes_of(_CRUMBS, qs.reshape(n * 2, 32)).reshape(n, 2, 4, 32)
    o16 = out.reshape(n, 16, 16)
    np.multiply(dl[:, :, None], q.reshape(n, 16, 16), out=o16)  # dl * q - ml
    np.subtract(o16, ml[:, :, None], out=o16)


def _q3_k(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    hmask = b[:, :32]
    qs = b[:, 32:96]
    scales = b[:, 96:108]
    d = _half(b, 108)
    lsc = (scales[:, None, :8] >> np.array([0, 4], np.uint8)[None, :, None]).reshape(n, 16)
    hsc = (scales[:, None, 8:] >> np.array([0, 2, 4, 6], np.uint8)[None, :, None]).reshape(n, 16)
    sc = ((lsc & 0x0F) | ((hsc & 0x03) << 4)).astype(np.int8) - np.int8(32)
    dl = d * sc.astype(_F32)
    # index = 2-bit low part | (high bit << 2); value = low - 4 * (1 - high bit)
    # the low 2 bits, minus 4 unless the high bit is set
    q = _bytes_of(_CRUMBS, qs.reshape(n * 2, 32)).reshape(n, 8, 32)
    q -= _bytes_of(_NOT_BIT_4, hmask)
    np.multiply(dl[:, :, None], q.view(np.int8).reshape(n, 16, 16), out=out.reshape(n, 16, 16))


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit scales and mins of Q4_K/Q5_K, (n, 8) each."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q4_k(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = _half(b, 0) * sc.astype(_F32)
    dm = _half(b, 2) * mn.astype(_F32)
    q = _nibbles(b[:, 16:].reshape(n * 4, 32))  # (4n, 2, 32): sub-blocks in order
    o8 = out.reshape(n, 8, 32)
    np.multiply(d[:, :, None], q.reshape(n, 8, 32), out=o8)  # d * q - dm
    np.subtract(o8, dm[:, :, None], out=o8)


def _q5_k(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = _half(b, 0) * sc.astype(_F32)
    dm = _half(b, 2) * mn.astype(_F32)
    qh = b[:, 16:48]
    qs = b[:, 48:].reshape(n, 4, 32)
    q = np.empty((n, 4, 2, 32), np.uint8)
    np.bitwise_and(qs, 15, out=q[:, :, 0])
    np.right_shift(qs, 4, out=q[:, :, 1])
    q8 = q.reshape(n, 8, 32)
    q8 |= _bytes_of(_BIT4, qh)
    o8 = out.reshape(n, 8, 32)
    np.multiply(d[:, :, None], q8, out=o8)
    np.subtract(o8, dm[:, :, None], out=o8)


def _q6_k(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 64)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    scales = b[:, 192:208].view(np.int8).astype(_F32)
    d = _half(b, 208) * scales  # (n, 16)
    q = np.empty((n, 2, 2, 64), np.uint8)  # [half][nibble][64] -> (n, 8, 32) in gguf-py's order
    np.bitwise_and(ql, 15, out=q[:, :, 0])
    np.right_shift(ql, 4, out=q[:, :, 1])
    q8 = q.reshape(n, 8, 32)
    q8 |= ((qh >> np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]) & 3).reshape(n, 8, 32) << 4
    qi = q.view(np.int8)
    qi -= np.int8(32)
    np.multiply(d[:, :, None], qi.reshape(n, 16, 16), out=out.reshape(n, 16, 16))


# --- ternary, microscaling and non-linear 4-bit types --------------------------------


def _tq1_0(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    qs, qh = b[:, :48], b[:, 48:52]
    d = _half(b, 52)
    pow3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
    q0 = (qs[:, None, :32] * pow3[None, :, None]).reshape(n, -1)
    q1 = (qs[:, None, 32:] * pow3[None, :, None]).reshape(n, -1)
    q2 = (qh[:, None, :] * pow3[None, :4, None]).reshape(n, -1)
    q = np.concatenate([q0, q1, q2], axis=-1)
    q = ((q.astype(np.uint16) * 3) >> 8).astype(np.int8) - np.int8(1)
    np.multiply(d, q.astype(_F32), out=out)


def _tq2_0(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    qs = b[:, :64].reshape(n, 2, 1, 32)
    d = _half(b, 64)
    q = ((qs >> _SHIFT2) & 3).view(np.int8)
    q -= np.int8(1)
    np.multiply(d, q.reshape(n, QK_K), out=out)


_E2M1 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], _F32)


def _mxfp4(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    e = b[:, :1]
    # ggml_e8m0_to_fp32_half
    bits = np.where(
        e < 2,
        np.uint32(0x00200000) << e.astype(np.uint32),
        (e.astype(np.uint32) - np.uint32(1)) << np.uint32(23),
    )
    d = bits.view(_F32)
    qs = b[:, 1:]
    o = out.reshape(n, 2, 16)
    np.take(_E2M1, qs & 15, out=o[:, 0], mode="clip")
    np.take(_E2M1, qs >> 4, out=o[:, 1], mode="clip")
    np.multiply(d[:, :, None], o, out=o)


_IQ4_NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], _F32)


def _iq4_nl(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    qs = b[:, 2:]
    o = out.reshape(n, 2, 16)
    np.take(_IQ4_NL, qs & 15, out=o[:, 0], mode="clip")
    np.take(_IQ4_NL, qs >> 4, out=o[:, 1], mode="clip")
    np.multiply(_half(b, 0)[:, :, None], o, out=o)


def _iq4_xs(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    d = _half(b, 0)
    sh = b[:, 2:4].view("<u2").reshape(n, 1)
    sl = b[:, 4:8]
    qs = b[:, 8:].reshape(n, 8, 16)
    lo = (sl[:, :, None] >> np.array([0, 4], np.uint8)[None, None, :]).reshape(n, 8) & 0x0F
    hi = ((sh >> (2 * np.arange(8, dtype=np.uint16))[None, :]).astype(np.uint8)) & 0x03
    sc = (lo | (hi << 4)).astype(np.int8) - np.int8(32)
    dl = d * sc.astype(_F32)  # (n, 8)
    o = out.reshape(n, 8, 2, 16)
    np.take(_IQ4_NL, qs & 15, out=o[:, :, 0], mode="clip")
    np.take(_IQ4_NL, qs >> 4, out=o[:, :, 1], mode="clip")
    o8 = out.reshape(n, 8, 32)
    np.multiply(dl[:, :, None], o8, out=o8)


def _bf16(b: np.ndarray, out: np.ndarray) -> None:
    out[...] = (b.view("<i2").astype(np.int32) << 16).view(_F32)


#: type name -> its dequantiser, ``f(blocks, out)``
DEQUANTIZERS: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "Q8_K": _q8_k,
    "TQ1_0": _tq1_0,
    "TQ2_0": _tq2_0,
    "MXFP4": _mxfp4,
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
    "BF16": _bf16,
}


def _codebook(type_name: str) -> Callable[[np.ndarray, np.ndarray], None]:
    from .gguf_iq import IQ_TYPES

    cls = IQ_TYPES[type_name]
    cls.init_grid()

    def run(b: np.ndarray, out: np.ndarray) -> None:
        out[...] = cls.dequantize_blocks(b)

    return run


#: types with codebooks, dequantised by the port of gguf-py's code in :mod:`.gguf_iq`
CODEBOOK_TYPES = frozenset(
    {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "NVFP4"}
)


def can_dequantize(type_name: str) -> bool:
    """Whether ``type_name``'s blocks can be dequantised (all but Q8_1 and Q1_0)."""
    return type_name in DEQUANTIZERS or type_name in CODEBOOK_TYPES


def dequantize_blocks(blocks: np.ndarray, type_name: str) -> np.ndarray:
    """``(n, type_size)`` uint8 blocks -> ``(n, block_size)`` float32."""
    t = TYPES_BY_NAME[type_name]
    out = np.empty((blocks.shape[0], t.block_size), _F32)
    dequantize_into(blocks, type_name, out)
    return out


def _dequantizer(type_name: str) -> Callable[[np.ndarray, np.ndarray], None]:
    f = DEQUANTIZERS.get(type_name)
    if f is not None:
        return f
    if type_name in CODEBOOK_TYPES:
        return _codebook(type_name)
    raise ConversionError(
        message(
            f"a {type_name} tensor",
            f"no dequantisation of {type_name} is known (gguf-py has none either)",
            "read its blocks undecoded with reader.read_raw(name)",
        )
    )


def dequantize_into(blocks: np.ndarray, type_name: str, out: np.ndarray) -> None:
    """Dequantise ``(n, type_size)`` uint8 ``blocks`` into the float32 ``out`` of
    ``n * block_size`` elements, :data:`CHUNK_ELEMENTS` at a time."""
    t = TYPES_BY_NAME[type_name]
    f = _dequantizer(type_name)
    flat = out.reshape(-1, t.block_size)
    step = max(1, CHUNK_ELEMENTS // t.block_size)
    with np.errstate(all="ignore"):  # inf or NaN scales in a file are values, not errors
        for start in range(0, blocks.shape[0], step):
            f(blocks[start : start + step], flat[start : start + step])


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes of a tensor (any shape of uint8) -> float32 of the logical ``shape``."""
    t = TYPES_BY_NAME[type_name]
    blocks = np.ascontiguousarray(data).reshape(-1).view(np.uint8).reshape(-1, t.type_size)
    out = np.empty(shape, _F32)
    dequantize_into(blocks, type_name, out)
    return out


# --- quantising -----------------------------------------------------------------------


def _roundf(n: np.ndarray) -> np.ndarray:
    """Round half away from zero, as gguf-py's np_roundf (and C's roundf)."""
    a = abs(n)
    floored = np.floor(a)
    b = floored + np.floor(2 * (a - floored))
    return np.sign(n) * b


def _quant_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = abs(blocks).max(axis=1, keepdims=True) / 127
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d)
    qs = _roundf(blocks * inv)
    return np.concatenate(
        [d.astype(np.float16).view(np.uint8), qs.astype(np.int8).view(np.uint8)], axis=1
    )


def _quant_q4_0(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    imax = abs(blocks).argmax(axis=-1, keepdims=True)
    mx = np.take_along_axis(blocks, imax, axis=-1)
    d = mx / -8
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d)
    qs = np.trunc((blocks * inv) + np.float32(8.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
    qs = qs.reshape((n, 2, 16))
    qs = qs[..., 0, :] | (qs[..., 1, :] << np.uint8(4))
    return np.concatenate([d.astype(np.float16).view(np.uint8), qs], axis=-1)


def _quant_q4_1(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    mx = blocks.max(axis=-1, keepdims=True)
    mn = blocks.min(axis=-1, keepdims=True)
    d = (mx - mn) / 15
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d)
    qs = (
        np.trunc((blocks - mn) * inv + np.float32(0.5), dtype=np.float32)
        .astype(np.uint8)
        .clip(0, 15)
    )
    qs = qs.reshape((n, 2, 16))
    qs = qs[..., 0, :] | (qs[..., 1, :] << np.uint8(4))
    return np.concatenate(
        [d.astype(np.float16).view(np.uint8), mn.astype(np.float16).view(np.uint8), qs], axis=-1
    )


def _quant_q5_0(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    imax = abs(blocks).argmax(axis=-1, keepdims=True)
    mx = np.take_along_axis(blocks, imax, axis=-1)
    d = mx / -16
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d)
    q = np.trunc((blocks * inv) + np.float32(16.5), dtype=np.float32).astype(np.uint8).clip(0, 31)
    qs = q.reshape((n, 2, 16))
    qs = (qs[..., 0, :] & np.uint8(0x0F)) | (qs[..., 1, :] << np.uint8(4))
    qh = np.packbits(q.reshape((n, 1, 32)) >> np.uint8(4), axis=-1, bitorder="little").reshape(n, 4)
    return np.concatenate([d.astype(np.float16).view(np.uint8), qh, qs], axis=-1)


def _quant_q5_1(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    mx = blocks.max(axis=-1, keepdims=True)
    mn = blocks.min(axis=-1, keepdims=True)
    d = (mx - mn) / 31
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d)
    q = (
        np.trunc((blocks - mn) * inv + np.float32(0.5), dtype=np.float32)
        .astype(np.uint8)
        .clip(0, 31)
    )
    qs = q.reshape((n, 2, 16))
    qs = (qs[..., 0, :] & np.uint8(0x0F)) | (qs[..., 1, :] << np.uint8(4))
    qh = np.packbits(q.reshape((n, 1, 32)) >> np.uint8(4), axis=-1, bitorder="little").reshape(n, 4)
    return np.concatenate(
        [d.astype(np.float16).view(np.uint8), mn.astype(np.float16).view(np.uint8), qh, qs], axis=-1
    )


#: type name -> its quantiser, ``f(float32 blocks) -> uint8 blocks`` (ports of gguf-py's)
QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q8_0": _quant_q8_0,
    "Q4_0": _quant_q4_0,
    "Q4_1": _quant_q4_1,
    "Q5_0": _quant_q5_0,
    "Q5_1": _quant_q5_1,
}
#: types gguf-py quantises (TQ1_0, TQ2_0, MXFP4): through gguf-py, when installed
_GGUF_PY_QUANTIZED = frozenset({"TQ1_0", "TQ2_0", "MXFP4"})


def can_quantize(type_name: str) -> bool:
    return type_name in QUANTIZERS or type_name in _GGUF_PY_QUANTIZED


def quantize_blocks(blocks: np.ndarray, type_name: str) -> np.ndarray:
    """``(n, block_size)`` float32 -> ``(n, type_size)`` uint8 blocks."""
    f = QUANTIZERS.get(type_name)
    if f is not None:
        with np.errstate(all="ignore"):  # inf/NaN weights or scales: gguf-py's bytes, no error
            return f(blocks)
    if type_name in _GGUF_PY_QUANTIZED:
        try:
            from gguf.constants import GGMLQuantizationType
            from gguf.quants import quantize as ref
        except ImportError as exc:
            raise FrameworkNotInstalledError(
                message(
                    f"quantising to {type_name}",
                    "tensorbridge quantises it with gguf-py, which is not installed",
                    "pip install 'tensorbridge[gguf]', or use q8_0, q4_0, q4_1, q5_0 or q5_1",
                )
            ) from exc
        with np.errstate(all="ignore"):
            return ref(np.ascontiguousarray(blocks), GGMLQuantizationType[type_name])
    raise ConversionError(
        message(
            f"quantising to {type_name}",
            "tensorbridge (like gguf-py) cannot quantise to it",
            "use one of q8_0, q4_0, q4_1, q5_0, q5_1, tq1_0, tq2_0, mxfp4 (llama.cpp's "
            "llama-quantize makes the K- and IQ-quants)",
        )
    )


def quantize(data: np.ndarray, type_name: str) -> np.ndarray:
    """Quantise an array (any float dtype, last axis a multiple of the block size) to
    uint8 blocks shaped ``(*shape[:-1], row_bytes)``, as ``gguf.quants.quantize``."""
    t = TYPES_BY_NAME[type_name]
    arr = np.asarray(data).astype(np.float32, copy=False)
    if arr.ndim == 0 or arr.shape[-1] % t.block_size:
        raise ConversionError(
            message(
                f"an array of shape {list(arr.shape)} for {type_name}",
                f"its last axis must be a multiple of {t.block_size}, {type_name}'s block size",
                "keep such tensors in float (tensorbridge does so on convert)",
            )
        )
    rows = arr.reshape(-1, arr.shape[-1])
    out = np.empty((rows.shape[0], rows.shape[1] // t.block_size * t.type_size), np.uint8)
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        piece = np.ascontiguousarray(rows[start : start + step]).reshape(-1, t.block_size)
        out[start : start + step] = quantize_blocks(piece, type_name).reshape(-1, out.shape[1])
    return out.reshape(*arr.shape[:-1], out.shape[1])
