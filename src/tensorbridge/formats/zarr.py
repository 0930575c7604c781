"""zarr v3 directory stores (``NAME.zarr/``), through zarr-python (the ``tensorbridge[zarr]`` extra).

Layout. Every tensor is an array at the store's root, named by its tensor name
(``enc.layers.0.weight``); arrays in sub-groups read as their path joined with ``.``.
File metadata is the root group's attributes (strings); tensorbridge keeps the tensor
order under the attribute :data:`ORDER_ATTR`. Arrays are chunked along the first axis
(about :data:`CHUNK_BYTES` per chunk) and compressed with zarr's default codec (zstd).
Each array names its dimensions (``NAME.dim0`` ...), so ``xarray.open_zarr`` opens the store.

Dtypes. zarr has no bfloat16 or float8: they are stored, as in ``.h5``, as the unsigned
integer of the same width with the array attribute ``tensorbridge_dtype`` naming the
canonical dtype. Arrays of other zarr data types (strings, structured) are skipped, and the
reader lists them in ``skipped`` with the reason.

Files from strangers. Before zarr-python sees the store, tensorbridge walks it once:
- symbolic links anywhere in the store are refused (a chunk could name any file);
- every ``zarr.json`` is at most :data:`MAX_METADATA_BYTES`, is parsed under the budget
  of :func:`~tensorbridge.formats.safejson.loads` (as safetensors headers are: at most
  :data:`MAX_JSON_DEPTH` deep, a bounded density of arrays and objects, no duplicate
  keys; NaN and Infinity allowed, since zarr-python writes them), and is ``zarr_format`` 3;
- data types and codecs must be on the allow-lists below (no codec that can unpickle);
- a chunk holds at most :data:`MAX_CHUNK_BYTES` decoded, so touching one element
  cannot allocate more;
- reading a whole tensor is refused when it declares more than
  :data:`MAX_EXPANSION` times the bytes its chunks occupy on disk (and more than
  :data:`SPARSE_FLOOR`): such an array is mostly fill value; index it lazily
  (``open(p).array(name)[...]`` or ``to_dask``) instead.
zarr v2 stores (``.zarray``) are refused with a fix.

Writing is atomic for the whole store: it is written into a temporary sibling directory,
flushed, and swapped in with one ``renameat2(RENAME_EXCHANGE)`` (or a rename when the
destination does not exist yet); the old store is then removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..dtypes import DTYPES, NUMPY_NATIVE, lookup
from ..errors import ConversionError, FileFormatError, FrameworkNotInstalledError, message
from . import safejson
from .atomic import (
    fsync_dir,
    fsync_together,
    new_locked_directory,
    release_directory,
    remove_stale_directories,
    start_writeback,
    temp_name,
)
from .base import Format, Reader, TensorInfo, file_stamp
from .names import check_unique
from .safetensors import check_fetched

__all__ = ["FORMAT", "ZarrFormat", "ZarrReader"]

ORDER_ATTR = "tensorbridge_order"
DTYPE_ATTR = "tensorbridge_dtype"
#: The name of the one tensor of a store whose root is an array (as for .npy files).
ROOT_ARRAY_NAME = "array"
CHUNK_BYTES = 16 << 20
MAX_CHUNK_BYTES = 512 << 20
MAX_METADATA_BYTES = 16 << 20
MAX_JSON_DEPTH = 32
MAX_EXPANSION = 4096
SPARSE_FLOOR = 64 << 20
MAX_NODES = 100_000

#: zarr data types read as tensors: the dtypes NumPy has, named as zarr v3 names them
_DATA_TYPES = NUMPY_NATIVE
_CODECS = {"bytes", "transpose", "zstd", "gzip", "blosc", "crc32c", "sharding_indexed"}
#: canonical dtypes zarr lacks -> the raw-bits dtype they are stored as
_RAW_BITS = {d.name: f"uint{8 * d.itemsize}" for d in DTYPES.values() if d.name not in NUMPY_NATIVE}


def _zarr(path: str = "") -> Any:
    try:
        import zarr
    except ImportError as exc:
        if sys.meta_path is None:  # a __del__ at exit: nothing can be imported any more
            raise FileFormatError(
                f"importing zarr-python: Python is shutting down and imports nothing more "
                f"({str(exc):.100}). Fix: save or load zarr stores before Python exits (not "
                "from a __del__ that runs at exit), or use another format there "
                "(.safetensors).",
                path,
            ) from exc
        raise FrameworkNotInstalledError(
            message(
                ".zarr stores", "zarr-python is not installed", "pip install 'tensorbridge[zarr]'"
            )
        ) from exc
    except RuntimeError as exc:  # its first import, at exit: it cannot register with atexit
        late = _at_shutdown(exc, path, "importing zarr-python")
        if late is None:
            raise
        raise late from exc
    return zarr


def _codec_names(codecs: Any, where: str, path: str) -> None:
    if not isinstance(codecs, list):
        raise FileFormatError(
            f"array {where!r}: codecs {codecs!r:.80} is not a list. Fix: the "
            "store is corrupt; re-save it.",
            path,
        )
    for c in codecs:
        name = c.get("name") if isinstance(c, dict) else c
        if not isinstance(name, str) or name not in _CODECS:
            raise FileFormatError(
                f"array {where!r} uses codec {name!r:.80}, which tensorbridge does not decode "
                f"(it decodes {sorted(_CODECS)}). Fix: re-save the store with one of those "
                "codecs using zarr-python, if you trust it.",
                path,
            )
        if name == "sharding_indexed":
            conf = c.get("configuration") if isinstance(c, dict) else None
            if not isinstance(conf, dict):
                raise FileFormatError(
                    f"array {where!r}: the sharding codec has no configuration. "
                    "Fix: the store is corrupt.",
                    path,
                )
            _codec_names(conf.get("codecs", []), where, path)
            _codec_names(conf.get("index_codecs", []), where, path)


def _load_meta(file: str, where: str, path: str) -> dict:
    try:
        size = os.lstat(file).st_size
    except OSError as exc:
        raise FileFormatError(
            f"cannot read {where!r} metadata ({exc.strerror}). Fix: check the store.", path
        ) from exc
    if size > MAX_METADATA_BYTES:
        raise FileFormatError(
            f"{where!r} metadata is {size} bytes, over the "
            f"{MAX_METADATA_BYTES}-byte cap. Fix: the store is corrupt or "
            "hostile.",
            path,
        )
    with open(file, "rb") as f:
        raw = f.read(MAX_METADATA_BYTES + 1)
    # nesting, container density, UTF-8 and duplicate keys checked as for safetensors
    # headers; NaN/Infinity allowed (zarr-python writes them in attributes)
    meta = safejson.loads(
        raw, path, f"{where!r} metadata", max_depth=MAX_JSON_DEPTH, nonfinite=True
    )
    if not isinstance(meta, dict):
        raise FileFormatError(
            f"{where!r} metadata is not a JSON object. Fix: the store is corrupt.", path
        )
    return meta


def _walk(path: str) -> tuple[dict[str, dict], dict[str, int], dict]:
    """Walk the store without following links: ``(arrays {zarr path: metadata},
    stored bytes per array, root metadata)``; refuse links, v2 stores and bad metadata."""
    arrays: dict[str, dict] = {}
    stored: dict[str, int] = {}
    root_meta: dict = {}
    nodes = 0
    stack = [("", path)]
    while stack:
        rel, directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as exc:
            raise FileFormatError(
                f"cannot list {rel or '/'!r} ({exc.strerror}). Fix: check the store's permissions.",
                path,
            ) from exc
        nodes += len(entries)
        if nodes > MAX_NODES * 64:
            raise FileFormatError(
                f"the store has more than {MAX_NODES * 64} files. Fix: the "
                "store is hostile or not a tensor store.",
                path,
            )
        names = {e.name for e in entries}
        if ".zarray" in names or ".zgroup" in names:
            raise FileFormatError(
                "this is a zarr v2 store; tensorbridge reads zarr v3. Fix: convert it with "
                "zarr-python (zarr.open(...) and write a v3 copy), if you trust it.",
                path,
            )
        meta = None
        if "zarr.json" in names:
            meta = _load_meta(os.path.join(directory, "zarr.json"), rel or "/", path)
            if meta.get("zarr_format") != 3:
                raise FileFormatError(
                    f"{rel or '/'!r}: zarr_format {meta.get('zarr_format')!r:.20} "
                    "is not 3. Fix: the store is corrupt.",
                    path,
                )
        elif not rel:
            raise FileFormatError(
                "the directory has no zarr.json, so it is not a zarr v3 store. "
                "Fix: check the path.",
                path,
            )
        if rel == "":
            root_meta = meta or {}
        kind = (meta or {}).get("node_type")
        for e in entries:
            if e.is_symlink():
                raise FileFormatError(
                    f"{os.path.join(rel, e.name)!r} is a symbolic link; a store from a stranger "
                    "could point it at any file. Fix: replace links with the files themselves.",
                    path,
                )
        if kind == "array":
            arrays[rel] = meta  # type: ignore[assignment]
            total = 0
            inner = [directory]
            while inner:
                d = inner.pop()
                with os.scandir(d) as it:
                    listing = list(it)
                for e in listing:
                    if e.is_symlink():
                        raise FileFormatError(
                            f"{os.path.relpath(e.path, path)!r} is a symbolic link; a store from "
                            "a stranger could point it at any file. Fix: replace links with the "
                            "files themselves.",
                            path,
                        )
                    if e.is_dir(follow_symlinks=False):
                        inner.append(e.path)
                    elif e.name != "zarr.json":
                        total += e.stat(follow_symlinks=False).st_size
            stored[rel] = total
            continue
        if len(arrays) > MAX_NODES:
            raise FileFormatError(
                f"the store has more than {MAX_NODES} arrays. Fix: the store is hostile.", path
            )
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                stack.append((f"{rel}/{e.name}" if rel else e.name, e.path))
    return arrays, stored, root_meta


def _check_array(rel: str, meta: dict, path: str) -> tuple[str | None, str, tuple[int, ...]]:
    """``(canonical dtype or None when skipped, reason, shape)`` for one array's metadata."""
    shape = meta.get("shape")
    if (
        not isinstance(shape, list)
        or not all(type(d) is int and d >= 0 for d in shape)
        or len(shape) > 64
    ):
        raise FileFormatError(
            f"array {rel!r}: shape {shape!r:.80} is not a list of at most 64 "
            "non-negative ints. Fix: the store is corrupt.",
            path,
        )
    data_type = meta.get("data_type")
    if not isinstance(data_type, str) or data_type not in _DATA_TYPES:
        return None, f"zarr data type {data_type!r:.60} is not a numeric tensor dtype", tuple(shape)
    dtype = data_type
    attrs = meta.get("attributes") or {}
    declared = attrs.get(DTYPE_ATTR) if isinstance(attrs, dict) else None
    if declared is not None:
        if not isinstance(declared, str) or _RAW_BITS.get(declared) != data_type:
            raise FileFormatError(
                f"array {rel!r}: attribute {DTYPE_ATTR}={declared!r:.60} does not match its "
                f"stored type {data_type!r}. Fix: the store is corrupt.",
                path,
            )
        dtype = declared
    grid = meta.get("chunk_grid")
    conf = grid.get("configuration") if isinstance(grid, dict) else None
    chunk = conf.get("chunk_shape") if isinstance(conf, dict) else None
    if (
        not isinstance(grid, dict)
        or grid.get("name") != "regular"
        or not isinstance(chunk, list)
        or len(chunk) != len(shape)
        or not all(type(c) is int and c > 0 for c in chunk)
    ):
        raise FileFormatError(
            f"array {rel!r}: chunk grid {grid!r:.100} is not a regular grid "
            "matching the shape. Fix: the store is corrupt.",
            path,
        )
    nbytes = lookup(dtype).itemsize
    for c in chunk:
        nbytes *= c
    if nbytes > MAX_CHUNK_BYTES:
        raise FileFormatError(
            f"array {rel!r}: one chunk {chunk} holds {nbytes} bytes decoded, over the "
            f"{MAX_CHUNK_BYTES}-byte cap (reading any element would allocate it). Fix: re-chunk "
            "the store with zarr-python, if you trust it.",
            path,
        )
    _codec_names(meta.get("codecs"), rel, path)
    return dtype, "", tuple(shape)


