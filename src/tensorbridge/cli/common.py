"""What every subcommand shares: opening files, JSON output, name filters."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import sys
from typing import Any
from collections.abc import Iterable, Sequence

from ..errors import FileFormatError
from ..formats import Reader, format_for_path

__all__ = ["open_file", "emit_json", "json_safe", "matches", "select", "CHUNK"]

#: elements per chunk when statistics and diffs stream through a tensor,
#: so float64 temporaries stay at a few MiB whatever the tensor's size
CHUNK = 1 << 20


def open_file(path: str, format: str | None = None) -> tuple[Reader, str]:
    """Open a tensor file (or sharded directory) for reading: ``(reader, format name)``."""
    if not os.path.exists(path):
        raise FileFormatError("no such file or directory. Fix: check the path.", path)
    fmt = format_for_path(path, format)
    return fmt.open(path), fmt.name


def json_safe(x: Any) -> Any:
    """Non-finite floats as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def emit_json(doc: Any, stream: Any = None) -> None:
    stream = sys.stdout if stream is None else stream
    stream.write(json.dumps(json_safe(doc), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def matches(name: str, patterns: Sequence[str]) -> bool:
    """True when ``name`` matches any of the shell-style ``patterns`` (case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select(names: Iterable[str], include: Sequence[str] | None,
           exclude: Sequence[str] | None) -> list[str]:
    """Names kept by ``--include`` (any match; all when none given) minus ``--exclude``."""
    out = []
    for n in names:
        if include and not matches(n, include):
            continue
        if exclude and matches(n, exclude):
            continue
        out.append(n)
    return out
