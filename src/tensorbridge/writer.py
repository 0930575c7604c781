"""Streaming export: append batches of tensors, get one file, with memory bounded to a batch.

``Writer`` collects batches (``w.append(x=..., y=...)``) of tensors from any
framework and concatenates them along axis 0, per name. Each batch is
converted to NumPy and its bytes are appended to a spool file per name, in
the destination's directory; nothing but the batch at hand is held in
memory. ``close()`` (the end of the ``with`` block) writes the final file
through the format table's streaming writer: each tensor is handed over as a
read-only memory map of its spool file, so the operating system pages it in
as the writer streams it out. The destination is replaced atomically;
the spool files are removed on success and on failure; spool files a killed
process left behind are removed by the next Writer for the same destination. An exception inside
the ``with`` block writes nothing and leaves an existing destination as it was.

>>> import numpy as np, tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "out.npz")
>>> with Writer(p) as w:
...     for i in range(3):
...         w.append(x=np.full((2, 4), i, np.float32), y=np.arange(2))
>>> np.load(p)["x"].shape, np.load(p)["y"].tolist()
((6, 4), [0, 1, 0, 1, 0, 1])
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import weakref
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from .dtypes import numpy_dtype
from .errors import ConversionError, FileFormatError, message
from .files import check_metadata, file_path, tensor_info, to_host
from .formats import TensorInfo, format_for_path
from .formats.atomic import lock_new_file, remove_stale, temp_name
from .formats.names import check_unique
from .formats.safetensors import iter_le_bytes

__all__ = ["Writer", "SPOOL_MARKER"]

#: Spool files are named ``.DEST.tb-spool-PID-RANDOM`` in the destination's directory.
#: A new Writer for the same destination removes those whose process is gone (SIGKILL).
SPOOL_MARKER = ".tb-spool-"
#: At most this many spool files are open at once (least recently used closed first,
#: reopened in append mode), so thousands of names stay under the open-file limit.
MAX_OPEN_SPOOLS = 64


def _remove(paths: list[str]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)
    paths.clear()


def _spool_dtype(dtype: str) -> np.dtype:
    """The dtype of the little-endian bytes spooled for canonical ``dtype``."""
    dt = numpy_dtype(dtype)
    if sys.byteorder == "big" and dt.itemsize > 1:  # pragma: no cover - big-endian hosts
        dt = dt.newbyteorder("<")
    return dt


class Writer:
    """Append batches of tensors; on close, write them concatenated along axis 0.

    ``format`` and ``**options`` are those of :func:`tensorbridge.files.save`.
    Every ``append`` must give the same names, with the same dtypes and the
    same shapes after the first axis, as the first one.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        /,
        *,
        format: str | None = None,
        metadata: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        self.path = file_path(path)
        self._format = format_for_path(self.path, format)
        self._metadata = check_metadata(metadata, self.path)
        # options and metadata the format refuses fail now, not after a long export
        self._format.check_write(self.path, [], self._metadata, options)
        self._options = dict(options)
        target = os.path.realpath(self.path)
        self._dir = target if os.path.isdir(target) else (os.path.dirname(target) or ".")
        self._base = os.path.basename(target)
        remove_stale(self._dir, self._base, SPOOL_MARKER)
        self._order: list[str] = []
        self._spec: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (dtype, trailing)
        self._rows: dict[str, int] = {}
        self._files: dict[str, BinaryIO] = {}
        self._spools: dict[str, str] = {}
        self._paths: list[str] = []  # every spool path, for cleanup
        self._finalizer = weakref.finalize(self, _remove, self._paths)
        self._state = "open"  # "open" | "closed" | "aborted"
        self.batches = 0

    # -- appending -----------------------------------------------------------
    def _check_open(self) -> None:
        if self._state != "open":
            raise ConversionError(
                message(
                    f"append to a Writer for {self.path!r}",
                    f"it is {self._state}",
                    "create a new Writer",
                )
            )

    def _check_batch(self, tensors: Mapping[str, Any]) -> list[tuple[str, TensorInfo, Any]]:
        if not tensors:
            raise ConversionError(
                message(
                    "an empty append()",
                    "a batch needs at least one tensor",
                    "pass tensors by name, e.g. w.append(x=batch_x, y=batch_y)",
                )
            )
        if self._order and set(tensors) != set(self._order):
            raise ConversionError(
                message(
                    f"a batch with names {sorted(tensors)!r}",
                    f"the first batch had {sorted(self._order)!r}; every batch must have the same "
                    "names",
                    "append the same set of tensors each time",
                )
            )
        check_unique(list(tensors), self.path, writing=True)
        checked = []
        for name, value in tensors.items():
            info, leaf = tensor_info(name, value, (name,))
            if not info.shape:
                raise ConversionError(
                    message(
                        f"0-d tensor {name!r}",
                        "batches are concatenated along axis 0, which a 0-d tensor does not have",
                        "append x[None] (a batch of one)",
                    )
                )
            spec = (info.dtype, info.shape[1:])
            first = self._spec.get(name, spec)
            if spec != first:
                raise ConversionError(
                    message(
                        f"tensor {name!r} of dtype {info.dtype} and shape {list(info.shape)}",
                        f"the first batch had dtype {first[0]} and shape [N, "
                        f"{', '.join(map(str, first[1]))}]; batches must match in dtype and in "
                        "every axis but the first",
                        f"cast or reshape it, e.g. x.astype({first[0]!r}) or "
                        f"x.reshape(-1, {', '.join(map(str, first[1]))})",
                    )
                )
            checked.append((name, info, leaf))
        return checked

    def _check_dtypes(self, checked: list[tuple[str, TensorInfo, Any]]) -> None:
        """Refuse, at the first append, dtypes, names and counts the destination format
        cannot hold (every later batch has the same names and dtypes). Dtypes first, so
        their refusal carries the Writer's own advice."""
        infos = [TensorInfo(name, info.dtype, (0, *info.shape[1:])) for name, info, _ in checked]
        for info in infos:
            try:
                self._format.check_info(info, self.path)
            except ConversionError:
                example = "complex64" if info.dtype.startswith("complex") else "float32"
                raise ConversionError(
                    message(
                        f"tensor {info.name!r} of dtype {info.dtype} for {self.path!r}",
                        f"{self._format.name} files cannot hold {info.dtype}",
                        f"cast each batch before appending (e.g. x.astype(np.{example})), or "
                        "write to .h5 or .npz, which hold every dtype",
                    )
                ) from None
        self._format.check_write(self.path, infos)

    def _new_spool(self) -> int:
        """Make, lock and open a new spool file (its path last in ``self._paths``). Locked
        while open: cleaners elsewhere skip it (atomic.py). An interrupt at any point (one
        that comes as the open returns too) leaves no file: its name, random and so ours
        alone, is chosen before the open and removed on any exception."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        while True:
            tmp = temp_name(self._dir, self._base, SPOOL_MARKER)
            made: str | None = tmp
            fd: int | None = None
            try:
                try:
                    fd = os.open(tmp, flags, 0o600)
                except OSError:
                    made = None  # not made here
                    raise
                if lock_new_file(fd, tmp):
                    self._paths.append(tmp)  # removed with the others from now on
                    return fd
            except FileExistsError:
                continue  # (a name taken: another one)
            except BaseException:
                if made is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(made)
                if fd is not None:
                    os.close(fd)
                raise
            os.close(fd)  # removed by a cleaner before the lock: another name

    def _spool(self, name: str) -> BinaryIO:
        """The open spool file of ``name``; at most :data:`MAX_OPEN_SPOOLS` stay open."""
        f = self._files.pop(name, None)  # re-inserted below: the dict's order is the LRU
        if f is None:
            while len(self._files) >= MAX_OPEN_SPOOLS:
                self._files.pop(next(iter(self._files))).close()
            tmp = self._spools.get(name)
            try:
                if tmp is None:
                    fd = self._new_spool()
                    tmp = self._paths[-1]
                    self._spools[name] = tmp
                    f = os.fdopen(fd, "wb")
                else:
                    # no O_CREAT: a spool removed while closed must fail, not restart empty
                    f = os.fdopen(
                        os.open(tmp, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)), "ab"
                    )
                    lock_new_file(f.fileno(), tmp)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    raise FileFormatError(
                        f"cannot open a spool file: too many open files ({exc.strerror}). "
                        "Fix: raise the open-file limit (e.g. `ulimit -n 4096`) or close "
                        "other open files.",
                        self.path,
                    ) from exc
                raise FileFormatError(
                    f"cannot create a spool file in {self._dir!r} ({exc.strerror}). Fix: check "
                    "that the directory exists and is writable.",
                    self.path,
                ) from exc
        self._files[name] = f
        return f

    def append(self, /, **tensors: Any) -> None:
        """Append one batch: each keyword is a tensor name, each value a tensor.

        The whole batch is checked before any of it is spooled.
        """
        self._check_open()
        checked = self._check_batch(tensors)
        if not self._order:
            self._check_dtypes(checked)
            self._order = list(tensors)
            self._spec = {name: (info.dtype, info.shape[1:]) for name, info, _ in checked}
        try:
            for name, info, leaf in checked:
                arr = to_host(leaf)
                f = self._spool(name)
                for piece in iter_le_bytes(arr):
                    f.write(piece)
                self._rows[name] = self._rows.get(name, 0) + info.shape[0]
                del arr
        except BaseException as exc:
            self.abort()  # a half-spooled batch cannot be kept
            if isinstance(exc, OSError):
                raise FileFormatError(
                    f"spooling a batch failed ({exc.strerror}); nothing was written. Fix: "
                    "free disk space in the destination's directory and start again.",
                    self.path,
                ) from exc
            raise
        self.batches += 1

    # -- finishing -----------------------------------------------------------
    def infos(self) -> list[TensorInfo]:
        """What the file will hold, so far."""
        return [
            TensorInfo(n, self._spec[n][0], (self._rows.get(n, 0), *self._spec[n][1]))
            for n in self._order
        ]

    def _fetch(self, name: str) -> np.ndarray:
        dtype, trailing = self._spec[name]
        shape = (self._rows[name], *trailing)
        dt = _spool_dtype(dtype)
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return np.empty(shape, numpy_dtype(dtype))
        return np.memmap(self._spools[name], dtype=dt, mode="r", shape=shape)

    def close(self) -> None:
        """Write the file atomically, then remove the spool files. Idempotent."""
        if self._state != "open":
            return
        try:
            for f in self._files.values():
                f.close()
            self._format.write(
                self.path, self.infos(), self._fetch, self._metadata, **self._options
            )
        finally:
            self._state = "closed"
            self._files.clear()
            _remove(self._paths)

    def abort(self) -> None:
        """Drop everything appended; write nothing. Idempotent."""
        if self._state == "closed":
            return
        self._state = "aborted"
        for f in self._files.values():
            with contextlib.suppress(OSError):
                f.close()
        self._files.clear()
        _remove(self._paths)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
