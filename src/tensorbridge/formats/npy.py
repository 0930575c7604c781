"""The ``.npy`` format: our own strict header parser and a streaming writer.

File layout (NumPy's ``lib/format.py``, versions 1.0, 2.0 and 3.0)::

    6 bytes   the magic string b"\\x93NUMPY"
    2 bytes   major, minor version: (1, 0), (2, 0) or (3, 0)
    2|4 bytes HEADER_LEN, little-endian: u16 for 1.0, u32 for 2.0 and 3.0
    HEADER_LEN bytes  a Python dict literal, latin-1 (UTF-8 for 3.0), padded with
              spaces and ended by '\\n':
              {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
    rest      the array data, exactly prod(shape) * itemsize bytes.

Why not ``np.load``? It reads files with trailing garbage, allocates whatever
shape the header declares before reading (and an int64 shape product can wrap
to 0), and ``literal_eval`` is parsed before some checks. Here the header
length is capped at :data:`MAX_HEADER_SIZE` (NumPy's own ``_MAX_HEADER_SIZE``)
*before* ``literal_eval`` sees it; the dict must have exactly the keys
``descr``, ``fortran_order`` and ``shape``; the shape must be a tuple of
non-negative ints whose product does not overflow; the declared data size must
equal the rest of the file exactly. Only plain numeric dtypes are accepted:
object, string, datetime and structured dtypes are refused. Big-endian data
is byte-swapped to native order with its values kept. The data is read with
``pread`` into a fresh array; the file is never memory-mapped.

A reader holds one tensor, named :data:`ARRAY_NAME` (``"array"``), whatever the
file is called, so that ``tensorbridge convert x.npy y.safetensors`` gives a
predictable name. The writer refuses more than one tensor (use ``.npz``).

**bfloat16 and float8.** NumPy has no such dtypes, so tensorbridge stores them
in a layout plain NumPy can still open: a single-field structured dtype whose
field name is the canonical dtype name and whose field type is the
same-width little-endian unsigned int holding the raw bits, e.g. ``descr =
[('bfloat16', '<u2')]`` or ``[('float8_e4m3fn', '|u1')]``.
``np.load(f, allow_pickle=False)`` returns a structured array of raw bits, and
``a['bfloat16'].view(ml_dtypes.bfloat16)`` recovers the values; tensorbridge
reads such files back as the ``ml_dtypes`` dtype, bit-exactly. Any other
structured dtype is refused. :func:`encode_dtype` and :func:`decode_dtype`
implement this layout; ``npz.py`` reuses them.

**Raw-bytes descrs ('<V2', '<V1').** ``np.save`` of an ``ml_dtypes`` array writes
bfloat16 as ``'<V2'`` and most float8s as ``'<V1'``, which says the width but not
the dtype; ``mx.save``/``mx.savez`` write MLX's bfloat16 as ``'<V2'`` too, and
``mx.load`` reads any ``'V2'`` as bfloat16 (and refuses the marker layout). So:

* a header in the exact layout MLX's writer uses (``'shape': (3, )}``, no
  trailing ``, }``: ``np.save`` never writes it) with ``'<V2'``/``'>V2'`` is read
  as bfloat16. A genuine ``np.void`` dtype is always ``'|V2'``, never ``'<V2'``,
  so a void array saved by NumPy is never taken for bfloat16;
* any other raw-bytes descr is refused, unless the reader is told what the bytes
  are: ``void_as="bfloat16"`` (or a float8 name) reads every raw-bytes descr of
  that width as that dtype (:func:`check_void_as`);
* the write option ``void=True`` stores bfloat16/float8 as ``np.save`` stores
  ``ml_dtypes`` arrays (the same header bytes), which ``mx.load`` reads as
  bfloat16; reading such a file back then needs ``void_as``, as the dtype is not
  in the file.

>>> import numpy as np, tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "a.npy")
>>> a = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> FORMAT.write(p, [TensorInfo("array", "float32", (2, 3))], lambda name: a)
>>> with FORMAT.open(p) as r:
...     (r.keys(), r.read("array").tobytes() == a.tobytes())
(['array'], True)
>>> np.load(p, allow_pickle=False).tobytes() == a.tobytes()
True
"""

from __future__ import annotations

