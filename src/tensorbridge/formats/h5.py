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

Metadata. The root group's string attributes are the file's metadata; other
root attributes are ignored on read. The writer stores metadata as string
attributes on the root.

Safety. External storage, external links, soft links, virtual datasets,
hard-linked groups (loops), and datasets of strings, objects, references or
compounds are refused, so reading a file never reads another file. An
uncompressed dataset that declares more bytes than the whole file, or a
compressed one that claims over ``MAX_EXPANSION`` times its stored bytes, is
refused before anything is allocated. Committed datatypes are not tensors and are
skipped.

Writing. h5py needs a real, readable file, so the writer creates the file as a
temporary sibling of the destination (named like :mod:`.atomic`'s temporaries,
so leftovers of a killed writer are cleaned up the same way), fsyncs it, and
``os.replace``\\ s it over the destination: the same guarantees as
:func:`.atomic.atomic_write`.

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
from typing import Any
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from ..dtypes import DTYPES, canonical_name, lookup
from ..errors import (
    ConversionError,
    FileFormatError,
    FrameworkNotInstalledError,
    TensorBridgeError,
    UnsafeContentError,
)
from .atomic import atomic_path
from .base import Format, Reader, TensorInfo, check_metadata, first_axis_rows
from .names import check_unique
from .safetensors import check_fetched, open_regular_file

__all__ = ["FORMAT", "H5Format", "H5Reader", "DTYPE_ATTR", "atomic_path", "metadata_problem"]

#: Dataset attribute naming the canonical dtype of raw-bits datasets (bfloat16, float8).
DTYPE_ATTR = "tensorbridge_dtype"

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
            "'tensorbridge[h5]' (or pip install h5py).") from exc
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
            "HDF5 file and that it is not corrupt or truncated.", path) from exc


# --- reading ------------------------------------------------------------------------

def _marker(dset: Any, name: str, path: str) -> str | None:
    if DTYPE_ATTR not in dset.attrs:
        return None
    value = dset.attrs[DTYPE_ATTR]
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or value not in _RAW_BITS:
        raise FileFormatError(
            f"dataset {name!r} has {DTYPE_ATTR}={value!r}, which is not one of "
            f"{sorted(_RAW_BITS)}. Fix: remove the attribute or set it to a raw-bits dtype.", path)
    want = np.dtype(f"u{lookup(value).itemsize}")
    if dset.dtype.kind != "u" or dset.dtype.itemsize != want.itemsize:
        raise FileFormatError(
            f"dataset {name!r} is marked {DTYPE_ATTR}={value!r} but holds {dset.dtype}, not "
            f"{want}. Fix: store the raw bits as {want}.", path)
    return value


def _dataset_info(h5py: Any, dset: Any, name: str, path: str, file_size: int) -> tuple[TensorInfo, np.dtype]:
    """Validate one dataset; return its info and the native dtype to read it into."""
    if dset.is_virtual:
        raise UnsafeContentError(
            f"dataset {name!r} is a virtual dataset whose data lives in other files. "
            "Fix: materialise it (copy the data into a normal dataset) before loading.", path)
    external = dset.external
    if external:
        files = [e[0] for e in external]
        raise UnsafeContentError(
            f"dataset {name!r} keeps its data in external files {files!r}; reading it would "
            "read those files. Fix: copy the data into the HDF5 file itself (e.g. h5repack).",
            path)
    dt = dset.dtype
    if (dt.kind in "OSUVMm" or dt.fields is not None or h5py.check_dtype(vlen=dt) is not None
            or h5py.check_dtype(ref=dt) is not None):
        raise FileFormatError(
            f"dataset {name!r} holds {dt!r} (strings, objects, references or compound "
            "records), not numbers. Fix: store numeric arrays only, or delete the dataset.", path)
    shape = dset.shape
    if shape is None:
        raise FileFormatError(
            f"dataset {name!r} has a null dataspace (h5py.Empty): it holds no array. Fix: "
            "delete it or store an array of shape (0,).", path)
    marker = _marker(dset, name, path)
    if marker is not None:
        dtype_name = marker
    else:
        try:
            dtype_name = canonical_name(dt)
        except ConversionError as exc:
            raise FileFormatError(
                f"dataset {name!r} has dtype {dt!r}, which is not a tensor dtype. Fix: "
                "convert it to a standard numeric dtype.", path) from exc
    info = TensorInfo(name, dtype_name, tuple(int(d) for d in shape))
    nfilters = dset.id.get_create_plist().get_nfilters()
    if nfilters == 0 and info.nbytes > file_size:
        raise FileFormatError(
            f"dataset {name!r} declares {info.nbytes} bytes ({dtype_name}{list(info.shape)}), "
            f"more than the whole file ({file_size} bytes), and is not compressed. Fix: the "
            "file is corrupt or hostile; do not load it.", path)
    if nfilters and info.nbytes > MAX_EXPANSION * dset.id.get_storage_size() + (1 << 20):
        raise FileFormatError(
            f"dataset {name!r} declares {info.nbytes} bytes but stores only "
            f"{dset.id.get_storage_size()} compressed bytes, an expansion over "
            f"{MAX_EXPANSION}x (a decompression bomb, or chunks never written). Fix: do not load "
            "it, or rewrite it uncompressed if you trust it.", path)
    return info, dt.newbyteorder("=")


