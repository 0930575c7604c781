"""The ``.safetensors`` format: our own strict header parser and streaming writer.

File layout (https://github.com/huggingface/safetensors)::

    8 bytes   N, a little-endian u64: the header length
    N bytes   a UTF-8 JSON object, padded with spaces:
              {"__metadata__": {"key": "value", ...},          (optional, str -> str)
               "NAME": {"dtype": "F32", "shape": [2, 3], "data_offsets": [BEGIN, END]}, ...}
    rest      the data region; offsets are relative to its start, little-endian,
              C order. The tensors tile it exactly: no overlap, no hole, no trailing byte.

Why not the ``safetensors`` package? Its NumPy binding has no BF16 or float8; its
Rust core accepts duplicate keys (the last one wins), names containing NUL or
``..``, and non-string metadata; and ``save_file`` needs every tensor in memory
at once. This module validates more strictly and writes one tensor at a time
through a bounded buffer. The tests check interoperability with the real
package in both directions.

Reading never memory-maps the file: a file truncated while mapped kills the
process with SIGBUS. Tensors are read with ``pread`` into fresh arrays, after the
header has been checked against the real file size (the header in the first
:data:`WHOLE_FILE_BYTES`, with one ``pread``). ``load`` reads a file of at most that
size whole, in one ``pread``, without a reader (:func:`load_whole`), and keeps its
tensors as views of that one copy.

Kernel-side copies: ``fetch(name)`` may return a :class:`~.base.RawSpan` instead
of an array (the source file's byte range holding the tensor's exact
little-endian bytes, see :meth:`~.base.Reader.raw_span`). The writer then moves
those bytes with ``os.copy_file_range`` (falling back to ``os.sendfile``, then
to a bounded ``pread``/``pwrite`` loop), never through a user buffer. A source
that is shorter than the span (truncated after it was validated) or that was
replaced raises :class:`FileFormatError`; the destination is left untouched.

>>> import numpy as np, tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
>>> a = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> FORMAT.write(p, [TensorInfo("w", "float32", (2, 3))], lambda name: a, {"k": "v"})
>>> with FORMAT.open(p) as r:
...     (r.keys(), r.metadata, r.read("w").tobytes() == a.tobytes())
(['w'], {'k': 'v'}, True)
"""

from __future__ import annotations

import contextlib
import errno
import json
import operator
import os
import stat
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from ..dtypes import DTYPES, canonical_name, lookup
from ..errors import CheckpointChangedError, ConversionError, FileFormatError, UnsafeContentError
from . import safejson
from .atomic import Commit, atomic_path, atomic_write, start_writeback
from .base import (
    Format,
    RawSpan,
    Reader,
    SharedDescriptor,
    TensorInfo,
    _changed_while_opening,
    check_metadata,
    file_stamp,
    first_axis_rows,
    modified_while_read,
    opening,
    stamp_changed,
)
from .names import check_name, check_unique
from .safejson import short

__all__ = [
    "FORMAT",
    "SafetensorsFormat",
    "SafetensorsReader",
    "WHOLE_FILE_BYTES",
    "load_whole",
    "MAX_HEADER_SIZE",
    "CODE_TO_DTYPE",
    "build_header",
    "open_regular_file",
    "open_regular_stat",
    "read_exact_into",
    "iter_le_bytes",
    "check_fetched",
    "check_span",
    "copy_span",
    "open_span",
    "Placed",
]

#: The Rust reference refuses longer headers; so do we (a header is parsed in memory).
MAX_HEADER_SIZE = 100_000_000
#: ``load`` reads a file up to this size whole, with one read (a reader reads this much
#: at open, which holds the header unless that is long): reading a small file once costs
#: less than reading its header and then each tensor.
WHOLE_FILE_BYTES = 1 << 16
#: NumPy cannot hold more dimensions than this.
MAX_NDIM = 64
#: Bytes written per chunk when a tensor must be made contiguous or little-endian.
CHUNK_BYTES = 16 * 1024 * 1024

_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_METADATA_KEY = "__metadata__"

#: safetensors header dtype code -> canonical dtype name (from the dtypes table).
CODE_TO_DTYPE: dict[str, str] = {d.safetensors: d.name for d in DTYPES.values() if d.safetensors}
#: canonical dtype name -> NumPy dtype, for the dtypes safetensors holds
_NUMPY: dict[str, np.dtype] = {d.name: d.numpy for d in DTYPES.values() if d.safetensors}
#: safetensors header dtype code -> (canonical dtype name, itemsize), for the header parse.
_CODE_ROWS: dict[str, tuple[str, int]] = {
    d.safetensors: (d.name, d.itemsize) for d in DTYPES.values() if d.safetensors
}