import ast
import io
import os
import re
import struct
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..dtypes import DTYPES, canonical_name, lookup
from ..errors import ConversionError, FileFormatError, UnsafeContentError
from .atomic import atomic_write
from .base import Format, RawSpan, Reader, TensorInfo, file_stamp, opening
from .safetensors import check_fetched, iter_le_bytes, open_regular_stat, read_exact_into

__all__ = [
    "FORMAT",
    "NpyFormat",
    "NpyReader",
    "NpyHeader",
    "ARRAY_NAME",
    "MAGIC",
    "MAX_HEADER_SIZE",
    "MAX_NDIM",
    "MARKED_DTYPES",
    "check_void_as",
    "check_void_option",
    "encode_dtype",
    "decode_dtype",
    "parse_header",
    "parse_header_bytes",
    "build_header",
    "read_into",
    "check_bool",
]

#: The name of the one tensor a ``.npy`` file holds.
ARRAY_NAME = "array"
MAGIC = b"\x93NUMPY"
#: NumPy's ``_MAX_HEADER_SIZE``: ``literal_eval`` is not safe on large inputs.
MAX_HEADER_SIZE = 10000
#: NumPy cannot hold more dimensions than this.
MAX_NDIM = 64
#: Bytes of the magic, version and the longest HEADER_LEN field, before the dict.
PREFIX_MAX = len(MAGIC) + 2 + 4

_KEYS = {"descr", "fortran_order", "shape"}
_VERSIONS = {(1, 0): "<H", (2, 0): "<I", (3, 0): "<I"}
_ALIGN = 64

#: Canonical dtypes NumPy does not know (ml_dtypes), stored with the marker layout.
MARKED_DTYPES: frozenset[str] = frozenset(
    name for name, row in DTYPES.items() if row.numpy.type.__module__.split(".")[0] != "numpy"
)


# --- the bfloat16/float8 marker layout ---------------------------------------


def encode_dtype(dtype: Any, /) -> np.dtype:
    """The dtype a ``.npy`` file stores for a tensor of ``dtype``.

    Plain NumPy dtypes become little-endian; bfloat16/float8 become the marker
    layout (a one-field structured dtype of raw little-endian bits).

    >>> encode_dtype(np.dtype(">f4"))
    dtype('<f4')
    >>> import ml_dtypes
    >>> encode_dtype(ml_dtypes.bfloat16)
    dtype([('bfloat16', '<u2')])
    """
    name = canonical_name(dtype)
    row = lookup(name)
    if name in MARKED_DTYPES:
        return np.dtype([(name, np.dtype(f"<u{row.itemsize}"))])
    return row.numpy.newbyteorder("<") if row.itemsize > 1 else row.numpy


def decode_dtype(dtype: Any, /) -> str | None:
    """The canonical name if ``dtype`` is the marker layout, else None.

    >>> decode_dtype(np.dtype([("float8_e4m3fn", "u1")]))
    'float8_e4m3fn'
    >>> decode_dtype(np.dtype("f4")) is None
    True
    """
    dt = np.dtype(dtype)
    if dt.names is None or len(dt.names) != 1:
        return None
    name = dt.names[0]
    if name not in MARKED_DTYPES:
        return None
    field, offset = dt.fields[name][:2]
    if (
        offset != 0
        or dt.itemsize != field.itemsize
        or field.kind != "u"
        or field.itemsize != lookup(name).itemsize
        or field.shape != ()
    ):
        return None
    return name


#: descrs that np.save writes for exactly one ml_dtypes type (float8_e5m2's '<f1'; the
#: others are written as raw '<V1'/'<V2', which could be any of several)
_SAVED_ML_DTYPES: dict[str, str] = {
    d: names[0]
    for d, names in (
        (d, [n for n in MARKED_DTYPES if DTYPES[n].numpy.str == d])
        for d in {DTYPES[n].numpy.str for n in MARKED_DTYPES}
    )
    if len(names) == 1 and d.lstrip("<>|=")[:1] != "V"
}


# --- the header ---------------------------------------------------------------


@dataclass(frozen=True)
class NpyHeader:
    """A validated ``.npy`` header."""

    dtype: str  # canonical name
    shape: tuple[int, ...]
    fortran_order: bool
    swap: bool  # the data is in the other byte order than this machine's: swap on read
    header_size: int  # bytes before the data
    nbytes: int  # bytes of data

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(name, self.dtype, self.shape)


def _fail(text: str, file: object) -> FileFormatError:
    return FileFormatError(text, file)


