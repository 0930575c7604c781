"""GGUF metadata: typed values, and reading and writing them (used by :mod:`.gguf`).

A value is a :class:`GGUFValue`: a ``str`` holding its text (strings as they are;
numbers, booleans and arrays as JSON) that also carries its GGUF type and value,
so a GGUF written from it keeps them. Arrays of numbers are kept as NumPy arrays;
their text is bounded: an array of more than :data:`INLINE_ITEMS` items (or past
:data:`INLINE_BUDGET` items in all of a file's metadata) reads as a short summary,
``[0.0, 1.0, ... 9.0] (10000000 FLOAT32 items)``, and its whole JSON is made only
when asked for (:meth:`GGUFValue.full_text`); each item as a Python object would
cost some 16 times its bytes. The header reader (:class:`Cursor`) reads through a
bounded buffer and checks every length and count against the bytes the file
really has before anything is allocated.

>>> value(4096, "uint32").gguf_type, value(["a", "b"], "array", "string")
('UINT32', '["a", "b"]')
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from ..errors import ConversionError, FileFormatError
from .gguf_types import VALUE_TYPE_IDS, VALUE_TYPES
from .safetensors import read_exact_into

__all__ = [
    "GGUFValue",
    "value",
    "Cursor",
    "read_name",
    "read_value_type",
    "read_value",
    "pack_string",
    "pack_value",
    "metadata_entries",
    "alignment_of",
    "DEFAULT_ALIGNMENT",
    "MAX_NAME",
    "MAX_ARRAY_DEPTH",
    "MAX_NESTED_ARRAYS",
    "MAX_KEYS",
    "MAX_TENSORS",
    "MAX_ALIGNMENT",
    "MAX_WRITE_ALIGNMENT",
    "INLINE_ITEMS",
    "INLINE_BUDGET",
]

DEFAULT_ALIGNMENT = 32
#: longest key or tensor name (the spec: keys are at most 65535 bytes)
MAX_NAME = 65535
#: deepest nesting of arrays inside arrays
MAX_ARRAY_DEPTH = 8
#: most arrays nested inside arrays, in all of a file's metadata
MAX_NESTED_ARRAYS = 1 << 16
#: most metadata keys in one file: each costs some 600 bytes of Python objects for as
#: little as 13 bytes of file (llama.cpp's models carry tens; vocabularies are one key)
MAX_KEYS = 1 << 16
#: most tensors in one file: each costs some 800 bytes for as little as 24 bytes of file
#: (the largest models carry a few thousand per file)
MAX_TENSORS = 1 << 18
#: the largest general.alignment accepted
MAX_ALIGNMENT = 1 << 30
#: largest alignment written: the header's padding is up to this many bytes, whatever the
#: tensors (a 90-byte file declaring 2**30 converted to a 1 GiB GGUF)
MAX_WRITE_ALIGNMENT = 1 << 20
#: bytes read at a time while parsing the header
_HEADER_CHUNK = 1 << 20
#: the most items of one numeric array written out as JSON text (a 256k vocabulary's
#: scores); longer arrays read as a summary (their values stay in ``.value``)
INLINE_ITEMS = 1 << 18
#: the most numeric array items written out as text in all of one file's metadata
INLINE_BUDGET = 1 << 20
#: items shown at each end of a summary
_SUMMARY_ITEMS = 8
_NP_CODES = {
    "UINT8": "u1",
    "INT8": "i1",
    "UINT16": "u2",
    "INT16": "i2",
    "UINT32": "u4",
    "INT32": "i4",
    "FLOAT32": "f4",
    "BOOL": "u1",
    "UINT64": "u8",
    "INT64": "i8",
    "FLOAT64": "f8",
}

# --- metadata values -----------------------------------------------------------------


class GGUFValue(str):
    """A GGUF metadata value: the ``str`` is its text (JSON for numbers and arrays),
    ``gguf_type`` its GGUF type name (``"UINT32"``, ``"ARRAY"``...), ``item_type``
    the type of an array's items, and ``value`` the value itself (a NumPy array for
    arrays of numbers, a list for strings and nested arrays). ``complete`` is False
    when the text is a bounded summary of a long array (see :meth:`full_text`)."""

    gguf_type: str
    item_type: str | None
    value: Any
    complete: bool

    def __new__(
        cls,
        text: str,
        gguf_type: str,
        value: Any,
        item_type: str | None = None,
        complete: bool = True,
    ) -> GGUFValue:
        self = super().__new__(cls, text)
        self.gguf_type, self.value, self.item_type = gguf_type, value, item_type
        self.complete = complete
        return self

    def full_text(self) -> str:
        """The whole value as text (JSON for arrays), made now if the ``str`` is a summary:
        for a long array that is some 5-20 bytes of text per item.

        >>> v = value(range(300_000), "array", "int32")
        >>> print(v)
        [0, 1, 2, 3, 4, 5, 6, 7, ... 299992, 299993, 299994, 299995, 299996, 299997, 299998, 299999] (300000 INT32 items)
        >>> v.complete, len(v.full_text()), v.value.nbytes
        (False, 2288890, 1200000)
        """
        if self.complete:
            return str.__str__(self)
        return json.dumps(_json_of(self.gguf_type, self.value, self.item_type), ensure_ascii=False)

    def __repr__(self) -> str:
        if len(self) <= 200:
            return super().__repr__()
        return f"{str.__repr__(self[:120])}... <{self.gguf_type}, {len(self)} chars>"

    def __eq__(self, other: object) -> bool:
        """As ``str``, except that a summary compares by value: two long arrays are equal
        when their types and items are (not only their first and last items)."""
        if isinstance(other, GGUFValue) and not (self.complete and other.complete):
            return (self.gguf_type, self.item_type) == (other.gguf_type, other.item_type) and (
                _same_items(self.value, other.value)
            )
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = str.__hash__  # equal values have equal texts

    def __reduce__(self) -> Any:
        return (
            GGUFValue,
            (str.__str__(self), self.gguf_type, self.value, self.item_type, self.complete),
        )


def _same_items(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return isinstance(a, list) and isinstance(b, list) and a == b


def _f32_text(x: float) -> Any:
    """A float32 as its shortest text (1e-05, not 9.999999747378752e-06), JSON-safe."""
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return (
        float(np.format_float_positional(np.float32(x), unique=True, trim="-"))
        if abs(x) >= 1e-4 or x == 0
        else float(np.format_float_scientific(np.float32(x), unique=True))
    )


def _plain(x: Any, t: str) -> Any:
    if t == "FLOAT32":
        return _f32_text(float(x))
    if t == "FLOAT64":
        x = float(x)
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
    if t == "BOOL":
        return bool(x)
    if t == "STRING":
        return _display(x)
    return int(x)


def _display(s: str) -> str:
    """A string value as valid text (bytes that were not UTF-8 become U+FFFD)."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _json_of(t: str, v: Any, item: str | None) -> Any:
    if t == "ARRAY":
        if item == "ARRAY":
            return [json.loads(x.full_text()) for x in v]
        if item == "STRING":
            return [_display(s) for s in v]
        if item in ("FLOAT32", "FLOAT64"):
            if np.isfinite(v).all():  # float32 items as their exact float64 value (fast)
                return v.astype(np.float64).tolist()
            return [_plain(x, "FLOAT64") for x in v.astype(np.float64).tolist()]
        return v.tolist()  # ints and bools
    return _plain(v, t)


