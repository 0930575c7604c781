"""Terminal output for the command line: rich on a terminal, plain text in a pipe.

Everything the command line prints goes through this module, and every string in
it passes :func:`escape` on the way out (``print_table`` cells, :func:`echo` lines,
progress descriptions): names, metadata and messages from a file can neither
colour nor move nor retitle the terminal, nor start a line of their own.

rich is optional. It is imported only when output goes to a terminal, and
everything falls back to plain, fixed-width text without ANSI escape codes
when it is missing or when the stream is piped. With ``NO_COLOR`` set (see
https://no-color.org) no escape code is written at all: tables are drawn
without styles, and there is no live progress bar (it moves the cursor).

>>> human_bytes(1536), human_bytes(12)
('1.5 KiB', '12 B')
>>> sorted(["layer.10", "layer.2", "emb"], key=natural_key)
['emb', 'layer.2', 'layer.10']
"""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import unicodedata
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = [
    "escape",
    "echo",
    "is_tty",
    "terminal_width",
    "clip",
    "cell_width",
    "use_color",
    "rich_available",
    "print_table",
    "human_bytes",
    "natural_key",
    "format_number",
    "progress",
]

_DIGITS = re.compile(r"(\d+)")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(c: str) -> str:
    short = _SHORT.get(c)
    if short is not None:
        return short
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def escape(text: object) -> str:
    r"""``text`` made safe for a terminal: every character that ``str.isprintable``
    rejects is written as a Python escape (``\x1b``, ``\n``, ``\u202e``, ...).

    That is C0 and C1 controls (ESC, BEL, CR, LF, TAB, ...), DEL, format characters
    (bidi overrides and isolates U+202A-202E, U+2066-2069, marks U+200E/F, zero-width
    characters), line and paragraph separators, spaces other than ' ', lone
    surrogates, private-use and unassigned code points. The rest, accented and CJK
    letters included, is unchanged. Backslashes are kept as they are: this prevents
    control of the terminal; for the exact text, use ``--json``.

    >>> escape("w\x1b[31m\nfake_row float32 [1] 4 B")
    'w\\x1b[31m\\nfake_row float32 [1] 4 B'
    >>> print(escape("caf\u00e9 \u202eevil \x07 \ud800"))
    café \u202eevil \x07 \ud800
    """
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else _escape_char(c) for c in s)


def echo(text: object = "", stream: TextIO | None = None) -> None:
    """Write one line, escaped (see :func:`escape`), to ``stream`` (default stdout)."""
    stream = sys.stdout if stream is None else stream
    stream.write(escape(text) + "\n")


def is_tty(stream: Any = None) -> bool:
    """True when ``stream`` (default stdout) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False


def terminal_width(stream: Any = None) -> int | None:
    """The width in columns of the terminal ``stream`` (default stdout) is, ``COLUMNS``
    first (as rich reads it); None when it is not a terminal (piped or a file)."""
    if not is_tty(stream):
        return None
    return max(20, shutil.get_terminal_size().columns)


def _cells(c: str) -> int:
    if unicodedata.combining(c):
        return 0
    return 2 if unicodedata.east_asian_width(c) in "WF" else 1


def cell_width(text: str) -> int:
    """Terminal cells ``text`` (already escaped) takes: wide characters count two."""
    return len(text) if text.isascii() else sum(map(_cells, text))


def clip(text: object, width: int | None, limit: int = 1 << 16) -> str:
    r"""``text`` escaped (see :func:`escape`) and cut to fit ``width`` terminal cells
    (wide characters count two), ending in ``...``; with ``width`` None (a pipe), whole
    up to ``limit`` characters, then ``... (N characters)`` with the full length.

    >>> clip("abc\x1bdefgh", 10), clip("x" * 8, None, limit=5)
    ('abc\\x1b...', 'xxxxx... (8 characters)')
    """
    s = text if isinstance(text, str) else str(text)
    if width is None:
        if len(s) <= limit:
            return escape(s)
        return escape(s[:limit]) + f"... ({len(s)} characters)"
    out = escape(s[: width + 1])  # escaping never shortens: enough to fill the width
    if len(out) <= width and len(s) <= width and cell_width(out) <= width:
        return out
    room, used, end = max(0, width - 3), 0, 0
    for end, c in enumerate(out):  # noqa: B007 - end is used after the loop
        used += _cells(c)
        if used > room:
            break
    else:
        end = len(out)
    return out[:end] + "..."


def use_color() -> bool:
    """False when the ``NO_COLOR`` environment variable is set to anything non-empty."""
    return not os.environ.get("NO_COLOR")


def rich_available() -> bool:
    """True when rich can be imported (it is an optional dependency)."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _rich_console(stream: TextIO) -> Any:
    """A rich console on a stream already known to be a terminal: no markup, emoji or
    highlighting is read from the text, and with NO_COLOR no escape code at all."""
    from rich.console import Console

    return Console(
        file=stream,
        force_terminal=True,
        color_system="auto" if use_color() else None,
        markup=False,
        emoji=False,
        highlight=False,
        soft_wrap=False,
    )