def _structured(descr: list) -> bool:
    """Whether the list ``descr`` is a structured dtype NumPy can make (records, not a
    corrupt header)."""
    try:
        np.dtype(descr)
    except (TypeError, ValueError, KeyError, SyntaxError, IndexError, OverflowError, MemoryError):
        return False
    return True


def _data_bytes(descr: Any, shape: tuple[int, ...]) -> int | None:
    """The bytes of data an array of ``descr`` and ``shape`` holds, where that is known
    (not for object arrays, whose data is a pickle)."""
    if isinstance(descr, str) and descr.lstrip("<>|=")[:1] == "a":
        descr = descr.replace("a", "S", 1)  # (NumPy warns of its deprecated alias)
    try:
        dt = np.dtype(descr)
    except (TypeError, ValueError, KeyError, SyntaxError, IndexError, OverflowError, MemoryError):
        return None
    if dt.hasobject:
        return None
    n = dt.itemsize
    for dim in shape:
        n *= dim
    return n


def _not_a_tensor(exc: FileFormatError, why: str) -> FileFormatError:
    """``exc``, marked as the refusal of a well-formed array that is not a tensor
    (strings, records, objects): an ``.npz`` reader skips such members (``why``, in its
    ``skipped``) instead of refusing the archive."""
    exc.not_a_tensor = why  # type: ignore[attr-defined]
    return exc


def _read_exactly(read: Callable[[int], bytes], n: int, what: str, file: object) -> bytes:
    chunks = []
    left = n
    while left:
        chunk = read(left)
        if not chunk:
            got = n - left
            raise _fail(
                f"the file ended inside the {what} ({got} of {n} bytes). Fix: it is "
                "truncated or not a .npy file; copy or download it again.",
                file,
            )
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def check_void_as(void_as: object, file: object = "") -> str | None:
    """``void_as`` checked: None, or the ``ml_dtypes`` dtype (bfloat16, a float8) that
    raw-bytes descrs (``'<V2'``, ``'|V1'``...) of its width are read as.

    >>> check_void_as("bfloat16")
    'bfloat16'
    """
    if void_as is None or (isinstance(void_as, str) and void_as in MARKED_DTYPES):
        return void_as
    raise ConversionError(
        f"{file}: void_as={void_as!r:.80} is not a dtype raw bytes are read as. Fix: pass "
        "the dtype the raw-bytes values hold, one of " + ", ".join(sorted(MARKED_DTYPES)) + " "
        "(e.g. void_as='bfloat16' for np.save of an ml_dtypes.bfloat16 array), or leave it out."
    )


def _void_dtype(
    descr: str, width: int, void_as: str | None, mlx: bool, file: object
) -> tuple[str, bool]:
    """(canonical name, needs byte swap) for the raw-bytes descr ``descr`` (``'<V2'``)."""
    order = descr[0] if descr[0] in "<>|=" else "|"
    swap = order in "<>" and order != ("<" if sys.byteorder == "little" else ">")
    if void_as is not None and lookup(void_as).itemsize == width:
        return void_as, swap
    if mlx and width == 2 and order in "<>":  # mx.save's bfloat16
        return "bfloat16", swap
    known = sorted(n for n in MARKED_DTYPES if lookup(n).itemsize == width)
    if void_as is not None:
        raise _fail(
            f"descr {descr!r} is raw {width}-byte values, but void_as={void_as!r} is a "
            f"{lookup(void_as).itemsize}-byte dtype. Fix: "
            + (f"pass void_as= one of {', '.join(known)}." if known else "leave void_as out.")
            + " (void_as applies to the raw-bytes arrays of its own width.)",
            file,
        )
    if not known:
        raise _not_a_tensor(
            _fail(
                f"descr {descr!r} is raw {width}-byte records (np.void), not a numeric tensor "
                "dtype. Fix: convert the array to a numeric dtype before saving.",
                file,
            ),
            f"raw {width}-byte records (np.void), not a tensor",
        )
    return "", swap  # refused by the caller, who words the fix


