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
    found = _LOADED.get(module)
    if found is None:
        found = _LOADED[module] = importlib.import_module(f"{__name__}.{module}").FORMAT
    return found


#: module name -> its FORMAT, once imported
_LOADED: dict[str, Format] = {}


#: a sharded checkpoint's index: *.index.json or *.index.VARIANT.json
_INDEX = re.compile(r"\.index(\.[^./\\]+)?\.json$")

_SUFFIXES: tuple[dict[str, str], dict[str, str]] = ({}, {})


def _suffix_table() -> dict[str, str]:
    """suffix -> format name, made once per state of :data:`FORMAT_MODULES`."""
    global _SUFFIXES
    if _SUFFIXES[0] != FORMAT_MODULES:
        table = {}
        for name in FORMAT_MODULES:
            for suffix in get_format(name).suffixes:
                table[suffix] = name
        _SUFFIXES = (dict(FORMAT_MODULES), table)
    return _SUFFIXES[1]


_SEPARATORS = "/" + os.sep + (os.altsep or "")


def _suffix(p: str) -> str:
    """``os.path.splitext(p)[1].lower()``, in a few string operations: the last name's
    suffix, where a dot follows something other than dots.

    >>> [_suffix(p) for p in ("m.NPY", "d/.npy", "a.b/c", "..npy", ".a.pt", "x.")]
    ['.npy', '', '', '', '.pt', '.']
    """
    dot = p.rfind(".")
    start = (p.rfind("/") if _SEPARATORS == "//" else max(map(p.rfind, _SEPARATORS))) + 1
    if dot <= start or not p[start:dot].strip("."):
        return ""
    return p[dot:].lower()


def format_for_path(
    path: str | os.PathLike[str], format: str | None = None, *, look: bool = True
) -> Format:
    """Pick the format from ``format=`` or from the path's suffix.

    A directory named ``*.zarr`` is a zarr store; any other directory (or a path ending
    in ``/``), or a file ending in ``.index.json`` (or ``.index.VARIANT.json``), is a
    sharded checkpoint. ``look=False`` does not ask the file system whether a path with
    a file format's suffix is a directory (the caller finds out when it opens it).
    """
    if format is not None:
        return get_format(format)
    p = os.fspath(path)
    stem = p.rstrip(_SEPARATORS)
    if stem.lower().endswith(".zarr"):  # a directory store, not a checkpoint
        return get_format("zarr")
    if len(stem) < len(p) or (p.endswith(".json") and _INDEX.search(p)):  # (ends with a /)
        return get_format("sharded")
    suffix = _suffix(p)
    table = _suffix_table()
    if suffix in table and not (look and os.path.isdir(p)):
        return get_format(table[suffix])
    if os.path.isdir(p):
        return get_format("sharded")
    raise FileFormatError(
        f"unknown file suffix {suffix or '(none)'!r}. Fix: use one of "
        f"{', '.join(sorted(table))}, or pass format= (one of {', '.join(FORMAT_MODULES)}; "
        "on the command line --format or --src-format).",
        p,
    )
