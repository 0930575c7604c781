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
evaluated by our own pure functions. TorchScript archives and legacy (pre-1.6,
non-zip) pickles are refused.

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

import json
import os
import sys
import threading
import zipfile
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from ..dtypes import lookup
from ..errors import ConversionError, FileFormatError
from .atomic import atomic_write
from .base import Format, RawSpan, Reader, TensorInfo
from .pt_errors import wrapped
from .pt_flatten import MAX_DEPTH, flatten  # noqa: F401 (MAX_DEPTH: re-export)
from .pt_pickle import (  # noqa: F401 (MAX_*: re-exported, as before the split)
    MAX_BROADCAST_BYTES,
    MAX_NDIM,
    STORAGE_TYPES,
    TORCH_DTYPES,
    _Tensor,
    parse_pickle,
)
from .pt_pickle_write import state_dict_pickle
from .pt_zip import (
    ALIGNMENT,  # noqa: F401 (re-exported, as before the split)
    ARCHIVE,
    add_record,
    check_magic,
    check_unique_members,
    find_prefix,
    stored_data_offset,
    truncated,
)
from .safetensors import check_fetched, open_regular_file, read_exact_into

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
MAX_METADATA_BYTES = 64 << 20

_WRITABLE = frozenset(TORCH_DTYPES.values())


# --- the reader --------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    tensor: _Tensor
    member: zipfile.ZipInfo
    data_offset: int  # absolute file offset of the record's bytes (stored records)