def _descr_dtype(
    descr: object, file: object, void_as: str | None = None, mlx: bool = False
) -> tuple[str, bool]:
    """(canonical name, needs byte swap) for a header's ``descr``; refuse the rest.

    ``void_as`` names the dtype raw-bytes descrs of its width hold; ``mlx`` says the
    header is in MLX's own layout, where ``'<V2'`` is bfloat16."""
    fix = (
        "Fix: convert the array to a numeric dtype before saving, e.g. "
        "a.astype(np.float32); tensorbridge reads only numeric tensors."
    )
    if isinstance(descr, list):
        try:
            if not (
                len(descr) == 1
                and isinstance(descr[0], tuple)
                and len(descr[0]) == 2
                and all(isinstance(p, str) for p in descr[0])
            ):
                raise ValueError
            dt = np.dtype([descr[0]])
        except (TypeError, ValueError, KeyError, SyntaxError, IndexError) as exc:
            refusal: FileFormatError = UnsafeContentError(
                f"descr {short_repr(descr)} is a structured dtype, which holds records, "
                "not a tensor. " + fix,
                file,
            )
            if _structured(descr):  # records NumPy can hold (an .npz skips the member)
                refusal = _not_a_tensor(refusal, "records (a structured dtype), not a tensor")
            raise refusal from exc
        name = decode_dtype(dt)
        if name is None:
            raise _not_a_tensor(
                UnsafeContentError(
                    f"descr {short_repr(descr)} is a structured dtype, which holds records, not "
                    "a tensor (the only structured layout read is tensorbridge's bfloat16/float8 "
                    "marker, e.g. [('bfloat16', '<u2')]). " + fix,
                    file,
                ),
                "records (a structured dtype), not a tensor",
            )
        field = dt[name]
        return name, field.itemsize > 1 and not field.isnative
    if not isinstance(descr, str):
        raise _fail(
            f"descr {short_repr(descr)} is a {type(descr).__name__}, not a dtype "
            "string. Fix: the header is corrupt; re-save the file.",
            file,
        )
    if descr in _SAVED_ML_DTYPES:  # what np.save writes for that ml_dtypes type, and no other
        return _SAVED_ML_DTYPES[descr], False
    code = descr.lstrip("<>|=")[:1]
    if code == "a":  # NumPy's deprecated alias of 'S' (np.dtype would warn)
        raise _not_a_tensor(
            _fail(f"descr {descr!r} is a bytes string, not a numeric tensor dtype. " + fix, file),
            f"bytes strings ({descr}), not a tensor",
        )
    digits = descr.lstrip("<>|=")[1:]
    if code == "V" and digits.isdigit() and len(digits) < 6:
        width = int(digits)
        name, swap = _void_dtype(descr, width, void_as, mlx, file)
        if name:
            return name, swap
        example = "bfloat16" if width == 2 else "float8_e4m3fn"
        who = (
            "np.save writes a NumPy void (raw records) array this way; ml_dtypes arrays "
            "are saved with '<'"
            if descr[0] in "|="
            else "np.save writes ml_dtypes arrays (bfloat16 as '<V2', most float8s as "
            "'<V1') this way without saying which dtype they were"
        )
        raise _fail(
            f"descr {descr!r} is raw {width}-byte values with no dtype: {who}. Fix: if you "
            f"know what the values are, say so: tb.load(path, void_as={example!r}) (or "
            f"tb.open(path, void_as={example!r})); .npy/.npz files MLX wrote are "
            "recognised and need no option.",
            file,
        )
    try:
        dt = np.dtype(descr)
    except (TypeError, ValueError, KeyError, SyntaxError, OverflowError, MemoryError) as exc:
        raise _fail(
            f"descr {descr!r} is not a dtype NumPy understands. Fix: the header is "
            "corrupt; re-save the file.",
            file,
        ) from exc
    if dt.kind == "O" or dt.hasobject:
        raise _not_a_tensor(
            UnsafeContentError(
                f"descr {descr!r} is an object array: it holds pickled Python objects, and "
                "unpickling runs code. " + fix,
                file,
            ),
            "pickled Python objects (never unpickled: that runs code), not a tensor",
        )
    name = None
    if dt.names is None and dt.subdtype is None:
        try:
            name = canonical_name(dt)
        except ConversionError:
            pass
    if name is None:
        raise _not_a_tensor(
            _fail(
                f"descr {descr!r} ({dt}) is not a numeric tensor dtype (strings, bytes, "
                "datetimes and records are not tensors). " + fix,
                file,
            ),
            f"{dt} values, not a tensor",
        )
    return name, dt.itemsize > 1 and not dt.isnative