def _walk(h5py: Any, group: Any, prefix: str, path: str, file_size: int,
          seen_groups: list[Any], out: dict[str, Any]) -> None:
    for key in group.keys():
        full = f"{prefix}/{key}"
        name = full.lstrip("/").replace("/", ".")
        link = group.get(key, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise UnsafeContentError(
                f"{full!r} is an external link to {link.filename!r}:{link.path!r}; following "
                "it would read another file. Fix: copy the linked data into this file.", path)
        if isinstance(link, h5py.SoftLink):
            raise UnsafeContentError(
                f"{full!r} is a soft link to {link.path!r}; tensorbridge does not follow "
                "links. Fix: store the data under this name, or delete the link.", path)
        obj = group.get(key)
        if isinstance(obj, h5py.Group):
            if any(obj.id == g for g in seen_groups):
                raise UnsafeContentError(
                    f"group {full!r} is reached a second time (a hard-linked group; it may "
                    "form a loop). Fix: give each group exactly one path.", path)
            seen_groups.append(obj.id)
            _walk(h5py, obj, full, path, file_size, seen_groups, out)
        elif isinstance(obj, h5py.Dataset):
            info, native = _dataset_info(h5py, obj, name, path, file_size)
            if name in out:
                check_unique([name, name], path)  # raises, naming the duplicate
            out[name] = (info, full, native)
        # committed datatypes are not tensors: skip them


class H5Reader(Reader):
    """An open HDF5 file; every dataset was validated by ``open``."""

    def __init__(self, path: str) -> None:
        self.path = path
        h5py = _h5py()
        fd, size = open_regular_file(path)
        os.close(fd)
        self._file = None
        with _h5_errors(path, "opening the HDF5 file"):
            self._file = h5py.File(path, "r")
        try:
            with _h5_errors(path, "reading the HDF5 structure"):
                entries: dict[str, Any] = {}
                _walk(h5py, self._file, "", path, size, [], entries)
                check_unique(entries, path)
                self._entries = entries
                self.metadata = {}
                for key, value in self._file.attrs.items():
                    if isinstance(value, str):
                        self.metadata[key] = value
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._entries[name][0]
        except KeyError:
            raise self.missing(name) from None

    def read(self, name: str) -> np.ndarray:
        info = self.info(name)
        _, h5path, native = self._entries[name]
        if self._file is None:
            raise FileFormatError("the file is closed. Fix: open it again.", self.path)
        try:
            out = np.empty(info.shape, dtype=native)
        except MemoryError as exc:
            raise FileFormatError(
                f"tensor {name!r} ({info.dtype}{list(info.shape)}) does not fit in memory. "
                "Fix: use a machine with more memory, or read it with h5py in slices.",
                self.path) from exc
        if out.size:
            with _h5_errors(self.path, f"reading dataset {h5path!r}"):
                self._file[h5path].read_direct(out)
        if info.dtype in _RAW_BITS:
            out = out.view(lookup(info.dtype).numpy)
        return out

    def read_slice(self, name: str, index: int | slice) -> np.ndarray:
        """``tensor[index]`` (an int or a step-1 first-axis slice): only those rows are read."""
        info = self.info(name)
        start, stop, single = first_axis_rows(info, index, self.path)
        _, h5path, native = self._entries[name]
        if self._file is None:
            raise FileFormatError("the file is closed. Fix: open it again.", self.path)
        out = np.empty((stop - start, *info.shape[1:]), dtype=native)
        if out.size:
            with _h5_errors(self.path, f"reading dataset {h5path!r}"):
                self._file[h5path].read_direct(out, np.s_[start:stop])
        if info.dtype in _RAW_BITS:
            out = out.view(lookup(info.dtype).numpy)
        return out.reshape(info.shape[1:]) if single else out

    def read_index(self, name: str, key: tuple) -> np.ndarray:
        """``tensor[key]`` (a normalized basic index): h5py reads only the chunks it touches."""
        info = self.info(name)
        _, h5path, native = self._entries[name]
        if self._file is None:
            raise FileFormatError("the file is closed. Fix: open it again.", self.path)
        shape = tuple(len(range(k.start, k.stop, k.step)) for k in key if isinstance(k, slice))
        if 0 in shape or 0 in info.shape:
            out = np.empty(shape, dtype=native)
        else:
            with _h5_errors(self.path, f"reading dataset {h5path!r}"):
                out = np.asarray(self._file[h5path][key])
        if info.dtype in _RAW_BITS:
            out = out.view(lookup(info.dtype).numpy)
        return out

    def native_chunks(self, name: str) -> tuple[int, ...] | None:
        if name not in self._entries:
            raise self.missing(name)
        _, h5path, _ = self._entries[name]
        if self._file is None:
            return None
        with _h5_errors(self.path, f"reading dataset {h5path!r}"):
            chunks = self._file[h5path].chunks
        return tuple(int(c) for c in chunks) if chunks else None

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None


# --- writing ----------------------------------------------------------------------

def _check_write_names(infos: Sequence[TensorInfo], path: str) -> None:
    check_unique([i.name for i in infos], path)
    for info in infos:
        if "/" in info.name or info.name == ".":
            raise ConversionError(
                f"{path}: tensor name {info.name!r} cannot be an HDF5 dataset name at the root "
                "('/' would create groups, and '.' is the root itself). Fix: rename it, e.g. "
                f"{info.name.replace('/', '.')!r}.")


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
                f"Fix: {fix}, or leave the entry out.")
    return metadata


