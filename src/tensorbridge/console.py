"""Terminal output for the command line: rich on a terminal, plain text in a pipe.

rich is optional. It is imported only when output goes to a terminal, and
everything falls back to plain, fixed-width text without ANSI escape codes
when it is missing, when the stream is piped, or when ``NO_COLOR`` is set
(see https://no-color.org: then rich draws tables without colour).

>>> human_bytes(1536), human_bytes(12)
('1.5 KiB', '12 B')
>>> sorted(["layer.10", "layer.2", "emb"], key=natural_key)
['emb', 'layer.2', 'layer.10']
"""

from __future__ import annotations

import io
import os
import re
import sys
from typing import Any, TextIO
from collections.abc import Sequence

__all__ = ["is_tty", "use_color", "rich_available", "print_table", "human_bytes",
           "natural_key", "format_number", "progress"]

_DIGITS = re.compile(r"(\d+)")


def is_tty(stream: Any = None) -> bool:
    """True when ``stream`` (default stdout) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False


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
    from rich.console import Console

    return Console(file=stream, no_color=not use_color(), highlight=False, soft_wrap=False)


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
    """Print a table: a rich table on a terminal, fixed-width plain text otherwise.

    ``align`` has one letter per column, ``l`` or ``r`` (default: all left).
    """
    stream = sys.stdout if stream is None else stream
    align = align or "l" * len(headers)
    cells = [[str(c) for c in row] for row in rows]
    if is_tty(stream) and rich_available():
        from rich.table import Table

        table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
        longest = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
        for i, (h, a) in enumerate(zip(headers, align, strict=True)):
            # On a narrow terminal every column folds onto more lines instead of being cut
            # (a number must never lose digits); names keep at least 16 characters a line.
            table.add_column(h, justify="right" if a == "r" else "left", overflow="fold",
                             min_width=min(longest[i], 16 if i == 0 else len(h)))
        for row in cells:
            table.add_row(*row)
        _rich_console(stream).print(table)
        return
    if title:
        stream.write(title + "\n")
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def line(values: Sequence[str]) -> str:
        out = [v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align, strict=True)]
        return "  ".join(out).rstrip()

    stream.write(line(list(headers)) + "\n")
    for row in cells:
        stream.write(line(row) + "\n")


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
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(),
            console=_rich_console(sys.stderr), transient=True,
        )
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> _RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def advance(self, n: int = 1, description: str | None = None) -> None:
        if description:
            self._progress.update(self._task, advance=n, description=description)
        else:
            self._progress.update(self._task, advance=n)


def progress(total_bytes: int, description: str, *, quiet: bool = False) -> Any:
    """A byte progress bar on stderr when stderr is a terminal, rich is
    installed and not ``quiet``; otherwise an object that does nothing.
    Use as a context manager and call ``advance(nbytes, description)``."""
    if quiet or not is_tty(sys.stderr) or not rich_available():
        return _NoProgress()
    return _RichProgress(total_bytes, description)
