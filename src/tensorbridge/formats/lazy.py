"""Lazy n-d arrays over tensors in files: index them, and only the bytes the index needs are read.

``reader.array(name)`` (on any reader from :func:`tensorbridge.open`) returns a
:class:`LazyArray`. It has ``shape``, ``dtype`` (a NumPy dtype; ``ml_dtypes`` for
bfloat16/float8) and ``ndim``, takes any basic index (ints, negative ints, slices with
any step, ``...``, ``None`` and tuples of these), and is valid input to
``dask.array.from_array``.

How little is read:
- tensors stored as one C-order run of little-endian bytes (safetensors, ``.npy``,
  stored ``.npz`` members, uncompressed ``.pt`` storages, shards of a checkpoint) are read
  with positioned reads of just the byte ranges the index touches, coalesced while the
  wasted bytes stay small (:data:`COALESCE_BYTES`);
- formats with their own chunking (``.h5``, ``.zarr``) read the chunks the index touches
  through their library (:meth:`~tensorbridge.formats.base.Reader.read_index`);
- other tensors (compressed records) read the first-axis rows the index touches.

The file is checked again on every read (same file identity as when it was opened), so a
file replaced meanwhile is refused, never mixed in. A ``LazyArray`` pickles as
``(path, format, name)`` and reopens the file where it is unpickled (a Dask worker).

>>> import numpy as np, tempfile, os, tensorbridge as tb
>>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
>>> tb.save({"w": np.arange(24, dtype=np.float32).reshape(4, 6)}, p)
>>> with tb.open(p) as r:
...     a = r.array("w")
...     a.shape, a.dtype, a[1:3, ::-2].tolist()
((4, 6), dtype('float32'), [[11.0, 9.0, 7.0], [17.0, 15.0, 13.0]])
"""

from __future__ import annotations

import operator
import os
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..dtypes import lookup
from ..errors import ConversionError, FileFormatError, LazyIndexError
from .base import RawSpan, Reader

__all__ = ["LazyArray", "normalize_index", "COALESCE_BYTES"]

#: Byte ranges closer than this are read with one positioned read (the gap is read and
#: dropped); a read never wastes more than this per range, or the bytes it keeps.
COALESCE_BYTES = 1 << 20

Key = tuple  # of ints and step>0 slices, one per axis


def normalize_index(
    index: Any, shape: tuple[int, ...], file: object = "", name: str = ""
) -> tuple[Key, tuple[Any, ...]]:
    """Split a basic index into ``(key, post)``.

    ``key`` has one entry per axis: an int in range, or a slice with a positive step
    whose ``start``/``stop`` are in range (what is read). ``post`` is the index to apply
    to the array read with ``key`` (reversals of negative steps, and new axes) so that
    ``read(key)[post] == full[index]``.
    """
    if not isinstance(index, tuple):
        index = (index,)
    n_ellipsis = sum(1 for i in index if i is Ellipsis)
    if n_ellipsis > 1:
        raise ConversionError(
            f"{file}: index {index!r} of {name!r} has more than one '...'. Fix: use at most one."
        )
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    if used > len(shape):
        raise LazyIndexError(
            f"{file}: index {index!r} has {used} entries for tensor {name!r} with "
            f"{len(shape)} axes. Fix: index at most {len(shape)} axes."
        )
    expanded: list[Any] = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (len(shape) - used))
        else:
            expanded.append(i)
    if not n_ellipsis:
        expanded.extend([slice(None)] * (len(shape) - used))
    key: list[Any] = []
    post: list[Any] = []
    axis = 0
    for i in expanded:
        if i is None:
            post.append(None)
            continue
        size = shape[axis]
        if isinstance(i, slice):
            start, stop, step = i.indices(size)
            count = len(range(start, stop, step))
            if count == 0:
                key.append(slice(0, 0, 1))
                post.append(slice(None))
            elif step > 0:
                key.append(slice(start, start + (count - 1) * step + 1, step))
                post.append(slice(None))
            else:  # read the same elements in increasing order, then reverse them
                last = start + (count - 1) * step
                key.append(slice(last, start + 1, -step))
                post.append(slice(None, None, -1))
        else:
            if isinstance(i, (bool, np.bool_)):
                raise ConversionError(
                    f"{file}: index {index!r} of {name!r} holds a bool, which is a mask, not "
                    "a position. Fix: read the array and index it with the mask."
                )
            try:
                pos = operator.index(i)
            except TypeError:
                raise ConversionError(
                    f"{file}: index entry {i!r} of {name!r} is not an int, a slice, '...' or "
                    "None (lazy arrays take basic indexes only). Fix: read the part you need, "
                    "then index it with arrays or masks."
                ) from None
            if not -size <= pos < size:
                raise LazyIndexError(
                    f"{file}: index {pos} is out of range for axis {axis} of tensor {name!r} "
                    f"with size {size}. Fix: use an int in [-{size}, {size})."
                )
            key.append(pos % size)
        axis += 1
    return tuple(key), tuple(post)