class ZarrReader(Reader):
    """An open zarr v3 store, walked and validated before zarr-python opens it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._group: Any = None
        if not os.path.isdir(path):
            raise FileFormatError(
                "not a directory: a .zarr store is a directory. Fix: check the path.", path
            )
        self._root = _root_stamp(path)  # (before the walk: a swap during it shows later)
        try:
            self._open(path)
        except (OSError, FileFormatError) as exc:
            if self.changed():  # swapped while it was opened: load reads again
                raise self._replaced() from exc
            if isinstance(exc, FileFormatError):
                raise
            raise FileFormatError(
                f"cannot read the store ({exc.strerror}). Fix: check the path and its permissions.",
                path,
            ) from exc

    def _open(self, path: str) -> None:
        arrays, stored, root = _walk(path)
        self.skipped: dict[str, str] = {}
        entries: dict[str, tuple[TensorInfo, str, int]] = {}
        for rel in sorted(arrays):
            dtype, why, shape = _check_array(rel, arrays[rel], path)
            # a store that is one array at its root (dask.array.to_zarr(x, "x.zarr"),
            # zarr.open_array): one tensor, named as a .npy file's
            name = rel.replace("/", ".") if rel else ROOT_ARRAY_NAME
            if dtype is None:
                self.skipped[name] = why
                continue
            if name in entries:
                check_unique([name, name], path)
            entries[name] = (TensorInfo(name, dtype, shape), rel, stored[rel])
        check_unique(list(entries) + list(self.skipped), path)
        attrs = root.get("attributes") or {}
        attrs = attrs if isinstance(attrs, dict) else {}
        order = attrs.get(ORDER_ATTR)
        if (
            isinstance(order, list)
            and all(isinstance(k, str) for k in order)
            and sorted(order) == sorted(entries)
        ):
            entries = {k: entries[k] for k in order}
        self._entries = entries
        self.metadata = {
            k: v
            for k, v in attrs.items()
            if isinstance(k, str) and isinstance(v, str) and k != ORDER_ATTR
        }
        with _zarr_errors(path, "opening the store"):
            if "" in arrays:  # the root is the array (its attributes are the array's)
                self.metadata = {}
                self._group = _zarr().open_array(path, mode="r")
            else:  # never the consolidated copy: it would bypass the metadata checked above
                self._group = _zarr().open_group(path, mode="r", use_consolidated=False)

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._entries[name][0]
        except KeyError:
            raise self.missing(name) from None

    def _array(self, name: str) -> Any:
        if self._group is None:
            raise FileFormatError("the store is closed. Fix: open it again.", self.path)
        with _zarr_errors(self.path, f"opening array {name!r}"):
            rel = self._entries[name][1]
            return self._group[rel] if rel else self._group

    def _finish(self, out: np.ndarray, info: TensorInfo) -> np.ndarray:
        out = np.asarray(out)
        if info.dtype in _RAW_BITS:
            out = out.view(lookup(info.dtype).numpy)
        if not out.flags.writeable or not out.flags.c_contiguous:
            out = np.array(out, order="C")
        return out

    def read(self, name: str) -> np.ndarray:
        info = self.info(name)
        stored = self._entries[name][2]
        if info.nbytes > max(SPARSE_FLOOR, MAX_EXPANSION * stored):
            raise FileFormatError(
                f"tensor {name!r} declares {info.nbytes} bytes but its chunks hold {stored} on "
                f"disk (more than {MAX_EXPANSION}x: it is mostly fill value). Fix: read the part "
                f"you need lazily: tb.open(path).array({name!r})[...], or tb.to_dask(path).",
                self.path,
            )
        return self.read_index(name, tuple(slice(0, d, 1) for d in info.shape))

    def read_index(self, name: str, key: tuple) -> np.ndarray:
        info = self.info(name)
        arr = self._array(name)
        with self._lock, _zarr_errors(self.path, f"reading array {name!r}"):
            out = arr[key] if key else arr[...]
        return self._finish(out, info)

    def changed(self) -> bool:
        """Whether the store at the path is no longer the one opened: zarr-python reads
        each chunk by its path, so a store swapped in whole since (another save) would have
        given some of this load's chunks; removed, or another directory there (its
        identity and times differ: a directory made anew on a reused inode too)."""
        return _root_stamp(self.path) != self._root

    def verify(self) -> None:
        if self.changed():
            raise self._replaced()

    def _replaced(self) -> Exception:
        from ..errors import CheckpointChangedError

        return CheckpointChangedError(
            "the store was replaced or changed while it was read (another save swapped in "
            "a new one, or its root directory was modified); what was read may mix two "
            "versions. Fix: load it again.",
            self.path,
        )

    def native_chunks(self, name: str) -> tuple[int, ...] | None:
        return tuple(int(c) for c in self._array(name).chunks)

    def close(self) -> None:
        self._group = None


def _root_stamp(path: str) -> tuple[int, ...] | None:
    """The store's root directory's :func:`~.base.file_stamp` (None: not there)."""
    try:
        return file_stamp(os.stat(path))
    except OSError:
        return None


def _at_shutdown(exc: BaseException, path: str, doing: str) -> FileFormatError | None:
    """zarr-python runs its work on an event-loop thread that it starts (and registers
    with ``atexit``) on first use: neither can be done once Python is shutting down."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or "shutdown" not in text:
        return None
    return FileFormatError(
        f"{doing}: zarr-python works on threads that it cannot start while Python is "
        f"shutting down ({text:.100}). Fix: save or load zarr stores before Python exits: "
        "not from an atexit handler or a __del__ at exit, nor from a thread still running "
        "once the main thread has returned (join that thread first); or use another "
        "format there (.safetensors).",
        path,
    )


