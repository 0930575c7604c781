"""Tensor-name rules shared by every format, on read and on write.

A name is refused when it is empty, contains NUL, is an absolute path, has a
``..`` component, or repeats; on write, also when it holds a lone surrogate (it
cannot be written as UTF-8). Such names let a file overwrite another entry, escape a directory when
extracted, confuse tools that split on ``/``, or fail half-way through a write.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import UnsafeContentError
from .safejson import short

__all__ = ["check_name", "check_unique", "text_is_utf8"]


def text_is_utf8(text: str) -> bool:
    r"""Whether ``text`` can be written as UTF-8: it holds no lone surrogate (which a JSON
    ``\ud800`` escape or a file name decoded with ``surrogateescape`` can produce).

    >>> text_is_utf8("w\u00e9ight"), text_is_utf8(chr(0xD800))
    (True, False)
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]*").fullmatch


def check_name(name: object, file: object = "", *, writing: bool = False) -> None:
    """Raise :class:`UnsafeContentError` unless ``name`` is a safe tensor name.

    ``writing``: also refuse a lone surrogate. A file may hold one (a JSON ``\\ud800``
    escape) and it is read, so that ``inspect`` can show it (escaped); no file can be
    written with it, as UTF-8 cannot encode it."""
    if type(name) is str and _PLAIN(name) and ".." not in name:
        return  # ASCII letters, digits, _ . - : with no slash: none of the refusals below apply
    if not isinstance(name, str):
        raise UnsafeContentError(
            f"tensor name {short(name)} is a {type(name).__name__}, not a string. "
            "Fix: use string names only.",
            file,
        )
    why = None
    if name == "":
        why = "it is empty"
    elif "\x00" in name:
        why = "it contains a NUL character"
    elif name.startswith(("/", "\\")) or (name[:1].isalpha() and name[1:3] in (":/", ":\\")):
        why = "it is an absolute path"
    elif ".." in name.replace("\\", "/").split("/"):
        why = "it has a '..' path component"
    elif writing and not text_is_utf8(name):
        why = (
            "it is not valid Unicode (it holds a lone surrogate), so it cannot be written as UTF-8"
        )
    if why:
        raise UnsafeContentError(
            f"tensor name {short(name)} is refused: {why}. Fix: rename the tensor "
            "(e.g. 'encoder.weight'); names must be non-empty relative names "
            "without NUL or '..'.",
            file,
        )


def check_unique(names: Iterable[str], file: object = "", *, writing: bool = False) -> None:
    """Check every name (see :func:`check_name`), and that none repeats."""
    seen: set[str] = set()
    for name in names:
        check_name(name, file, writing=writing)
        if name in seen:
            raise UnsafeContentError(
                f"tensor name {short(name)} appears more than once; a reader would silently "
                "keep only one of them. Fix: give every tensor a unique name.",
                file,
            )
        seen.add(name)