def short_repr(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters, without ever formatting a huge int in
    decimal (Python refuses ints over 4300 digits, and a header can hold one).

    >>> short_repr((2, 1 << 20000))
    '(2, <int of 20001 bits>)'
    """

    def one(v: object) -> str:
        if isinstance(v, int) and v.bit_length() > 64:
            return f"<int of {v.bit_length()} bits>"
        if isinstance(v, (tuple, list)):
            inner = ", ".join(one(x) for x in v[:70]) + (", ..." if len(v) > 70 else "")
            if isinstance(v, list):
                return f"[{inner}]"
            return f"({inner},)" if len(v) == 1 else f"({inner})"
        try:
            return repr(v)[:limit]
        except ValueError:  # a huge int inside something else
            return f"<{type(v).__name__}>"

    text = one(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_shape(shape: object, file: object) -> tuple[int, ...]:
    if (
        not isinstance(shape, tuple)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _fail(
            f"shape {short_repr(shape)} is not a tuple of at most {MAX_NDIM} "
            "non-negative integers. Fix: the header is corrupt or hostile; re-save the "
            "file.",
            file,
        )
    if any(d >= 2**63 for d in shape):
        raise _fail(
            f"shape {short_repr(shape)} has a dimension of 2**63 or more, which no "
            "array can have (even beside a zero-length one). Fix: the header is corrupt "
            "or hostile; re-save the file.",
            file,
        )
    size = 1
    for d in shape:
        size *= d
    if size >= 2**63:
        raise _fail(
            f"shape {short_repr(shape)} has 2**{size.bit_length() - 1} elements or more, "
            "over 2**63 (the product overflows int64). Fix: the header is corrupt or "
            "hostile; re-save the file.",
            file,
        )
    return shape


def parse_header(
    read: Callable[[int], bytes], file: object = "", *, void_as: str | None = None
) -> NpyHeader:
    """Read and validate a ``.npy`` header through ``read(n) -> bytes``.

    Reads at most ``PREFIX_MAX + MAX_HEADER_SIZE`` bytes, and only the header.
    ``read`` may return fewer bytes than asked (a stream); an early end is an error.
    ``void_as`` is the dtype raw-bytes descrs hold (see :func:`check_void_as`).
    """
    start = _read_exactly(read, len(MAGIC) + 2, "magic string", file)
    if start[: len(MAGIC)] != MAGIC:
        raise _fail(
            f"the file starts with {start[: len(MAGIC)]!r}, not the .npy magic string "
            f"{MAGIC!r}. Fix: this is not a .npy file; pass the right path or format=.",
            file,
        )
    version = (start[6], start[7])
    if version not in _VERSIONS:
        raise _fail(
            f".npy format version {version[0]}.{version[1]} is not one of 1.0, 2.0, "
            "3.0. Fix: re-save the file with NumPy's np.save.",
            file,
        )
    code = _VERSIONS[version]
    (hlen,) = struct.unpack(code, _read_exactly(read, struct.calcsize(code), "header length", file))
    if hlen > MAX_HEADER_SIZE:
        raise _fail(
            f"the header is {hlen} bytes, over the {MAX_HEADER_SIZE}-byte limit "
            "(NumPy's own; parsing longer headers is unsafe). Fix: the file is corrupt "
            "or hostile; if you trust it, load it with "
            "np.load(f, max_header_size=...) and re-save it.",
            file,
        )
    raw = _read_exactly(read, hlen, "header", file)
    return _parse_text(raw, version, code, hlen, file, void_as)


def parse_header_bytes(data: bytes, file: object = "", *, void_as: str | None = None) -> NpyHeader:
    """:func:`parse_header` of a header already in memory (``data`` may run on into the
    array data); the same checks and messages, without a read per field."""
    if len(data) >= 10 and data[:6] == MAGIC and (data[6], data[7]) == (1, 0):
        (hlen,) = struct.unpack_from("<H", data, 8)
        if len(data) >= 10 + hlen:
            return _parse_text(data[10 : 10 + hlen], (1, 0), "<H", hlen, file, void_as)
    return parse_header(io.BytesIO(data).read, file, void_as=void_as)


def _parse_text(
    raw: bytes,
    version: tuple[int, int],
    code: str,
    hlen: int,
    file: object,
    void_as: str | None = None,
) -> NpyHeader:
    try:
        text = raw.decode("utf-8" if version == (3, 0) else "latin1")
    except UnicodeDecodeError as exc:
        raise _fail(
            f"the header is not valid UTF-8 ({exc.reason}). Fix: the file is corrupt; re-save it.",
            file,
        ) from exc
    fast = _NP_SAVE_HEADER.fullmatch(text)
    if fast is not None:  # what np.save writes: no need to parse a literal
        dims = fast["shape"].replace(",", " ").split()
        d: Any = {
            "descr": fast["descr"],
            "fortran_order": fast["fortran"] == "True",
            "shape": tuple(int(x) for x in dims),
        }
        return _header(d, version, code, hlen, file, void_as)
    mlx = _MLX_SAVE_HEADER.fullmatch(text) is not None
    try:
        d = ast.literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as exc:
        raise _fail(
            f"the header {text[:80]!r} is not a Python literal ({type(exc).__name__}). "
            "Fix: the file is corrupt; re-save it with np.save.",
            file,
        ) from exc
    if not isinstance(d, dict):
        raise _fail(
            f"the header is a {type(d).__name__} ({text[:80]!r}), not a dict. Fix: "
            "the file is corrupt; re-save it with np.save.",
            file,
        )
    return _header(d, version, code, hlen, file, void_as, mlx)


#: The header np.save writes for a plain dtype: parsed without literal_eval (10x faster)
_NP_SAVE_HEADER = re.compile(
    r"\{'descr': '(?P<descr>[<>|=]?[a-zA-Z]\d{0,3})', 'fortran_order': (?P<fortran>True|False), "
    r"'shape': \((?P<shape>|\d{1,19},|\d{1,19}(?:, \d{1,19}){1,63})\), \} *\n",
    re.ASCII,  # \d is 0-9 only: int() takes other scripts' digits, which NumPy refuses
)


#: The header MLX's mx.save/mx.savez write (mlx/io/load.cpp): a shape of "N, " items and
#: no trailing ", }", which np.save never writes. With '<V2' it marks MLX's bfloat16.
_MLX_SAVE_HEADER = re.compile(
    r"\{'descr': '[<>|][a-zA-Z]\d{1,2}', 'fortran_order': (?:True|False), "
    r"'shape': \((?:\d{1,19}, ){0,64}\)\} *\n",
    re.ASCII,
)


def _header(
    d: Any,
    version: tuple[int, int],
    code: str,
    hlen: int,
    file: object,
    void_as: str | None = None,
    mlx: bool = False,
) -> NpyHeader:
    if set(d) != _KEYS:
        keys = ", ".join(sorted(short_repr(k, 60) for k in list(d)[:20]))
        raise _fail(
            f"the header has the keys [{keys}], but a .npy header has exactly "
            "'descr', 'fortran_order' and 'shape'. Fix: the file is corrupt or "
            "hostile; re-save it with np.save.",
            file,
        )
    if not isinstance(d["fortran_order"], bool):
        raise _fail(
            f"fortran_order {short_repr(d['fortran_order'])} is not True or False. "
            "Fix: the file is corrupt; re-save it.",
            file,
        )
    shape = _check_shape(d["shape"], file)
    header_size = len(MAGIC) + 2 + struct.calcsize(code) + hlen
    try:
        name, swap = _descr_dtype(d["descr"], file, void_as, mlx)
    except FileFormatError as exc:
        if getattr(exc, "not_a_tensor", None) is not None:  # (what its member must hold)
            exc.layout = (header_size, _data_bytes(d["descr"], shape))  # type: ignore[attr-defined]
        raise
    size = 1
    for dim in shape:
        size *= dim
    return NpyHeader(
        name,
        shape,
        d["fortran_order"],
        swap,
        header_size,
        size * lookup(name).itemsize,
    )


def build_header(dtype: str, shape: Sequence[int], *, void: bool = False) -> bytes:
    """The bytes of a C-order ``.npy`` header for canonical ``dtype`` and ``shape``.

    Version 1.0 where the header fits a u16 length, else 2.0; padded so the
    data starts 64-byte aligned, as NumPy does. ``void=True`` writes bfloat16/float8
    as ``np.save`` writes ``ml_dtypes`` arrays (``'<V2'``, which ``mx.load`` reads as
    bfloat16) instead of the marker layout.

    >>> build_header("float32", (2,))[:10]
    b'\\x93NUMPY\\x01\\x00v\\x00'
    >>> build_header("bfloat16", (2,), void=True)[10:25]
    b"{'descr': '<V2'"
    """
    if void and dtype in MARKED_DTYPES:  # np.save's descr on a little-endian machine
        descr: Any = "<" + lookup(dtype).numpy.str[1:]
    else:
        descr = np.lib.format.dtype_to_descr(encode_dtype(lookup(dtype).numpy))
    shape = tuple(int(d) for d in shape)
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    body = text.encode("latin1")
    for version, prefix in (((1, 0), 10), ((2, 0), 12)):
        pad = -(prefix + len(body) + 1) % _ALIGN
        total = len(body) + pad + 1
        if version == (1, 0) and total >= 65536:
            continue
        code = _VERSIONS[version]
        return MAGIC + bytes(version) + struct.pack(code, total) + body + b" " * pad + b"\n"
    raise AssertionError("unreachable")  # pragma: no cover


def read_into(
    fill: Callable[[memoryview], None], header: NpyHeader, file: object = ""
) -> np.ndarray:
    """A fresh array for ``header``; ``fill(bytes_view)`` writes the raw data into it.

    Byte-swaps foreign-order data to native (values kept) and applies Fortran order.
    """
    row = lookup(header.dtype)
    count = header.nbytes // row.itemsize if row.itemsize else 0
    try:
        out = np.empty(count, dtype=row.numpy)
    except (MemoryError, ValueError) as exc:
        raise FileFormatError(
            f"cannot allocate {header.nbytes} bytes for a {header.dtype}{list(header.shape)} "
            "array. Fix: free memory, or read the file on a machine with more.",
            file,
        ) from exc
    if count:
        fill(out.view(np.uint8).data)
    if header.swap and row.itemsize > 1:
        unit = row.itemsize // 2 if row.kind == "complex" else row.itemsize
        out.view(np.dtype(f"u{unit}")).byteswap(inplace=True)
    if header.fortran_order:
        return out.reshape(header.shape[::-1]).T
    return out.reshape(header.shape)


def check_void_option(options: Mapping[str, Any] | None, file: object) -> None:
    """Refuse a write option ``void`` that is not True or False."""
    void = (options or {}).get("void", False)
    if not isinstance(void, bool):
        raise ConversionError(
            f"{file}: void={void!r:.80} is not True or False. Fix: pass void=True to write "
            "bfloat16/float8 as np.save writes ml_dtypes arrays (what mx.load reads), or "
            "leave it out."
        )


def check_bool(arr: np.ndarray, name: str, file: object) -> None:
    """Refuse bool tensors holding bytes other than 0 and 1."""
    if arr.dtype == np.bool_ and arr.size and arr.view(np.uint8).max() > 1:
        raise FileFormatError(
            f"tensor {name!r} is bool but holds bytes other than 0 and 1. Fix: the file is "
            "corrupt; re-save it.",
            file,
        )


# --- the reader -----------------------------------------------------------------


class NpyReader(Reader):
    """An open ``.npy`` file whose header and size have been validated.

    It holds one tensor, named ``"array"``.
    """

    def __init__(self, path: str, *, void_as: str | None = None) -> None:
        self.path = path
        self.metadata = {}
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._handed = False  # the descriptor went to a mapping (take_descriptor)
        void_as = check_void_as(void_as, path)
        fd, st = open_regular_stat(path)
        size = st.st_size
        # (a file changed while it was opened is read again)
        with opening(fd, st, path, lambda: os.close(fd)):
            position = 0

            def read(n: int) -> bytes:
                nonlocal position
                try:
                    data = os.pread(fd, n, position)
                except OSError as exc:
                    raise FileFormatError(
                        f"reading failed ({exc.strerror}). Fix: check the disk and the file.", path
                    ) from exc
                position += len(data)
                return data

            self._header = parse_header(read, path, void_as=void_as)
            data_len = size - self._header.header_size
            if data_len < self._header.nbytes:
                raise FileFormatError(
                    f"the header declares {self._header.nbytes} bytes of data "
                    f"({self._header.dtype}{list(self._header.shape)}), but the file holds only "
                    f"{data_len} after the header (it is truncated). Fix: copy or download the "
                    "file again.",
                    path,
                )
            if data_len > self._header.nbytes:
                raise FileFormatError(
                    f"the file has {data_len - self._header.nbytes} trailing bytes after the "
                    f"{self._header.nbytes} bytes of data the header declares. Fix: the file "
                    "is corrupt or has something appended; re-save it.",
                    path,
                )
        self._file_id = (st.st_dev, st.st_ino)
        self.stamp = file_stamp(st)
        self._size = size
        self._fd = fd

    def keys(self) -> list[str]:
        return [ARRAY_NAME]

    def info(self, name: str) -> TensorInfo:
        if name != ARRAY_NAME:
            raise FileFormatError(
                f"no tensor named {name!r}. Fix: a .npy file holds one tensor, named "
                f"{ARRAY_NAME!r}.",
                self.path,
            )
        return self._header.info(ARRAY_NAME)

    def read(self, name: str) -> np.ndarray:
        self.info(name)
        with self._lock:
            fd = self._fd
            if fd is None:
                raise FileFormatError("the file is closed. Fix: open it again.", self.path)
            out = read_into(
                lambda view: read_exact_into(fd, view, self._header.header_size, self.path),
                self._header,
                self.path,
            )
        self.verify()  # (rewritten in place while it was read: not half old, half new)
        check_bool(out, name, self.path)
        return out

    def raw_span(self, name: str) -> RawSpan | None:
        """The data's bytes, when :meth:`read` returns them unchanged: C order, this
        machine's byte order (little-endian), not bool (whose bytes are checked), not empty."""
        info = self.info(name)
        h = self._header
        if (
            (self._fd is None and not self._handed)
            or h.fortran_order
            or h.swap
            or sys.byteorder != "little"
            or info.dtype == "bool"
            or h.nbytes == 0
        ):
            return None
        return RawSpan(self.path, h.header_size, h.nbytes, self._file_id)

    def descriptor(self) -> int | None:
        return self._fd

    def take_descriptor(self, span: RawSpan, smallest: int = 0) -> tuple[int, int] | None:
        """``(descriptor, size)``: the descriptor the header was checked through, handed to
        the caller (:class:`~.mapping.FileMaps` maps it and closes it), so the file is not
        opened again; ``None`` when the reader is closed. The reader reads no more after
        (its span stays, for a copy that opens the file by path and checks it is this one)."""
        if self._size < smallest:  # (not to be mapped: copies read through it)
            return None
        with self._lock:
            fd = self._fd
            if fd is None or span.file_id != self._file_id:
                return None
            self._fd = None
            self._handed = True
            return fd, self._size

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


# --- the format -------------------------------------------------------------------


class NpyFormat(Format):
    """NumPy ``.npy``: one array, strict header, no pickles."""

    name = "npy"
    suffixes = (".npy",)
    holds_metadata = False
    description = (
        "NumPy .npy: one tensor, named 'array'. Holds every tensorbridge dtype; "
        "bfloat16/float8 as a one-field structured dtype of raw bits, e.g. "
        "[('bfloat16', '<u2')]; option void=True writes them as np.save writes ml_dtypes "
        "arrays ('<V2', what mx.load reads as bfloat16)."
    )
    options = ("void",)

    def check_write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        metadata: Mapping[str, str] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        if len(infos) > 1:
            names = [i.name for i in infos]
            raise ConversionError(
                f"{path}: a .npy file holds exactly one array, but {len(infos)} tensors were "
                f"given ({names[:10]!r}{' ...' if len(names) > 10 else ''}). Fix: save to .npz, "
                ".safetensors or .h5 for several tensors, or pass a single array."
            )
        meta = super().check_write(path, infos, metadata, options)
        check_void_option(options, path)
        return meta

    def check_info(self, info: TensorInfo, path: str) -> None:
        encode_dtype(lookup(info.dtype).numpy)  # a dtype .npy cannot hold fails here

    def open(self, path: str, *, void_as: str | None = None) -> NpyReader:
        """Open ``path``; ``void_as`` is the dtype its raw-bytes descr holds
        (:func:`check_void_as`)."""
        return NpyReader(os.fspath(path), void_as=void_as)

    def write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        fetch: Callable[[str], np.ndarray],
        metadata: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        """Write the one tensor in ``infos`` to ``path`` atomically, streaming its data."""
        path = os.fspath(path)
        infos = list(infos)
        self.check_write(path, infos, metadata, options)
        if not infos:
            raise ConversionError(
                f"{path}: a .npy file holds exactly one array, but no tensor was given. Fix: "
                "pass a single array."
            )
        info = infos[0]
        header = build_header(info.dtype, info.shape, void=options.get("void", False))
        with atomic_write(path) as f:
            f.write(header)
            arr = check_fetched(fetch(info.name), info, path)
            for piece in iter_le_bytes(arr):
                f.write(piece)
            del arr


FORMAT = NpyFormat()
