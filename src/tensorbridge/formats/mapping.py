"""Arrays that map a file's bytes instead of copying them (``load(..., mmap=...)``).

Any reader that says where a tensor's exact bytes lie (:meth:`~.base.Reader.raw_span`:
safetensors, sharded checkpoints, stored ``.pt`` records, C-order little-endian ``.npy``,
stored ``.npz`` members) can hand out a NumPy array over a private mapping of those bytes
(``MAP_PRIVATE``, as ``safetensors.torch.load_file`` maps through
``torch.UntypedStorage.from_file``). Nothing
is read until a page is touched, so a load costs what the headers cost (and, for
``.npz``, one pass that checks each member's CRC-32).

What a mapping means:

- the array is writable; writes are copy-on-write and never reach the file;
- a file **replaced** after loading (``os.replace``, as tensorbridge, ``huggingface_hub``
  and ``save_pretrained`` write) leaves the array unchanged: the mapping holds the old inode;
- a file **rewritten in place** (``torch.save``, ``np.save`` and ``safetensors``'
  ``save_file`` open the same inode with ``O_TRUNC``) shows through on every page the
  array has not written, and a page past the new end of a **truncated** file kills the
  process with SIGBUS on access.

So ``mmap=None`` (the default) maps only where the last point cannot happen: files on a
read-only file system (a read-only mount, squashfs, a container layer), and files it can
hold a read lease on (Linux: :mod:`.file_lease`), which turns a rewrite into a copy of the
mapped bytes before the writer may go on. Elsewhere it copies, with one ``pread`` per
tensor into one fresh allocation, and the arrays never change. ``mmap=True`` maps wherever
the bytes allow it (the caller accepts the above); ``mmap=False`` always copies. Tensors
whose bytes are not stored as they are returned (bool, which is checked; empty;
byte-swapped; strided; compressed) are always copied.
"""

from __future__ import annotations

import mmap
import os
import sys
from typing import Any

import numpy as np

from ..dtypes import lookup
from .base import RawSpan, Reader
from .safetensors import SpanFiles, open_span, read_exact_into

__all__ = ["Arena", "FileMaps", "LoadReads", "should_map"]


def should_map(path: str, mode: bool | None) -> str:
    """How ``load(path, mmap=mode)`` reads spans: ``"map"`` (``mmap=True``, or ``path`` on a
    read-only file system, where nothing can rewrite the file in place), ``"lease"`` (the
    default elsewhere: map under a read lease, else copy) or ``"copy"`` (``mmap=False``)."""
    if mode is not None:
        return "map" if mode else "copy"
    try:
        if os.statvfs(path).f_flag & getattr(os, "ST_RDONLY", 1):
            return "map"
    except (OSError, ValueError):
        pass
    return "lease" if sys.platform == "linux" else "copy"


_UNSEEN: Any = object()


class FileMaps:
    """One private mapping per file, shared by the arrays of that file (each array keeps
    its mapping alive). ``leased``: map only files a read lease can be held on
    (:func:`.file_lease.guarded_map`; the lease's descriptor lives as long as the mapping),
    and say ``None`` for the tensors of the others (the caller copies them); otherwise map
    every file and close its descriptor at once."""

    def __init__(self, leased: bool = False) -> None:
        self._leased = leased
        self._maps: dict[tuple[str, Any], Any] = {}  # an mmap.mmap, or None: not mapped

    def array(self, reader: Reader, name: str) -> np.ndarray | None:
        """Tensor ``name`` of ``reader`` over a mapping of its file, or ``None`` when its
        bytes are not stored exactly as :meth:`~.base.Reader.read` returns them."""
        if sys.byteorder != "little":  # pragma: no cover - spans are little-endian bytes
            return None
        span = reader.raw_span(name)
        if span is None:
            return None
        key = (span.path, span.file_id)
        mapped = self._maps.get(key, _UNSEEN)
        if mapped is None:  # a file that is not mapped (leased: small, or no lease)
            return None
        info = reader.info(name)
        dtype = lookup(info.dtype).numpy
        if span.nbytes != info.nbytes or span.offset % max(dtype.alignment, 1):
            return None  # a misaligned tensor is copied (torch refuses unaligned memory)
        if mapped is _UNSEEN:
            # the descriptor the reader checked the file through (a .npy reader, a sharded
            # reader opened with hold=True), else that file opened again
            smallest = 0
            if self._leased:
                from .file_lease import MIN_BYTES as smallest  # (Linux only: fcntl)

                stamp = reader.stamp if span.path == reader.path else None
                if stamp is not None and stamp[2] < smallest:  # a copy costs less
                    self._maps[key] = None
                    return None
            take = getattr(reader, "take_descriptor", None)
            held = take(span, smallest) if take is not None else None
            fd, size = held if held is not None else (reopen(reader, span), None)
            if self._leased:
                from .file_lease import guarded_map

                mapped = guarded_map(fd, size)  # (takes the descriptor)
            else:
                try:
                    mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                except ValueError:  # the file is empty now: it was truncated since its check
                    raise _truncated(name, span.path) from None
                except OSError as exc:
                    raise _unmappable(exc, span.path) from exc
                finally:
                    os.close(fd)
            self._maps[key] = mapped
            if mapped is not None:
                note = getattr(reader, "mapped", None)
                if note is not None:
                    note(span)  # (still the version whose header was checked?)
        if mapped is None:
            return None
        if span.offset + span.nbytes > len(mapped):  # the file shrank since it was checked
            raise _truncated(name, span.path)
        return np.ndarray(info.shape, dtype, mapped, span.offset)


