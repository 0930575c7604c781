"""What every subcommand shares: opening files, JSON output, name filters."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import stat
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import FileFormatError
from ..formats import Reader, format_for_path

__all__ = ["open_file", "sniff", "emit_json", "json_safe", "matches", "select", "CHUNK"]

#: elements per chunk when statistics and diffs stream through a tensor,
#: so float64 temporaries stay at a few MiB whatever the tensor's size
CHUNK = 1 << 20


def sniff(path: str) -> str | None:
    """The format a file's first bytes show (``"safetensors"``, ``"npz"``, ``"pt"``,
    ``"npy"``, ``"h5"``, ``"gguf"``), or None: a cheap guess for hints, never trusted
    for reading. Reads at most 64 bytes plus one zip entry name.

    >>> import tempfile, numpy as np, tensorbridge as tb
    >>> p = os.path.join(tempfile.mkdtemp(), "model.bin")
    >>> tb.save({"w": np.ones(2, np.float32)}, p, format="safetensors")
    >>> sniff(p)
    'safetensors'
    """
    try:
        # non-blocking and regular files only: a FIFO or a device named like a tensor file
        # must not hang the hint (the reader refused it already)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            head = f.read(64)
            size = st.st_size
            if head[:4] == b"PK\x03\x04" and len(head) >= 30:
                f.seek(30)
                name = f.read(min(int.from_bytes(head[26:28], "little"), 256))
                return "pt" if name.endswith(b"data.pkl") or b"/" in name else "npz"
    except OSError:
        return None
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "h5"
    if head.startswith(b"GGUF"):
        return "gguf"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pt"  # a pickle: torch's legacy (pre-1.6) format
    return None


def _hint(path: str, chosen: str | None, flag: str) -> str:
    """``Fix: pass --format X`` when the file's first bytes are another table format's."""
    from ..formats import FORMAT_MODULES

    if os.path.isdir(path):
        return ""
    found = sniff(path)
    if found is None or found == chosen or found not in FORMAT_MODULES:
        return ""
    return f" Hint: its first bytes are those of a {found} file; if it is one, pass {flag} {found}."


def open_file(
    path: str, format: str | None = None, variant: str | None = None, *, flag: str = "--format"
) -> tuple[Reader, str]:
    """Open a tensor file (or sharded directory) for reading: ``(reader, format name)``.
    ``variant`` picks a Hugging Face variant in a directory; what the reader chose over
    what (safetensors over .bin, the only variant) is said on stderr.

    When it cannot be read as the format its suffix (or ``format``) names, and its first
    bytes are those of another format, the error says so and names ``flag``."""
    from ..files import open_reader

    if not os.path.exists(path):
        raise FileFormatError("no such file or directory. Fix: check the path.", path)
    chosen = format
    try:
        fmt = format_for_path(path, format)
        chosen = fmt.name
        reader = open_reader(fmt, path, variant)
    except FileFormatError as exc:
        hint = _hint(path, chosen, flag)
        if hint and exc.args and isinstance(exc.args[0], str):
            exc.args = (exc.args[0] + hint, *exc.args[1:])
        raise
    for note in getattr(reader, "notes", ()):
        print(f"tensorbridge: note: {path}: {note}", file=sys.stderr)
    return reader, fmt.name


def json_safe(x: Any) -> Any:
    """``x`` for strict JSON, which has no NaN or infinity: a non-finite float becomes
    ``null``, and the dict holding it gets ``"nonfinite": {key: "inf" | "-inf" | "nan"}``
    (a non-finite float directly in a list just becomes ``null``).

    >>> json_safe({"max_abs_diff": float("inf"), "mismatches": 1})
    {'max_abs_diff': None, 'mismatches': 1, 'nonfinite': {'max_abs_diff': 'inf'}}
    """
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        out = {k: json_safe(v) for k, v in x.items()}
        odd = {
            k: _nonfinite_name(v)
            for k, v in x.items()
            if isinstance(v, float) and not math.isfinite(v)
        }
        if odd:
            out["nonfinite"] = odd
        return out
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _nonfinite_name(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _json_escape_char(c: str) -> str:
    o = ord(c)
    if o < 0x10000:
        return f"\\u{o:04x}"
    o -= 0x10000
    return f"\\u{0xD800 + (o >> 10):04x}\\u{0xDC00 + (o & 0x3FF):04x}"


def emit_json(doc: Any, stream: Any = None) -> None:
    """Print ``doc`` as one JSON document. Strings stay exact (a JSON reader gets
    them back unchanged); characters a terminal could act on are written as
    ``\\uXXXX`` escapes, other non-ASCII text as it is."""
    stream = sys.stdout if stream is None else stream
    text = json.dumps(json_safe(doc), indent=2, ensure_ascii=False, allow_nan=False)
    stream.write(_unsafe_json_chars(text) + "\n")


def _unsafe_json_chars(text: str) -> str:
    # json.dumps escaped every control character below 0x20 already; outside strings
    # there is only ASCII (punctuation, spaces, the newlines of the indent)
    if text.isascii() and "\x7f" not in text:
        return text
    return "".join(c if c.isprintable() or c == "\n" else _json_escape_char(c) for c in text)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """True when ``name`` matches any of the shell-style ``patterns`` (case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select(
    names: Iterable[str], include: Sequence[str] | None, exclude: Sequence[str] | None
) -> list[str]:
    """Names kept by ``--include`` (any match; all when none given) minus ``--exclude``."""
    out = []
    for n in names:
        if include and not matches(n, include):
            continue
        if exclude and matches(n, exclude):
            continue
        out.append(n)
    return out
