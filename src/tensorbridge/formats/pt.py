"""PyTorch checkpoints (``.pt``, ``.pth``, ``.bin``), read and written without torch.

A checkpoint saved by ``torch.save`` (zip format, the default since torch 1.6) is a
zip archive whose entries all sit under one top-level folder (``archive/`` or the
file's stem)::

    NAME/data.pkl            a pickle of the saved object; tensors appear in it as
                             _rebuild_tensor_v2/_v3 calls on "persistent ids"
                             ("storage", <storage type>, KEY, LOCATION, NUMEL)
    NAME/data/KEY            the raw bytes of storage KEY (stored, 64-byte aligned)
    NAME/byteorder           "little" or "big" (absent: little)
    NAME/.format_version, NAME/.storage_alignment, NAME/version, NAME/.data/...

Reading never unpickles. ``data.pkl`` is walked opcode by opcode
(:func:`pickletools.genops`) by a small stack machine that knows only the opcodes
``torch.save`` writes for state dicts and only these globals: ``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2``/``_v3``/``_rebuild_parameter(_with_state)``, the
legacy ``torch.<X>Storage`` types, ``torch.storage.UntypedStorage``, ``torch.<dtype>``,
``torch.Size`` and ``_codecs.encode`` (how protocol 2 spells ``bytes``; it only
encodes a string). Every other global or opcode raises :class:`UnsafeContentError`
before anything is built, and no global is ever looked up or called: "calls" are
evaluated by our own pure functions. Pickle protocols 0-5 are read (their data
opcodes); TorchScript archives are refused. The legacy format
(``_use_new_zipfile_serialization=False``: five pickles then the raw storages) is read
by the same interpreter.

State that changes values is applied (the conjugate and negative bits) or refused
with the reason and a fix (sparse, quantized, nested and meta tensors, tensor
subclasses, dtypes such as ``complex32``); ``requires_grad`` and ``Parameter`` change
nothing and are dropped. Work is bounded: text records are capped and ratio-checked
before inflating, the pickle's evaluation and flattening are budgeted in proportion
to its size, compressed records inflate in bounded steps, and the bytes that reads
may materialise over distinct names are capped at :data:`MAX_AMPLIFICATION` times
the file size plus :data:`AMPLIFY_SLACK` (tied names and zero-stride views).

The parts live in their own modules: :mod:`.pt_pickle` (the opcode interpreter and
its allowed globals), :mod:`.pt_flatten` (saved object -> flat table),
:mod:`.pt_zip` (zip layout, aligned records), :mod:`.pt_pickle_write` (the pickle
the writer emits) and :mod:`.pt_errors` (raw errors -> :class:`FileFormatError`).
This module holds the reader and :data:`FORMAT`.

The saved object becomes a flat table. Nested dicts, lists and tuples are walked
and their keys joined with ``.`` (``{"model": {"w": t}, "layers": [t0]}`` gives
``model.w`` and ``layers.0``); a bare saved tensor is named ``tensor``. Plain leaves
that are not tensors (ints, floats, bools, None, strings, bytes) go to
``Reader.metadata`` under their joined path as ``repr`` text (a string as itself):
``{"epoch": 3}`` gives ``metadata == {"epoch": "3"}``. Attributes pickled on an
``OrderedDict`` (``state_dict()._metadata``, module versions) are dropped.

Writing produces what ``torch.save(flat_dict)`` produces: a flat ``{name: tensor}``
dict that ``torch.load(path, weights_only=True)`` (and ``mmap=True``) loads
bit-exactly, storages stored uncompressed and 64-byte aligned. ``metadata`` goes
into an extra zip entry ``archive/extra/tensorbridge_metadata.json`` that torch
ignores and this reader merges back into ``Reader.metadata``; nothing is lost and
``torch.load`` still returns only the tensors.

>>> import numpy as np, tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "m.pt")
>>> a = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> FORMAT.write(p, [TensorInfo("w", "float32", (2, 3))], lambda name: a, {"k": "v"})
>>> with FORMAT.open(p) as r:
...     (r.keys(), r.metadata, r.read("w").tobytes() == a.tobytes())
(['w'], {'k': 'v'}, True)
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..dtypes import lookup
from ..errors import ConversionError, FileFormatError
from .atomic import atomic_write
from .base import Format, RawSpan, Reader, TensorInfo, file_stamp, opening, writing_zip
from .pt_errors import wrapped
from .pt_flatten import MAX_DEPTH, flatten  # noqa: F401 (MAX_DEPTH: re-export)
from .pt_pickle import (  # noqa: F401 (MAX_*: re-exported, as before the split)
    MAX_BROADCAST_BYTES,
    MAX_NDIM,
    STORAGE_TYPES,
    TORCH_DTYPES,
    _Tensor,
    parse_pickle,
    run_pickle,
)
from .pt_pickle_write import state_dict_pickle
from .pt_zip import (
    ALIGNMENT,  # noqa: F401 (re-exported, as before the split)
    ARCHIVE,
    add_record,
    check_magic,
    check_record,
    check_unique_members,
    find_prefix,
    inflate_into,
    record_start,
    truncated,
)
from .safetensors import check_fetched, open_regular_stat, read_exact_into

__all__ = [
    "FORMAT",
    "PtFormat",
    "PtReader",
    "STORAGE_TYPES",
    "TORCH_DTYPES",
    "parse_pickle",
    "METADATA_RECORD",
]

#: ``data.pkl`` is parsed in memory; a state dict with a million tensors is ~200 MB.
MAX_PICKLE_BYTES = 1 << 30
#: The metadata record this module writes (relative to the archive folder).
METADATA_RECORD = "extra/tensorbridge_metadata.json"
MAX_METADATA_BYTES = 16 << 20
#: Compressed text records (data.pkl, the metadata JSON) may inflate to at most this
#: ratio of their compressed size, plus :data:`TEXT_RATIO_SLACK`.
MAX_TEXT_RATIO = 64
TEXT_RATIO_SLACK = 1 << 20
#: Reads may materialise, over distinct tensor names, at most this many times the file
#: size plus :data:`AMPLIFY_SLACK` (tied names, overlapping views and zero-stride views
#: make the bytes returned exceed the bytes stored).
MAX_AMPLIFICATION = 4
AMPLIFY_SLACK = MAX_BROADCAST_BYTES
#: torch's legacy (``_use_new_zipfile_serialization=False``) format: the first pickle.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_WRITABLE = frozenset(TORCH_DTYPES.values())
_SIGN = {2: np.uint16(0x8000), 4: np.uint32(0x8000_0000), 8: np.uint64(1 << 63)}


# --- the reader --------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """A storage's bytes: ``nbytes`` at file offset ``start``, or compressed ``member``."""

    key: str
    nbytes: int
    start: int
    member: zipfile.ZipInfo | None = None  # set when compressed