def human_bytes(n: int | float) -> str:
    """Bytes in binary units: ``512 B``, ``1.5 KiB``, ``3.0 GiB``."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024.0
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def natural_key(name: str) -> tuple[Any, ...]:
    """A sort key that orders digit runs by value, so ``layer.2`` < ``layer.10``.

    Even positions hold text and odd positions integers, so keys of any two
    names compare without mixing types.
    """
    parts = _DIGITS.split(name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def format_number(x: Any) -> str:
    """Compact text for a statistic: ``6`` significant digits, ``-`` for None."""
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.6g}"


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    stream: TextIO | None = None,
    *,
    title: str | None = None,
    align: str | None = None,
) -> None:
    r"""Print a table: a rich table on a terminal, fixed-width plain text otherwise.
    Every cell, header and the title are escaped (see :func:`escape`).

    ``align`` has one letter per column, ``l`` or ``r`` (default: all left). A row is
    always one line: no value is ever folded, cut or dropped (a folded name could
    start a line that looks like a row of its own). When the table does not fit the
    terminal, each row is printed as a block of ``header value`` lines instead.

    >>> print_table(["name", "size"], [["a\x1b[31m", 4]], sys.stdout, align="lr")
    name       size
    a\x1b[31m     4
    """
    stream = sys.stdout if stream is None else stream
    align = align or "l" * len(headers)
    heads = [escape(h) for h in headers]
    cells = [[escape(c) for c in row] for row in rows]
    if is_tty(stream) and rich_available():
        console = _rich_console(stream)
        need = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)]
        if sum(need) + 3 * (len(need) - 1) > console.width:
            _print_records(heads, cells, stream, title)
            return
        from rich.table import Table
        from rich.text import Text

        table = Table(
            title=Text(escape(title)) if title else None,
            title_justify="left",
            show_edge=False,
            pad_edge=False,
        )
        for h, a, n in zip(heads, align, need, strict=True):
            table.add_column(
                Text(h), justify="right" if a == "r" else "left", min_width=n, no_wrap=True
            )
        for row in cells:
            table.add_row(*(Text(c) for c in row))
        console.print(table)
        return
    if title:
        stream.write(escape(title) + "\n")
    widths = [len(h) for h in heads]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def line(values: Sequence[str]) -> str:
        out = [
            v.rjust(w) if a == "r" else v.ljust(w)
            for v, w, a in zip(values, widths, align, strict=True)
        ]
        return "  ".join(out).rstrip()

    stream.write(line(heads) + "\n")
    for row in cells:
        stream.write(line(row) + "\n")


def _print_records(
    heads: list[str], cells: list[list[str]], stream: TextIO, title: str | None
) -> None:
    """A table too wide for the terminal, one block per row: the first cell, then
    ``header: value`` lines (the terminal folds what is longer than a line)."""
    if title:
        stream.write(escape(title) + "\n")
    pad = max(len(h) for h in heads[1:]) if len(heads) > 1 else 0
    for row in cells:
        stream.write(row[0] + "\n")
        for h, c in zip(heads[1:], row[1:], strict=True):
            stream.write(f"  {h.ljust(pad)}  {c}\n")


class _NoProgress:
    """What :func:`progress` returns when no bar is shown: does nothing."""

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def advance(self, n: int = 1, description: str | None = None) -> None:
        pass


class _RichProgress:
    def __init__(self, total: int, description: str) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=_rich_console(sys.stderr),
            transient=True,
        )
        self._task = self._progress.add_task(escape(description), total=total)

    def __enter__(self) -> _RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def advance(self, n: int = 1, description: str | None = None) -> None:
        if description:
            self._progress.update(self._task, advance=n, description=escape(description))
        else:
            self._progress.update(self._task, advance=n)


def progress(total_bytes: int, description: str, *, quiet: bool = False) -> Any:
    """A byte progress bar on stderr when stderr is a terminal, rich is installed,
    ``NO_COLOR`` is not set (the bar moves the cursor with escape codes) and not
    ``quiet``; otherwise an object that does nothing. Use as a context manager and
    call ``advance(nbytes, description)``; descriptions are escaped."""
    if quiet or not is_tty(sys.stderr) or not use_color() or not rich_available():
        return _NoProgress()
    return _RichProgress(total_bytes, description)