class PtReader(Reader):
    """An open ``torch.save`` zip checkpoint whose pickle and records were validated."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._zip: zipfile.ZipFile | None = None
        self._zfile: object | None = None  # the zip's file object, on a dup of self._fd
        self._fd, size = open_regular_file(path)
        self._little = True
        try:
            st = os.fstat(self._fd)
            self._file_id = (st.st_dev, st.st_ino)
            head = bytearray(min(size, 8))
            read_exact_into(self._fd, memoryview(head), 0, path)
            check_magic(bytes(head), size, path)
            self._open(size)
        except BaseException:
            self.close()
            raise

    def _open(self, size: int) -> None:
        path = self.path
        assert self._fd is not None
        # read everything from the descriptor that was checked, never reopen ``path``:
        # it may have been replaced since (another file, or a FIFO that would hang)
        self._zfile = os.fdopen(os.dup(self._fd), "rb")
        with wrapped(path, "reading the zip directory"):
            self._zip = zipfile.ZipFile(self._zfile)  # type: ignore[arg-type]
            members = self._zip.infolist()
        names = [m.filename for m in members]
        check_unique_members(names, path)
        prefix = find_prefix(names, path)
        by_name = {m.filename: m for m in members}
        little = self._byteorder(by_name.get(prefix + "byteorder"))
        self._little = little
        self._swap = little != (sys.byteorder == "little")
        records = {n[len(prefix) + 5:]: m for n, m in by_name.items()
                   if n.startswith(prefix + "data/")}
        data = self._small_record(by_name[prefix + "data.pkl"], MAX_PICKLE_BYTES)
        tree = parse_pickle(data, {k: m.file_size for k, m in records.items()}, path)
        del data
        tensors, self.metadata = flatten(tree, path)
        extra = by_name.get(prefix + METADATA_RECORD)
        if extra is not None:
            self.metadata.update(self._metadata_record(extra))
        used = {t.storage.key for _, t in tensors}
        offsets = {k: self._data_offset(records[k], size) for k in used}
        self._entries = {
            name: _Entry(TensorInfo(name, t.dtype, t.shape), t, records[t.storage.key],
                         offsets[t.storage.key])
            for name, t in tensors
        }

    def _small_record(self, member: zipfile.ZipInfo, limit: int) -> bytes:
        if member.file_size > limit:
            raise FileFormatError(
                f"the entry {member.filename!r} is {member.file_size} bytes, over the {limit}-"
                "byte limit. Fix: this is not a normal checkpoint; re-save it.", self.path)
        with wrapped(self.path, f"reading {member.filename!r}"):
            assert self._zip is not None
            return self._zip.read(member)

    def _byteorder(self, member: zipfile.ZipInfo | None) -> bool:
        """True for little-endian storages."""
        if member is None:
            return True
        text = self._small_record(member, 16)
        if text not in (b"little", b"big"):
            raise FileFormatError(
                f"the byteorder record says {text!r}, not 'little' or 'big'. Fix: the "
                "checkpoint is corrupt; save it again.", self.path)
        return text == b"little"

    def _metadata_record(self, member: zipfile.ZipInfo) -> dict[str, str]:
        raw = self._small_record(member, MAX_METADATA_BYTES)
        with wrapped(self.path, f"parsing {member.filename!r}"):
            meta = json.loads(raw.decode("utf-8"))
        if not isinstance(meta, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise FileFormatError(
                f"{member.filename!r} is not a JSON object of strings. Fix: the checkpoint is "
                "corrupt; save it again.", self.path)
        return meta

    def _data_offset(self, member: zipfile.ZipInfo, size: int) -> int:
        assert self._fd is not None
        return stored_data_offset(self._fd, member, size, self.path)

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

    def _read_bytes(self, entry: _Entry, lo: int, hi: int) -> np.ndarray:
        buf = np.empty(hi - lo, dtype=np.uint8)
        if self._fd is None or self._zip is None:
            raise FileFormatError("the file is closed. Fix: open it again.", self.path)
        if entry.data_offset >= 0:
            read_exact_into(self._fd, memoryview(buf), entry.data_offset + lo, self.path)
            return buf
        with wrapped(self.path, f"decompressing {entry.member.filename!r}"):
            with self._zip.open(entry.member) as f:
                f.seek(lo)
                if f.readinto(memoryview(buf)) != hi - lo:
                    raise truncated(entry.member, self.path)
        return buf

    def read(self, name: str) -> np.ndarray:
        entry = self._entry(name)
        t = entry.tensor
        dtype = lookup(t.dtype).numpy
        itemsize = dtype.itemsize
        if entry.info.size == 0:
            return np.empty(t.shape, dtype=dtype)
        last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
        buf = self._read_bytes(entry, t.offset * itemsize, (last + 1) * itemsize).view(dtype)
        contiguous = buf.size == entry.info.size and all(
            s == int(np.prod(t.shape[i + 1:], dtype=np.int64)) for i, s in enumerate(t.stride)
            if t.shape[i] > 1)
        if contiguous:
            out = buf.reshape(t.shape)
        else:  # as_strided needs a builtin dtype: use raw units of the same width
            unit = np.dtype(f"u{itemsize}" if itemsize <= 8 else f"V{itemsize}")
            view = np.lib.stride_tricks.as_strided(
                buf.view(unit), t.shape, tuple(s * itemsize for s in t.stride), writeable=False)
            out = view.copy(order="C").view(dtype)
        if self._swap and itemsize > 1:
            unit = itemsize // 2 if lookup(t.dtype).kind == "complex" else itemsize
            out.view(f"u{unit}").byteswap(inplace=True)
        if t.dtype == "bool" and out.size and out.view(np.uint8).max() > 1:
            raise FileFormatError(
                f"tensor {name!r} is BOOL but holds bytes other than 0 and 1. Fix: the "
                "file is corrupt; re-save it.", self.path)
        return out

    def raw_span(self, name: str) -> RawSpan | None:
        """Where the tensor's bytes lie, when :meth:`read` would return them unchanged.

        That is: the record is stored (not compressed), the storage is little-endian,
        and the tensor is a C-contiguous run of its storage (any storage offset, e.g.
        one view of a shared storage). Transposed, strided, broadcast (stride 0) and
        empty tensors give ``None``, and so does BOOL, whose bytes :meth:`read` checks.
        """
        entry = self._entry(name)
        t = entry.tensor
        if (self._fd is None or entry.data_offset < 0 or not self._little
                or entry.info.size == 0 or entry.tensor.offset < 0 or t.dtype == "bool"):
            return None
        expected = 1
        for d, s in zip(reversed(t.shape), reversed(t.stride)):
            if d != 1 and s != expected:
                return None
            expected *= d
        itemsize = lookup(t.dtype).itemsize
        begin = t.offset * itemsize
        nbytes = entry.info.nbytes
        if begin + nbytes > entry.member.file_size:
            return None  # not inside its record: read() reports it
        return RawSpan(self.path, entry.data_offset + begin, nbytes, self._file_id)

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


# --- the writer --------------------------------------------------------------------

def _check_writable(info: TensorInfo, path: str) -> None:
    if info.dtype not in _WRITABLE:
        raise ConversionError(
            f"{path}: tensor {info.name!r} has dtype {info.dtype!r}, which PyTorch does not "
            "have. Fix: save as .npz or .h5, or convert it first (e.g. --dtype float32); "
            "PyTorch holds: " + ", ".join(sorted(_WRITABLE)) + ".")
    lookup(info.dtype)
    if any(type(d) is not int or d < 0 for d in info.shape):
        raise ConversionError(f"{path}: tensor {info.name!r} has shape {info.shape!r}. Fix: use "
                              "non-negative integer dimensions.")


def _native_bytes(arr: np.ndarray) -> memoryview:
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    arr = np.ascontiguousarray(arr)
    return memoryview(arr.reshape(-1).view(np.uint8))


class PtFormat(Format):
    """PyTorch ``torch.save`` zip checkpoints, without torch and without unpickling."""

    name = "pt"
    suffixes = (".pt", ".pth", ".bin")
    description = ("PyTorch checkpoint (torch.save zip); read with a safe pickle-opcode "
                   "interpreter, written as a flat state dict that torch.load(weights_only=True) "
                   "loads. Holds: " + ", ".join(sorted(_WRITABLE)) + ".")

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
        small = [("data.pkl", pickle_bytes), (".format_version", b"1"),
                 (".storage_alignment", str(ALIGNMENT).encode()),
                 ("byteorder", sys.byteorder.encode())]
        with atomic_write(path) as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
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