@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    tensor: _Tensor
    record: _Record


def _json_strings(raw: bytes, what: str, path: str) -> dict[str, str]:
    """Parse a JSON object of strings in one linear pass that builds only the strings
    (``json.loads`` would build any nesting the record holds before we could check it)."""
    with wrapped(path, f"parsing {what}"):
        text = raw.decode("utf-8")
    ws = " \t\n\r"
    out: dict[str, str] = {}

    def bad() -> FileFormatError:
        return FileFormatError(
            f"{what} is not a JSON object of strings. Fix: the checkpoint is corrupt; "
            "save it again.",
            path,
        )

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def string(i: int) -> tuple[str, int]:
        if i >= len(text) or text[i] != '"':
            raise bad()
        try:
            return json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        except ValueError as exc:
            raise bad() from exc

    i = skip(0)
    if i >= len(text) or text[i] != "{":
        raise bad()
    i = skip(i + 1)
    if i < len(text) and text[i] == "}":
        i += 1
    else:
        while True:
            key, i = string(skip(i))
            i = skip(i)
            if i >= len(text) or text[i] != ":":
                raise bad()
            value, i = string(skip(i + 1))
            out[key] = value
            i = skip(i)
            if i < len(text) and text[i] == ",":
                i += 1
                continue
            if i < len(text) and text[i] == "}":
                i += 1
                break
            raise bad()
    if skip(i) != len(text):
        raise bad()
    return out


