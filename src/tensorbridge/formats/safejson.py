"""JSON from files, parsed under a budget, and values quoted in messages under a length cap.

A safetensors header and a sharded checkpoint's index are JSON that a stranger wrote.
``json.loads`` makes one Python object per value: two bytes of ``[]`` become a 56-byte
list, so 32 MiB of nested empty lists cost gigabytes. :func:`loads` checks the text
*before* parsing it, in C-speed passes over the bytes (strings removed by one regular
expression, then brackets counted and their nesting measured with NumPy), against:

- :data:`MAX_DEPTH` levels of nesting (both schemas need 3);
- at most one ``[`` or ``{`` per :data:`BYTES_PER_CONTAINER` bytes of text (the densest
  valid safetensors entry, ``"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},``,
  has one per 17 bytes; an index has a handful in all);
- no ``NaN``/``Infinity`` (not JSON; the Rust safetensors reader refuses them too);
- duplicate keys (other readers silently keep the last one).

Every refusal is a :class:`~tensorbridge.FileFormatError` (duplicates:
:class:`~tensorbridge.UnsafeContentError`), and every value a message quotes goes
through :func:`short`, whose cost does not depend on the value's size.

>>> loads(b'{"a": [1, 2]}', "f.json", "the index")
{'a': [1, 2]}
>>> loads(b"[" * 20 + b"]" * 20 + b" " * 300, "f.json", "the index")
Traceback (most recent call last):
...
tensorbridge.errors.FileFormatError: f.json: the index nests at least 20 levels deep, over the limit of 16 (a valid one needs 3). Fix: this is not a valid file, or it is corrupt or hostile.
>>> short("x" * 10**6).endswith("...' (1000000 characters)"), len(short("x" * 10**6)) < 200
(True, True)
"""

from __future__ import annotations

import json
import re
import reprlib
from typing import Any

import numpy as np

from ..errors import FileFormatError, UnsafeContentError

__all__ = ["loads", "short", "MAX_DEPTH", "BYTES_PER_CONTAINER"]

#: Deepest nesting of ``[``/``{`` accepted (safetensors headers and indexes need 3).
MAX_DEPTH = 16
#: At most one container per this many bytes of JSON text (see the module docstring).
BYTES_PER_CONTAINER = 12
#: A JSON string, escapes included (unrolled so that it runs in linear time).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NON_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_CHUNK = 1 << 22

_REPR = reprlib.Repr()
_REPR.maxstring = 120
_REPR.maxother = 120
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8


def short(value: object, limit: int = 120) -> str:
    """A ``repr`` of ``value`` for a message, bounded in length and in work.

    >>> short([[1, 2, 3]] * 100)
    '[[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], ...]'
    """
    if isinstance(value, int) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit])[:-1] + f"...' ({len(value)} characters)"
    text = _REPR.repr(value)
    return text if len(text) <= 2 * limit else text[: 2 * limit] + "..."


def _max_depth(brackets: bytes | bytearray, limit: int = MAX_DEPTH) -> int:
    """The deepest nesting of a string holding only ``[]{}`` (NumPy, in chunks); stops
    measuring once it is over ``limit``."""
    depth = 0
    deepest = 0
    for start in range(0, len(brackets), _CHUNK):
        codes = np.frombuffer(brackets, np.uint8, min(_CHUNK, len(brackets) - start), start)
        steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int32)
        running = np.cumsum(steps, dtype=np.int64) + depth
        deepest = max(deepest, int(running.max()))
        depth = int(running[-1])
        if deepest > limit:
            break  # refused anyway: no need to measure the rest
    return deepest