@contextlib.contextmanager
def _zarr_errors(path: str, doing: str) -> Iterator[None]:
    try:
        yield
    except FileFormatError:
        raise
    except RuntimeError as exc:
        late = _at_shutdown(exc, path, doing)
        if late is not None:
            raise late from exc
        raise FileFormatError(
            f"{doing} failed ({type(exc).__name__}: {str(exc):.200}). Fix: the "
            "store is corrupt or incomplete; re-save it.",
            path,
        ) from exc
    except MemoryError as exc:
        raise FileFormatError(
            f"{doing} ran out of memory. Fix: read it in parts (open(p).array(name)[...]).", path
        ) from exc
    except Exception as exc:  # zarr, numcodecs and json raise many kinds
        raise FileFormatError(
            f"{doing} failed ({type(exc).__name__}: {str(exc):.200}). Fix: the "
            "store is corrupt or incomplete; re-save it.",
            path,
        ) from exc


# --- writing ----------------------------------------------------------------------

_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where it is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    """Flush every file of the store, then every directory, to disk.

    A store is many files (a ``zarr.json`` per array and a file per chunk). One ``fsync``
    after another waits for one journal commit each (1000 small files: ~1.5 s here);
    flushed from several threads at once, the file system commits them together (~0.1 s).
    Every file is flushed before any directory; the first error is raised once all
    flushes have ended."""
    files: list[str] = []
    directories: list[str] = []
    for directory, _dirs, names in os.walk(root):
        directories.append(directory)
        files.extend(os.path.join(directory, f) for f in names)
    for exc in fsync_together(files, _fsync_file, serial=2):
        if exc is not None:
            raise exc  # the first error, once every flush has ended
    for directory in directories:
        fsync_dir(directory)