class PtReader(Reader):
    """An open ``torch.save`` checkpoint (zip or legacy) whose pickle and records were
    validated. Reads and :meth:`close` hold one lock, so a read never races a close."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._zip: zipfile.ZipFile | None = None
        self._zfile: object | None = None  # a file object on a dup of self._fd
        self._fd, st = open_regular_stat(path)  # (one fstat: its size and its stamp)
        size = st.st_size
        self._little = True
        self._swap = False
        self._size = size
        self._allowance = MAX_AMPLIFICATION * size + AMPLIFY_SLACK
        self._charged: set[str] = set()
        # (a file changed while it was opened is read again)
        with opening(self._fd, st, path, self.close):
            self._file_id = (st.st_dev, st.st_ino)
            self.stamp = file_stamp(st)
            head = bytearray(min(size, 8))
            read_exact_into(self._fd, memoryview(head), 0, path)
            if check_magic(bytes(head), size, path):
                self._open_legacy(size)
            else:
                self._open(size)

    def _set_byteorder(self, little: bool) -> None:
        self._little = little
        self._swap = little != (sys.byteorder == "little")

    def _index(self, tensors: list[tuple[str, _Tensor]], records: Mapping[str, _Record]) -> None:
        self._entries = {
            name: _Entry(TensorInfo(name, t.dtype, t.shape), t, records[t.storage.key])
            for name, t in tensors
        }

    # -- the zip format ------------------------------------------------------------------
    def _open(self, size: int) -> None:
        path = self.path
        assert self._fd is not None
        # read everything from the descriptor that was checked, never reopen ``path``:
        # it may have been replaced since (another file, or a FIFO that would hang)
        self._zfile = os.fdopen(os.dup(self._fd), "rb")
        with wrapped(path, "reading the zip directory"):
            self._zip = zipfile.ZipFile(self._zfile)
            members = self._zip.infolist()
        names = [m.filename for m in members]
        check_unique_members(names, path)
        prefix = find_prefix(names, path)
        by_name = {m.filename: m for m in members}
        for m in members:
            check_record(m, path)
        self._set_byteorder(self._byteorder(by_name.get(prefix + "byteorder")))
        members_of = {
            n[len(prefix) + 5 :]: m for n, m in by_name.items() if n.startswith(prefix + "data/")
        }
        data = self._text_record(by_name[prefix + "data.pkl"], MAX_PICKLE_BYTES)
        tree, ops, _ = run_pickle(
            io.BytesIO(data), len(data), {k: m.file_size for k, m in members_of.items()}, path
        )
        tensors, self.metadata = flatten(tree, path, ops, len(data))
        del data, tree
        extra = by_name.get(prefix + METADATA_RECORD)
        if extra is not None:
            raw = self._text_record(extra, MAX_METADATA_BYTES)
            self.metadata.update(_json_strings(raw, repr(extra.filename), path))
        records = {}
        for key in {t.storage.key for _, t in tensors}:
            m = members_of[key]
            start = record_start(self._fd, m, size, path)
            stored = m.compress_type == zipfile.ZIP_STORED
            if stored and m.compress_size != m.file_size:
                raise truncated(m, path)
            records[key] = _Record(key, m.file_size, start, None if stored else m)
        self._index(tensors, records)

    def _record_bytes(self, member: zipfile.ZipInfo) -> bytes:
        """All of a (small, checked) member's bytes."""
        assert self._fd is not None
        start = record_start(self._fd, member, self._size, self.path)
        buf = bytearray(member.file_size)
        with wrapped(self.path, f"reading {member.filename!r}"):
            if member.compress_type == zipfile.ZIP_STORED:
                if member.compress_size != member.file_size:
                    raise truncated(member, self.path)
                read_exact_into(self._fd, memoryview(buf), start, self.path)
            else:
                inflate_into(self._fd, start, member, 0, memoryview(buf), self.path)
        return bytes(buf)

    def _text_record(self, member: zipfile.ZipInfo, limit: int) -> bytes:
        """A text record (pickle, JSON, byteorder), checked for size and ratio first."""
        if member.file_size > limit:
            raise FileFormatError(
                f"the entry {member.filename!r} is {member.file_size} bytes, over the {limit}-"
                "byte limit. Fix: this is not a normal checkpoint; re-save it.",
                self.path,
            )
        if (
            member.compress_type != zipfile.ZIP_STORED
            and member.file_size > MAX_TEXT_RATIO * member.compress_size + TEXT_RATIO_SLACK
        ):
            raise FileFormatError(
                f"the entry {member.filename!r} inflates {member.compress_size} compressed "
                f"bytes to {member.file_size}, more than {MAX_TEXT_RATIO}:1 (a decompression "
                "bomb, or a corrupt zip). Fix: save the checkpoint again with torch.save.",
                self.path,
            )
        return self._record_bytes(member)

    def _byteorder(self, member: zipfile.ZipInfo | None) -> bool:
        """True for little-endian storages."""
        if member is None:
            return True
        text = self._text_record(member, 16)
        if text not in (b"little", b"big"):
            raise FileFormatError(
                f"the byteorder record says {text!r}, not 'little' or 'big'. Fix: the "
                "checkpoint is corrupt; save it again.",
                self.path,
            )
        return text == b"little"

    # -- the legacy format ---------------------------------------------------------------
    def _open_legacy(self, size: int) -> None:
        """torch.save(..., _use_new_zipfile_serialization=False): pickles of the magic
        number, the protocol version, sys_info, the object and the storage keys, then
        each storage as an 8-byte element count and its bytes."""
        path = self.path
        assert self._fd is not None
        f = os.fdopen(os.dup(self._fd), "rb")
        self._zfile = f

        def next_pickle(sizes: Mapping[str, int] | None = None) -> tuple[Any, int, Any, int]:
            begin = f.tell()
            obj, ops, storages = run_pickle(f, size - begin, sizes, path)
            return obj, ops, storages, f.tell() - begin

        def bad(what: str) -> FileFormatError:
            return FileFormatError(
                f"this legacy (non-zip) PyTorch checkpoint has {what}. Fix: the file is corrupt "
                "or not a checkpoint; save it again with torch.save (zip format).",
                path,
            )

        if next_pickle()[0] != LEGACY_MAGIC:
            raise bad("no torch magic number")
        if next_pickle()[0] != LEGACY_PROTOCOL:
            raise bad("an unknown protocol version")
        info = next_pickle()[0]
        if not isinstance(info, dict) or type(info.get("little_endian")) is not bool:
            raise bad("a malformed sys_info record")
        self._set_byteorder(info["little_endian"])
        tree, ops, storages, nbytes = next_pickle()
        tensors, self.metadata = flatten(tree, path, ops, nbytes)
        del tree
        keys = next_pickle()[0]
        if (
            not isinstance(keys, list)
            or not all(isinstance(k, str) for k in keys)
            or len(set(keys)) != len(keys)
            or set(keys) != set(storages)
        ):
            raise bad("a storage key list that does not match its storages")
        pos = f.tell()
        records = {}
        for key in keys:
            storage = storages[key]
            if storage.dtype is None:
                raise bad(f"an untyped storage {key!r}, which torch.load cannot read either")
            head = bytearray(8)
            if pos + 8 > size:
                raise bad(f"storage {key!r} cut off by the end of the file")
            read_exact_into(self._fd, memoryview(head), pos, path)
            count = int.from_bytes(head, "little" if self._little else "big")
            if (
                count * lookup(storage.dtype).itemsize != storage.nbytes
                or pos + 8 + storage.nbytes > size
            ):
                raise bad(f"storage {key!r} of a size other than the pickle declares, or cut off")
            records[key] = _Record(key, storage.nbytes, pos + 8)
            pos += 8 + storage.nbytes
        if pos != size:
            raise bad(f"{size - pos} bytes after its last storage")
        self._index(tensors, records)

    # -- Reader API ----------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        return self._entry(name).info

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise self.missing(name) from None

    def _charge(self, entry: _Entry, work: int) -> None:
        """Count a name's bytes once against the file's amplification allowance."""
        name = entry.info.name
        if name in self._charged:
            return
        if work > self._allowance:
            raise FileFormatError(
                f"reading {name!r} would bring the bytes read from this {self._size}-byte "
                f"file to more than {MAX_AMPLIFICATION}x its size + {AMPLIFY_SLACK} bytes: "
                "many names view the same storage, or views repeat it (zero strides). This is "
                "how a small file makes a reader allocate gigabytes. Fix: save each tensor "
                "once (t.clone() for views), or read only the names you need.",
                self.path,
            )
        self._allowance -= work
        self._charged.add(name)

    def _read_bytes(self, entry: _Entry, lo: int, hi: int) -> np.ndarray:
        buf = np.empty(hi - lo, dtype=np.uint8)
        record = entry.record
        with self._lock:
            if self._fd is None:
                raise FileFormatError("the file is closed. Fix: open it again.", self.path)
            if record.member is None:
                read_exact_into(self._fd, buf.data, record.start + lo, self.path)
                return buf
            with wrapped(self.path, f"decompressing {record.member.filename!r}"):
                inflate_into(self._fd, record.start, record.member, lo, buf.data, self.path)
        return buf

    def read(self, name: str) -> np.ndarray:
        entry = self._entry(name)
        t = entry.tensor
        dtype = lookup(t.dtype).numpy
        itemsize = dtype.itemsize
        if entry.info.size == 0:
            return np.empty(t.shape, dtype=dtype)
        last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride, strict=True))
        lo, hi = t.offset * itemsize, (last + 1) * itemsize
        # a compressed record is inflated from its start up to hi: that is the work
        self._charge(entry, entry.info.nbytes + (hi if entry.record.member is not None else 0))
        buf = self._read_bytes(entry, lo, hi).view(dtype)
        contiguous = buf.size == entry.info.size and all(
            s == int(np.prod(t.shape[i + 1 :], dtype=np.int64))
            for i, s in enumerate(t.stride)
            if t.shape[i] > 1
        )
        if contiguous:
            out = buf.reshape(t.shape)
        else:  # as_strided needs a builtin dtype: use raw units of the same width
            unit = np.dtype(f"u{itemsize}" if itemsize <= 8 else f"V{itemsize}")
            view = np.lib.stride_tricks.as_strided(
                buf.view(unit), t.shape, tuple(s * itemsize for s in t.stride), writeable=False
            )
            out = view.copy(order="C").view(dtype)
        kind = lookup(t.dtype).kind
        if self._swap and itemsize > 1:
            word = itemsize // 2 if kind == "complex" else itemsize
            out.view(f"u{word}").byteswap(inplace=True)
        if t.neg or t.conj:
            _apply_math_bits(out, t, kind)
        if t.dtype == "bool" and out.size and out.view(np.uint8).max() > 1:
            raise FileFormatError(
                f"tensor {name!r} is BOOL but holds bytes other than 0 and 1. Fix: the "
                "file is corrupt; re-save it.",
                self.path,
            )
        return out

    def raw_span(self, name: str) -> RawSpan | None:
        """Where the tensor's bytes lie, when :meth:`read` would return them unchanged.

        That is: the record is stored (not compressed), the storage is little-endian,
        the tensor has no negative or conjugate bit, and it is a C-contiguous run of its
        storage (any storage offset, e.g. one view of a shared storage). Transposed,
        strided, broadcast (stride 0) and empty tensors give ``None``, and so does BOOL,
        whose bytes :meth:`read` checks.
        """
        entry = self._entry(name)
        t = entry.tensor
        if (
            self._fd is None
            or entry.record.member is not None
            or not self._little
            or entry.info.size == 0
            or t.dtype == "bool"
            or t.neg
            or t.conj
        ):
            return None
        expected = 1
        for d, s in zip(reversed(t.shape), reversed(t.stride), strict=True):
            if d != 1 and s != expected:
                return None
            expected *= d
        itemsize = lookup(t.dtype).itemsize
        begin = t.offset * itemsize
        nbytes = entry.info.nbytes
        if begin + nbytes > entry.record.nbytes:
            return None  # not inside its record: read() reports it
        self._charge(entry, nbytes)
        return RawSpan(self.path, entry.record.start + begin, nbytes, self._file_id)

    def descriptor(self) -> int | None:
        return self._fd

    def close(self) -> None:
        with self._lock:
            if self._zip is not None:
                self._zip.close()
                self._zip = None
            if self._zfile is not None:
                self._zfile.close()  # type: ignore[attr-defined]
                self._zfile = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _apply_math_bits(out: np.ndarray, t: _Tensor, kind: str) -> None:
    """Resolve torch's lazy negation/conjugation in place: floats (and both parts of
    complex numbers) flip their sign bit (IEEE negate), integers negate with wrap-around,
    and conjugation flips the sign bit of imaginary parts. That is what torch computes
    for every number; for NaNs, torch's own ``resolve_neg`` sometimes quiets them or
    returns its canonical NaN (depending on dtype and vectorisation), tensorbridge
    keeps the payload."""
    itemsize = out.dtype.itemsize
    if kind == "complex":
        parts = out.reshape(-1).view(f"u{itemsize // 2}").reshape(-1, 2)
        sign = _SIGN[itemsize // 2]
        if t.neg:
            parts ^= sign
        if t.conj:
            parts[:, 1] ^= sign
    elif kind == "float":
        bits = out.view(f"u{itemsize}")
        bits ^= _SIGN[itemsize]
    else:  # int8..int64 and uint8 (_math_bits refuses the rest)
        raw = out.view(f"{'i' if kind == 'int' else 'u'}{itemsize}")
        np.negative(raw, out=raw)


# --- the writer --------------------------------------------------------------------


def _check_writable(info: TensorInfo, path: str) -> None:
    if info.dtype not in _WRITABLE:
        raise ConversionError(
            f"{path}: tensor {info.name!r} has dtype {info.dtype!r}, which PyTorch does not "
            "have. Fix: save as .npz or .h5, or convert it first (e.g. --dtype float32); "
            "PyTorch holds: " + ", ".join(sorted(_WRITABLE)) + "."
        )
    lookup(info.dtype)
    if any(type(d) is not int or d < 0 for d in info.shape):
        raise ConversionError(
            f"{path}: tensor {info.name!r} has shape {info.shape!r}. Fix: use "
            "non-negative integer dimensions."
        )


def _native_bytes(arr: np.ndarray) -> memoryview:
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    arr = np.ascontiguousarray(arr)
    return arr.reshape(-1).view(np.uint8).data


class PtFormat(Format):
    """PyTorch ``torch.save`` zip checkpoints, without torch and without unpickling."""

    name = "pt"
    suffixes = (".pt", ".pth", ".bin")
    description = (
        "PyTorch checkpoint (torch.save zip); read with a safe pickle-opcode "
        "interpreter, written as a flat state dict that torch.load(weights_only=True) "
        "loads. Holds: " + ", ".join(sorted(_WRITABLE)) + "."
    )

    def check_info(self, info: TensorInfo, path: str) -> None:
        _check_writable(info, path)

    def open(self, path: str) -> PtReader:
        return PtReader(os.fspath(path))

    def write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        fetch: Callable[[str], np.ndarray],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Stream ``infos`` into a torch zip checkpoint at ``path``, atomically."""
        path = os.fspath(path)
        infos = list(infos)
        meta = self.check_write(path, infos, metadata)
        pickle_bytes = state_dict_pickle(infos)
        small = [
            ("data.pkl", pickle_bytes),
            (".format_version", b"1"),
            (".storage_alignment", str(ALIGNMENT).encode()),
            ("byteorder", sys.byteorder.encode()),
        ]
        with atomic_write(path) as f:
            with writing_zip(f, zipfile.ZIP_STORED) as zf:
                for name, raw in small:
                    add_record(zf, f, f"{ARCHIVE}/{name}", [raw], len(raw))
                for i, info in enumerate(infos):
                    arr = check_fetched(fetch(info.name), info, path)
                    data = _native_bytes(arr)
                    add_record(zf, f, f"{ARCHIVE}/data/{i}", [data], len(data))
                    del arr, data
                add_record(zf, f, f"{ARCHIVE}/version", [b"3\n"], 2)
                if meta:
                    raw = json.dumps(meta, sort_keys=True).encode("utf-8")
                    add_record(zf, f, f"{ARCHIVE}/{METADATA_RECORD}", [raw], len(raw))


FORMAT = PtFormat()
