"""``tensorbridge inspect``: what a tensor file holds, without loading it whole.

Names, dtypes, shapes and sizes come from the file's header. ``--stats`` reads
one tensor at a time and streams it in chunks, accumulating in float64.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, TextIO

import numpy as np

from ..console import (
    cell_width,
    clip,
    echo,
    escape,
    format_number,
    human_bytes,
    natural_key,
    print_table,
    terminal_width,
)
from ..dtypes import canonical_name, lookup
from ..errors import ConversionError, TensorBridgeError
from ..formats import TensorInfo
from .common import CHUNK, emit_json, matches, open_file

__all__ = ["tensor_stats", "inspect_file", "render_text", "run", "SORT_KEYS"]

SORT_KEYS = ("name", "size", "dtype", "file")
_STAT_COLUMNS = ("min", "max", "mean", "std", "nan", "inf")


def tensor_stats(a: np.ndarray) -> dict[str, Any]:
    """min/max/mean/std over the finite values, and the NaN and inf counts.

    Streams through ``a`` in chunks with float64 accumulation (Chan's pairwise
    merge of means and squared deviations). bfloat16 and float8 go through
    float32; bool counts as 0/1; integer min/max are exact Python ints;
    complex values are summarised by their magnitude (``"of": "abs"``).
    ``std`` is the population standard deviation, as ``np.std``.

    >>> s = tensor_stats(np.array([1.0, 3.0, np.nan, np.inf], np.float32))
    >>> s["min"], s["max"], s["mean"], s["std"], s["nan"], s["inf"]
    (1.0, 3.0, 2.0, 1.0, 1, 1)
    >>> s = tensor_stats(np.array([1e300, 3e300]))  # squares beyond float64: scaled
    >>> s["mean"], s["std"]
    (2e+300, 1e+300)
    """
    kind = lookup(canonical_name(a.dtype)).kind
    flat = a.reshape(-1)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        stats = _scan(flat, kind, 1.0)
        big = max(abs(stats["min"]), abs(stats["max"])) if stats["finite"] else 0.0
        if kind in ("float", "complex") and (big > 2.0**400 or 0 < big < 2.0**-400):
            # squares (and sums) of such values leave float64's range: scan again on
            # values scaled by a power of two (exact), then scale mean and std back
            scale = 2.0 ** -math.frexp(big)[1]
            again = _scan(flat, kind, scale)
            stats["mean"], stats["std"] = again["mean"] / scale, again["std"] / scale
    if kind == "complex":
        stats["of"] = "abs"
    return stats


def _scan(flat: np.ndarray, kind: str, scale: float) -> dict[str, Any]:
    """One pass of :func:`tensor_stats` over ``flat``; mean and std of ``flat * scale``."""
    n, mean, m2 = 0, 0.0, 0.0
    lo: Any = None
    hi: Any = None
    nan = inf = 0
    cmin: float
    cmax: float
    for start in range(0, flat.size, CHUNK):
        c = flat[start : start + CHUNK]
        if kind in ("bool", "int", "uint"):
            if kind == "bool":
                c = c.astype(np.uint8)
            cmin, cmax = int(c.min()), int(c.max())
            fin = c.astype(np.float64)
        else:
            if kind == "complex":
                bad_nan = np.isnan(c.real) | np.isnan(c.imag)
                bad_inf = ~bad_nan & (np.isinf(c.real) | np.isinf(c.imag))
                f = np.abs(c.astype(np.complex128))
            else:
                if c.dtype.itemsize < 4 or c.dtype.type.__module__ != "numpy":
                    c = c.astype(np.float32)  # ml_dtypes and float16: widen first
                f = c.astype(np.float64)
                bad_nan, bad_inf = np.isnan(f), np.isinf(f)
            nan += int(bad_nan.sum())
            inf += int(bad_inf.sum())
            fin = f[~(bad_nan | bad_inf)]
            if fin.size == 0:
                continue
            cmin, cmax = float(fin.min()), float(fin.max())
            if scale != 1.0:
                fin = fin * scale
        k = fin.size
        cmean = float(fin.mean())
        cm2 = float(np.square(fin - cmean).sum())
        total = n + k
        delta = cmean - mean
        mean += delta * k / total
        m2 += cm2 + delta * delta * n * k / total
        n = total
        lo = cmin if lo is None else min(lo, cmin)
        hi = cmax if hi is None else max(hi, cmax)
    return {
        "min": lo,
        "max": hi,
        "mean": mean if n else None,
        "std": math.sqrt(m2 / n) if n else None,
        "nan": nan,
        "inf": inf,
        "finite": n,
    }


def _sort(infos: list[TensorInfo], key: str) -> list[TensorInfo]:
    if key == "file":
        return infos
    if key == "size":
        return sorted(infos, key=lambda i: (-i.nbytes, natural_key(i.name)))
    if key == "dtype":
        return sorted(infos, key=lambda i: (i.dtype, natural_key(i.name)))
    return sorted(infos, key=lambda i: natural_key(i.name))


def inspect_file(
    path: str,
    *,
    format: str | None = None,
    stats: bool = False,
    filters: list[str] | None = None,
    sort: str = "name",
    variant: str | None = None,
) -> dict[str, Any]:
    """The JSON document ``inspect --json`` prints for one file."""
    reader, fmt = open_file(path, format, variant)
    with reader:
        infos = reader.infos()
        if filters:
            infos = [i for i in infos if matches(i.name, filters)]
        tensors = []
        for info in _sort(infos, sort):
            entry = info.to_json()
            if stats:
                try:
                    arr = reader.read(info.name)
                except ConversionError as exc:  # a GGUF type nothing dequantises (Q8_1)
                    entry["stats"], entry["stats_error"] = None, str(exc)
                else:
                    entry["stats"] = tensor_stats(arr)
                    del arr
            tensors.append(entry)
        metadata = dict(reader.metadata or {})
        skipped = dict(getattr(reader, "skipped", {}))
    doc = {
        "path": path,
        "format": fmt,
        "metadata": metadata,
        "tensors": tensors,
        "skipped": skipped,
        "total_nbytes": sum(t["nbytes"] for t in tensors),
        "count": len(tensors),
    }
    stored = sum(t.get("stored_nbytes", t["nbytes"]) for t in tensors)
    if stored != doc["total_nbytes"]:  # GGUF blocks: what the file holds, besides as read
        doc["total_stored_nbytes"] = stored
    return doc


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _clip(text: str, width: int = 120) -> str:
    text = escape(text)
    return text if len(text) <= width else text[: width - 3] + "..."


def render_text(doc: dict[str, Any], stream: TextIO) -> None:
    """One file's report as a table (rich on a terminal, plain when piped); every
    string from the file is escaped (see :func:`~tensorbridge.console.escape`)."""
    echo(f"{doc['path']}  ({doc['format']})", stream)
    if doc["metadata"]:
        echo("metadata:", stream)
        # a line per entry, cut to the terminal's width; whole (up to 64k) in a pipe
        width = terminal_width(stream)
        for k, v in doc["metadata"].items():
            key = clip(k, None if width is None else max(10, width // 2))
            room = None if width is None else max(10, width - 4 - cell_width(key))
            echo(f"  {key}: {clip(v, room)}", stream)
    with_stats = any("stats" in t for t in doc["tensors"])
    headers = ["name", "dtype", "shape", "size"]
    align = "lllr"
    if with_stats:
        headers += list(_STAT_COLUMNS)
        align += "r" * len(_STAT_COLUMNS)
    rows = []
    for t in doc["tensors"]:
        row = [t["name"], t["dtype"], _shape(t["shape"]), human_bytes(t["nbytes"])]
        if t.get("stored_nbytes", t["nbytes"]) != t["nbytes"]:  # GGUF blocks: as stored
            row[1:4:2] = [
                f"{t['stored_type']} ({t['bits_per_weight']:g} bpw)",
                human_bytes(t["stored_nbytes"]),
            ]
        if with_stats:
            s = t["stats"] or {}
            row += [format_number(s.get(c)) for c in _STAT_COLUMNS]
        rows.append(row)
    if rows:
        stream.flush()
        print_table(headers, rows, stream, align=align)
    for name, why in doc.get("skipped", {}).items():
        stream.write(f"skipped: {_clip(name, 60)}: {_clip(why)}\n")
    for t in doc["tensors"]:
        if t.get("stats_error"):
            stream.write(f"no stats: {_clip(t['name'], 60)}: {_clip(t['stats_error'], 200)}\n")
    word = "tensor" if doc["count"] == 1 else "tensors"
    stored = doc.get("total_stored_nbytes")
    echo(
        f"total: {doc['count']} {word}, "
        + (
            f"{human_bytes(stored)} stored ({stored} bytes), {human_bytes(doc['total_nbytes'])}"
            " as read"
            if stored is not None
            else f"{human_bytes(doc['total_nbytes'])} ({doc['total_nbytes']} bytes)"
        ),
        stream,
    )


def run(args: argparse.Namespace) -> int:
    docs, errors, status = [], [], 0
    for i, path in enumerate(args.files):
        try:
            doc = inspect_file(
                path,
                format=args.format,
                stats=args.stats,
                filters=args.filter,
                sort=args.sort,
                variant=args.variant,
            )
        except TensorBridgeError as exc:
            echo(f"tensorbridge: error: {exc}", sys.stderr)
            errors.append({"path": path, "error": str(exc)})
            status = 2
            continue
        docs.append(doc)
        if args.filter and not doc["count"]:  # a typo in a pattern should not look like "empty"
            echo(
                f"tensorbridge: note: no tensor in {path} matches --filter {' '.join(args.filter)}",
                sys.stderr,
            )
        if not args.json:
            if i:
                sys.stdout.write("\n")
            render_text(doc, sys.stdout)
    if args.json:
        emit_json({"files": docs, "errors": errors})  # every file: read, or why not
    elif len(docs) > 1:
        count = sum(d["count"] for d in docs)
        nbytes = sum(d["total_nbytes"] for d in docs)
        echo()
        echo(f"all {len(docs)} files: {count} tensors, {human_bytes(nbytes)} ({nbytes} bytes)")
    return status