# --- shared low-level helpers (also used by other format modules) ------------


def open_regular_file(path: str) -> tuple[int, int]:
    """Open ``path`` read-only and return ``(fd, size)``; refuse non-regular files.

    ``O_NONBLOCK`` keeps a FIFO from hanging the open; it has no effect on files.
    """
    fd, st = open_regular_stat(path)
    return fd, st.st_size


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def open_regular_stat(path: str, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """:func:`open_regular_file`, with the descriptor's ``fstat`` instead of its size
    (``path`` relative to the directory ``dir_fd`` when given)."""
    try:
        fd = os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise FileFormatError(
                f"cannot open the file: too many open files ({exc.strerror}). Fix: raise the "
                "open-file limit (e.g. `ulimit -n 4096`) or close other open files.",
                path,
            ) from exc
        raise FileFormatError(
            f"cannot open the file ({exc.strerror}). Fix: check the path and its permissions.", path
        ) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileFormatError(
                "it is not a regular file (a directory, FIFO or device cannot hold a "
                "tensor file). Fix: pass the path of a file.",
                path,
            )
        return fd, st  # (O_NONBLOCK left on: reads of a regular file never wait anyway)
    except BaseException:
        os.close(fd)
        raise


_PREADV = hasattr(os, "preadv")


def read_exact_into(fd: int, buffer: memoryview, offset: int, path: str) -> None:
    """Fill ``buffer`` (a byte memoryview) from ``fd`` at ``offset``, or raise."""
    total = len(buffer)
    if _PREADV and total:  # most reads are done by one call
        try:
            done = os.preadv(fd, [buffer], offset)
        except OSError:
            done = 0  # (the loop below says what failed)
        if done == total:
            return
    else:
        done = 0
    while done < total:
        try:
            if _PREADV:
                n = os.preadv(fd, [buffer[done:]], offset + done)
            else:  # pragma: no cover - Windows
                data = os.pread(fd, min(total - done, 1 << 30), offset + done)
                n = len(data)
                buffer[done : done + n] = data
        except OSError as exc:
            raise FileFormatError(
                f"reading failed at byte {offset + done} ({exc.strerror}). Fix: check the "
                "disk and the file, or copy the file locally and retry.",
                path,
            ) from exc
        if n == 0:
            raise FileFormatError(
                f"the file ended at byte {offset + done}, but {total - done} more bytes were "
                "expected (it was truncated or changed while being read). Fix: download or "
                "copy the file again.",
                path,
            )
        done += n


def _byte_view(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without copying (works for ml_dtypes)."""
    return arr.reshape(-1).view(np.uint8).data


def iter_le_bytes(arr: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """Yield the C-order little-endian bytes of ``arr`` in bounded pieces.

    A C-contiguous little-endian array is yielded as one view (no copy); otherwise
    blocks along the first axis are copied, each about ``chunk_bytes`` long.
    """
    big = arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big")
    if arr.dtype.itemsize == 1:
        big = False
    if arr.size == 0:
        return
    if not big and arr.flags.c_contiguous:
        yield _byte_view(arr)
        return
    if arr.ndim == 0:
        arr = arr.reshape(1)
    row_bytes = arr[0].nbytes if arr.ndim > 1 else arr.itemsize
    if row_bytes > chunk_bytes and arr.ndim > 1:
        for row in arr:
            yield from iter_le_bytes(row, chunk_bytes)
        return
    step = max(1, chunk_bytes // max(row_bytes, 1))
    le = arr.dtype.newbyteorder("<")
    for start in range(0, arr.shape[0], step):
        block = np.ascontiguousarray(arr[start : start + step])
        if big:
            block = block.astype(le)
        yield _byte_view(block)


def check_fetched(arr: object, info: TensorInfo, file: object = "") -> np.ndarray:
    """Check that ``fetch(name)`` gave an array with the announced dtype and shape."""
    if not isinstance(arr, np.ndarray):
        raise ConversionError(
            f"{file}: fetch({info.name!r}) returned a {type(arr).__name__}, not a numpy "
            "array. Fix: return host NumPy arrays from fetch()."
        )
    try:
        got = canonical_name(arr.dtype)
    except ConversionError as exc:
        raise ConversionError(f"{file}: tensor {info.name!r}: {exc}") from exc
    if got != info.dtype or tuple(arr.shape) != tuple(info.shape):
        raise ConversionError(
            f"{file}: tensor {info.name!r} was announced as {info.dtype}{list(info.shape)} but "
            f"fetch() returned {got}{list(arr.shape)}; the header is already written. Fix: "
            "pass TensorInfo values that match the arrays fetch() returns."
        )
    return arr


def check_span(span: RawSpan, info: TensorInfo, file: object = "") -> RawSpan:
    """Check that a :class:`RawSpan` from ``fetch(name)`` holds ``info.nbytes`` bytes."""
    if span.nbytes != info.nbytes or span.offset < 0:
        raise ConversionError(
            f"{file}: tensor {info.name!r} was announced as {info.dtype}{list(info.shape)} "
            f"({info.nbytes} bytes) but fetch() returned a byte span of {span.nbytes} bytes at "
            f"offset {span.offset}; the header is already written. Fix: pass TensorInfo values "
            "that match the spans fetch() returns."
        )
    return span


def open_span(span: RawSpan) -> int:
    """Open ``span.path`` read-only; refuse a file other than the one the reader checked.

    A file that is gone, or is another file now, was changed by a save after it was opened
    and checked: :class:`~tensorbridge.errors.CheckpointChangedError` (``load`` retries)."""
    try:
        fd, _size = open_regular_file(span.path)
    except FileFormatError as exc:
        if span.file_id is not None and isinstance(exc.__cause__, FileNotFoundError):
            raise CheckpointChangedError(
                "the file was removed after it was opened and checked (a save replaced it). "
                "Fix: open or load it again.",
                span.path,
            ) from exc
        raise
    if span.file_id is not None:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != tuple(span.file_id):
            os.close(fd)
            raise CheckpointChangedError(
                "the file was replaced while it was being read (it is no longer the file "
                "that was opened and checked). Fix: wait until it is written, then open or "
                "load it again.",
                span.path,
            )
    return fd


def _short_source(span: RawSpan, done: int) -> FileFormatError:
    return FileFormatError(
        f"the file ended at byte {span.offset + done}, but {span.nbytes - done} more bytes "
        "were expected (it was truncated or changed while being read). Fix: download or "
        "copy the file again.",
        span.path,
    )


class SpanFiles:
    """Open descriptors of the files spans point into, at most :data:`OPEN` at once (the
    least recently used is closed first): a sharded source hands over its shards one
    after another, and each is a separate file. ``close()`` closes them all."""

    #: descriptors kept open at once
    OPEN = 4

    def __init__(self) -> None:
        self._fds: dict[tuple[str, Any], int] = {}  # by span path and file id; LRU order

    def fd(self, span: RawSpan) -> int:
        key = (span.path, span.file_id)
        fd = self._fds.pop(key, None)  # re-inserted last: the dict's order is the LRU
        if fd is None:
            while len(self._fds) >= self.OPEN:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = open_span(span)
        self._fds[key] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


#: Most bytes asked of one kernel copy call (Linux copies at most ~2 GiB per call).
_COPY_CALL_BYTES = 1 << 30


def copy_span(src_fd: int, span: RawSpan, dst_fd: int, dst_offset: int) -> None:
    """Copy ``span`` (read from ``src_fd``) to ``dst_fd`` at ``dst_offset``, kernel-side.

    Tries ``os.copy_file_range``, then ``os.sendfile``, then a chunked
    ``pread``/``pwrite`` loop; each resumes where the previous one stopped. The
    destination descriptor's file position is not relied on (the caller seeks).
    Raises :class:`FileFormatError` when the source holds fewer bytes than the span.
    """
    total = span.nbytes
    done = 0
    # 1. copy_file_range: explicit offsets on both sides; the kernel may reflink or splice.
    if hasattr(os, "copy_file_range"):
        while done < total:
            try:
                n = os.copy_file_range(
                    src_fd,
                    dst_fd,
                    min(total - done, _COPY_CALL_BYTES),
                    span.offset + done,
                    dst_offset + done,
                )
            except OSError as exc:
                if exc.errno in _FALLBACK_ERRNOS:
                    break
                raise
            if n == 0:  # the end of the source, or a filesystem that will not copy
                if os.fstat(src_fd).st_size < span.offset + total:
                    raise _short_source(span, done)
                break
            done += n
    # 2. sendfile writes at dst_fd's file position, so put it where the copy resumes.
    if done < total and hasattr(os, "sendfile"):
        os.lseek(dst_fd, dst_offset + done, os.SEEK_SET)
        while done < total:
            try:
                n = os.sendfile(
                    dst_fd, src_fd, span.offset + done, min(total - done, _COPY_CALL_BYTES)
                )
            except OSError as exc:
                if exc.errno in _FALLBACK_ERRNOS:
                    break
                raise
            if n == 0:
                if os.fstat(src_fd).st_size < span.offset + total:
                    raise _short_source(span, done)
                break
            done += n
    # 3. bounded user-space copy.
    if done < total:
        buf = bytearray(min(CHUNK_BYTES, total - done))
        view = memoryview(buf)
        while done < total:
            k = min(len(buf), total - done)
            try:
                read_exact_into(src_fd, view[:k], span.offset + done, span.path)
            except FileFormatError:
                raise _short_source(span, done) from None
            written = 0
            while written < k:
                written += os.pwrite(dst_fd, view[written:k], dst_offset + done + written)
            done += k


#: Written bytes handed to the kernel's writeback at a time (see _start_writeback).
WRITEBACK_BYTES = 16 * 1024 * 1024


def _start_writeback(f: Any, kicked: int) -> int:
    """Start writing back ``f``'s dirty pages up to its position once
    :data:`WRITEBACK_BYTES` were added since byte ``kicked``; returns the new mark.

    Bytes written through ``f`` are handed to writeback by :func:`.atomic.atomic_write`
    already; this covers the kernel-side copies (:func:`copy_span`), which bypass it,
    so that the final ``fsync`` does not wait for the whole file at once. Advisory:
    nothing changes where :func:`.atomic.start_writeback` cannot start it.
    """
    end = f.tell()
    if end - kicked < WRITEBACK_BYTES:
        return kicked
    f.flush()
    start_writeback(f.fileno(), end)
    return end


def _fallback_errnos() -> frozenset[int]:
    import errno

    names = (
        "EXDEV",
        "ENOSYS",
        "EINVAL",
        "EOPNOTSUPP",
        "ENOTSUP",
        "EBADF",
        "ETXTBSY",
        "EPERM",
        "EOVERFLOW",
    )
    return frozenset(getattr(errno, n) for n in names if hasattr(errno, n))


#: Errors after which the next copy method is tried instead of failing.
_FALLBACK_ERRNOS = _fallback_errnos()


def _safetensors_code(info: TensorInfo, file: object) -> str:
    row = lookup(info.dtype)
    if row.safetensors is None:
        raise ConversionError(
            f"{file}: tensor {info.name!r} has dtype {info.dtype!r}, which safetensors cannot "
            "store (it has no header code for it). Fix: save as .npz or .h5, or convert it "
            "first with --dtype (e.g. --dtype float32); safetensors holds: "
            + ", ".join(CODE_TO_DTYPE.values())
            + "."
        )
    return row.safetensors


def build_header(
    infos: Sequence[TensorInfo], metadata: Mapping[str, str] | None, file: object = ""
) -> bytes:
    """The 8-byte length plus the space-padded JSON header for ``infos``, in order."""
    check_unique([i.name for i in infos], file, writing=True)
    header: dict[str, Any] = {}
    meta = check_metadata(metadata, file)
    if meta:
        header[_METADATA_KEY] = meta
    offset = 0
    for info in infos:
        if info.name == _METADATA_KEY:
            raise UnsafeContentError(
                f"tensor name {info.name!r} is reserved for the file's metadata. Fix: rename the "
                "tensor.",
                file,
            )
        code = _safetensors_code(info, file)
        end = offset + info.nbytes
        header[info.name] = {
            "dtype": code,
            "shape": [int(d) for d in info.shape],
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the reference pads so the data starts 8-byte aligned
    if len(text) > MAX_HEADER_SIZE:
        raise ConversionError(
            f"{file}: the safetensors header would be {len(text)} bytes, over the "
            f"{MAX_HEADER_SIZE}-byte limit readers enforce. Fix: use fewer tensors or shorter "
            "metadata, or write a sharded checkpoint."
        )
    return struct.pack("<Q", len(text)) + text


# --- header validation --------------------------------------------------------


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_LIMIT = 2**63


def _parse_entry(name: str, entry: object, path: str) -> tuple[TensorInfo, int, int]:
    """``(info, begin, end)`` of one header entry, checked (see :func:`_check_entry`).

    The common entry (a dict of exactly the three keys, a known dtype code, a list of at
    most :data:`MAX_NDIM` plain non-negative ints whose element and byte counts stay
    under 2**63, offsets ``[begin, end]`` of plain ints spanning exactly those bytes)
    is accepted here in one pass; anything else goes through :func:`_check_entry`, which
    accepts the same entries and names what is wrong with the others."""
    if type(entry) is dict and entry.keys() == _ENTRY_KEYS:
        code = entry["dtype"]
        shape = entry["shape"]
        offsets = entry["data_offsets"]
        row = _CODE_ROWS.get(code) if type(code) is str else None
        if (
            row is not None
            and type(shape) is list
            and len(shape) <= MAX_NDIM
            and type(offsets) is list
            and len(offsets) == 2
        ):
            begin, end = offsets
            if type(begin) is int and type(end) is int and 0 <= begin <= end:
                size = 1
                span = itemsize = row[1]
                for d in shape:
                    if type(d) is not int or d < 0:
                        break
                    size *= d
                    span *= d or 1
                    if span >= _LIMIT:  # size <= span: both stay under 2**63
                        break
                else:
                    if end - begin == size * itemsize:
                        return TensorInfo(name, row[0], tuple(shape)), begin, end
    return _check_entry(name, entry, path)


def _check_entry(name: str, entry: object, path: str) -> tuple[TensorInfo, int, int]:
    """Every check of one header entry, one at a time, each with its own message."""
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise FileFormatError(
            f"tensor {short(name)}: header entry must have exactly the keys 'dtype', 'shape' "
            f"and 'data_offsets', got {short(keys)}. Fix: re-save the file with a safetensors writer.",
            path,
        )
    code = entry["dtype"]
    if not isinstance(code, str) or code not in CODE_TO_DTYPE:
        raise FileFormatError(
            f"tensor {short(name)}: unknown dtype {short(code)}. Fix: use a known dtype code ("
            + ", ".join(CODE_TO_DTYPE)
            + "), or convert the tensor with the tool that wrote it.",
            path,
        )
    dtype = CODE_TO_DTYPE[code]
    shape = entry["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(_is_int(d) and d >= 0 for d in shape)
    ):
        raise FileFormatError(
            f"tensor {short(name)}: shape {short(shape)} is not a list of at most {MAX_NDIM} "
            "non-negative integers. Fix: the file is corrupt; re-save it.",
            path,
        )
    size = 1
    span = lookup(dtype).itemsize  # NumPy refuses a shape whose non-zero dims overflow
    for d in shape:
        size *= d
        span *= max(d, 1)
        if size >= 2**63 or span >= 2**63:
            raise FileFormatError(
                f"tensor {short(name)}: shape {short(shape)} has more than 2**63 elements or bytes (NumPy "
                "cannot hold that shape, even empty; the product "
                "overflows). Fix: the file is corrupt or hostile; re-save it.",
                path,
            )
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise FileFormatError(
            f"tensor {short(name)}: data_offsets {short(offsets)} is not [begin, end] with "
            "0 <= begin <= end. Fix: the file is corrupt; re-save it.",
            path,
        )
    begin, end = offsets
    expected = size * lookup(dtype).itemsize
    if end - begin != expected:
        raise FileFormatError(
            f"tensor {short(name)}: data_offsets {short(offsets)} span {end - begin} bytes, but "
            f"shape {short(shape)} of {dtype} needs {expected}. Fix: the file is corrupt; re-save it.",
            path,
        )
    return TensorInfo(name, dtype, tuple(shape)), begin, end


_BEGIN_END = operator.itemgetter(0, 1)
_BEGIN = operator.itemgetter(1)


def _check_tiling(spans: list[tuple[int, int, str]], data_len: int, path: str) -> None:
    """The sorted spans must cover ``[0, data_len)`` exactly once."""
    position = 0
    for begin, end, name in sorted(spans, key=_BEGIN_END):
        if begin < position:
            raise FileFormatError(
                f"tensor {short(name)}: data_offsets [{begin}, {end}] overlap the previous tensor "
                f"(which ends at {position}). Fix: the file is corrupt or hostile; re-save it.",
                path,
            )
        if begin > position:
            raise FileFormatError(
                f"tensor {short(name)}: data_offsets start at {begin}, leaving a hole of "
                f"{begin - position} unused bytes after byte {position}. Fix: the file is "
                "corrupt; re-save it.",
                path,
            )
        position = end
    if position < data_len:
        raise FileFormatError(
            f"the data region has {data_len - position} trailing bytes after the last tensor "
            f"(tensors end at {position}, the data region is {data_len} bytes). Fix: the file "
            "is corrupt or has something appended; re-save it.",
            path,
        )
    if position > data_len:
        raise FileFormatError(
            f"the header says the data region is {position} bytes, but the file holds only "
            f"{data_len} (it is truncated). Fix: download or copy the file again.",
            path,
        )


def _parse_header(
    raw: bytes | bytearray,
    data_len: int,
    path: str,
) -> tuple[dict[str, str], list[tuple[TensorInfo, int]]]:
    header = safejson.loads(raw, path, "the header", offset=8)
    if not isinstance(header, dict):
        raise FileFormatError(
            f"the header is a JSON {type(header).__name__}, not an object. Fix: this is not a "
            "safetensors file, or it is corrupt.",
            path,
        )
    metadata = header.pop(_METADATA_KEY, None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        bad = (
            metadata
            if not isinstance(metadata, dict)
            else next({k: v} for k, v in metadata.items() if not isinstance(v, str))
        )
        raise UnsafeContentError(
            f"__metadata__ must map strings to strings, got {short(bad)}. Fix: re-save the file "
            "with string metadata values.",
            path,
        )
    for name in header:  # (unique: safejson refuses repeated keys)
        check_name(name, path)
    entries = []
    spans = []
    for name, entry in header.items():
        info, begin, end = _parse_entry(name, entry, path)
        entries.append((info, begin))
        spans.append((begin, end, name))
    _check_tiling(spans, data_len, path)
    entries.sort(key=_BEGIN)  # file order; stable for empty tensors
    return dict(metadata), entries


def _read_header(
    fd: int, first: np.ndarray, size: int, path: str
) -> tuple[int, dict[str, str], list[tuple[TensorInfo, int]]]:
    """``(where the data region starts, metadata, [(info, begin)] in file order)`` of the
    file of ``size`` bytes open as ``fd``, whose first bytes (at least 8, or the whole
    file) are ``first``; the header is read from ``first`` where it fits, else read."""
    if size < 8:
        raise FileFormatError(
            f"the file is {size} bytes, shorter than the 8-byte header length. Fix: "
            "this is not a safetensors file, or it is truncated.",
            path,
        )
    (n,) = struct.unpack_from("<Q", first.data)
    if n > MAX_HEADER_SIZE:
        raise FileFormatError(
            f"the header length {n} is over the {MAX_HEADER_SIZE}-byte limit. Fix: "
            "this is not a safetensors file, or it is corrupt or hostile.",
            path,
        )
    if n > size - 8:
        raise FileFormatError(
            f"the header length {n} is larger than the rest of the file "
            f"({size - 8} bytes). Fix: this is not a safetensors file, or it is truncated.",
            path,
        )
    if 8 + n <= len(first):
        raw: bytes | bytearray = first[8 : 8 + n].tobytes()
    else:
        raw = bytearray(n)
        read_exact_into(fd, memoryview(raw), 8, path)
    metadata, entries = _parse_header(raw, size - 8 - n, path)
    return 8 + n, metadata, entries


def _check_bool(arr: np.ndarray, name: str, path: str) -> None:
    if arr.size and arr.view(np.uint8).max() > 1:
        raise FileFormatError(
            f"tensor {name!r} is BOOL but holds bytes other than 0 and 1. Fix: the "
            "file is corrupt; re-save it.",
            path,
        )


def load_whole(path: str) -> dict[str, np.ndarray] | None:
    """Every tensor of the file at ``path`` if it is small (at most
    :data:`WHOLE_FILE_BYTES`), read with one ``pread``: views of that one fresh buffer
    (writable; a misaligned tensor is copied, BOOL is checked), the header validated as
    :class:`SafetensorsReader` does; ``None`` for a larger file. What ``load`` does for
    small files, without a reader.

    Raises :class:`~tensorbridge.errors.CheckpointChangedError` if the file was modified
    in place while it was read (``load`` reads it again). ``None`` for a directory too
    (``load`` gave the format by the suffix alone: it is a sharded checkpoint)."""
    try:
        fd, st = open_regular_stat(path)
    except FileFormatError:
        if os.path.isdir(path):
            return None
        raise
    try:
        size = st.st_size
        if size > WHOLE_FILE_BYTES or sys.byteorder != "little":
            return None
        try:
            whole = np.empty(size, np.uint8)
            read_exact_into(fd, whole.data, 0, path)
            start, _, entries = _read_header(fd, whole, size, path)
            out = {}
            for info, begin in entries:
                dtype = _NUMPY[info.dtype]
                if 0 in info.shape:
                    out[info.name] = np.empty(info.shape, dtype)
                    continue
                arr = np.ndarray(info.shape, dtype, whole, start + begin)
                if not arr.flags.aligned:  # (torch refuses unaligned memory)
                    arr = arr.copy()
                if info.dtype == "bool":
                    _check_bool(arr, info.name, path)
                out[info.name] = arr
        except FileFormatError as exc:  # (a file changed while read is read again)
            err = _changed_while_opening(fd, st, path, exc)
            if err is exc:
                raise
            raise err from exc
        if stamp_changed(os.fstat(fd), file_stamp(st)):
            raise modified_while_read(path)
        return out
    finally:
        os.close(fd)


# --- the reader ----------------------------------------------------------------


class SafetensorsReader(Reader):
    """An open ``.safetensors`` file whose header has been fully validated."""

    def __init__(self, path: str) -> None:
        self.path = path
        # one fstat: its times are taken before the header is read, so a change made
        # while it is read shows in any later comparison with self.stamp
        fd, st = open_regular_stat(path)
        size = st.st_size
        # (a file changed while it was opened is read again)
        with opening(fd, st, path, lambda: os.close(fd)):
            # one read takes the header of most files (tensors are read from the file)
            first = np.empty(min(size, WHOLE_FILE_BYTES), np.uint8)
            read_exact_into(fd, first.data, 0, path)
            self._data_start, self.metadata, entries = _read_header(fd, first, size, path)
        self._file = SharedDescriptor(fd, path)
        self._file_id = (st.st_dev, st.st_ino)
        #: what identifies this version of the file (see the sharded reader)
        self.stamp = file_stamp(st)
        self._infos = {info.name: info for info, _ in entries}
        self._begin = {info.name: begin for info, begin in entries}

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise self.missing(name) from None

    def descriptor(self) -> int | None:
        return self._file.fd

    def _read_rows(self, info: TensorInfo, shape: tuple[int, ...], byte_offset: int) -> np.ndarray:
        with self._file.use() as fd:
            return self._read_rows_from(fd, info, shape, byte_offset)

    def _read_rows_from(
        self, fd: int, info: TensorInfo, shape: tuple[int, ...], byte_offset: int
    ) -> np.ndarray:
        try:
            out = np.empty(shape, dtype=lookup(info.dtype).numpy)
        except MemoryError as exc:
            raise FileFormatError(
                f"tensor {info.name!r} ({info.dtype}{list(shape)}) does not fit in memory. Fix: "
                "read it in parts with read_slice(), or use a machine with more memory.",
                self.path,
            ) from exc
        if out.nbytes:
            start = self._data_start + self._begin[info.name] + byte_offset
            read_exact_into(fd, _byte_view(out), start, self.path)
        if sys.byteorder == "big" and out.dtype.itemsize > 1:  # pragma: no cover
            out.byteswap(inplace=True)
        if info.dtype == "bool":
            _check_bool(out, info.name, self.path)
        return out

    def read(self, name: str) -> np.ndarray:
        info = self.info(name)
        return self._read_rows(info, info.shape, 0)

    def raw_span(self, name: str) -> RawSpan | None:
        """The tensor's bytes in this file (validated: inside the data region).

        ``None`` for empty tensors, and for BOOL, whose bytes :meth:`read` checks.
        """
        info = self.info(name)
        nbytes = info.nbytes
        if nbytes == 0 or info.dtype == "bool" or self._file.fd is None:
            return None
        return RawSpan(self.path, self._data_start + self._begin[name], nbytes, self._file_id)

    def read_slice(self, name: str, index: int | slice) -> np.ndarray:
        """Read ``tensor[index]`` for an int or a step-1 slice of the first axis only."""
        info = self.info(name)
        start, stop, single = first_axis_rows(info, index, self.path)
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        shape = info.shape[1:] if single else (stop - start, *info.shape[1:])
        return self._read_rows(info, shape, start * row_bytes)

    def detach(self) -> int | None:
        """Close the reader, handing its open descriptor (of the file whose header was
        checked, :attr:`stamp`) to the caller, who closes it; ``None`` when it is closed
        or a read is under way (the descriptor is then closed as :meth:`close` does)."""
        return self._file.detach()

    def close(self) -> None:
        self._file.close()


# --- the format ------------------------------------------------------------------


class SafetensorsFormat(Format):
    """Hugging Face safetensors: a JSON header, then raw little-endian tensor bytes."""

    name = "safetensors"
    suffixes = (".safetensors",)
    description = (
        "Hugging Face safetensors; no code runs on load. Holds: "
        + ", ".join(CODE_TO_DTYPE.values())
        + "."
    )

    def check_info(self, info: TensorInfo, path: str) -> None:
        _safetensors_code(info, path)

    def check_write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        metadata: Mapping[str, str] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        return self._preflight(path, infos, metadata, options)[0]

    def _preflight(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        metadata: Mapping[str, str] | None,
        options: Mapping[str, Any] | None,
    ) -> tuple[dict[str, str], bytes]:
        """The checked metadata and the header (which checks the reserved name and the
        header size limit)."""
        meta = super().check_write(path, infos, metadata, options)  # names: check_unique
        return meta, build_header(infos, meta, path)

    def open(self, path: str) -> SafetensorsReader:
        return SafetensorsReader(os.fspath(path))

    def load_whole(self, path: str) -> dict[str, np.ndarray] | None:
        return load_whole(path)

    def write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        fetch: Callable[[str], np.ndarray | RawSpan],
        metadata: Mapping[str, str] | None = None,
        *,
        landed: Callable[[str, int, int, int], None] | None = None,
        checked: bool = False,
        commit: Commit | None = None,
    ) -> None:
        """Stream ``infos`` into ``path`` atomically, one fetched tensor at a time.

        ``checked=True`` skips the checks of :meth:`check_write` (the caller ran them).
        With ``commit``, the written file waits there to be fsynced and renamed together
        with others (:class:`.atomic.Commit`; a sharded save's shards).

        ``fetch(name)`` returns an array, or a :class:`RawSpan` whose bytes are
        copied kernel-side from the source file. After each such copy,
        ``landed(name, fd, offset, nbytes)`` is called, when given: ``fd`` is the
        file being written (open for reading too, valid during the call only; ``os.dup``
        it to keep it) and the tensor's bytes lie at ``offset``. A verifier can check
        them there while the next tensor is copied. An exception it raises aborts
        the write and leaves the destination untouched.
        """
        path = os.fspath(path)
        if checked:  # the caller ran check_write on these (a sharded write, for all shards)
            header = build_header(infos, metadata, path)
        else:
            header = self._preflight(path, infos, metadata, None)[1]
        sources = SpanFiles()
        try:
            with atomic_write(path, commit=commit) as f:
                f.write(header)
                kicked = 0  # bytes before this were handed to writeback already
                for info in infos:
                    got = fetch(info.name)
                    if isinstance(got, RawSpan):
                        span = check_span(got, info, path)
                        fd = sources.fd(span)
                        f.flush()  # the buffered bytes first; then the copy lands after them
                        start = f.tell()
                        copy_span(fd, span, f.fileno(), start)
                        f.seek(start + span.nbytes)
                        if landed is not None:
                            landed(info.name, f.fileno(), start, span.nbytes)
                    else:
                        arr = check_fetched(got, info, path)
                        for piece in iter_le_bytes(arr):
                            f.write(piece)
                        del arr
                    del got
                    kicked = _start_writeback(f, kicked)
        finally:
            sources.close()

    @contextlib.contextmanager
    def placed(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        metadata: Mapping[str, str] | None = None,
        *,
        checked: bool = False,
        within: int | None = None,
    ) -> Iterator[Placed]:
        """A new ``path`` whose tensor bytes others write: yields a :class:`Placed` (the
        temporary file, its header written and its data region sized, and where each
        tensor goes). Whoever fills it (worker processes, see :mod:`tensorbridge.parallel`)
        opens ``placed.path`` without creating it and writes each tensor's little-endian
        bytes at its offset. When the block ends, the file is fsynced and replaces
        ``path`` atomically; on an exception it is removed and ``path`` is untouched.
        The bytes are those :meth:`write` writes. ``within``: see :func:`.atomic.atomic_path`."""
        path = os.fspath(path)
        if checked:
            header = build_header(infos, metadata, path)
        else:
            header = self._preflight(path, infos, metadata, None)[1]
        with atomic_path(path, within=within) as tmp:
            fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                done = 0
                while done < len(header):
                    done += os.pwrite(fd, header[done:], done)
                offsets, end = {}, len(header)
                for info in infos:
                    offsets[info.name] = (end, info.nbytes)
                    end += info.nbytes
                os.ftruncate(fd, end)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            yield Placed(tmp, (st.st_dev, st.st_ino), offsets)


class Placed(NamedTuple):
    """A file being written by others (see :meth:`SafetensorsFormat.placed`)."""

    path: str  #: the temporary file, renamed over the destination at the end
    file_id: tuple[int, int]  #: its ``(st_dev, st_ino)`` here
    offsets: dict[str, tuple[int, int]]  #: tensor name -> (byte offset, nbytes)


FORMAT = SafetensorsFormat()
