"""The shape every file-format module has.

A format module (``npy.py``, ``npz.py``, ``safetensors.py``, ``pt.py``,
``h5.py``, ``sharded.py``) defines one :class:`Format` subclass instance named
``FORMAT``. The table in ``formats/__init__.py`` lists them; the library API
and the CLI dispatch only through that table.

Readers are lazy: ``open`` validates the file's structure (header, names,
sizes) without reading tensor data; ``read(name)`` returns one host NumPy
array in its canonical dtype (bfloat16/float8 as ``ml_dtypes`` dtypes).

Writers stream: ``write`` receives every tensor's :class:`TensorInfo` up front
(so headers can be written first) and a ``fetch(name)`` callable that yields
each array only when it is its turn, so at most one tensor is held at a time.

A reader may also say where a tensor's bytes lie in its file
(:meth:`Reader.raw_span`), so that a writer that stores the same bytes can copy
them kernel-side instead of reading them into memory.
"""

from __future__ import annotations

import contextlib
import os
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import lookup
from .names import check_unique, text_is_utf8

if TYPE_CHECKING:
    from .lazy import LazyArray

__all__ = ["TensorInfo", "RawSpan", "Reader", "Format"]


@dataclass(frozen=True)
class TensorInfo:
    """What a file says about one tensor, before its data is read."""

    name: str
    dtype: str  # canonical dtype name, see tensorbridge.dtypes
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.size * lookup(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
        }


@dataclass(frozen=True)
class RawSpan:
    """Where one tensor's exact bytes lie in a file.

    ``nbytes`` bytes at ``offset`` in the regular file ``path`` are the tensor's
    C-order, little-endian bytes, exactly as its canonical dtype is written (the
    layout of a safetensors data region). ``file_id`` is ``(st_dev, st_ino)`` of
    the file the reader validated, when known: whoever opens ``path`` again
    checks it, so a file replaced in the meantime is refused, not mixed in.
    """

    path: str
    offset: int
    nbytes: int
    file_id: tuple[int, int] | None = None


