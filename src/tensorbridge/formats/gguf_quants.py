"""Dequantising and quantising GGUF blocks with NumPy, bit-exact to gguf-py.

Every function here works on whole blocks: ``blocks`` is a ``(n, type_size)``
uint8 array, the result ``(n, block_size)`` float32. Each float operation is
the one gguf-py's ``gguf.quants`` does, in the same order and precision (the
reference is llama.cpp's ``ggml-quants.c``), so results match bit for bit; what
differs is that the integers stay uint8/int8 until they are turned into float32
(exactly) and scaled, and that results are written straight into the caller's
output, a cache-sized piece at a time (:func:`dequantize_into`). For the K-quants
and Q8_0 the per-block scales are computed once per input, and the bit fields are
unpacked eight bytes at a time (shifts and masks on uint64 words, plane by plane)
and put in element order by copies of whole 32-byte runs, so NumPy runs long
loops instead of one short loop per sub-block; their work arrays are reused
(:class:`Scratch`).

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

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ConversionError, FrameworkNotInstalledError, message
from .gguf_types import QK_K, TYPES_BY_NAME

__all__ = [
    "CHUNK_ELEMENTS",
    "PIECE_ELEMENTS",
    "Scratch",
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


def _halves(b: np.ndarray, at: int, count: int = 1) -> np.ndarray:
    """``count`` little-endian float16 from byte ``at`` of each block, as (n, count) float32."""
    return b[:, at : at + 2 * count].view("<f2").astype(_F32)


# --- the legacy 32-element types ------------------------------------------------------


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
    np.multiply(_halves(b, 0), q.reshape(n, 32), out=out)  # d * (q - 8)


def _q4_1(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    np.multiply(_halves(b, 0), _nibbles(b[:, 4:]).reshape(n, 32), out=out)  # (d * q) + m
    np.add(out, _halves(b, 2), out=out)


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
    np.multiply(_halves(b, 0), q, out=out)


def _q5_1(b: np.ndarray, out: np.ndarray) -> None:
    q = _q5_index(b[:, 4:8], b[:, 8:])
    np.multiply(_halves(b, 0), q, out=out)
    np.add(out, _halves(b, 2), out=out)


def _q8_k(b: np.ndarray, out: np.ndarray) -> None:
    # ggml's dequantize_row_q8_K: y = d * q, d a float32 (gguf-py has no Q8_K)
    d = b[:, :4].view("<f4").astype(_F32)
    np.multiply(b[:, 4 : 4 + QK_K].view(np.int8), d, out=out)


# --- K-quants and Q8_0: whole pieces, integers unpacked as uint64 words --------------

#: outputs per piece of element work in the kernels below (1 MiB of float32: bigger pieces
#: pay NumPy's per-call overhead less often; the temporaries stay within L2/L3)
PIECE_ELEMENTS = 1 << 18
_U8 = np.uint8
_U64 = np.uint64
# Masks that keep, in every byte of a uint64 word, bits of that byte only, so a shift right
# by less than 8 and a mask unpack 8 bytes at once, in either host byte order.
_M01 = 0x0101010101010101
_M03 = 0x0303030303030303
_M0F = 0x0F0F0F0F0F0F0F0F
_SH_NIBBLE = np.array([0, 4], _U64)[:, None]
_SH_CRUMB = np.array([0, 2, 4, 6], _U64)[:, None]
_SH_BIT = np.arange(8, dtype=_U64)[:, None]


class Scratch:
    """Work arrays kept between pieces (and between calls, when passed on): fresh large
    temporaries per piece would cost page faults each time."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: Any = _U8) -> np.ndarray:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        a = self._arrays.get(key)
        if a is None or a.size < size:
            a = self._arrays[key] = np.empty(size, _U8)
        return a[:size].view(dtype).reshape(shape)


def _void(a: np.ndarray, width: int) -> np.ndarray:
    """``a``'s last axis (contiguous bytes) as items of ``width`` bytes: a copy of such runs
    is one long loop (NumPy merges the axes), where a uint8 copy loops once per run."""
    return a.view(np.dtype((np.void, width)))