class H5Format(Format):
    """HDF5 via h5py; bfloat16/float8 stored as raw bits with a dtype attribute."""

    name = "h5"
    suffixes = (".h5", ".hdf5")
    description = ("HDF5 via h5py. Holds every tensorbridge dtype; bfloat16/float8 are stored "
                   f"as same-width uint with attribute {DTYPE_ATTR}.")

    def check_write(self, path: str, infos: Sequence[TensorInfo],
                    metadata: Mapping[str, str] | None = None,
                    options: Mapping[str, Any] | None = None) -> dict[str, str]:
        super().check_write(path, infos, metadata, options)
        _check_write_names(infos, path)
        return _check_metadata(metadata, path)

    def check_info(self, info: TensorInfo, path: str) -> None:
        lookup(info.dtype)  # unknown dtypes fail before anything is written

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
            f = h5py.File(tmp, "w")
            try:
                for key, value in attrs.items():
                    f.attrs[key] = str(value)  # a str subclass (GGUF's typed values) as text
                for info in infos:
                    arr = check_fetched(fetch(info.name), info, path)
                    if info.dtype in _RAW_BITS:
                        arr = arr.view(f"u{arr.dtype.itemsize}")
                    storage = arr.dtype.newbyteorder("=") if arr.dtype.itemsize > 1 else arr.dtype
                    dset = f.create_dataset(info.name, shape=info.shape, dtype=storage)
                    if info.dtype in _RAW_BITS:
                        dset.attrs[DTYPE_ATTR] = info.dtype
                    if arr.size:
                        dset[...] = arr
                    del arr
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
                    "another destination, then retry.", path) from exc


FORMAT = H5Format()