def _make(t: str, v: Any, item: str | None = None, inline: int = INLINE_ITEMS) -> GGUFValue:
    """The value with its text; an array of numbers (or of arrays) holding more than
    ``inline`` items, or an inner array that is a summary, gets a summary text."""
    if t == "STRING":
        return GGUFValue(_display(v), t, v)
    if t == "ARRAY" and item != "STRING":
        summarise = len(v) > inline
        if item == "ARRAY":
            summarise = summarise or not all(x.complete for x in v)
        if summarise:
            return GGUFValue(_summary(v, item or ""), t, v, item, complete=False)
    return GGUFValue(json.dumps(_json_of(t, v, item), ensure_ascii=False), t, v, item)


def _summary(v: Any, item: str) -> str:
    """A long array as bounded text: its first and last items, then how many."""
    k = _SUMMARY_ITEMS
    if item == "ARRAY":
        head = ", ".join(f"{str.__str__(x):.40}" for x in v[: k // 2])
        return f"[{head}, ...] ({len(v)} arrays)"
    if len(v) <= 2 * k:  # an array of arrays, some of them summaries
        return json.dumps(_json_of("ARRAY", v, item))
    first = json.dumps(_json_of("ARRAY", v[:k], item))[1:-1]
    last = json.dumps(_json_of("ARRAY", v[-k:], item))[1:-1]
    return f"[{first}, ... {last}] ({len(v)} {item} items)"


def value(v: Any, gguf_type: str, item_type: str | None = None) -> GGUFValue:
    """A metadata value of a given GGUF type, for ``metadata=`` when writing GGUF
    (plain ``str`` values are written as STRING).

    >>> value(4096, "uint32").gguf_type, value([1.5, 2], "array", "float32")
    ('UINT32', '[1.5, 2.0]')
    """
    t = gguf_type.upper()
    if t not in VALUE_TYPE_IDS:
        raise ConversionError(
            f"unknown GGUF value type {gguf_type!r}. Fix: use one of {', '.join(VALUE_TYPE_IDS)}."
        )
    if t == "ARRAY":
        item = (item_type or "").upper()
        if item == "STRING":
            return _make(t, [str(s) for s in v], item)
        if item not in _NP_CODES:
            raise ConversionError(
                f"array item type {item_type!r} is not a GGUF scalar or "
                "string type. Fix: pass item_type= like 'int32' or 'string'."
            )
        try:
            with np.errstate(over="raise"):
                arr = np.asarray(v, dtype=np.dtype(_NP_CODES[item]).newbyteorder("<"))
        except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
            raise ConversionError(
                f"the items cannot be stored as GGUF {item} ({exc}). Fix: "
                "pass numbers in that type's range."
            ) from exc
        return _make(t, arr.reshape(-1), item)
    if t == "STRING":
        return _make(t, str(v))
    code = VALUE_TYPES[VALUE_TYPE_IDS[t]][1]
    try:
        packed = struct.unpack("<" + code, struct.pack("<" + code, v))[0]  # type: ignore[operator]
    except (struct.error, TypeError, OverflowError) as exc:
        raise ConversionError(
            f"{v!r} cannot be stored as GGUF {t} ({exc}). Fix: pass a value in that type's range."
        ) from exc
    return _make(t, packed)


# --- reading ---------------------------------------------------------------------------


class Cursor:
    """Reads the header through a bounded buffer; never past the file's real size."""

    def __init__(self, fd: int, size: int, path: str) -> None:
        self.fd, self.size, self.path = fd, size, path
        self.pos = 0
        self._buf = b""
        self._start = 0
        self.order: Literal["<", ">"] = "<"
        #: arrays inside arrays still allowed: each costs a Python object of some 300
        #: bytes for 12 bytes of file, so their number is capped, not only their bytes
        self.nested_left = MAX_NESTED_ARRAYS
        #: numeric array items that may still be written out as text (see INLINE_BUDGET)
        self.inline_left = INLINE_BUDGET

    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise FileFormatError(
                f"{what} needs {n} bytes at byte {self.pos}, but the file has only "
                f"{self.size - self.pos} more (it is truncated or corrupt). Fix: download or "
                "copy the file again.",
                self.path,
            )

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        off = self.pos - self._start
        if off < 0 or off + n > len(self._buf):
            k = min(max(n, _HEADER_CHUNK), self.size - self.pos)
            buf = bytearray(k)
            read_exact_into(self.fd, memoryview(buf), self.pos, self.path)
            self._buf, self._start, off = bytes(buf), self.pos, 0
        self.pos += n
        return self._buf[off : off + n]

    def take_array(self, n: int, what: str) -> np.ndarray:
        """``n`` bytes as a new uint8 array, read straight from the file when they are
        many (no second copy through the buffer)."""
        if n <= _HEADER_CHUNK:
            return np.frombuffer(self.take(n, what), np.uint8)
        self.need(n, what)
        out = np.empty(n, np.uint8)
        read_exact_into(self.fd, out.data, self.pos, self.path)
        self.pos += n
        return out

    def unpack(self, code: str, what: str) -> Any:
        size = struct.calcsize(code)
        return struct.unpack(self.order + code, self.take(size, what))[0]

    def strings(self, count: int, what: str) -> list[str]:
        """``count`` strings in a row: one tight loop over the buffer (vocabularies hold
        100k+), falling back to :meth:`string` where one crosses the buffer's end."""
        out = []
        unpack = struct.Struct(self.order + "Q").unpack_from
        for _ in range(count):
            off = self.pos - self._start
            buf = self._buf
            if off >= 0 and off + 8 <= len(buf):
                n = unpack(buf, off)[0]
                if off + 8 + n <= len(buf):
                    out.append(buf[off + 8 : off + 8 + n].decode("utf-8", "surrogateescape"))
                    self.pos += 8 + n
                    continue
            out.append(self.string(what))
        return out

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.unpack("Q", what)
        if limit is not None and n > limit:
            raise FileFormatError(
                f"{what} is {n} bytes long, over the {limit}-byte limit. Fix: the file is "
                "corrupt or hostile.",
                self.path,
            )
        raw = self.take(n, what)
        return raw.decode("utf-8", "surrogateescape")


def read_name(cur: Cursor, what: str) -> str:
    start = cur.pos
    s = cur.string(what, MAX_NAME)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise FileFormatError(
            f"{what} at byte {start} is not valid UTF-8 ({s!r:.80}). Fix: the "
            "file is corrupt; re-save it.",
            cur.path,
        ) from None
    return s


def read_value_type(cur: Cursor, what: str) -> str:
    tid = cur.unpack("I", what)
    if tid not in VALUE_TYPES:
        raise FileFormatError(
            f"{what} has the unknown value type {tid} (known: 0..12). Fix: the file is corrupt, "
            "or from a newer GGUF version.",
            cur.path,
        )
    return VALUE_TYPES[tid][0]


def read_value(cur: Cursor, t: str, key: str, depth: int = 0) -> GGUFValue:
    what = f"metadata {key!r:.80}"
    if t == "STRING":
        return _make(t, cur.string(what))
    if t != "ARRAY":
        raw = cur.unpack(VALUE_TYPES[VALUE_TYPE_IDS[t]][1] or "", what)
        return _make(t, raw)
    if depth >= MAX_ARRAY_DEPTH:
        raise FileFormatError(
            f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep. Fix: the "
            "file is corrupt or hostile.",
            cur.path,
        )
    item = read_value_type(cur, what + " (array item type)")
    count = cur.unpack("Q", what + " (array length)")
    if item in _NP_CODES:
        size = VALUE_TYPES[VALUE_TYPE_IDS[item]][2] or 1
        cur.need(count * size, f"{what} ({count} items)")
        raw = cur.take_array(count * size, what)
        dtype = np.dtype(_NP_CODES[item]).newbyteorder("<")
        if raw.flags.writeable:  # read straight into its own array: swap in place
            arr = raw.view(dtype)
            if cur.order == ">" and size > 1:
                arr.byteswap(inplace=True)
        else:
            arr = raw.view(dtype.newbyteorder(cur.order)).astype(dtype)
        if item == "BOOL":
            arr = arr != 0
        inline = min(INLINE_ITEMS, cur.inline_left)
        if count <= inline:
            cur.inline_left -= count
        return _make(t, arr, item, inline)
    least = 8 if item == "STRING" else 12  # a string's length; an array's type and length
    cur.need(count * least, f"{what} ({count} items)")
    if item == "STRING":
        return _make(t, cur.strings(count, what), item)
    cur.nested_left -= count
    if cur.nested_left < 0:
        raise FileFormatError(
            f"{what} holds arrays of arrays with more than {MAX_NESTED_ARRAYS} inner arrays in "
            "all (GGUF models use flat arrays). Fix: the file is corrupt or hostile.",
            cur.path,
        )
    return _make(t, [read_value(cur, "ARRAY", key, depth + 1) for _ in range(count)], item)


# --- writing ---------------------------------------------------------------------------


def pack_string(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(raw)) + raw


def pack_value(v: GGUFValue) -> bytes:
    t = v.gguf_type
    if t == "STRING":
        return pack_string(v.value)
    if t != "ARRAY":
        return struct.pack("<" + (VALUE_TYPES[VALUE_TYPE_IDS[t]][1] or ""), v.value)
    item = v.item_type or "STRING"
    head = struct.pack("<IQ", VALUE_TYPE_IDS[item], len(v.value))
    if item == "STRING":
        return head + b"".join(pack_string(s) for s in v.value)
    if item == "ARRAY":
        return head + b"".join(pack_value(x) for x in v.value)  # nested: no value type
    arr = np.asarray(v.value)
    if item == "BOOL":
        arr = arr.astype(np.uint8)
    return head + arr.astype(np.dtype(_NP_CODES[item]).newbyteorder("<")).tobytes()


def metadata_entries(metadata: Mapping[str, str], path: str) -> list[tuple[str, GGUFValue]]:
    out = []
    for key, v in metadata.items():
        if not key or len(key.encode("utf-8", "surrogateescape")) > MAX_NAME:
            raise ConversionError(
                f"{path}: metadata key {key!r:.80} must be 1 to {MAX_NAME} bytes. Fix: rename it."
            )
        gv = v if isinstance(v, GGUFValue) else _make("STRING", str(v))
        if key == "general.alignment" and gv.gguf_type != "UINT32":
            try:
                gv = value(int(str(v)), "UINT32")
            except (ValueError, ConversionError):
                raise ConversionError(
                    f"{path}: general.alignment {str(v)!r:.40} is not an integer. Fix: pass a "
                    "power of two, e.g. value(32, 'uint32')."
                ) from None
        out.append((key, gv))
    return out


def alignment_of(entries: list[tuple[str, GGUFValue]], path: str) -> int:
    for key, v in entries:
        if key == "general.alignment":
            a = int(v.value)
            if not 0 < a <= MAX_WRITE_ALIGNMENT or a & (a - 1):
                raise ConversionError(
                    f"{path}: general.alignment {a} is not a power of two up to "
                    f"{MAX_WRITE_ALIGNMENT} (the padding before the data would be up to that "
                    "many bytes; files use 32). Fix: pass e.g. 32 (value(32, 'uint32'))."
                )
            return a
    return DEFAULT_ALIGNMENT
