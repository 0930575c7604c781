"""The HDF5 format (``.h5``, ``.hdf5``), through h5py, imported only when used.

Names. A dataset's tensor name is its HDF5 path without the leading ``/``,
with every ``/`` replaced by ``.``: ``/encoder/layer0/weight`` is read as
``encoder.layer0.weight``. The writer stores every tensor as one dataset at the
root, named with the full tensor name (``/encoder.layer0.weight``), so names
round-trip exactly. Names containing ``/`` are refused on write (they would
become groups, and read back with ``.``). If two datasets map to the same name
(``/a.b`` and ``/a/b``), reading refuses the file.

Dtypes. HDF5 has no bfloat16 or float8. tensorbridge stores them as the
unsigned integer of the same width (``uint16`` for bfloat16, ``uint8`` for the
float8s) holding the raw bits, with the dataset attribute
``tensorbridge_dtype = "bfloat16"`` (the canonical dtype name). Reading
restores the dtype with a bit-exact ``.view``. Every other dtype is stored
natively (bool as h5py's enum, complex as h5py's ``{r, i}`` compound).

Metadata. The root group's string attributes (variable- or fixed-length, one
string each) are the file's metadata; other root attributes are ignored on
read. The writer stores metadata as variable-length string attributes on the
root, and the dtype marker as a fixed-length one.

What is not read. Every link is visited once and every object is read once, under
the first name found: further hard links to it, soft links, external links,
virtual datasets, external storage, named datatypes, datasets of strings,
objects, references or records, null dataspaces, datasets never or partly
written (their unwritten part would read as the fill value), and chunks over
``MAX_CHUNK_BYTES`` bigger than their tensor are listed in
``reader.skipped`` (name -> why) and never read, so reading a file never reads
another file. A file where nothing is readable is refused with those reasons.

Bounds. A compressed dataset that claims over ``MAX_EXPANSION`` times its stored
bytes is refused (a decompression bomb). Data past the end of the file is refused
at open, and a file that shrinks while open is an error at read, not zeros.
Variable-length strings live in "global heap" collections, on which libhdf5 can
loop forever (no signal stops it); they are read through a file object that checks
each collection before libhdf5 parses it (:func:`heap_problem`).

Writing. h5py needs a real, readable file, so the writer creates the file as a
temporary sibling of the destination (named like :mod:`.atomic`'s temporaries,
so leftovers of a killed writer are cleaned up the same way), fsyncs it, and
``os.replace``\\ s it over the destination: the same guarantees as
:func:`.atomic.atomic_write`. As there, the written datasets are handed to the
kernel's writeback as they go (:func:`.atomic.start_writeback`), so the final
``fsync`` waits only for the tail.

>>> import numpy as np, tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "m.h5")
>>> a = np.arange(3, dtype=np.float32)
>>> FORMAT.write(p, [TensorInfo("enc.w", "float32", (3,))], lambda name: a, {"k": "v"})
>>> with FORMAT.open(p) as r:
...     (r.keys(), r.metadata, r.read("enc.w").tobytes() == a.tobytes())
(['enc.w'], {'k': 'v'}, True)
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..dtypes import DTYPES, canonical_name, lookup
from ..errors import (
    ConversionError,
    FileFormatError,
    FrameworkNotInstalledError,
    TensorBridgeError,
    UnsafeContentError,
)
from .atomic import WRITEBACK_CHUNK, atomic_path, start_writeback
from .base import Format, Reader, TensorInfo, check_metadata, first_axis_rows
from .names import check_unique
from .safetensors import check_fetched, open_regular_file

__all__ = ["FORMAT", "H5Format", "H5Reader", "DTYPE_ATTR", "atomic_path", "metadata_problem"]

#: Dataset attribute naming the canonical dtype of raw-bits datasets (bfloat16, float8).
DTYPE_ATTR = "tensorbridge_dtype"
_DTYPE_ATTR_B = DTYPE_ATTR.encode()

#: gzip expands at most ~1032x; a compressed dataset that claims more is refused.
MAX_EXPANSION = 1100

#: Canonical dtypes HDF5 cannot hold natively: the ml_dtypes ones (NumPy user-defined types).
_RAW_BITS = {d.name for d in DTYPES.values() if d.numpy.isbuiltin == 2}


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:
        raise FrameworkNotInstalledError(
            "Cannot handle .h5 files: h5py is not installed. Fix: pip install "
            "'tensorbridge[h5]' (or pip install h5py)."
        ) from exc
    return h5py


@contextlib.contextmanager
def _h5_errors(path: str, doing: str) -> Iterator[None]:
    """Turn whatever h5py raises (OSError, KeyError, RuntimeError...) into FileFormatError."""
    try:
        yield
    except TensorBridgeError:
        raise
    except Exception as exc:  # h5py raises many unrelated types
        raise FileFormatError(
            f"{doing} failed ({type(exc).__name__}: {exc}). Fix: check that this is an "
            "HDF5 file and that it is not corrupt or truncated.",
            path,
        ) from exc


# --- the global heap guard ------------------------------------------------------------


class _HeapGuard:
    """A read-only file for h5py's ``fileobj`` driver that checks every global heap
    collection (the ``GCOL`` blocks holding variable-length strings) before libhdf5
    parses it.

    libhdf5 loops forever, holding the GIL, on a collection whose free-space object has
    size 0 (a 10 KB file with 2 bytes changed hangs any h5py program that reads a string
    attribute), and no signal can stop it. This driver has no metadata accumulator, so
    libhdf5 reads each collection from its own address, and the check sees it first.
    Only attribute values are read through it (no tensor data). A short read (the file
    shrank) is an error, not zeros.
    """

    def __init__(self, fd: int, size: int, length_size: int, path: str) -> None:
        self._fd, self._size, self._length, self._path = fd, size, length_size, path
        self._pos = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = (
            offset if whence == 0 else (self._pos + offset if whence == 1 else self._size + offset)
        )
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:  # h5py wants it to exist; libhdf5 uses readinto
        data = os.pread(self._fd, self._size - self._pos if n < 0 else n, self._pos)
        self._pos += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")  # h5py passes a Cython memoryview
        at, want = self._pos, len(view)
        got = os.preadv(self._fd, [view], at)
        problem = None
        if got < want:
            problem = (
                f"the file ended at byte {at + got} while libhdf5 read {want} bytes at "
                f"{at} (it is truncated, or shrank while open)"
            )
        elif view[:4] == _HEAP_MAGIC:
            problem = heap_problem(
                bytes(view[: min(want, self._size - at)]), self._length, self._size - at
            )
            size = int.from_bytes(view[8 : 8 + self._length], "little") if want >= 16 else 0
            if problem is None and size > want:
                # libhdf5 read the first 4096 bytes and will read the rest on its own, never
                # starting at the magic again: check the whole collection now
                problem = heap_problem(os.pread(self._fd, size, at), self._length, self._size - at)
        view.release()
        if problem is not None:
            del buf  # never keep libhdf5's buffer alive in a traceback
            raise FileFormatError(
                f"the global heap collection at byte {at} (where HDF5 keeps variable-length "
                f"strings) is corrupt: {problem}. It was not parsed: libhdf5 can loop forever "
                "on such a heap. Fix: the file is corrupt or hostile; re-create it.",
                self._path,
            )
        self._pos = at + got
        return got

    def flush(self) -> None:
        pass


_HEAP_MAGIC = b"GCOL"


def heap_problem(block: bytes, length_size: int, room: int) -> str | None:
    """Why ``block`` (bytes read at a global heap collection's address) must not reach
    libhdf5's parser, or ``None``. ``room`` is how many bytes the file has from there.

    The layout (HDF5 spec, "Global Heap"): ``GCOL``, version 1, 3 reserved bytes, the
    collection size; then objects of ``index (2) refs (2) reserved (4) size (L)`` and
    their data padded to 8 bytes; index 0 is the free space, whose size includes its
    header. A block shorter than the collection declares is only checked up to its header
    (the caller then reads and checks the whole collection).

    >>> heap_problem(b"GCOL\\x01\\0\\0\\0" + (32).to_bytes(8, "little") + bytes(16), 8, 32)
    'its object at offset 16 has index 0 (free space) but size 0, which never ends'
    """
    head = 8 + length_size
    obj_head = 8 + length_size
    if len(block) < head:
        return f"it is {len(block)} bytes, shorter than its header"
    if block[4] != 1:
        return f"version {block[4]}, not 1"
    size = int.from_bytes(block[8:head], "little")
    if size < head or size > room:
        return f"it declares {size} bytes, but {room} bytes are left in the file"
    if size > len(block):
        return None  # a first, speculative read: the caller checks the whole collection
    p = head
    while p < size:
        if p + obj_head > size:
            break  # a tail too small for an object header is free space
        index = int.from_bytes(block[p : p + 2], "little")
        length = int.from_bytes(block[p + 8 : p + obj_head], "little")
        need = obj_head + (-(-length // 8) * 8) if index else length
        if index == 0 and length == 0:
            return f"its object at offset {p} has index 0 (free space) but size 0, which never ends"
        if need < obj_head or p + need > size:
            return (
                f"its object at offset {p} (index {index}) declares {length} bytes, which "
                f"do not fit in the {size}-byte collection"
            )
        p += need
    return None


# --- reading ------------------------------------------------------------------------


class _Skip(Exception):
    """A dataset or link that is not read; its message is the reason. ``unsafe``: reading
    it would read another file."""

    def __init__(self, why: str, unsafe: bool = False) -> None:
        super().__init__(why)
        self.unsafe = unsafe


#: A chunk (decompressed) may exceed its dataset's size only up to this many bytes: libhdf5
#: allocates and decompresses whole chunks, so a 4-byte dataset with a 1 GiB chunk would
#: cost 1 GiB to read.
MAX_CHUNK_BYTES = 64 << 20
#: Datasets kept open after ``open`` (more are reopened by name at each read).
_KEEP_OPEN = 1024  # each costs libhdf5 about 20 KB
#: HDF5's own limit on dataset rank (H5S_MAX_RANK).
MAX_RANK = 32


_MEMORY_TYPES: dict[np.dtype, Any] = {}


def _memory_type(dtype: np.dtype) -> Any:
    """h5py's memory type for ``dtype``, made once (making it costs more than a small read)."""
    tid = _MEMORY_TYPES.get(dtype)
    if tid is None:
        from h5py import h5t

        tid = _MEMORY_TYPES[dtype] = h5t.py_create(dtype)
    return tid


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _decode(raw: Any) -> str | None:
    if isinstance(raw, np.ndarray):
        if raw.size != 1:
            return None
        raw = raw.reshape(()).item()
    if isinstance(raw, (bytes, np.bytes_)):
        try:
            return bytes(raw).rstrip(b"\x00").decode("utf-8")
        except UnicodeDecodeError:
            return None
    return raw if isinstance(raw, str) else None


_DEFLATE, _SHUFFLE, _FLETCHER32 = 1, 2, 3


def fletcher32(data: bytes) -> int:
    """HDF5's Fletcher-32 checksum (``H5_checksum_fletcher32``): sums of big-endian 16-bit
    words modulo 65535, where a non-zero multiple of 65535 is 65535.

    >>> hex(fletcher32(b"abcde"))
    '0x4ff029c7'
    """
    n_words = (len(data) + 1) // 2
    if not any(data):
        return 0
    words = np.frombuffer(data[: len(data) // 2 * 2], ">u2")
    s1 = s2 = 0
    for start in range(0, len(words), 1 << 20):  # bounded temporaries
        block = words[start : start + (1 << 20)].astype(np.uint64)
        weights = (n_words - np.arange(start, start + len(block), dtype=np.uint64)) % 65535
        s1 += int(block.sum())
        s2 += int((block * weights).sum())
    if len(data) % 2:
        s1 += data[-1] << 8
        s2 += data[-1] << 8
    s1 = 0 if s1 == 0 else (s1 - 1) % 65535 + 1
    s2 = 0 if s2 == 0 else (s2 - 1) % 65535 + 1
    return (s2 << 16) | s1


class _Chunks:
    """Decoding of a chunked dataset whose filters are deflate, shuffle and fletcher32 (what
    h5py writes), here instead of in libhdf5: libhdf5 inflates a chunk for as long as its
    stream goes (a 260 KB file holding a 4 KiB dataset made it allocate 256 MiB); here each
    chunk inflates to at most its own size."""

    def __init__(self, chunk: tuple[int, ...], chunk_bytes: int, filters: list, dtype: np.dtype):
        self.chunk, self.chunk_bytes, self.filters, self.dtype = chunk, chunk_bytes, filters, dtype

    @classmethod
    def plan(cls, dsid: Any, dcpl: Any, chunk: tuple[int, ...], chunk_bytes: int) -> _Chunks | None:
        from h5py import h5t

        filters = [dcpl.get_filter(i)[:3] for i in range(dcpl.get_nfilters())]
        codes = [f[0] for f in filters]
        if (
            not set(codes) <= {_DEFLATE, _SHUFFLE, _FLETCHER32}
            or codes.count(_DEFLATE) > 1
            or not hasattr(dsid, "chunk_iter")
        ):
            return None  # others (lzf, szip, plugins) are left to libhdf5
        dt = dsid.dtype
        if not dsid.get_type().equal(h5t.py_create(dt, logical=True)):
            return None  # an unusual file type (bit offsets, odd floats): libhdf5 converts
        return cls(tuple(chunk), chunk_bytes, filters, dt)

    def _decode(self, data: bytes, mask: int, name: str, path: str) -> bytes:
        sizes: list[int | None] = [
            self.chunk_bytes
        ]  # each stage's input size on the way in (None: unknown)
        for code, _flags, _values in self.filters:
            last = sizes[-1]
            sizes.append(
                None
                if code == _DEFLATE or last is None
                else last + 4
                if code == _FLETCHER32
                else last
            )
        for i in range(len(self.filters) - 1, -1, -1):
            if mask & (1 << i):
                continue
            code, _flags, values = self.filters[i]
            if code == _FLETCHER32:
                body, stored = data[:-4], int.from_bytes(data[-4:], "little")
                mine = fletcher32(body)
                c = mine.to_bytes(4, "little")  # what HDF5 1.6.0-1.6.2 wrote
                swapped = (c[1] << 24) | (c[0] << 16) | (c[3] << 8) | c[2]
                if len(data) < 4 or stored not in (mine, swapped):
                    raise FileFormatError(
                        f"a chunk of dataset {name!r} fails its Fletcher-32 checksum. Fix: "
                        "the file is corrupt; copy or download it again.",
                        path,
                    )
                data = body
            elif code == _DEFLATE:
                known = sizes[i]
                want = known if known is not None else self.chunk_bytes + 4 * len(sizes)
                inflate = zlib.decompressobj()
                try:
                    out = inflate.decompress(data, want + 1)
                except zlib.error as exc:
                    raise FileFormatError(
                        f"a chunk of dataset {name!r} is not a valid deflate stream ({exc}). "
                        "Fix: the file is corrupt; copy or download it again.",
                        path,
                    ) from exc
                if len(out) > want or inflate.unconsumed_tail:
                    raise UnsafeContentError(
                        f"a chunk of dataset {name!r} inflates to more than its {want} bytes (a "
                        "decompression bomb); it was stopped there. Fix: do not use this "
                        "file.",
                        path,
                    )
                data = out
            else:
                size = values[0] if values else self.dtype.itemsize
                count = len(data) // size if size else 0
                if size > 1 and count:
                    planes = np.frombuffer(data, np.uint8, count * size).reshape(size, count)
                    data = planes.T.tobytes() + data[count * size :]
        if len(data) != self.chunk_bytes:
            raise FileFormatError(
                f"a chunk of dataset {name!r} decodes to {len(data)} bytes, not "
                f"{self.chunk_bytes}. Fix: the file is corrupt; copy or download it again.",
                path,
            )
        return data

    def read(
        self, dsid: Any, out: np.ndarray, name: str, path: str, lo: tuple[int, ...] | None = None
    ) -> None:
        """Fill ``out`` with the box of the dataset that starts at ``lo`` (default: the
        origin) and has ``out``'s shape, decoding only the chunks it touches."""
        lo = lo if lo is not None else (0,) * out.ndim
        hi = tuple(a + n for a, n in zip(lo, out.shape, strict=True))
        stored: list[tuple[tuple[int, ...], int]] = []
        dsid.chunk_iter(lambda info: stored.append((info.chunk_offset, info.size)))
        for offset, size in stored:
            box = [
                (max(o, a), min(o + c, b))
                for o, c, a, b in zip(offset, self.chunk, lo, hi, strict=True)
            ]
            if any(a >= b for a, b in box):
                continue  # outside the box (or left beyond the extent by a shrink)
            if size > 2 * self.chunk_bytes + 4096:
                raise UnsafeContentError(
                    f"a chunk of dataset {name!r} stores {size} bytes for {self.chunk_bytes} "
                    "bytes of data, more than any of its filters produce. Fix: do not use this "
                    "file.",
                    path,
                )
            mask, raw = dsid.read_direct_chunk(offset)
            data = self._decode(raw, mask, name, path)
            block = np.frombuffer(data, self.dtype).reshape(self.chunk)
            into = tuple(slice(a - l0, b - l0) for (a, b), l0 in zip(box, lo, strict=True))
            part = tuple(slice(a - o, b - o) for (a, b), o in zip(box, offset, strict=True))
            out[into] = block[part]
        if out.dtype == np.bool_ and out.size and out.view(np.uint8).max() > 1:
            raise FileFormatError(
                f"bool dataset {name!r} holds bytes other than 0 and 1. "
                "Fix: the file is corrupt; re-create it.",
                path,
            )


class H5Reader(Reader):
    """An open HDF5 file: every dataset was checked by ``open``; what cannot be read is
    listed in :attr:`skipped` (tensor name -> why)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self._unsafe = False
        self._h5py = h5py = _h5py()
        self._file: Any = None
        self._guarded: Any = None
        self._entries: dict[str, tuple[TensorInfo, bytes, np.dtype, _Chunks | None, Any]] = {}
        self._fd, self._size = open_regular_file(path)
        try:
            with _h5_errors(path, "opening the HDF5 file"):
                self._file = h5py.File(path, "r")
            with _h5_errors(path, "reading the HDF5 structure"):
                self._same_file()
                self._length_size = self._file.id.get_create_plist().get_sizes()[1]
                self._walk()
                self._read_metadata()
            if self.skipped and not self._entries:
                error = UnsafeContentError if self._unsafe else FileFormatError
                raise error(
                    "no dataset can be read as a tensor: "
                    + "; ".join(f"{k!r}: {v}" for k, v in list(self.skipped.items())[:10])
                    + (" ..." if len(self.skipped) > 10 else "")
                    + ". Fix: store numeric arrays as plain datasets in this file.",
                    path,
                )
        except BaseException:
            self.close()
            raise
        self._close_guarded()

    # --- open -------------------------------------------------------------------------
    def _same_file(self) -> None:
        """h5py opened the path again: make sure it is the file whose size was checked."""
        mine = os.fstat(self._fd)
        theirs = os.fstat(self._file.id.get_vfd_handle())
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            raise FileFormatError(
                "the file was replaced while it was being opened. Fix: open "
                "it again when nothing is writing it.",
                self.path,
            )

    def _walk(self) -> None:
        """Every link once (H5Lvisit; it does not enter a group twice), every object once."""
        from h5py import h5l

        links: list[tuple[bytes, int, Any]] = []
        self._file.id.links.visit(
            lambda name, info: links.append(
                (name, info.type, info.u if info.type == h5l.TYPE_HARD else None)
            ),
            info=True,
        )
        first: dict[int, str] = {}  # object address -> the tensor name it was first seen as
        for raw, kind, addr in links:
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                self.skipped[raw.decode("utf-8", "backslashreplace").replace("/", ".")] = (
                    "its HDF5 name is not valid UTF-8"
                )
                continue
            tname = name.replace("/", ".")
            try:
                if kind == h5l.TYPE_SOFT:
                    target = self._file.id.links.get_val(raw)
                    raise _Skip(
                        f"a soft link to {target.decode('utf-8', 'replace')!r}; links "
                        "are not followed (read the target's own name)"
                    )
                if kind == h5l.TYPE_EXTERNAL:
                    other, where = self._file.id.links.get_val(raw)
                    raise _Skip(
                        f"an external link to {other.decode('utf-8', 'replace')!r}:"
                        f"{where.decode('utf-8', 'replace')!r}; other files are never "
                        "read",
                        unsafe=True,
                    )
                if kind != h5l.TYPE_HARD:
                    raise _Skip(f"a user-defined link (type {kind}); links are not followed")
                if addr in first:
                    raise _Skip(
                        f"another name (hard link) of {first[addr]!r}, which is read "
                        "once, under that name"
                    )
                first[addr] = tname
                entry = self._object(raw, tname)
            except _Skip as why:
                self.skipped[tname] = str(why)
                self._unsafe |= why.unsafe
                continue
            if entry is None:
                continue
            if tname in self._entries:
                check_unique([tname, tname], self.path)  # raises, naming the duplicate
            check_unique([tname], self.path)
            self._entries[tname] = entry

    def _object(
        self, raw: bytes, tname: str
    ) -> tuple[TensorInfo, bytes, np.dtype, _Chunks | None, Any] | None:
        from h5py import h5d, h5g, h5o

        obj = h5o.open(self._file.id, raw)
        if isinstance(obj, h5g.GroupID):
            return None
        if not isinstance(obj, h5d.DatasetID):
            raise _Skip("a named datatype, not a tensor")
        return self._dataset(obj, raw, tname)

    def _dataset(
        self, dsid: Any, raw: bytes, tname: str
    ) -> tuple[TensorInfo, bytes, np.dtype, _Chunks | None, Any]:
        from h5py import h5a, h5d, h5s

        dcpl = dsid.get_create_plist()
        layout = dcpl.get_layout()
        if layout == h5d.VIRTUAL:
            raise _Skip(
                "a virtual dataset, whose data lives in other files (never read)", unsafe=True
            )
        if layout == h5d.CONTIGUOUS and dcpl.get_external_count():
            files = [
                dcpl.get_external(i)[0].decode("utf-8", "replace")
                for i in range(min(dcpl.get_external_count(), 3))
            ]
            raise _Skip(f"its data lives in external files {files!r} (never read)", unsafe=True)
        dt = dsid.dtype
        if dt.kind in "OSUVMm" or dt.fields is not None:  # vlen and references are "O"
            raise _Skip(f"it holds {dt} (strings, objects, references or records), not numbers")
        space = dsid.get_space()
        if space.get_simple_extent_type() == h5s.NULL:
            raise _Skip("a null dataspace (h5py.Empty): it holds no array")
        shape = tuple(int(d) for d in space.shape)
        dtype_name = None
        if h5a.exists(dsid, _DTYPE_ATTR_B):
            dtype_name = self._marker(dsid, raw, tname)
        if dtype_name is None:
            try:
                dtype_name = canonical_name(dt)
            except ConversionError:
                raise _Skip(f"its dtype {dt} is not a tensor dtype") from None
        if any(d >= 2**63 for d in shape):
            raise _Skip(f"its shape {shape} has a dimension of 2**63 or more")
        info = TensorInfo(tname, dtype_name, shape)
        plan = self._check_storage(dsid, dcpl, layout, info)
        keep = dsid if len(self._entries) < _KEEP_OPEN else None  # saves reopening by name
        return info, raw, dt.newbyteorder("="), plan, keep

    def _check_storage(self, dsid: Any, dcpl: Any, layout: int, info: TensorInfo) -> _Chunks | None:
        """Read only what the file really holds: no fill values for data never written, no
        chunk much bigger than its tensor, no data past the end of the file, no bombs.
        Returns how to decode the chunks here (bounded), or None to let libhdf5 read."""
        from h5py import h5d

        nbytes = info.nbytes
        if nbytes == 0:
            return None
        stored = dsid.get_storage_size()
        if layout == h5d.CHUNKED:
            chunk = dcpl.get_chunk()
            itemsize = nbytes // info.size
            chunk_bytes = _prod(chunk) * itemsize
            if chunk_bytes > max(nbytes, MAX_CHUNK_BYTES):
                raise _Skip(
                    f"its chunks hold {chunk_bytes} bytes each, for a tensor of {nbytes} "
                    f"bytes: libhdf5 would decompress whole chunks (over the "
                    f"{MAX_CHUNK_BYTES}-byte cap)"
                )
            grid = _prod(-(-s // c) for s, c in zip(info.shape, chunk, strict=True))
            have = dsid.get_num_chunks()
            if have < grid:
                raise _Skip(
                    f"partly written: {have} of {grid} chunks are stored; the rest "
                    "would read as the fill value, not as data from the file"
                )
            if dcpl.get_nfilters():
                if nbytes > MAX_EXPANSION * stored + (1 << 20):
                    raise UnsafeContentError(
                        f"dataset {info.name!r} declares {nbytes} bytes but stores only {stored} "
                        f"compressed bytes, an expansion over {MAX_EXPANSION}x (a decompression "
                        "bomb). Fix: do not load it, or rewrite it uncompressed if you trust "
                        "it.",
                        self.path,
                    )
                return _Chunks.plan(dsid, dcpl, chunk, chunk_bytes)
            if stored > self._size:
                raise FileFormatError(
                    f"dataset {info.name!r} stores {stored} bytes, more than the whole file "
                    f"({self._size} bytes). Fix: the file is corrupt; re-create it.",
                    self.path,
                )
        elif layout == h5d.CONTIGUOUS:
            offset = dsid.get_offset()
            if offset is None or stored == 0:
                raise _Skip(f"never written: no storage is allocated for its {nbytes} bytes")
            if offset + nbytes > self._size:
                raise FileFormatError(
                    f"dataset {info.name!r} lies at bytes {offset}..{offset + nbytes}, past the "
                    f"end of the file ({self._size} bytes): it is truncated. Fix: copy or "
                    "download the file again.",
                    self.path,
                )
        return None

    def _marker(self, dsid: Any, raw: bytes, tname: str) -> str:
        value = self._string_attr(dsid, _DTYPE_ATTR_B, raw)
        if value is None or value not in _RAW_BITS:
            raise FileFormatError(
                f"dataset {tname!r} has {DTYPE_ATTR}={value!r}, which is not one of "
                f"{sorted(_RAW_BITS)}. Fix: remove the attribute or set it to a raw-bits "
                "dtype.",
                self.path,
            )
        dt = dsid.dtype
        want = np.dtype(f"u{lookup(value).itemsize}")
        if dt.kind != "u" or dt.itemsize != want.itemsize:
            raise FileFormatError(
                f"dataset {tname!r} is marked {DTYPE_ATTR}={value!r} but holds {dt}, not "
                f"{want}. Fix: store the raw bits as {want}.",
                self.path,
            )
        return value

    def _string_attr(self, oid: Any, aname: bytes, obj_path: bytes) -> str | None:
        """The string attribute ``aname`` of object ``oid`` (at ``obj_path``), or None if it
        is not a single string. Variable-length strings live in the global heap and are read
        through :class:`_HeapGuard`; fixed-length ones are stored in the object header."""
        from h5py import h5a, h5t

        aid = h5a.open(oid, aname)
        tid = aid.get_type()
        if tid.get_class() != h5t.STRING or _prod(aid.shape or ()) != 1:
            return None
        if tid.is_variable_str():
            return _decode(self._guarded_file()[obj_path].attrs[aname.decode("utf-8")])
        size = tid.get_size()
        if size > self._size:
            return None
        out = np.empty(aid.shape or (), dtype=f"S{size}")
        aid.read(out, tid)  # the file's own type (ASCII or UTF-8): no conversion
        return _decode(out)

    def _guarded_file(self) -> Any:
        if self._guarded is None:
            guard = _HeapGuard(self._fd, self._size, self._length_size, self.path)
            self._guarded = self._h5py.File(guard, "r")
        return self._guarded

    def _read_metadata(self) -> None:
        from h5py import h5a

        names: list[bytes] = []
        h5a.iterate(self._file.id, lambda name, *_: names.append(name))
        for raw in names:
            try:
                key = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            value = self._string_attr(self._file.id, raw, b"/")
            if value is not None:
                self.metadata[key] = value

    def _close_guarded(self) -> None:
        if self._guarded is not None:
            with contextlib.suppress(Exception):
                self._guarded.close()
            self._guarded = None

    # --- reading ------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._entries[name][0]
        except (KeyError, TypeError):
            raise self.missing(name) from None

    def _check_size(self) -> None:
        size = os.fstat(self._fd).st_size
        if size < self._size:
            raise FileFormatError(
                f"the file shrank from {self._size} to {size} bytes while it was open; what "
                "libhdf5 reads past the new end would be zeros, not data. Fix: open it again "
                "when nothing is writing it.",
                self.path,
            )

    def _dataset_id(self, name: str) -> tuple[TensorInfo, Any, np.dtype, _Chunks | None]:
        info = self.info(name)
        _, raw, native, plan, dsid = self._entries[name]
        if self._file is None:
            raise FileFormatError("the file is closed. Fix: open it again.", self.path)
        if dsid is None:
            from h5py import h5d

            dsid = h5d.open(self._file.id, raw)
        return info, dsid, native, plan

    def read(self, name: str) -> np.ndarray:
        info, dsid, native, plan = self._dataset_id(name)
        try:
            out = np.empty(info.shape, dtype=native)
        except MemoryError as exc:
            raise FileFormatError(
                f"tensor {name!r} ({info.dtype}{list(info.shape)}) does not fit in memory. "
                "Fix: use a machine with more memory, or read it with h5py in slices.",
                self.path,
            ) from exc
        if out.size:
            from h5py import h5s

            with _h5_errors(self.path, f"reading dataset {name!r}"):
                if plan is not None:
                    plan.read(dsid, out, name, self.path)
                else:
                    dsid.read(h5s.ALL, h5s.ALL, out, _memory_type(out.dtype))
            self._check_size()  # after: any read past a new end gave zeros
        if info.dtype in _RAW_BITS:
            out = out.view(lookup(info.dtype).numpy)
        return out

    def read_slice(self, name: str, index: int | slice) -> np.ndarray:
        """``tensor[index]`` (an int or a step-1 first-axis slice): only those rows are read."""
        info, dsid, native, plan = self._dataset_id(name)
        start, stop, single = first_axis_rows(info, index, self.path)
        if plan is not None:  # only the chunks holding those rows, each under the bound
            out = np.empty((stop - start, *info.shape[1:]), dtype=native)
            if out.size:
                with _h5_errors(self.path, f"reading dataset {name!r}"):
                    plan.read(dsid, out, name, self.path, (start,) + (0,) * (out.ndim - 1))
                self._check_size()
            if info.dtype in _RAW_BITS:
                out = out.view(lookup(info.dtype).numpy)
            return out.reshape(info.shape[1:]) if single else out
        out = np.empty((stop - start, *info.shape[1:]), dtype=native)
        if out.size:
            with _h5_errors(self.path, f"reading dataset {name!r}"):
                self._h5py.Dataset(dsid).read_direct(out, np.s_[start:stop])
            self._check_size()
        if info.dtype in _RAW_BITS:
            out = out.view(lookup(info.dtype).numpy)
        return out.reshape(info.shape[1:]) if single else out

    def read_index(self, name: str, key: tuple) -> np.ndarray:
        """``tensor[key]`` (a normalized basic index): only the chunks it touches are read
        (by h5py, or decoded here, each under the bound, for deflate/shuffle/fletcher32)."""
        info, dsid, native, plan = self._dataset_id(name)
        shape = tuple(len(range(k.start, k.stop, k.step)) for k in key if isinstance(k, slice))
        if 0 in shape or 0 in info.shape:
            out = np.empty(shape, dtype=native)
        elif plan is not None:  # decode the chunks of the key's bounding box, then index it
            lo = tuple(k if isinstance(k, int) else k.start for k in key)
            hi = tuple(
                k + 1
                if isinstance(k, int)
                else k.start + (len(range(k.start, k.stop, k.step)) - 1) * k.step + 1
                for k in key
            )
            box = np.empty(tuple(b - a for a, b in zip(lo, hi, strict=True)), dtype=native)
            with _h5_errors(self.path, f"reading dataset {name!r}"):
                plan.read(dsid, box, name, self.path, lo)
            self._check_size()
            inner = tuple(
                k - a if isinstance(k, int) else slice(0, None, k.step)
                for k, a in zip(key, lo, strict=True)
            )
            out = np.array(box[inner], order="C")  # 0-d stays 0-d
        else:
            with _h5_errors(self.path, f"reading dataset {name!r}"):
                out = np.asarray(self._h5py.Dataset(dsid)[key])
            self._check_size()
        if info.dtype in _RAW_BITS:
            out = out.view(lookup(info.dtype).numpy)
        return out

    def native_chunks(self, name: str) -> tuple[int, ...] | None:
        if self._file is None:
            return None
        _, dsid, _, _ = self._dataset_id(name)
        with _h5_errors(self.path, f"reading dataset {name!r}"):
            dcpl = dsid.get_create_plist()
            from h5py import h5d

            if dcpl.get_layout() != h5d.CHUNKED:
                return None
            return tuple(int(c) for c in dcpl.get_chunk())

    def close(self) -> None:
        self._close_guarded()
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None  # type: ignore[assignment]


# --- writing ----------------------------------------------------------------------


def _check_write_names(infos: Sequence[TensorInfo], path: str) -> None:
    check_unique([i.name for i in infos], path)
    for info in infos:
        if "/" in info.name or info.name == ".":
            raise ConversionError(
                f"{path}: tensor name {info.name!r} cannot be an HDF5 dataset name at the root "
                "('/' would create groups, and '.' is the root itself). Fix: rename it, e.g. "
                f"{info.name.replace('/', '.')!r}."
            )


def metadata_problem(key: str, value: str) -> str | None:
    """Why HDF5 cannot store the string attribute ``key = value``, or ``None``.

    An attribute name cannot be empty, and HDF5 strings end at a NUL byte (h5py
    would truncate a name there, and refuses a value holding one).
    """
    if key == "":
        return "an HDF5 attribute name cannot be empty"
    if "\x00" in key:
        return "an HDF5 attribute name cannot hold a NUL character"
    if "\x00" in value:
        return "an HDF5 string attribute cannot hold a NUL character"
    return None


def _check_metadata(metadata: Mapping[str, str] | None, path: str) -> dict[str, str]:
    metadata = check_metadata(metadata, path)
    for key, value in metadata.items():
        why = metadata_problem(key, value)
        if why is not None:
            fix = "give it a non-empty key" if key == "" else "remove the NUL character"
            raise ConversionError(
                f"{path}: metadata key {key!r} is refused: {why}; nothing was written. "
                f"Fix: {fix}, or leave the entry out."
            )
    return metadata


class _DatasetMaker:
    """Creates root datasets in one step each: no fill value is written first, no
    timestamps (reproducible files), and one write of native bytes. The property lists
    and the HDF5 type of each dtype are made once per file (12 µs a dataset otherwise)."""

    def __init__(self, fid: Any) -> None:
        from h5py import h5d, h5p, h5t

        self.fid = fid
        self.dcpl = h5p.create(h5p.DATASET_CREATE)
        self.dcpl.set_fill_time(h5d.FILL_TIME_NEVER)
        self.dcpl.set_obj_track_times(False)
        self.lcpl = h5p.create(h5p.LINK_CREATE)
        self.lcpl.set_char_encoding(h5t.CSET_UTF8)
        self.types: dict[np.dtype, Any] = {}

    def create(self, info: TensorInfo, arr: np.ndarray) -> Any:
        """Create dataset ``info.name`` holding ``arr``; returns its id."""
        from h5py import h5d, h5s, h5t

        storage = arr.dtype.newbyteorder("=") if arr.dtype.itemsize > 1 else arr.dtype
        arr = np.ascontiguousarray(arr, dtype=storage)
        space = h5s.create_simple(info.shape) if info.shape else h5s.create(h5s.SCALAR)
        tid = self.types.get(storage)
        if tid is None:
            tid = self.types[storage] = h5t.py_create(storage, logical=True)
        dsid = h5d.create(
            self.fid, info.name.encode("utf-8"), tid, space, dcpl=self.dcpl, lcpl=self.lcpl
        )
        if arr.size:
            dsid.write(h5s.ALL, h5s.ALL, arr, tid)
        return dsid


class H5Format(Format):
    """HDF5 via h5py; bfloat16/float8 stored as raw bits with a dtype attribute."""

    name = "h5"
    suffixes = (".h5", ".hdf5")
    description = (
        "HDF5 via h5py. Holds every tensorbridge dtype; bfloat16/float8 are stored "
        f"as same-width uint with attribute {DTYPE_ATTR}."
    )

    def check_write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        metadata: Mapping[str, str] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        super().check_write(path, infos, metadata, options)
        _check_write_names(infos, path)
        return _check_metadata(metadata, path)

    def check_info(self, info: TensorInfo, path: str) -> None:
        lookup(info.dtype)  # unknown dtypes fail before anything is written
        if len(info.shape) > MAX_RANK:
            raise ConversionError(
                f"{path}: tensor {info.name!r} has {len(info.shape)} dimensions, but HDF5 "
                f"datasets have at most {MAX_RANK}. Fix: reshape it (e.g. merge axes), or save "
                "to .npy/.npz/.safetensors, which allow more."
            )

    def open(self, path: str) -> H5Reader:
        return H5Reader(os.fspath(path))

    def write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        fetch: Callable[[str], np.ndarray],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Write one root dataset per tensor, fetching one at a time, atomically."""
        path = os.fspath(path)
        h5py = _h5py()
        attrs = self.check_write(path, infos, metadata)
        with atomic_path(path) as tmp:
            # a descriptor of the same file, to start writeback of what libhdf5 writes
            kick = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                self._write_into(h5py, tmp, kick, infos, fetch, attrs, path)
            finally:
                os.close(kick)

    @staticmethod
    def _write_into(
        h5py: Any,
        tmp: str,
        kick: int,
        infos: Sequence[TensorInfo],
        fetch: Callable[[str], np.ndarray],
        attrs: Mapping[str, str],
        path: str,
    ) -> None:
        f = h5py.File(tmp, "w")
        pending = 0  # dataset bytes written since writeback was last started
        try:
            maker = _DatasetMaker(f.id)
            for key, value in attrs.items():
                f.attrs[key] = str(value)  # a str subclass (GGUF's typed values) as text
            for info in infos:
                arr = check_fetched(fetch(info.name), info, path)
                if info.dtype in _RAW_BITS:
                    if not arr.dtype.isnative:  # (a byte-swapped bfloat16: its values)
                        arr = arr.astype(arr.dtype.newbyteorder("="))
                    arr = arr.view(f"u{arr.dtype.itemsize}")
                dsid = maker.create(info, arr)
                if info.dtype in _RAW_BITS:  # fixed-length: no global heap to read back
                    h5py.Dataset(dsid).attrs.create(
                        DTYPE_ATTR, np.bytes_(info.dtype.encode("ascii"))
                    )
                pending += arr.nbytes
                if pending >= WRITEBACK_CHUNK:
                    pending = 0
                    start_writeback(kick)
                del arr, dsid
            del maker
        except BaseException:
            # closing a file whose write failed (e.g. a full disk) raises again, as a
            # RuntimeError that would hide the real error; the file is discarded anyway
            with contextlib.suppress(Exception):
                f.close()
            raise
        try:
            f.close()  # flushes the metadata: a full disk can fail here too
        except Exception as exc:
            raise FileFormatError(
                f"writing failed while finishing the HDF5 file ({exc}); the disk may be "
                "full. The destination was left unchanged. Fix: free space or choose "
                "another destination, then retry.",
                path,
            ) from exc


FORMAT = H5Format()