def file_stamp(st: os.stat_result) -> tuple[int, ...]:
    """What identifies one version of a file: device, inode, size, modification time and
    inode change time (which every write sets and nobody can set back)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class SharedDescriptor:
    """A reader's open descriptor, shared by its reads in any number of threads:
    :meth:`close` while a read is under way leaves the descriptor to the last read to
    close, so its number is never reused by another file under a read (which would then
    read that file's bytes)."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd: int | None = fd
        self._path = path
        self._lock = threading.Lock()
        self._users = 0  # reads under way
        self._closing = False

    @property
    def fd(self) -> int | None:
        """The descriptor (borrowed), or ``None`` once closed or closing."""
        return None if self._closing else self._fd

    @contextlib.contextmanager
    def use(self) -> Iterator[int]:
        """The descriptor, held open for the ``with`` block (else ``FileFormatError``:
        the reader is closed)."""
        with self._lock:
            if self._fd is None or self._closing:
                from ..errors import FileFormatError

                raise FileFormatError("the file is closed. Fix: open it again.", self._path)
            self._users += 1
            fd = self._fd
        try:
            yield fd
        finally:
            with self._lock:
                self._users -= 1
                if self._closing and self._users == 0 and self._fd is not None:
                    os.close(self._fd)
                    self._fd = None

    def detach(self) -> int | None:
        """Close, handing the descriptor to the caller, who closes it; ``None`` when it is
        closed or a read is under way (the last read then closes it)."""
        with self._lock:
            self._closing = True
            fd = self._fd
            if fd is None or self._users:
                return None
            self._fd = None
            return fd

    def close(self) -> None:
        with self._lock:
            self._closing = True
            if self._fd is not None and self._users == 0:
                os.close(self._fd)
                self._fd = None


def stamp_changed(st: os.stat_result, stamp: tuple[int, ...]) -> bool:
    """Whether the file whose ``fstat`` is ``st`` now was modified in place since it had
    ``stamp`` (:func:`file_stamp`). A file replaced or removed since (no link left) was
    not: unlinking sets its ctime, and leaves its bytes as they were."""
    if st.st_nlink == 0:
        return file_stamp(st)[:4] != stamp[:4]
    return file_stamp(st) != stamp


def modified_while_read(path: str) -> Exception:
    """The :class:`~tensorbridge.errors.CheckpointChangedError` of a file whose version
    changed while it was read (``load`` reads it again)."""
    from ..errors import CheckpointChangedError

    return CheckpointChangedError(
        "the file was modified in place while it was read (a save was under way, "
        "or its permissions or links changed); what was read may mix two versions. "
        "Fix: load it again.",
        path,
    )


class Reader:
    """An open tensor file. Use as a context manager; ``close()`` is idempotent."""

    path: str
    metadata: dict[str, str]
    #: what the file holds that is not read as a tensor: name -> why (h5 lists strings,
    #: links, partly written datasets...); empty for formats that refuse instead
    skipped: Mapping[str, str] = MappingProxyType({})
    #: the version of the file when it was opened (:func:`file_stamp` of the descriptor's
    #: ``fstat``, taken before the header was read); ``None`` for readers that do not keep one
    stamp: tuple[int, ...] | None = None

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        """Read one tensor into host memory (a fresh, writable array)."""
        raise NotImplementedError

    def read_slice(self, name: str, index: int | slice) -> np.ndarray:
        """``tensor[index]`` for an int or a step-1 slice of the first axis (a fresh array).

        safetensors, h5 and sharded checkpoints read only those rows; this default
        reads the whole tensor, then keeps the rows."""
        info = self.info(name)
        start, stop, single = first_axis_rows(info, index, self.path)
        rows = self.read(name)[start:stop]
        return rows.reshape(info.shape[1:]).copy() if single else rows.copy()

    def array(self, name: str) -> LazyArray:
        """Tensor ``name`` as a lazy n-d array: index it, and only the bytes the index needs
        are read (see :mod:`tensorbridge.formats.lazy`)."""
        from . import FORMAT_MODULES
        from .lazy import LazyArray

        module = type(self).__module__.rsplit(".", 1)[-1]
        fmt = next((k for k, v in FORMAT_MODULES.items() if v == module), module)
        return LazyArray(self, name, fmt)

    def read_index(self, name: str, key: tuple) -> np.ndarray:
        """``tensor[key]`` for a normalized basic index (one int or step>0 slice per axis,
        see :func:`~tensorbridge.formats.lazy.normalize_index`), reading only what it needs.
        Formats with their own chunking (h5, zarr) override it; the others are read by
        byte range (:meth:`raw_span`) or by first-axis rows."""
        from .lazy import read_index

        return read_index(self, name, key)

    def native_chunks(self, name: str) -> tuple[int, ...] | None:
        """The chunk shape the file stores ``name`` in (h5, zarr), or ``None``."""
        return None

    def raw_span(self, name: str) -> RawSpan | None:
        """Where tensor ``name``'s bytes lie, stored contiguous, C order and
        little-endian exactly as :meth:`read` would return them; ``None`` when
        they are not stored that way (then use :meth:`read`)."""
        return None

    def close(self) -> None:
        pass

    def descriptor(self) -> int | None:
        """The open descriptor this reader checked its file through (borrowed: the reader
        closes it), or ``None`` (closed, handed on, or a reader of several files). Copies
        read through it, so a file replaced since (``os.replace``) is not read instead."""
        return None

    def changed(self) -> bool:
        """Whether the file was modified in place since it was opened (its stamp differs).

        A file replaced by another (``os.replace``, as atomic writers do) is not: this
        reader reads the inode it opened, whose bytes the replacement does not touch."""
        if self.stamp is None:
            return False
        fd = self.descriptor()
        try:
            if fd is not None:  # the very file it opened
                st = os.fstat(fd)
                # (unless another thread closed the reader and the number names another
                # file now: then ask the path, as for a reader without a descriptor)
                if (st.st_dev, st.st_ino) == self.stamp[:2]:
                    return stamp_changed(st, self.stamp)
            now = file_stamp(os.stat(self.path))
        except OSError:  # removed: the inode this reader opened is unchanged
            return False
        return now[:2] == self.stamp[:2] and now != self.stamp

    def mapped(self, span: RawSpan) -> None:
        """Called once the file of ``span`` is mapped (under a lease, nothing can rewrite it
        any more): it must still be the version whose header was checked, else the mapping
        holds another version's bytes at this version's offsets
        (:class:`~tensorbridge.errors.CheckpointChangedError`: ``load`` reads again)."""
        self.verify()

    def verify(self) -> None:
        """Raise :class:`~tensorbridge.errors.CheckpointChangedError` if the file was
        modified in place since it was opened: what was read from it may mix two versions
        (``load`` calls it after its reads, and reads again)."""
        if self.changed():
            raise modified_while_read(self.path)

    # --- shared conveniences -------------------------------------------------
    def missing(self, name: object) -> Exception:
        """The error for a name the file does not hold (raise it ``from None``)."""
        from ..errors import FileFormatError

        why = self.skipped.get(name) if isinstance(name, str) else None
        if why is not None:
            return FileFormatError(
                f"{name!r} is not read: it holds {why}. Fix: load the file's tensors "
                "without it (see reader.skipped, or `tensorbridge inspect`).",
                self.path,
            )
        names = self.keys()
        return FileFormatError(
            f"no tensor named {name!r}. Fix: use one of {names[:20]!r}"
            + (" ..." if len(names) > 20 else "")
            + ".",
            self.path,
        )

    def infos(self) -> list[TensorInfo]:
        return [self.info(k) for k in self.keys()]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.read(name)

    def __contains__(self, name: object) -> bool:
        return name in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class opening:  # noqa: N801 - used as a function: ``with opening(...):``
    """Around a reader's work on ``fd`` while it opens it (``fstat`` ``st`` taken before
    anything was read): on an error, ``close()``, and if the file changed since ``st``
    (a save was under way: its header may have been half written) raise
    :class:`~tensorbridge.errors.CheckpointChangedError` instead (``load`` reads again);
    a file that did not change gets its own error. (A class, not a generator: it is
    entered once per file opened, and costs a third as much.)"""

    __slots__ = ("_fd", "_st", "_path", "_close")

    def __init__(self, fd: int, st: os.stat_result, path: str, close: Callable[[], object]) -> None:
        self._fd = fd
        self._st = st
        self._path = path
        self._close = close

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None:
            return
        if not isinstance(exc, Exception):
            self._close()
            return  # (re-raised)
        err = _changed_while_opening(self._fd, self._st, self._path, exc)
        self._close()
        if err is not exc:
            raise err from exc


def _changed_while_opening(fd: int, st: os.stat_result, path: str, exc: Exception) -> Exception:
    """The error for a reader that failed while it opened ``fd`` (``fstat`` ``st`` taken
    before anything was read): :class:`~tensorbridge.errors.CheckpointChangedError` if the
    file changed since (a save was under way: its header may have been half written, and
    ``load`` reads again), else ``exc`` itself (the file is what it says)."""
    from ..errors import CheckpointChangedError, FileFormatError

    if not isinstance(exc, FileFormatError) or isinstance(exc, CheckpointChangedError):
        return exc
    try:
        if file_stamp(os.fstat(fd)) == file_stamp(st):
            return exc
    except OSError:
        return exc
    new = CheckpointChangedError(
        "the file changed while its header was read (a save was under way, or its "
        "permissions or links changed). Fix: load it again.",
        path,
    )
    new.__cause__ = exc
    return new


class Format:
    """One file format: a name, its suffixes, and open/write."""

    name: str = ""
    suffixes: tuple[str, ...] = ()
    #: dtypes the format can hold natively; others use tensorbridge's documented layout
    description: str = ""
    #: whether the format has a place for string metadata
    holds_metadata: bool = True
    #: the keyword options ``write`` takes (``compress``, ``max_shard_size``)
    options: tuple[str, ...] = ()
    #: ``--dtype`` values that store tensors quantised (GGUF's ``q8_0``...), see
    #: :meth:`quantized_info`
    quantizations: tuple[str, ...] = ()

    def open(self, path: str) -> Reader:
        raise NotImplementedError

    def load_whole(self, path: str) -> dict[str, np.ndarray] | None:
        """Every tensor of a small file, read at once without a reader (``load``'s way
        for the files of formats that have one), or ``None``: read it through a reader.
        Raises :class:`~tensorbridge.errors.CheckpointChangedError` for a file modified
        in place while it was read."""
        return None

    def check_info(self, info: TensorInfo, path: str) -> None:
        """Raise :class:`~tensorbridge.ConversionError` if this format cannot hold
        ``info``'s dtype. Formats that hold every dtype keep this default."""

    def quantized_info(self, info: TensorInfo, quantization: str) -> TensorInfo:
        """``info`` marked to be stored as ``quantization`` (one of :attr:`quantizations`),
        or ``info`` itself when that tensor stays as it is."""
        return info

    def stored(self, info: TensorInfo, arr: np.ndarray) -> np.ndarray:
        """The values reading ``arr`` back gives once written as ``info``: ``arr`` itself,
        except where the format quantises."""
        return arr

    def stored_blocks(self, info: TensorInfo) -> RawSpan | None:
        """Where the source holds the bytes this format stores for ``info`` as they are
        (GGUF's quantised blocks, copied GGUF -> GGUF): ``fetch`` may hand the writer this
        span instead of values, and the copy is verified by those bytes (see
        :meth:`read_blocks`). None, the default: fetch the values."""
        return None

    def read_blocks(self, reader: Reader, name: str) -> np.ndarray:
        """The bytes a file of this format stores for ``name``, for a tensor whose info
        had :meth:`stored_blocks`."""
        raise NotImplementedError

    def check_write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        metadata: Mapping[str, str] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        """Refuse what :meth:`write` would refuse, before a byte is written: unknown
        options, metadata the format has no place for, names and dtypes it cannot
        store, duplicate names. ``write`` calls it first; :class:`~tensorbridge.Writer`
        calls it when it is made and on its first batch, so a long export fails at
        once, not at ``close()``. Returns the metadata to write. Formats extend it."""
        from ..errors import ConversionError

        check_options(dict(options or {}), self.options, self.name, path)
        if metadata and not self.holds_metadata:
            raise ConversionError(
                f"{path}: metadata {dict(metadata)!r:.100} cannot be stored: .{self.name} files "
                "have no place for it, and dropping it silently would lose it. Fix: save as "
                ".safetensors or .h5, or pass metadata=None."
            )
        meta = check_metadata(metadata, path)
        for info in infos:
            self.check_info(info, path)
        check_unique([i.name for i in infos], path, writing=True)
        return meta

    def write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        fetch: Callable[[str], np.ndarray],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Write atomically: the destination is replaced only when complete."""
        raise NotImplementedError


@contextlib.contextmanager
def writing_zip(file: Any, compression: int) -> Iterator[zipfile.ZipFile]:
    """``zipfile.ZipFile(file, "w", compression, allowZip64=True)``, closed when the block
    ends. A block that fails closes it quietly: an archive whose member handle was lost
    (an interrupt as ``zf.open(..., "w")`` returned) raises ``ValueError`` on close,
    which would replace the real error; the half-written file is discarded anyway."""
    zf = zipfile.ZipFile(file, "w", compression, allowZip64=True)
    try:
        yield zf
    except BaseException:
        with contextlib.suppress(Exception):
            zf.close()
        zf.fp = None  # closed, or past saving: its __del__ must not raise the same again
        raise
    zf.close()


def first_axis_rows(info: TensorInfo, index: Any, file: object) -> tuple[int, int, bool]:
    """``(start, stop, single)`` rows of ``info``'s first axis that ``index`` selects: an int
    (``single``: the axis is dropped) or a step-1 slice."""
    from ..errors import ConversionError

    if not info.shape:
        raise ConversionError(
            f"{file}: tensor {info.name!r} is 0-d and cannot be sliced. Fix: use read()."
        )
    rows = info.shape[0]
    if (
        isinstance(index, bool)
        or not isinstance(index, (int, np.integer, slice))
        or (
            isinstance(index, slice)
            and not all(
                b is None or (isinstance(b, (int, np.integer)) and not isinstance(b, bool))
                for b in (index.start, index.stop, index.step)
            )
        )
    ):
        raise ConversionError(
            f"{file}: read_slice({info.name!r}, {index!r:.80}) takes an int or a slice of ints "
            f"(rows of the first axis), not {type(index).__name__} or slice bounds of other "
            "types. Fix: pass int(i), or slice(int(a), int(b))."
        )
    if isinstance(index, slice):
        start, stop, step = index.indices(rows)
        if step != 1:
            raise ConversionError(
                f"{file}: read_slice({info.name!r}, {index!r}) needs a step of 1. Fix: read the "
                "block, then index it with the step."
            )
        return start, max(start, stop), False
    if not -rows <= index < rows:
        raise ConversionError(
            f"{file}: index {index!r} is out of range for tensor {info.name!r} with {rows} "
            f"rows. Fix: use an int in [-{rows}, {rows}) or a slice."
        )
    i = int(index) % rows
    return i, i + 1, True


def check_metadata(metadata: Any, file: object = "") -> dict[str, str]:
    """``metadata`` as a ``dict[str, str]`` (``{}`` for None); refuse anything else,
    before anything is written."""
    from ..errors import ConversionError

    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ConversionError(
            f"{file}: metadata {metadata!r:.200} is not a mapping. Fix: pass a dict of str to str."
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConversionError(
                f"{file}: metadata entry {key!r:.100}: {value!r:.100} is refused: file metadata "
                "maps strings to strings. Fix: convert keys and values with str() or json.dumps()."
            )
        if not (text_is_utf8(key) and text_is_utf8(value)):
            raise ConversionError(
                f"{file}: metadata entry {key!r:.100}: {value!r:.100} is refused: it holds a lone "
                "surrogate, which no file can store as UTF-8. Fix: encode the text with "
                "errors='surrogateescape' and store it as hex, or remove it."
            )
    return dict(metadata)


def check_options(
    options: Mapping[str, Any], allowed: Sequence[str], fmt: str, file: object
) -> None:
    """Refuse write options a format does not take."""
    from ..errors import ConversionError

    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConversionError(
            f"{file}: unknown option(s) {unknown!r} for {fmt} files. Fix: "
            + (f"the options are {list(allowed)!r}." if allowed else "it takes no options.")
        )
