"""The table of file formats. Add a format by adding a module and a row.

Each module defines ``FORMAT``, an instance of :class:`~.base.Format`.
Modules are imported on first use, so h5py or safetensors are only touched
when a file of theirs is.
"""

from __future__ import annotations

import importlib
import os
import re

from ..errors import FileFormatError
from .base import Format, Reader, TensorInfo

__all__ = ["FORMAT_MODULES", "get_format", "format_for_path", "Format", "Reader", "TensorInfo"]

#: format name -> module under tensorbridge.formats
FORMAT_MODULES: dict[str, str] = {
    "npy": "npy",
    "npz": "npz",
    "safetensors": "safetensors",
    "pt": "pt",
    "h5": "h5",
    "sharded": "sharded",
    "gguf": "gguf",
    "zarr": "zarr",
}


def get_format(name: str) -> Format:
    """The :class:`Format` registered under ``name``."""
    module = FORMAT_MODULES.get(name)
    if module is None:
        raise FileFormatError(
            f"unknown format {name!r}. Fix: use one of {', '.join(FORMAT_MODULES)}."
        )
    return importlib.import_module(f"{__name__}.{module}").FORMAT


_SUFFIXES: tuple[tuple[tuple[str, str], ...], dict[str, str]] = ((), {})


def _suffix_table() -> dict[str, str]:
    """suffix -> format name, made once per state of :data:`FORMAT_MODULES`."""
    global _SUFFIXES
    rows = tuple(FORMAT_MODULES.items())
    if rows != _SUFFIXES[0]:
        table = {}
        for name in FORMAT_MODULES:
            for suffix in get_format(name).suffixes:
                table[suffix] = name
        _SUFFIXES = (rows, table)
    return _SUFFIXES[1]


def format_for_path(path: str | os.PathLike[str], format: str | None = None) -> Format:
    """Pick the format from ``format=`` or from the path's suffix.

    A directory named ``*.zarr`` is a zarr store; any other directory (or a path ending
    in ``/``), or a file ending in ``.index.json`` (or ``.index.VARIANT.json``), is a
    sharded checkpoint.
    """
    if format is not None:
        return get_format(format)
    p = os.fspath(path)
    if p.rstrip("/" + os.sep).lower().endswith(".zarr"):  # a directory store, not a checkpoint
        return get_format("zarr")
    if (
        os.path.isdir(p)
        or p.endswith((".index.json", "/", os.sep))
        or re.search(r"\.index\.[^./\\]+\.json$", p)
    ):
        return get_format("sharded")
    suffix = os.path.splitext(p)[1].lower()
    table = _suffix_table()
    if suffix in table:
        return get_format(table[suffix])
    raise FileFormatError(
        f"unknown file suffix {suffix or '(none)'!r}. Fix: use one of "
        f"{', '.join(sorted(table))}, or pass format= (one of {', '.join(FORMAT_MODULES)}; "
        "on the command line --format or --src-format).",
        p,
    )
