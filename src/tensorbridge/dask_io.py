"""Hand tensor files to Dask: one lazy ``dask.array.Array`` per tensor, read only at compute.

>>> import numpy as np, tempfile, os, tensorbridge as tb
>>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
>>> tb.save({"w": np.arange(12, dtype=np.float32).reshape(4, 3)}, p)
>>> arrays = tb.to_dask(p, chunks=(2, 3))
>>> arrays["w"].chunks, float(arrays["w"].sum().compute())
(((2, 2), (3,)), 66.0)

Chunks. ``chunks="auto"`` (the default) makes chunks of about Dask's
``array.chunk-size`` (128 MiB unless configured). They are whole multiples of the chunks
the file stores (``.h5`` and ``.zarr`` datasets), and for the formats that store a tensor as
one C-order run (safetensors, ``.npy``, ``.pt``, sharded checkpoints) they span whole rows,
so that every chunk is one contiguous read. A tensor of a sharded checkpoint lives in one
shard, so its chunks never straddle shard files. Any ``chunks=`` Dask's ``from_array``
takes is accepted too (a tuple, a dict per axis, a byte size like ``"64MiB"``).

Nothing is read until ``compute()``: every chunk is a :class:`~tensorbridge.formats.lazy.LazyArray`
index, so it reads only its own bytes. On a ``dask.distributed`` cluster the arrays pickle as
``(path, format, name)`` and each worker opens the file itself: workers need the same path
(a shared filesystem). Dask is the ``tensorbridge[dask]`` extra, imported only here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import ConversionError, message

__all__ = ["to_dask"]


def _dask_array() -> Any:
    try:
        import dask.array as da
    except ImportError as exc:
        raise ConversionError(
            message("to_dask()", "Dask is not installed", "pip install 'tensorbridge[dask]'")
        ) from exc
    return da


def _auto_chunks(
    da: Any, shape: tuple[int, ...], dtype: np.dtype, native: tuple[int, ...] | None, chunks: Any
) -> Any:
    from dask.array.core import normalize_chunks

    if chunks != "auto" or not shape:
        return chunks
    if native is not None:
        return normalize_chunks("auto", shape, dtype=dtype, previous_chunks=native)
    # one C-order run: whole rows per chunk keep every chunk one contiguous read
    spec = ("auto",) + (-1,) * (len(shape) - 1)
    try:
        return normalize_chunks(spec, shape, dtype=dtype)
    except ValueError:  # a single row is over the chunk size: let Dask split it too
        return normalize_chunks("auto", shape, dtype=dtype)


def to_dask(
    path: str | os.PathLike,
    /,
    *,
    chunks: Any = "auto",
    format: str | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, Any]:
    """``{name: dask.array.Array}`` for every tensor of the file, in file order.

    ``names`` picks tensors (every name is checked first). The file stays open while the
    arrays are alive; nothing is read until they are computed.
    """
    from .files import _check_names
    from .files import open as open_file
    from .formats.lazy import LazyArray, ReaderOwner

    da = _dask_array()
    wanted = None if names is None else _check_names(names)
    reader = open_file(path, format=format)
    owner = ReaderOwner(reader)  # the reader closes when the last array is collected
    try:
        keys = reader.keys() if wanted is None else wanted
        for name in keys:
            reader.info(name)  # every name checked before any array is made
        st = os.stat(reader.path)
        out: dict[str, Any] = {}
        for name in keys:
            lazy = LazyArray(reader, name, reader.array(name).format_name, owner)
            spec = _auto_chunks(da, lazy.shape, lazy.dtype, reader.native_chunks(name), chunks)
            token = f"tensorbridge-{name}-{da.core.tokenize(reader.path, st.st_ino, st.st_mtime_ns, st.st_size, name, spec)}"
            out[name] = da.from_array(
                lazy,
                chunks=spec,
                name=token,
                lock=False,
                meta=np.empty((0,) * lazy.ndim, lazy.dtype),
            )
        return out
    except BaseException:
        reader.close()
        raise