def _runs(key: Key, shape: tuple[int, ...], itemsize: int) -> tuple[int, int, int]:
    """``(first byte, last byte + 1, bytes kept)`` of the elements ``key`` selects."""
    lo = hi = 0
    kept = itemsize
    for k, st in zip(key, _c_strides(shape, itemsize), strict=True):
        if isinstance(k, slice):
            n = len(range(k.start, k.stop, k.step))
            lo += k.start * st
            hi += (k.start + (n - 1) * k.step) * st
            kept *= n
        else:
            lo += k * st
            hi += k * st
    return lo, hi + itemsize, kept


def _pread_exact(fd: int, n: int, offset: int, file: str) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            chunk = os.preadv(fd, [view[got:]], offset + got)
        except OSError as exc:
            raise FileFormatError(
                f"reading failed ({exc.strerror}). Fix: check the disk and the file.", file
            ) from exc
        if chunk == 0:
            raise FileFormatError(
                f"the file ended {n - got} bytes early while reading a tensor (it was truncated "
                "after it was opened). Fix: copy or download the file again.",
                file,
            )
        got += chunk
    return buf


class _SpanFile:
    """One open descriptor on a span's file, checked to be the file that was validated."""

    def __init__(self, span: RawSpan) -> None:
        self.path = span.path
        try:
            self.fd = os.open(span.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise FileFormatError(
                f"cannot open the file again ({exc.strerror}). Fix: check that it still exists.",
                span.path,
            ) from exc
        st = os.fstat(self.fd)
        if span.file_id is not None and (st.st_dev, st.st_ino) != tuple(span.file_id):
            os.close(self.fd)
            raise FileFormatError(
                "the file was replaced after it was opened, so its tensors cannot be read "
                "from the old header. Fix: open it again.",
                span.path,
            )

    def close(self) -> None:
        os.close(self.fd)


def _read_key_from_span(
    span: RawSpan, key: Key, shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    """The elements ``key`` selects, read from the C-order bytes at ``span``."""
    itemsize = dtype.itemsize
    out_shape = tuple(len(range(k.start, k.stop, k.step)) for k in key if isinstance(k, slice))
    if 0 in out_shape:
        return np.empty(out_shape, dtype)
    f = _SpanFile(span)
    try:
        out = np.empty(out_shape, dtype)
        _fill(f, span, key, shape, itemsize, out)
        return out
    finally:
        f.close()


def _c_strides(shape: tuple[int, ...], itemsize: int) -> list[int]:
    strides = [itemsize] * len(shape)
    for ax in range(len(shape) - 2, -1, -1):
        strides[ax] = strides[ax + 1] * shape[ax + 1]
    return strides


def _read_dense(
    f: _SpanFile,
    span: RawSpan,
    key: Key,
    shape: tuple[int, ...],
    itemsize: int,
    out: np.ndarray,
    base: int,
) -> None:
    """One positioned read covering every element ``key`` selects, then a strided copy."""
    lo, hi, _ = _runs(key, shape, itemsize)
    raw = _pread_exact(f.fd, hi - lo, span.offset + base + lo, span.path)
    unit = np.dtype(f"<u{itemsize}") if itemsize in (1, 2, 4, 8) else np.dtype(f"V{itemsize}")
    flat = np.frombuffer(raw, unit)
    sel_shape, sel_strides = [], []
    for k, st in zip(key, _c_strides(shape, itemsize), strict=True):
        if isinstance(k, slice):
            sel_shape.append(len(range(k.start, k.stop, k.step)))
            sel_strides.append(st * k.step)
    view = np.lib.stride_tricks.as_strided(
        flat, tuple(sel_shape), tuple(sel_strides), writeable=False
    )
    out.view(unit)[...] = view


def _dense(lo: int, hi: int, kept: int) -> bool:
    return hi - lo <= max(COALESCE_BYTES, 2 * kept)


def _fill(
    f: _SpanFile,
    span: RawSpan,
    key: Key,
    shape: tuple[int, ...],
    itemsize: int,
    out: np.ndarray,
    base: int = 0,
) -> None:
    """Read ``key`` of the C-order block at byte ``base`` of the span into ``out``."""
    if not shape or _dense(*_runs(key, shape, itemsize)):
        _read_dense(f, span, key, shape, itemsize, out, base)
        return
    # Too sparse for one read: split along the first axis, grouping positions whose
    # ranges together stay dense.
    k0, rest = key[0], key[1:]
    row = itemsize
    for d in shape[1:]:
        row *= d
    if isinstance(k0, int):
        _fill(f, span, rest, shape[1:], itemsize, out, base + k0 * row)
        return
    positions = range(k0.start, k0.stop, k0.step)
    if rest and not _dense(*_runs(rest, shape[1:], itemsize)):
        for j, p in enumerate(positions):
            _fill(f, span, rest, shape[1:], itemsize, out[j], base + p * row)
        return
    group = max(1, COALESCE_BYTES // max(1, k0.step * row))
    for j in range(0, len(positions), group):
        ps = positions[j : j + group]
        sub = (slice(ps.start, ps.start + (len(ps) - 1) * ps.step + 1, ps.step), *rest)
        _read_dense(f, span, sub, shape, itemsize, out[j : j + len(ps)], base)


def read_index(reader: Reader, name: str, key: Key) -> np.ndarray:
    """``tensor[key]`` (a normalized key) read with as few bytes as the reader allows."""
    info = reader.info(name)
    dtype = lookup(info.dtype).numpy
    span = reader.raw_span(name)
    if span is not None and sys.byteorder == "little":
        return _read_key_from_span(span, key, info.shape, dtype)
    own = type(reader).read_index is not Reader.read_index
    if own:
        return reader.read_index(name, key)
    # rows of the first axis, then the rest in memory
    if not info.shape:
        return reader.read(name)
    k0 = key[0]
    if isinstance(k0, int):
        rows = reader.read_slice(name, k0)
        return np.array(rows[key[1:]], order="C") if key[1:] else rows
    if k0.start >= k0.stop:
        shape = tuple(len(range(k.start, k.stop, k.step)) for k in key if isinstance(k, slice))
        return np.empty(shape, dtype)
    rows = reader.read_slice(name, slice(k0.start, k0.stop))
    return np.array(rows[(slice(None, None, k0.step),) + tuple(key[1:])], order="C")


class ReaderOwner:
    """Keeps a reader open while any array made from it is alive, and closes it after the
    last one is collected (``to_dask`` arrays, and arrays unpickled on a worker)."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        weakref.finalize(self, reader.close)


def _reopen(path: str, format: str, name: str) -> LazyArray:
    from . import get_format

    owner = ReaderOwner(get_format(format).open(path))
    return LazyArray(owner.reader, name, format, owner)


class LazyArray:
    """One tensor of an open file, read only where indexed. See the module docstring."""

    __array_priority__ = 0

    def __init__(
        self, reader: Reader, name: str, format: str, owner: ReaderOwner | None = None
    ) -> None:
        info = reader.info(name)
        self._info = info
        self._reader = reader
        self._owner = owner  # closes the reader once no array needs it
        self.format_name = format
        self.name = name
        self.shape: tuple[int, ...] = tuple(info.shape)
        self.dtype: np.dtype = lookup(info.dtype).numpy
        self.canonical_dtype = info.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return self._info.size

    @property
    def nbytes(self) -> int:
        return self._info.nbytes

    @property
    def path(self) -> str:
        return self._reader.path

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d lazy array")
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        key, post = normalize_index(index, self.shape, self._reader.path, self.name)
        out = read_index(self._reader, self.name, key)
        if any(p is None or p != slice(None) for p in post):
            out = out[post]
            if out.base is not None:
                out = out.copy()
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        """The rows of the first axis, each read when it is reached."""
        if not self.shape:
            raise TypeError("iteration over a 0-d lazy array")
        return (self[i] for i in range(self.shape[0]))

    def read(self) -> np.ndarray:
        """The whole tensor (a fresh array)."""
        return self._reader.read(self.name)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if copy is False:
            raise ValueError(
                f"np.asarray(..., copy=False) of lazy array {self.name!r}: its bytes are in a "
                "file, so reading them is a copy. Fix: drop copy=False."
            )
        out = self.read()
        return out if dtype is None else out.astype(dtype, copy=False)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (self._reader.path, self.format_name, self.name))

    def __repr__(self) -> str:
        return (
            f"LazyArray({self.name!r}, shape={self.shape}, dtype={self.canonical_dtype}, "
            f"file={self._reader.path!r})"
        )