def _check_budget(raw: bytes | bytearray, path: str, what: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse ``raw`` over the budget. The first pass counts brackets inside strings too
    (an upper bound, one C pass); only if that is over does the exact pass, which first
    removes the strings, decide."""
    if _within_budget(raw.translate(None, _NON_BRACKETS), len(raw), max_depth):
        return
    bare = _STRING.sub(b"", raw)
    brackets = bare.translate(None, _NON_BRACKETS)
    del bare
    allowed = len(raw) // BYTES_PER_CONTAINER + 8
    containers = brackets.count(b"[") + brackets.count(b"{")
    if containers > allowed:
        raise FileFormatError(
            f"{what} has {containers} JSON arrays and objects in {len(raw)} bytes, more than "
            f"one per {BYTES_PER_CONTAINER} bytes (a valid one has far fewer; parsing it could "
            "take gigabytes). Fix: this is not a valid file, or it is corrupt or hostile.",
            path,
        )
    if brackets:
        depth = _max_depth(brackets, max_depth)
        if depth > max_depth:
            needs = " (a valid one needs 3)" if max_depth == MAX_DEPTH else ""
            raise FileFormatError(
                f"{what} nests at least {depth} levels deep, over the limit of {max_depth}{needs}. "
                "Fix: this is not a valid file, or it is corrupt or hostile.",
                path,
            )


def _within_budget(brackets: bytes | bytearray, size: int, max_depth: int) -> bool:
    containers = brackets.count(b"[") + brackets.count(b"{")
    return containers <= size // BYTES_PER_CONTAINER + 8 and (
        containers <= max_depth  # each level opens one: no deeper than that (a small file)
        or _max_depth(brackets, max_depth) <= max_depth
    )


class _Constant(Exception):
    """``NaN``/``Infinity`` met by a decoder that refuses them (see :func:`loads`)."""


class _Duplicate(Exception):
    """A key met twice in one JSON object (see :func:`loads`)."""


def _refuse_constant(name: str) -> Any:
    raise _Constant(name)


def _unique(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return out


# Made once: a decoder costs more to make than a small header costs to parse. Its hooks
# know nothing of the file; loads() words their refusals.
_STRICT = json.JSONDecoder(object_pairs_hook=_unique, parse_constant=_refuse_constant)
_NONFINITE = json.JSONDecoder(object_pairs_hook=_unique)
_JSON_SPACE = " \t\n\r"


def _decode(decoder: json.JSONDecoder, text: str) -> Any:
    """``decoder.decode(text)``: one value between JSON whitespace, with the same errors,
    without its two regular-expression passes (a third of a small header's parse)."""
    if text.startswith("\ufeff"):  # (as json.loads words it)
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    start = len(text) - len(text.lstrip(_JSON_SPACE))
    try:
        value, end = decoder.scan_once(text, start)  # type: ignore[attr-defined]
    except StopIteration as err:
        raise json.JSONDecodeError("Expecting value", text, err.value) from None
    if text[end:].strip(_JSON_SPACE):
        raise json.JSONDecodeError(
            "Extra data", text, len(text) - len(text[end:].lstrip(_JSON_SPACE))
        )
    return value


def loads(
    raw: bytes | bytearray,
    path: str,
    what: str,
    *,
    offset: int = 0,
    max_depth: int = MAX_DEPTH,
    nonfinite: bool = False,
) -> Any:
    """Parse the UTF-8 JSON ``raw`` (from ``path``, where it starts at byte ``offset``;
    ``what`` names it in messages) within the budget above, nesting at most ``max_depth``
    deep; refuse duplicate keys, and NaN/Infinity unless ``nonfinite`` (zarr metadata:
    zarr-python writes them). The budget is checked before the text is decoded or parsed."""
    _check_budget(raw, path, what, max_depth)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(
            f"{what} is not valid UTF-8 ({exc.reason} at byte {offset + exc.start}). Fix: "
            "this is not a valid file, or it is corrupt.",
            path,
        ) from exc
    try:
        return _decode(_NONFINITE if nonfinite else _STRICT, text)
    except _Constant as exc:
        raise FileFormatError(
            f"{what} holds {exc.args[0]}, which is not JSON (strict readers such as the "
            "safetensors library refuse it). Fix: write a number, or re-save the file.",
            path,
        ) from None
    except _Duplicate as exc:
        raise UnsafeContentError(
            f"{what} has the key {short(exc.args[0])} more than once; other readers would "
            "silently keep only the last one. Fix: re-save it with unique keys.",
            path,
        ) from None
    except (ValueError, RecursionError) as exc:
        raise FileFormatError(
            f"{what} is not valid JSON ({short(str(exc), 200)}). Fix: this is not a valid "
            "file, or it is corrupt.",
            path,
        ) from exc
