"""The ``.gguf`` format (llama.cpp, ollama, whisper.cpp): our own validated parser and writer.

File layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), versions 2
and 3, little- or big-endian (the byte order of the version field tells)::

    "GGUF"  u32 version  u64 n_tensors  u64 n_kv
    n_kv x      key (u64 length + UTF-8), u32 value type, value
                (a scalar, a string, or an array: u32 item type, u64 count, items)
    n_tensors x name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset
    padding to ``general.alignment`` (32 unless the metadata says otherwise)
    data        each tensor at data start + its offset (a multiple of the alignment)

``ne[0]`` is the fastest axis, so a tensor's NumPy shape is ``ne`` reversed.

Reading: every count, string length, dimension, type id and offset is checked
against the real file size before anything is allocated; tensors must lie
inside the data region, aligned, without overlapping. Tensors of F32, F16,
BF16 (as ``ml_dtypes.bfloat16``), F64 and I8..I64 come back as stored;
quantised ones (Q4_0 ... Q8_0, the K-quants, IQ, TQ, MXFP4) dequantised to
float32, bit-exact to ``gguf.quants.dequantize`` (see :mod:`.gguf_quants`), one
cache-sized piece at a time; :meth:`GGUFReader.read_raw` gives the blocks
undecoded. In a big-endian file the F16/F32/F64/int data is byte-swapped; BF16
and quantised blocks are taken as they lie (as gguf-py does).

Metadata: ``reader.metadata`` maps every key to a :class:`GGUFValue`, a ``str``
(the value as text: strings as they are, numbers and arrays as JSON) that also
carries its GGUF type and value (see :mod:`.gguf_meta`), so a GGUF written from it
keeps them. Its repr is short, however long the value (tokenizer vocabularies).

Writing: F32, F16, BF16, F64 and I8..I64 as they are; a tensor whose info is a
:class:`GGUFTensorInfo` of a quantised type (from a GGUF reader, or from
:func:`quantized_info`) is stored quantised: blocks from a GGUF source are
copied as they are, others quantised (``quantize="q8_0"`` does that for every
float tensor with at least two axes whose last axis fits the blocks).

>>> import numpy as np, tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "m.gguf")
>>> a = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> FORMAT.write(p, [TensorInfo("w", "float32", (2, 3))], lambda name: a,
...              {"general.name": "demo", "n": value(7, "uint32")})
>>> with FORMAT.open(p) as r:
...     (r.keys(), r.metadata, r.metadata["n"].gguf_type, r.read("w").tobytes() == a.tobytes())
(['w'], {'general.name': 'demo', 'n': '7'}, 'UINT32', True)
"""

from __future__ import annotations

import math
import os
import struct
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..dtypes import lookup
from ..errors import ConversionError, FileFormatError, UnsafeContentError
from .atomic import atomic_write
from .base import (
    Format,
    RawSpan,
    Reader,
    SharedDescriptor,
    TensorInfo,
    file_stamp,
    first_axis_rows,
    opening,
)
from .gguf_meta import (
    DEFAULT_ALIGNMENT,
    MAX_ALIGNMENT,
    MAX_KEYS,
    MAX_NAME,
    MAX_TENSORS,
    Cursor,
    GGUFValue,
    alignment_of,
    metadata_entries,
    pack_string,
    pack_value,
    read_name,
    read_value,
    read_value_type,
    value,
)
from .gguf_quants import Scratch, can_dequantize, can_quantize, dequantize_into
from .gguf_quants import quantize as quantize_array
from .gguf_types import (
    PLAIN_DTYPES,
    TYPES,
    TYPES_BY_NAME,
    VALUE_TYPE_IDS,
    GGMLType,
)
from .names import check_unique
from .safetensors import (
    SpanFiles,
    check_fetched,
    copy_span,
    iter_le_bytes,
    open_regular_stat,
    read_exact_into,
)

__all__ = [
    "DEFAULT_ALIGNMENT",
    "FORMAT",
    "MAX_DIMS",
    "QUANT_TYPES",
    "GGUFFormat",
    "GGUFReader",
    "GGUFTensorInfo",
    "GGUFValue",
    "quantized_info",
    "value",
]