def _field(b: np.ndarray, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """Bytes ``lo:hi`` of every block, copied into ``out``'s first ``hi - lo`` columns
    (``(n, width)`` uint8, contiguous: its rows can be viewed as aligned words)."""
    _void(out[:, : hi - lo], hi - lo)[...] = _void(b[:, lo:hi], hi - lo)
    return out


def _planes(words: np.ndarray, shifts: np.ndarray, mask: int, out: np.ndarray) -> np.ndarray:
    """``(words >> s) & mask`` for each ``s`` in ``shifts``, plane-major (one long loop per
    operation) into ``out``, ``(len(shifts), words.size)`` uint64."""
    np.right_shift(words.reshape(1, -1), shifts, out=out)
    out &= _U64(mask)
    return out


def _place(dest: np.ndarray, planes: np.ndarray, width: int) -> None:
    """``dest[..., i, :] = planes[i]`` in runs of ``width`` bytes: ``dest`` is
    ``(m, *g, k, width)`` uint8, ``planes`` ``(k, words)`` uint64, each plane holding
    ``m * prod(g) * width`` bytes in order."""
    dv = _void(dest, width)[..., 0]
    pv = _void(planes.view(_U8), width).reshape(planes.shape[0], *dv.shape[:-1])
    for i in range(planes.shape[0]):
        dv[..., i] = pv[i]


def _affine(q: np.ndarray, out: np.ndarray, d: np.ndarray, k: int, m: Any = None) -> None:
    """``out = d * q`` (then ``- m``), ``d`` and ``m`` one float32 per ``k`` consecutive
    elements: gguf-py's float operations (the products are exact, so the integers are
    converted first; no temporaries)."""
    o = out.reshape(-1, k)
    np.copyto(o, q.reshape(-1, k), casting="unsafe")  # small integers -> float32: exact
    np.multiply(o, d.reshape(-1, 1), out=o)
    if m is not None:
        np.subtract(o, m.reshape(-1, 1), out=o)


def _pieces(n: int, block_size: int) -> list[slice]:
    """Slices of ``n`` blocks with :data:`PIECE_ELEMENTS` outputs each."""
    step = max(1, PIECE_ELEMENTS // block_size)
    return [slice(s, s + step) for s in range(0, n, step)]


def _q8_0(b: np.ndarray, out: np.ndarray, scr: Scratch) -> None:
    d = _halves(b, 0)
    for p in _pieces(b.shape[0], 32):
        bb = b[p]
        q = _field(bb, 2, 34, scr.get("q", (bb.shape[0], 32)))
        _affine(q.view(np.int8), out[p], d[p], 32)  # x * d


def _q2_k(b: np.ndarray, out: np.ndarray, scr: Scratch) -> None:
    sc = b[:, :16]
    dl = _halves(b, 80) * (sc & 15).astype(_F32)
    ml = _halves(b, 82) * (sc >> 4).astype(_F32)
    for p in _pieces(b.shape[0], QK_K):
        bb = b[p]
        m = bb.shape[0]
        w = _field(bb, 16, 80, scr.get("qs", (m, 64))).view(_U64)
        q = scr.get("q", (m, 2, 4, 32))  # [half][shift][32] = 16 sub-blocks of 16
        _place(q, _planes(w, _SH_CRUMB, _M03, scr.get("p", (4, m * 8), _U64)), 32)
        _affine(q, out[p], dl[p], 16, ml[p])  # dl * q - ml


def _k3_scales(b: np.ndarray) -> np.ndarray:
    """Q3_K's 16 signed 6-bit scales per block, as float32 (n, 16)."""
    n = b.shape[0]
    raw = _field(b, 96, 108, np.empty((n, 16), _U8))
    lo = raw[:, :8].view(_U64)[:, 0]
    hi = raw[:, 8:12].view(np.uint32)[:, 0]
    low = np.empty((n, 2), _U64)  # scales 0-7: low nibbles of bytes 0-7; 8-15: high ones
    np.bitwise_and(lo, _U64(_M0F), out=low[:, 0])
    np.bitwise_and(lo >> _U64(4), _U64(_M0F), out=low[:, 1])
    high = np.empty((n, 4), np.uint32)  # scale 4i+j: bits 2i..2i+1 of byte 8+j
    for i in range(4):
        np.bitwise_and(hi >> np.uint32(2 * i), np.uint32(0x03030303), out=high[:, i])
    sc = low.view(_U8) | (high.view(_U8) << _U8(4))
    return (sc.view(np.int8) - np.int8(32)).astype(_F32)


def _q3_k(b: np.ndarray, out: np.ndarray, scr: Scratch) -> None:
    dl = _halves(b, 108) * _k3_scales(b)
    for p in _pieces(b.shape[0], QK_K):
        bb = b[p]
        m = bb.shape[0]
        w = _field(bb, 32, 96, scr.get("qs", (m, 64))).view(_U64)
        q = scr.get("q", (m, 2, 4, 32))  # the low 2 bits
        _place(q, _planes(w, _SH_CRUMB, _M03, scr.get("p", (4, m * 8), _U64)), 32)
        hw = _field(bb, 0, 32, scr.get("qh", (m, 32))).view(_U64)
        np.invert(hw, out=hw)
        hp = _planes(hw, _SH_BIT, _M01, scr.get("hp", (8, m * 4), _U64))
        hp *= _U64(0xFC)  # 0xFC where the high bit is clear: q | 0xFC is q - 4 as int8
        h = scr.get("h", (m, 8, 32))
        _place(h, hp, 32)
        qw = q.reshape(m, -1).view(_U64)
        qw |= h.reshape(m, -1).view(_U64)
        _affine(q.view(np.int8), out[p], dl[p], 16)  # dl * q


def _k4_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit scales and mins of Q4_K/Q5_K, (n, 8) uint8 each, four per uint32."""
    n = b.shape[0]
    s = _field(b, 4, 16, np.empty((n, 12), _U8)).view(np.uint32)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    low6, low4, two = np.uint32(0x3F3F3F3F), np.uint32(0x0F0F0F0F), np.uint32(0x30303030)
    sc = np.empty((n, 2), np.uint32)
    mn = np.empty((n, 2), np.uint32)
    np.bitwise_and(d, low6, out=sc[:, 0])
    np.bitwise_and(m, low6, out=mn[:, 0])
    np.bitwise_or(md & low4, (d >> np.uint32(2)) & two, out=sc[:, 1])
    np.bitwise_or((md >> np.uint32(4)) & low4, (m >> np.uint32(2)) & two, out=mn[:, 1])
    return sc.view(_U8), mn.view(_U8)


def _k4_factors(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc, mn = _k4_scales(b)
    h = _halves(b, 0, 2)
    return h[:, :1] * sc.astype(_F32), h[:, 1:] * mn.astype(_F32)


def _k4_nibbles(bb: np.ndarray, at: int, scr: Scratch) -> np.ndarray:
    """The 128 bytes at ``at`` of each block -> (m, 4, 2, 32) uint8: per 32 bytes, the low
    nibbles then the high ones (sub-blocks 0..7 in order)."""
    m = bb.shape[0]
    w = _field(bb, at, at + 128, scr.get("qs", (m, 128))).view(_U64)
    q = scr.get("q", (m, 4, 2, 32))
    _place(q, _planes(w, _SH_NIBBLE, _M0F, scr.get("p", (2, m * 16), _U64)), 32)
    return q


def _q4_k(b: np.ndarray, out: np.ndarray, scr: Scratch) -> None:
    d, dm = _k4_factors(b)
    for p in _pieces(b.shape[0], QK_K):
        _affine(_k4_nibbles(b[p], 16, scr), out[p], d[p], 32, dm[p])  # d * q - dm


def _q5_k(b: np.ndarray, out: np.ndarray, scr: Scratch) -> None:
    d, dm = _k4_factors(b)
    for p in _pieces(b.shape[0], QK_K):
        bb = b[p]
        m = bb.shape[0]
        q = _k4_nibbles(bb, 48, scr)
        hw = _field(bb, 16, 48, scr.get("qh", (m, 32))).view(_U64)
        hp = _planes(hw, _SH_BIT, _M01, scr.get("hp", (8, m * 4), _U64))
        hp <<= _U64(4)  # bit j of qh byte k: the 5th bit of element 32j + k
        h = scr.get("h", (m, 8, 32))
        _place(h, hp, 32)
        qw = q.reshape(m, -1).view(_U64)
        qw |= h.reshape(m, -1).view(_U64)
        _affine(q, out[p], d[p], 32, dm[p])  # d * q - dm


def _q6_k(b: np.ndarray, out: np.ndarray, scr: Scratch) -> None:
    d = _halves(b, 208) * b[:, 192:208].view(np.int8).astype(_F32)
    for p in _pieces(b.shape[0], QK_K):
        bb = b[p]
        m = bb.shape[0]
        w = _field(bb, 0, 128, scr.get("qs", (m, 128))).view(_U64)
        q = scr.get("q", (m, 2, 2, 64))  # [half][nibble][64]: the low 4 bits
        _place(q, _planes(w, _SH_NIBBLE, _M0F, scr.get("p", (2, m * 16), _U64)), 64)
        hw = _field(bb, 128, 192, scr.get("qh", (m, 64))).view(_U64)
        hp = _planes(hw, _SH_CRUMB, _M03, scr.get("hp", (4, m * 8), _U64))
        hp <<= _U64(4)
        h = scr.get("h", (m, 2, 4, 32))  # [half][shift][32]: the high 2 bits
        _place(h, hp, 32)
        qw = q.reshape(m, -1).view(_U64)
        qw |= h.reshape(m, -1).view(_U64)
        q -= _U8(32)  # wraps: as int8, q - 32
        _affine(q.view(np.int8), out[p], d[p], 16)  # d * q


#: kernels that take any number of blocks and a :class:`Scratch` (per element, they
#: work in pieces of :data:`PIECE_ELEMENTS`)
_WHOLE: dict[str, Callable[[np.ndarray, np.ndarray, Scratch], None]] = {
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


# --- ternary, microscaling and non-linear 4-bit types --------------------------------


def _tq1_0(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    qs, qh = b[:, :48], b[:, 48:52]
    d = _halves(b, 52)
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
    d = _halves(b, 64)
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
    np.multiply(_halves(b, 0)[:, :, None], o, out=o)


def _iq4_xs(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    d = _halves(b, 0)
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
    "Q8_K": _q8_k,
    "TQ1_0": _tq1_0,
    "TQ2_0": _tq2_0,
    "MXFP4": _mxfp4,
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
    "BF16": _bf16,
}
for _name, _kernel in _WHOLE.items():
    DEQUANTIZERS[_name] = functools.partial(lambda k, b, out: k(b, out, Scratch()), _kernel)


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


def dequantize_into(
    blocks: np.ndarray, type_name: str, out: np.ndarray, scratch: Scratch | None = None
) -> None:
    """Dequantise ``(n, type_size)`` uint8 ``blocks`` into the float32 ``out`` of
    ``n * block_size`` elements, :data:`CHUNK_ELEMENTS` at a time (the K-quants and
    Q8_0 take all at once: they work per block once, then in pieces per element, in
    ``scratch``'s arrays: pass one :class:`Scratch` to calls in a row)."""
    t = TYPES_BY_NAME[type_name]
    flat = out.reshape(-1, t.block_size)
    whole = _WHOLE.get(type_name)
    if whole is not None:
        with np.errstate(all="ignore"):  # inf or NaN scales in a file are values, not errors
            whole(blocks, flat, scratch or Scratch())
        return
    f = _dequantizer(type_name)
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