def _start_writeback_tree(root: str) -> None:
    """Start writing the files under ``root`` (an array just written) to disk, without
    waiting: the next arrays are encoded meanwhile, and the final flush
    (:func:`_fsync_tree`) waits only for what is left. Advisory: errors are the flush's."""
    for directory, _dirs, names in os.walk(root):
        for name in names:
            try:
                fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not start_writeback(fd):
                    return  # (no sync_file_range here)
            finally:
                os.close(fd)


def _is_zarr_store(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "zarr.json")) or not os.listdir(path)


def _row_chunks(info: TensorInfo, itemsize: int) -> tuple[int, ...]:
    if not info.shape:
        return ()
    row = itemsize
    for d in info.shape[1:]:
        row *= max(d, 1)
    rows = max(1, min(max(info.shape[0], 1), CHUNK_BYTES // max(row, 1)))
    chunks = [rows, *[max(d, 1) for d in info.shape[1:]]]
    # rows bigger than the cap are split along the next axes as well
    ax = 1
    while ax < len(chunks):
        total = itemsize
        for c in chunks:
            total *= c
        if total <= MAX_CHUNK_BYTES // 2:
            break
        chunks[ax] = max(1, chunks[ax] // max(1, -(-total // (MAX_CHUNK_BYTES // 2))))
        ax += 1
    return tuple(chunks)


class ZarrFormat(Format):
    """zarr v3 directory stores through zarr-python."""

    name = "zarr"
    suffixes = (".zarr",)
    description = (
        "zarr v3 directory store (NAME.zarr/). Holds every tensorbridge dtype; "
        "bfloat16/float8 as raw bits with a tensorbridge_dtype attribute."
    )
    holds_metadata = True

    def check_write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        metadata: Mapping[str, str] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        meta = super().check_write(path, infos, metadata, options)
        if ORDER_ATTR in meta:
            raise ConversionError(
                f"{path}: metadata key {ORDER_ATTR!r} is where tensorbridge "
                "keeps the tensor order. Fix: rename that key."
            )
        for info in infos:
            n = info.name
            if not n or "/" in n or n in (".", "..") or n.startswith("__") or n == "zarr.json":
                raise ConversionError(
                    f"{path}: tensor name {n!r} cannot be a zarr array name ('/' makes groups; "
                    "'', '.', '..', names starting with '__' and 'zarr.json' are reserved). "
                    f"Fix: rename it, e.g. {n.replace('/', '.').lstrip('_') or 'x'!r}."
                )
        return meta

    def open(self, path: str) -> ZarrReader:
        _zarr(os.fspath(path))
        return ZarrReader(os.fspath(path).rstrip("/") or "/")

    def write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        fetch: Callable[[str], np.ndarray],
        metadata: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        """Write a new store beside ``path``, then swap it in whole."""
        zarr = _zarr(os.fspath(path))
        path = os.fspath(path).rstrip("/")
        infos = list(infos)
        meta = self.check_write(path, infos, metadata, options)
        target = os.path.realpath(path)
        if os.path.exists(target) and (not os.path.isdir(target) or not _is_zarr_store(target)):
            raise FileFormatError(
                "the destination exists and is not a zarr store; replacing it would lose it. "
                "Fix: choose another path, or remove it first.",
                path,
            )
        directory = os.path.dirname(target) or "."
        base = os.path.basename(target)
        remove_stale_directories(directory, base)  # (what earlier saves left)
        tmp, held = new_locked_directory(directory, base)  # (held: its lock, until the end)
        made = tmp
        try:
            group = zarr.open_group(tmp, mode="w-")
            group.attrs.update({**meta, ORDER_ATTR: [i.name for i in infos]})
            for info in infos:
                row = lookup(info.dtype)
                stored = np.dtype(_RAW_BITS.get(info.dtype, row.numpy))
                arr = group.create_array(
                    info.name,
                    shape=info.shape,
                    dtype=stored,
                    chunks=_row_chunks(info, row.itemsize),
                    dimension_names=[f"{info.name}.dim{i}" for i in range(len(info.shape))],
                    attributes={DTYPE_ATTR: info.dtype} if info.dtype in _RAW_BITS else None,
                )
                data = check_fetched(fetch(info.name), info, path)
                if not data.dtype.isnative:  # (a byte-swapped array: stored little-endian)
                    data = data.astype(data.dtype.newbyteorder("="))
                if data.size:
                    arr[...] = data.view(stored) if info.dtype in _RAW_BITS else data
                del data
                _start_writeback_tree(os.path.join(tmp, info.name))
            _fsync_tree(tmp)
            if os.path.exists(target):
                if not _exchange(tmp, target):  # (not Linux): two renames, the old store
                    # aside under a name no cleaner takes, and put back on any failure
                    old = temp_name(directory, base, _ASIDE_MARKER)
                    try:
                        os.rename(target, old)
                        os.rename(tmp, target)
                        # the new store is in: the old one is garbage, under a name any
                        # later save may remove (an interrupt while it is removed)
                        tmp = temp_name(directory, base)
                        os.rename(old, tmp)
                    except BaseException:
                        if not os.path.lexists(target) and os.path.lexists(old):
                            with contextlib.suppress(OSError):
                                os.rename(old, target)  # put back
                        elif os.path.lexists(old):
                            tmp = old  # (the new store is in: the old one goes)
                        raise
            else:
                os.rename(tmp, target)
                tmp = ""
            fsync_dir(directory)
        except OSError as exc:
            raise FileFormatError(
                f"writing failed ({exc.strerror}); the destination was left "
                "unchanged. Fix: check free space and permissions.",
                path,
            ) from exc
        except RuntimeError as exc:
            late = _at_shutdown(exc, path, "writing the store")
            if late is None:
                raise
            raise late from exc
        finally:
            try:
                if tmp:
                    _discard(tmp)
            finally:
                release_directory(made, held)


#: the marker of an old store moved aside for a moment where paths cannot be exchanged
#: (never taken for a stale temporary store: it holds the only copy until put back)
_ASIDE_MARKER = ".tb-old-"

#: how long a failed save waits, in all, for zarr-python to stop writing into its store
DISCARD_SECONDS = 1.0


def _discard(tmp: str) -> None:
    """Remove a temporary store (or a replaced one). After an interrupt, zarr-python's
    own thread may still be writing chunks into it for a moment (and make its
    directories again): try again until it is gone, for up to :data:`DISCARD_SECONDS`.
    What is left (or made again later) is not locked any more: the next save removes it
    (:func:`.atomic.remove_stale_directories`)."""
    deadline = time.monotonic() + DISCARD_SECONDS
    delay = 0.005
    while True:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.lexists(tmp):
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(delay)
        delay = min(2 * delay, 0.1)


FORMAT = ZarrFormat()