MAGIC = b"GGUF"
#: ggml tensors have at most 4 dimensions (GGML_MAX_DIMS)
MAX_DIMS = 4
#: raw bytes read at a time while dequantising (kept in cache for the kernels)
_READ_CHUNK = 1 << 18
#: dtypes that byte-swap in a big-endian file (as gguf-py: BF16 and blocks do not)
_SWAPPED = {"float16", "float32", "float64", "int16", "int32", "int64"}
#: types --dtype / quantize= can make (gguf-py's quantisers)
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0", "MXFP4")


#: ggml type ids llama.cpp once wrote and has since removed (ggml.h keeps them reserved)
_REMOVED_TYPES = {
    4: "Q4_2",
    5: "Q4_3",
    31: "Q4_0_4_4",
    32: "Q4_0_4_8",
    33: "Q4_0_8_8",
    36: "IQ4_NL_4_4",
    37: "IQ4_NL_4_8",
    38: "IQ4_NL_8_8",
}


# --- tensor infos ----------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFTensorInfo(TensorInfo):
    """A :class:`TensorInfo` with the GGUF type it is (or will be) stored as.

    ``dtype``/``shape`` are what reading gives (float32 for quantised types);
    ``ggml_type`` is the stored type (``"Q4_K"``), ``source`` where a GGUF
    source file holds its blocks (copied as they are when written to GGUF)."""

    ggml_type: str = "F32"
    source: RawSpan | None = field(default=None, compare=False, repr=False)

    @property
    def stored_nbytes(self) -> int:
        t = TYPES_BY_NAME[self.ggml_type]
        return self.size // t.block_size * t.type_size

    def to_json(self) -> dict:
        out = super().to_json()
        t = TYPES_BY_NAME[self.ggml_type]
        out.update(
            stored_type=t.name,
            stored_nbytes=self.stored_nbytes,
            bits_per_weight=round(t.bits_per_weight, 4),
        )
        return out


def quantized_info(info: TensorInfo, type_name: str) -> TensorInfo:
    """``info`` marked to be stored as ``type_name`` (``"q8_0"``) when it is a float
    tensor with at least two axes whose last axis is a multiple of the block size
    (as llama.cpp does, vectors such as norms and biases stay unquantised); else
    ``info`` unchanged."""
    t = _quant_type(type_name)
    if (
        lookup(info.dtype).kind != "float"
        or len(info.shape) < 2
        or not info.shape[-1]
        or info.shape[-1] % t.block_size
        or info.size == 0
    ):
        return info
    return GGUFTensorInfo(info.name, "float32", tuple(info.shape), ggml_type=t.name)


def _float_of(got: object) -> str:
    """The dtype a tensor to quantise may be fetched in: its own float dtype (a bfloat16
    or float16 checkpoint saved with ``quantize=``), quantised from its float32 values."""
    try:
        row = lookup(got.dtype) if isinstance(got, np.ndarray) else None
    except ConversionError:
        row = None
    return row.name if row is not None and row.kind == "float" else "float32"


def _quant_type(type_name: str) -> GGMLType:
    t = TYPES_BY_NAME.get(str(type_name).upper())
    if t is None or not can_quantize(t.name):
        raise ConversionError(
            f"cannot quantise to {type_name!r}. Fix: use one of "
            f"{', '.join(q.lower() for q in QUANT_TYPES)} (K- and IQ-quants are made by "
            "llama.cpp's llama-quantize)."
        )
    return t


# --- the header parser -------------------------------------------------------------------


@dataclass
class _Entry:
    info: GGUFTensorInfo
    type: GGMLType
    offset: int  # relative to the data start
    nbytes: int