def reopen(reader: Reader, span: RawSpan) -> int:
    """A new descriptor, in an open file description of its own (a lease needs one), of
    the very file ``reader`` checked: through ``/proc/self/fd`` where the reader's own
    descriptor is at hand, so a file replaced since (``os.replace``) is not opened instead;
    else the path opened again and refused if it names another file now
    (:func:`.safetensors.open_span`)."""
    own = reader.descriptor() if span.path == reader.path else None
    if own is not None and sys.platform == "linux":
        try:
            return os.open(f"/proc/self/fd/{own}", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            pass
    return open_span(span)


def _truncated(name: str, path: str) -> Exception:
    from ..errors import FileFormatError

    return FileFormatError(
        f"the file ends before tensor {name!r} does (it was truncated after it was "
        "opened). Fix: copy or download the file again.",
        path,
    )


def _unmappable(exc: OSError, path: str) -> Exception:
    import errno

    from ..errors import FileFormatError

    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        fix = (
            "raise the open-file limit (e.g. `ulimit -n 4096`) or the memory map count "
            "(vm.max_map_count), or load with mmap=False to copy instead"
        )
    else:
        fix = "load with mmap=False to copy instead of mapping"
    return FileFormatError(f"the file cannot be mapped ({exc.strerror}). Fix: {fix}.", path)


class Arena:
    """Copies for one ``load``: the tensors whose bytes are stored as returned (their
    :meth:`~.base.Reader.raw_span`) are read with one ``pread`` each into slices of one
    allocation, made when the first is asked for. One large allocation faults its pages in
    far faster than one per tensor (the kernel can back it with huge pages). The arrays are
    views of it: the memory is released when the last of them is."""

    ALIGN = 64

    def __init__(self, names: list[str] | None) -> None:
        self._names = names
        self._slots: dict[str, tuple[Any, int]] | None = None
        self._buffer = np.empty(0, np.uint8)
        self._files = SpanFiles()

    def _plan(self, reader: Reader) -> None:
        slots: dict[str, tuple[Any, int]] = {}
        total = 0
        for name in self._names if self._names is not None else reader.keys():
            span = reader.raw_span(name)
            if span is None or span.nbytes != reader.info(name).nbytes:
                continue
            slots[name] = (span, total)
            total += -(-span.nbytes // self.ALIGN) * self.ALIGN
        raw = np.empty(total + self.ALIGN, np.uint8)
        skip = -raw.ctypes.data % self.ALIGN
        self._buffer = raw[skip : skip + total]
        self._slots = slots

    def array(self, reader: Reader, name: str) -> np.ndarray | None:
        """A fresh copy of tensor ``name`` in the arena, or ``None`` (read it instead)."""
        if self._slots is None:
            self._plan(reader)
        assert self._slots is not None
        slot = self._slots.pop(name, None)
        if slot is None:
            return None
        span, start = slot
        info = reader.info(name)
        piece = self._buffer[start : start + span.nbytes]
        # through the reader's own descriptor where it has one: the file it checked, even
        # if another was renamed over its path since
        own = reader.descriptor() if span.path == reader.path else None
        fd = self._files.fd(span) if own is None else own
        read_exact_into(fd, piece.data, span.offset, span.path)
        return piece.view(lookup(info.dtype).numpy).reshape(info.shape)

    def close(self) -> None:
        self._files.close()


class LoadReads:
    """How one attempt of ``load`` gets each tensor of a reader: a mapping
    (:class:`FileMaps`), else a copy in an :class:`Arena`, else the reader's own
    :meth:`~.base.Reader.read`. ``mode`` is :func:`should_map`'s answer; ``keep``: the
    arrays are kept as they are (NumPy, or torch on the CPU sharing them), so a target
    that copies anyway is given copies, not mappings."""

    def __init__(self, mode: str, names: list[str] | None, keep: bool) -> None:
        #: whether files are mapped
        self.maps = mode == "map" or (mode == "lease" and keep)
        self._maps = FileMaps(leased=mode == "lease") if self.maps else None
        self._copies = Arena(names) if keep and mode != "map" else None
        #: how the first tensor that was not mapped was had: True, copied into the arena;
        #: False, read by the reader's read; None: none was
        self.copied: bool | None = None

    def __call__(self, reader: Reader, name: str) -> np.ndarray:
        arr = None if self._maps is None else self._maps.array(reader, name)
        if arr is not None:  # (mapped: Reader.mapped compared the file with its check)
            return arr
        if self._copies is not None:
            arr = self._copies.array(reader, name)
        if self.copied is None:
            self.copied = arr is not None
        return reader.read(name) if arr is None else arr

    def close(self) -> None:
        if self._copies is not None:
            self._copies.close()