def _tensor_entry(cur: Cursor, index: int) -> _Entry:
    name = read_name(cur, f"tensor #{index}'s name")
    ndim = cur.unpack("I", f"tensor {name!r}: n_dims")
    if ndim > MAX_DIMS:
        raise FileFormatError(
            f"tensor {name!r} has {ndim} dimensions; ggml tensors have at most {MAX_DIMS}. Fix: "
            "the file is corrupt or hostile.",
            cur.path,
        )
    ne = [cur.unpack("Q", f"tensor {name!r}: dims") for _ in range(ndim)]
    tid = cur.unpack("I", f"tensor {name!r}: type")
    offset = cur.unpack("Q", f"tensor {name!r}: offset")
    t = TYPES.get(tid)
    if t is None and tid in _REMOVED_TYPES:
        raise FileFormatError(
            f"tensor {name!r} is {_REMOVED_TYPES[tid]} (ggml type {tid}), a repacked layout "
            "llama.cpp has removed from files (it repacks when loading now); no reader "
            "(gguf-py included) dequantises it. Fix: download or make the model's plain "
            "quantisation (e.g. Q4_0) instead.",
            cur.path,
        )
    if t is None:
        raise FileFormatError(
            f"tensor {name!r} has the unknown ggml type {tid} (known: "
            f"{', '.join(f'{k}={v.name}' for k, v in sorted(TYPES.items()))}). Fix: the file "
            "is corrupt, or from a newer llama.cpp than tensorbridge knows.",
            cur.path,
        )
    size = math.prod(ne)
    if math.prod(max(d, 1) for d in ne) >= 2**62:  # NumPy refuses such shapes even when empty
        raise FileFormatError(
            f"tensor {name!r}: dims {ne} have more than 2**62 elements. Fix: the file is "
            "corrupt or hostile.",
            cur.path,
        )
    if not ne and t.block_size > 1:  # no blocks to hold it: it would read as 0 bytes
        raise FileFormatError(
            f"tensor {name!r} is {t.name} with no dimensions; a quantised tensor has at least "
            f"one, a multiple of its block size {t.block_size}. Fix: the file is corrupt.",
            cur.path,
        )
    if ne and ne[0] % t.block_size:
        raise FileFormatError(
            f"tensor {name!r} is {t.name} with ne[0]={ne[0]}, not a multiple of its block size "
            f"{t.block_size}. Fix: the file is corrupt.",
            cur.path,
        )
    shape = tuple(reversed(ne))
    dtype = t.dtype or "float32"
    nbytes = size // t.block_size * t.type_size
    return _Entry(GGUFTensorInfo(name, dtype, shape, ggml_type=t.name), t, offset, nbytes)


def _parse(fd: int, size: int, path: str) -> dict[str, Any]:
    cur = Cursor(fd, size, path)
    if size < 24:
        raise FileFormatError(
            f"the file is {size} bytes, shorter than a GGUF header (24). Fix: "
            "this is not a GGUF file, or it is truncated.",
            path,
        )
    magic = cur.take(4, "the magic")
    if magic != MAGIC:
        raise FileFormatError(
            f"the file starts with {magic!r}, not b'GGUF'. Fix: this is not a "
            "GGUF file (or pass the right --format).",
            path,
        )
    raw_version = cur.take(4, "the version")
    version = struct.unpack("<I", raw_version)[0]
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        cur.order = ">"
        version = struct.unpack(">I", raw_version)[0]
    if version not in (2, 3):
        raise FileFormatError(
            f"GGUF version {version} is not supported (versions 2 and 3 are; version 1 used "
            "32-bit counts). Fix: re-convert the model with a current llama.cpp.",
            path,
        )
    n_tensors = cur.unpack("Q", "the tensor count")
    n_kv = cur.unpack("Q", "the metadata count")
    # every key/value takes at least 13 bytes, every tensor info at least 24
    cur.need(n_kv * 13 + n_tensors * 24, f"{n_kv} metadata entries and {n_tensors} tensors")
    if n_kv > MAX_KEYS or n_tensors > MAX_TENSORS:
        raise UnsafeContentError(
            f"the header declares {n_kv} metadata keys and {n_tensors} tensors; tensorbridge "
            f"reads at most {MAX_KEYS} keys and {MAX_TENSORS} tensors per file (each costs "
            "hundreds of bytes of memory for a few bytes of file; llama.cpp's models carry "
            "tens of keys and a few thousand tensors). Fix: the file is corrupt or hostile; a "
            "model this large is split into several GGUF files.",
            path,
        )
    metadata: dict[str, GGUFValue] = {}
    for i in range(n_kv):
        key = read_name(cur, f"metadata key #{i}")
        if key in metadata:
            raise UnsafeContentError(
                f"metadata key {key!r} appears more than once; other readers keep one of them "
                "silently. Fix: re-save the file with unique keys.",
                path,
            )
        metadata[key] = read_value(cur, read_value_type(cur, f"metadata {key!r:.80}"), key)
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        a = metadata["general.alignment"]
        if a.gguf_type != "UINT32" or not 0 < a.value <= MAX_ALIGNMENT or a.value & (a.value - 1):
            raise FileFormatError(
                f"general.alignment is {a.gguf_type} {a!s:.40}; it must be a UINT32 power of "
                f"two up to {MAX_ALIGNMENT}. Fix: the file is corrupt.",
                path,
            )
        alignment = a.value
    entries = [_tensor_entry(cur, i) for i in range(n_tensors)]
    check_unique([e.info.name for e in entries], path)
    data_start = cur.pos + (-cur.pos % alignment)
    data_len = max(0, size - data_start)
    spans = []
    for e in entries:
        if e.offset % alignment:
            raise FileFormatError(
                f"tensor {e.info.name!r} starts at offset {e.offset}, not a multiple of the "
                f"alignment {alignment}. Fix: the file is corrupt.",
                path,
            )
        if e.offset + e.nbytes > data_len:
            raise FileFormatError(
                f"tensor {e.info.name!r} ({e.type.name}, {e.nbytes} bytes at offset "
                f"{e.offset}) ends past the end of the file's data ({data_len} bytes). Fix: the "
                "file is truncated or corrupt; download it again.",
                path,
            )
        if e.nbytes:
            spans.append((e.offset, e.offset + e.nbytes, e.info.name))
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise UnsafeContentError(
                f"tensors {n0!r} and {n1!r} overlap in the file (bytes {b1}..{e0}); reading "
                "one region many times would make a small file expand. Fix: the file is "
                "corrupt or hostile; re-save it.",
                path,
            )
    return {
        "version": version,
        "order": cur.order,
        "metadata": metadata,
        "alignment": alignment,
        "entries": entries,
        "data_start": data_start,
    }


# --- the reader ----------------------------------------------------------------------------


class GGUFReader(Reader):
    """An open ``.gguf`` file whose header has been fully validated.

    ``read(name)`` gives float32 for quantised tensors (dequantised) and the stored
    dtype otherwise; ``read_raw(name)`` the stored bytes, shaped like gguf-py's
    ``ReaderTensor.data`` for quantised types; ``tensor_type(name)`` the stored type.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._scratch: Scratch | None = None
        fd, st = open_regular_stat(path)  # (one fstat: its size, and its stamp before reading)
        size = st.st_size
        # (a file changed while it was opened is read again)
        with opening(fd, st, path, lambda: os.close(fd)):
            parsed = _parse(fd, size, path)
        self._file = SharedDescriptor(fd, path)  # (closed by the last read under way)
        self._file_id = (st.st_dev, st.st_ino)
        self.stamp = file_stamp(st)
        self.version: int = parsed["version"]
        self.byteorder = "little" if parsed["order"] == "<" else "big"
        self.alignment: int = parsed["alignment"]
        self.metadata = parsed["metadata"]
        self._data_start = parsed["data_start"]
        self._entries: dict[str, _Entry] = {}
        for e in parsed["entries"]:
            span = RawSpan(path, self._data_start + e.offset, e.nbytes, self._file_id)
            e.info = GGUFTensorInfo(
                e.info.name, e.info.dtype, e.info.shape, ggml_type=e.type.name, source=span
            )
            self._entries[e.info.name] = e

    def keys(self) -> list[str]:
        return list(self._entries)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise self.missing(name) from None

    def info(self, name: str) -> GGUFTensorInfo:
        return self._entry(name).info

    def tensor_type(self, name: str) -> str:
        """The stored ggml type's name (``"Q4_K"``)."""
        return self._entry(name).type.name

    def _alloc(self, e: _Entry, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        try:
            return np.empty(shape, dtype=dtype)
        except (MemoryError, ValueError) as exc:  # ValueError: "array is too big"
            raise FileFormatError(
                f"tensor {e.info.name!r} ({e.info.dtype}{list(shape)}) does not fit in memory. "
                "Fix: use a machine with more memory, or read_raw() the blocks.",
                self.path,
            ) from exc

    def read_raw(self, name: str) -> np.ndarray:
        """The stored bytes as uint8, shaped ``(*shape[:-1], bytes per row)``."""
        e = self._entry(name)
        shape = e.info.shape
        row = (shape[-1] // e.type.block_size * e.type.type_size) if shape else e.type.type_size
        out = self._alloc(e, (*shape[:-1], row), np.uint8)
        if out.nbytes:
            with self._file.use() as fd:
                read_exact_into(fd, out.reshape(-1).data, self._data_start + e.offset, self.path)
        return out

    def read(self, name: str) -> np.ndarray:
        e = self._entry(name)
        return self._read_rows(e, 0, e.info.shape)

    def read_slice(self, name: str, index: int | slice) -> np.ndarray:
        """``tensor[index]`` for an int or a step-1 slice of the first axis: only those
        rows are read (and dequantised), e.g. a few rows of a token embedding."""
        e = self._entry(name)
        start, stop, single = first_axis_rows(e.info, index, self.path)
        rest = e.info.shape[1:]
        shape = rest if single else (stop - start, *rest)
        bs = e.type.block_size
        if not rest and bs > 1 and (start % bs or stop % bs):
            # a quantised vector: its "rows" are elements, so the range can start or end
            # inside a block; dequantise the whole blocks around it and cut it out
            b0, b1 = start // bs * bs, -(-stop // bs) * bs
            whole = self._read_rows(e, b0, (b1 - b0,))
            return whole[start - b0 : stop - b0].reshape(shape).copy()
        return self._read_rows(e, start * math.prod(rest), shape)

    def _read_rows(self, e: _Entry, first: int, shape: tuple[int, ...]) -> np.ndarray:
        """``shape`` elements of ``e`` from element ``first`` on (a whole number of rows, so
        whole blocks: a quantised row is a multiple of the block size)."""
        with self._file.use() as fd:
            return self._read_rows_from(fd, e, first, shape)

    def _read_rows_from(self, fd: int, e: _Entry, first: int, shape: tuple[int, ...]) -> np.ndarray:
        t = e.type
        start = self._data_start + e.offset + first // t.block_size * t.type_size
        if not t.quantized:
            out = self._alloc(e, shape, lookup(e.info.dtype).numpy)
            if out.nbytes:
                read_exact_into(fd, out.reshape(-1).view(np.uint8).data, start, self.path)
            if self.byteorder != sys.byteorder and e.info.dtype in _SWAPPED:
                out.byteswap(inplace=True)
            return out
        if not can_dequantize(t.name):
            raise ConversionError(
                f"{self.path}: tensor {e.info.name!r} is {t.name}, which has no known "
                "dequantisation (gguf-py has none either). Fix: read its blocks with "
                "reader.read_raw(name), or leave it out (--exclude)."
            )
        out = self._alloc(e, shape, np.float32)
        flat = out.reshape(-1)
        nblocks = flat.size // t.block_size
        per = max(1, _READ_CHUNK // t.type_size)  # blocks per read
        # the read buffer and the kernels' work arrays, reused for every piece and every
        # tensor (fresh ones each time cost page faults); a concurrent read makes its own
        with self._lock:
            scratch, self._scratch = self._scratch or Scratch(), None
        try:
            buf = scratch.get("read", (min(per, nblocks) * t.type_size,))
            for b0 in range(0, nblocks, per):
                k = min(per, nblocks - b0)
                piece = buf[: k * t.type_size]
                read_exact_into(fd, piece.data, start + b0 * t.type_size, self.path)
                dequantize_into(
                    piece.reshape(k, t.type_size),
                    t.name,
                    flat[b0 * t.block_size : (b0 + k) * t.block_size],
                    scratch,
                )
        finally:
            with self._lock:
                self._scratch = scratch
        return out

    def raw_span(self, name: str) -> RawSpan | None:
        """The bytes of an unquantised little-endian tensor; ``None`` otherwise."""
        e = self._entry(name)
        if (
            e.type.quantized
            or not e.nbytes
            or self._file.fd is None
            or (self.byteorder == "big" and e.info.dtype in _SWAPPED)
        ):
            return None
        return e.info.source

    def descriptor(self) -> int | None:
        return self._file.fd

    def close(self) -> None:
        with self._lock:
            self._scratch = None
        self._file.close()


# --- the writer ------------------------------------------------------------------------------


def _stored_type(info: TensorInfo, path: str) -> GGMLType:
    if isinstance(info, GGUFTensorInfo) and TYPES_BY_NAME[info.ggml_type].quantized:
        return TYPES_BY_NAME[info.ggml_type]
    t = PLAIN_DTYPES.get(info.dtype)
    if t is None:
        row = _dtype_row(info.dtype)
        if row is not None and row.kind == "float":  # float8 and the like: --dtype casts them
            how = "cast it first (--dtype float16, float32 or bfloat16)"
        else:  # --dtype leaves ints and bools alone, so it cannot help here
            how = (
                "leave it out (--exclude NAME), or cast it in Python before tb.save (e.g. "
                "arr.astype(np.int16) holds every uint8 and bool value; int32 every uint16)"
            )
        raise ConversionError(
            f"{path}: tensor {info.name!r} has dtype {info.dtype!r}, which GGUF cannot store "
            f"(it holds {', '.join(PLAIN_DTYPES)}). Fix: {how}, or save as .safetensors or .npz."
        )
    return t


def _dtype_row(dtype: str) -> Any:
    try:
        return lookup(dtype)
    except ConversionError:
        return None


#: Names gguf-py's GGUFReader gives the header's fields (a key/value of the same name breaks it).
_READER_HEADER_KEYS = frozenset({"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"})


class GGUFFormat(Format):
    """llama.cpp's GGUF: typed metadata, then tensors, plain or quantised in blocks."""

    name = "gguf"
    suffixes = (".gguf",)
    description = (
        "llama.cpp GGUF; reads every ggml type (quantised ones dequantised to "
        "float32), writes "
        + ", ".join(PLAIN_DTYPES)
        + " and quantises to "
        + ", ".join(q.lower() for q in QUANT_TYPES)
        + "."
    )
    options = ("quantize",)
    #: the --dtype values that mean "store quantised"
    quantizations = tuple(q.lower() for q in QUANT_TYPES)

    def open(self, path: str) -> GGUFReader:
        return GGUFReader(os.fspath(path))

    def check_info(self, info: TensorInfo, path: str) -> None:
        _stored_type(info, path)
        if len(info.name.encode("utf-8", "surrogateescape")) > MAX_NAME:
            raise ConversionError(
                f"{path}: tensor name {info.name!r:.80} is "
                f"{len(info.name.encode('utf-8', 'surrogateescape'))} bytes; GGUF readers take "
                f"at most {MAX_NAME} (llama.cpp: 63). Fix: rename the tensor."
            )
        if len(info.shape) > MAX_DIMS:
            raise ConversionError(
                f"{path}: tensor {info.name!r} has {len(info.shape)} dimensions; GGUF (ggml) "
                f"holds at most {MAX_DIMS}. Fix: reshape it, or save as .safetensors."
            )

    def check_write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        metadata: Mapping[str, str] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        meta = super().check_write(path, infos, metadata, options)
        for key in meta:
            if key in _READER_HEADER_KEYS:
                raise ConversionError(
                    f"{path}: metadata key {key!r} is the name gguf-py's GGUFReader gives a field "
                    "of the file header, so it could not read a file holding it too. Fix: "
                    "rename the key (the header's version and counts are written anyway)."
                )
        if options and options.get("quantize") is not None:
            _quant_type(options["quantize"])
        entries = metadata_entries(meta, path)
        if len(entries) > MAX_KEYS or len(infos) > MAX_TENSORS:
            raise ConversionError(
                f"{path}: {len(entries)} metadata keys and {len(infos)} tensors; a GGUF file "
                f"that tensorbridge reads back holds at most {MAX_KEYS} keys and {MAX_TENSORS} "
                "tensors. Fix: fewer keys (put a table in one array value), or save the "
                "tensors in several files."
            )
        alignment_of(entries, path)
        return meta

    def quantized_info(self, info: TensorInfo, type_name: str) -> TensorInfo:
        return quantized_info(info, type_name)

    def stored(self, info: TensorInfo, arr: np.ndarray) -> np.ndarray:
        """What reading back ``arr`` written as ``info`` gives: quantising loses precision."""
        if not isinstance(info, GGUFTensorInfo) or info.source is not None:
            return arr
        t = TYPES_BY_NAME[info.ggml_type]
        if not t.quantized:
            return arr
        blocks = quantize_array(arr, t.name).reshape(-1, t.type_size)
        out = np.empty(arr.shape, np.float32)
        dequantize_into(blocks, t.name, out)
        return out

    def stored_blocks(self, info: TensorInfo) -> RawSpan | None:
        """A GGUF source's quantised blocks, which :meth:`write` copies as they are."""
        if not isinstance(info, GGUFTensorInfo) or info.source is None:
            return None
        t = TYPES_BY_NAME[info.ggml_type]
        return info.source if t.quantized and info.source.nbytes == info.stored_nbytes else None

    def read_blocks(self, reader: Reader, name: str) -> np.ndarray:
        if not isinstance(reader, GGUFReader):
            raise ConversionError(f"{reader.path}: not a GGUF reader; it holds no blocks.")
        return reader.read_raw(name)

    def write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        fetch: Callable[[str], np.ndarray],
        metadata: Mapping[str, str] | None = None,
        *,
        quantize: str | None = None,
    ) -> None:
        """Write atomically, one fetched tensor at a time.

        A :class:`GGUFTensorInfo` of a quantised type is stored in blocks: copied from
        its ``source`` (a GGUF file's blocks) when it has one, else quantised from the
        fetched float values. ``fetch`` is called for every tensor, in order; for blocks
        copied from a source it may return that source's :class:`RawSpan`
        (:meth:`stored_blocks`) instead of the values, which are then never computed.
        ``quantize="q8_0"`` quantises every eligible float tensor
        (see :func:`quantized_info`).
        """
        path = os.fspath(path)
        if quantize is not None:
            infos = [quantized_info(i, quantize) for i in infos]
        meta = self.check_write(path, infos, metadata, None)
        entries = metadata_entries(meta, path)
        align = alignment_of(entries, path)
        types = [_stored_type(i, path) for i in infos]
        head = bytearray(MAGIC + struct.pack("<IQQ", 3, len(infos), len(entries)))
        for key, v in entries:
            head += pack_string(key) + struct.pack("<I", VALUE_TYPE_IDS[v.gguf_type])
            head += pack_value(v)
        offset = 0
        sizes = []
        for info, t in zip(infos, types, strict=True):
            nbytes = info.size // t.block_size * t.type_size
            if t.quantized and (not info.shape or info.shape[-1] % t.block_size):
                raise ConversionError(
                    f"{path}: tensor {info.name!r} of shape {list(info.shape)} "
                    f"cannot be {t.name}: its last axis is not a multiple of "
                    f"{t.block_size}. Fix: keep it unquantised."
                )
            head += pack_string(info.name) + struct.pack("<I", len(info.shape))
            head += b"".join(struct.pack("<Q", d) for d in reversed(info.shape))
            head += struct.pack("<IQ", t.id, offset)
            sizes.append(nbytes)
            offset += nbytes + (-nbytes % align)
        head += bytes(-len(head) % align)
        sources = SpanFiles()
        try:
            with atomic_write(path) as f:
                f.write(head)
                for info, t, nbytes in zip(infos, types, sizes, strict=True):
                    got = fetch(info.name)
                    src = info.source if isinstance(info, GGUFTensorInfo) else None
                    if t.quantized:
                        blocks = self.stored_blocks(info)
                        if isinstance(got, RawSpan) and got == blocks:
                            arr = None  # the blocks as they are: no values needed
                        else:
                            arr = check_fetched(
                                got, TensorInfo(info.name, _float_of(got), info.shape), path
                            )
                        if src is not None and src.nbytes == nbytes:
                            f.flush()
                            at = f.tell()
                            copy_span(sources.fd(src), src, f.fileno(), at)
                            f.seek(at + nbytes)
                        else:
                            assert arr is not None  # a span is only taken for its blocks
                            f.write(quantize_array(arr, t.name).reshape(-1).data)
                    else:
                        arr = check_fetched(
                            got, TensorInfo(info.name, info.dtype, info.shape), path
                        )
                        for piece in iter_le_bytes(arr):
                            f.write(piece)
                    del got
                    f.write(bytes(-nbytes % align))
        finally:
            sources.close()


FORMAT = GGUFFormat()
