"""PyTorch checkpoints (``.pt``, ``.pth``, ``.bin``), read and written without torch.

A checkpoint saved by ``torch.save`` (zip format, the default since torch 1.6) is a
zip archive whose entries all sit under one top-level folder (``archive/`` or the
file's stem)::

    NAME/data.pkl            a pickle of the saved object; tensors appear in it as
                             _rebuild_tensor_v2/_v3 calls on "persistent ids"
                             ("storage", <storage type>, KEY, LOCATION, NUMEL)
    NAME/data/KEY            the raw bytes of storage KEY (stored, 64-byte aligned)
    NAME/byteorder           "little" or "big" (absent: little)
    NAME/.format_version, NAME/.storage_alignment, NAME/version, NAME/.data/...

Reading never unpickles. ``data.pkl`` is walked opcode by opcode
(:func:`pickletools.genops`) by a small stack machine that knows only the opcodes
``torch.save`` writes for state dicts and only these globals: ``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2``/``_v3``/``_rebuild_parameter(_with_state)``, the
legacy ``torch.<X>Storage`` types, ``torch.storage.UntypedStorage``, ``torch.<dtype>``,
``torch.Size`` and ``_codecs.encode`` (how protocol 2 spells ``bytes``; it only
encodes a string). Every other global or opcode raises :class:`UnsafeContentError`
before anything is built, and no global is ever looked up or called: "calls" are
evaluated by our own pure functions. TorchScript archives and legacy (pre-1.6,
non-zip) pickles are refused.

The saved object becomes a flat table. Nested dicts, lists and tuples are walked
and their keys joined with ``.`` (``{"model": {"w": t}, "layers": [t0]}`` gives
``model.w`` and ``layers.0``); a bare saved tensor is named ``tensor``. Plain leaves
that are not tensors (ints, floats, bools, None, strings, bytes) go to
``Reader.metadata`` under their joined path as ``repr`` text (a string as itself):
``{"epoch": 3}`` gives ``metadata == {"epoch": "3"}``. Attributes pickled on an
``OrderedDict`` (``state_dict()._metadata``, module versions) are dropped.

Writing produces what ``torch.save(flat_dict)`` produces: a flat ``{name: tensor}``
dict that ``torch.load(path, weights_only=True)`` (and ``mmap=True``) loads
bit-exactly, storages stored uncompressed and 64-byte aligned. ``metadata`` goes
into an extra zip entry ``archive/extra/tensorbridge_metadata.json`` that torch
ignores and this reader merges back into ``Reader.metadata``; nothing is lost and
``torch.load`` still returns only the tensors.

>>> import numpy as np, tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "m.pt")
>>> a = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> FORMAT.write(p, [TensorInfo("w", "float32", (2, 3))], lambda name: a, {"k": "v"})
>>> with FORMAT.open(p) as r:
...     (r.keys(), r.metadata, r.read("w").tobytes() == a.tobytes())
(['w'], {'k': 'v'}, True)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickletools
import struct
import sys
import threading
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..dtypes import lookup
from ..errors import ConversionError, FileFormatError, TensorBridgeError, UnsafeContentError
from .atomic import atomic_write
from .base import Format, Reader, TensorInfo
from .names import check_unique
from .safetensors import check_fetched, open_regular_file, read_exact_into

__all__ = [
    "FORMAT",
    "PtFormat",
    "PtReader",
    "STORAGE_TYPES",
    "TORCH_DTYPES",
    "parse_pickle",
    "METADATA_RECORD",
]

#: ``data.pkl`` is parsed in memory; a state dict with a million tensors is ~200 MB.
MAX_PICKLE_BYTES = 1 << 30
#: The metadata record this module writes (relative to the archive folder).
METADATA_RECORD = "extra/tensorbridge_metadata.json"
MAX_METADATA_BYTES = 64 << 20
#: Containers nested deeper than this are refused (flattening recurses).
MAX_DEPTH = 100
MAX_NDIM = 64
#: A tensor may claim more bytes than its storage holds only through zero strides
#: (``expand``); reading it materialises the copy, so that growth is capped.
MAX_BROADCAST_BYTES = 64 << 20
#: Data records start at multiples of this (as torch's writer does; needed for mmap).
ALIGNMENT = 64
#: Archive folder name used when writing (torch uses this for file objects).
ARCHIVE = "archive"

#: legacy ``torch.<X>Storage`` name -> canonical dtype (torch/storage.py).
STORAGE_TYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
_LEGACY_BY_DTYPE = {v: k for k, v in STORAGE_TYPES.items()}

#: ``torch.<name>`` dtype attribute -> canonical dtype (aliases included).
TORCH_DTYPES: dict[str, str] = {
    **{n: n for n in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "bfloat16", "complex64", "complex128",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    )},
    "half": "float16", "float": "float32", "double": "float64", "short": "int16",
    "int": "int32", "long": "int64", "cfloat": "complex64", "cdouble": "complex128",
}

_WRITABLE = frozenset(TORCH_DTYPES.values())

_NO_CODE = ("no code was run: tensorbridge reads checkpoints without unpickling. Fix: if you "
            "trust the file, load it with torch and re-save only the tensors, e.g. "
            "safetensors.torch.save_file(model.state_dict(), 'model.safetensors') or "
            "torch.save(model.state_dict(), path)")

#: Errors the standard library raises on malformed zips and pickles.
_RAW_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
               struct.error, KeyError, IndexError, NotImplementedError, RuntimeError,
               OverflowError, MemoryError, UnicodeDecodeError)


@contextlib.contextmanager
def _wrapped(path: str, doing: str) -> Iterator[None]:
    """Turn raw zip/pickle/IO errors into one :class:`FileFormatError` naming ``path``."""
    try:
        yield
    except TensorBridgeError:
        raise
    except _RAW_ERRORS as exc:
        raise FileFormatError(
            f"{doing} failed ({type(exc).__name__}: {exc}); the file is corrupt, truncated "
            "or not a PyTorch checkpoint. Fix: download or save it again (torch.save writes "
            "a zip archive).", path) from exc


# --- the pickle interpreter ---------------------------------------------------------

@dataclass(frozen=True)
class _StorageType:
    """``torch.FloatStorage`` & co. (``dtype`` set) or ``torch.storage.UntypedStorage``."""

    dtype: str | None


@dataclass(frozen=True)
class _DType:
    """A ``torch.<dtype>`` global."""

    name: str


@dataclass(frozen=True)
class _Storage:
    """A persistent-id storage: record ``key``, element ``dtype`` (None: bytes), size."""

    key: str
    dtype: str | None
    nbytes: int


@dataclass(frozen=True, eq=False)
class _Tensor:
    """A rebuilt tensor: a strided view (in elements) of a storage record."""

    storage: _Storage
    dtype: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _ODict(dict):
    """A dict built by ``collections.OrderedDict()``; BUILD may set its attributes."""


@dataclass(frozen=True)
class _Global:
    """An allowed global callable, evaluated by ``fn`` (never by Python's import)."""

    qualname: str
    fn: Callable[[tuple], Any]


def _int(x: object, what: str, path: str) -> int:
    if type(x) is not int or x < 0:
        raise FileFormatError(
            f"{what} is {x!r}; a non-negative integer is required. Fix: the checkpoint is "
            "corrupt or hand-made; re-save it with torch.save.", path)
    return x


def _int_tuple(x: object, what: str, path: str) -> tuple[int, ...]:
    if not isinstance(x, tuple) or len(x) > MAX_NDIM:
        raise FileFormatError(
            f"{what} is {x!r}; a tuple of at most {MAX_NDIM} non-negative integers is "
            "required. Fix: the checkpoint is corrupt or hand-made; re-save it.", path)
    return tuple(_int(v, what, path) for v in x)


def _rebuild(storage: object, offset: object, size: object, stride: object,
             dtype: str | None, path: str) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise FileFormatError(
            f"a tensor is rebuilt from {type(storage).__name__}, not from a storage record. "
            "Fix: the checkpoint is corrupt or hand-made; re-save it with torch.save.", path)
    dtype = dtype or storage.dtype
    if dtype is None:
        raise FileFormatError(
            f"storage {storage.key!r} is untyped and no dtype was given. Fix: re-save the "
            "checkpoint with torch.save.", path)
    if storage.dtype is not None and storage.dtype != dtype:
        raise FileFormatError(
            f"storage {storage.key!r} holds {storage.dtype} but a tensor reads it as {dtype}. "
            "Fix: re-save the checkpoint with torch.save.", path)
    shape = _int_tuple(size, "a tensor shape", path)
    strides = _int_tuple(stride, "a tensor stride", path)
    if len(strides) != len(shape):
        raise FileFormatError(
            f"a tensor has shape {list(shape)} but stride {list(strides)}. Fix: the checkpoint "
            "is corrupt; re-save it.", path)
    tensor = _Tensor(storage, dtype, _int(offset, "a storage offset", path), shape, strides)
    _check_extent(tensor, path)
    return tensor


def _check_extent(t: _Tensor, path: str) -> None:
    """The view must lie inside its storage; broadcasting may not blow it up too far."""
    itemsize = lookup(t.dtype).itemsize
    count = 1
    for d in t.shape:
        count *= d
    if count == 0:
        return
    last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
    need = (last + 1) * itemsize
    if need > t.storage.nbytes:
        raise FileFormatError(
            f"a {t.dtype} tensor of shape {list(t.shape)}, stride {list(t.stride)}, offset "
            f"{t.offset} needs {need} bytes of storage {t.storage.key!r}, which holds only "
            f"{t.storage.nbytes}. Fix: the checkpoint is corrupt or truncated; save it again.",
            path)
    if count * itemsize > max(t.storage.nbytes, MAX_BROADCAST_BYTES):
        raise FileFormatError(
            f"a {t.dtype} tensor of shape {list(t.shape)} would take {count * itemsize} bytes "
            f"but its storage {t.storage.key!r} holds only {t.storage.nbytes} (zero strides); "
            "reading it would allocate what the file merely claims. Fix: save the tensor "
            "materialised, e.g. t.contiguous().", path)


def _globals(path: str) -> dict[str, Any]:
    """Allowed ``module.name`` globals -> the value the interpreter pushes for them."""

    def ordered_dict(args: tuple) -> _ODict:
        if args != ():
            raise FileFormatError("OrderedDict is called with arguments. Fix: re-save it.", path)
        return _ODict()

    def v2(args: tuple) -> _Tensor:
        if len(args) not in (6, 7):
            raise FileFormatError(f"_rebuild_tensor_v2 gets {len(args)} arguments.", path)
        return _rebuild(*args[:4], None, path)

    def v3(args: tuple) -> _Tensor:
        if len(args) not in (7, 8) or not isinstance(args[6], _DType):
            raise FileFormatError("_rebuild_tensor_v3 gets malformed arguments.", path)
        return _rebuild(*args[:4], args[6].name, path)

    def parameter(args: tuple) -> _Tensor:
        if len(args) not in (3, 4) or not isinstance(args[0], _Tensor):
            raise FileFormatError("_rebuild_parameter gets malformed arguments.", path)
        return args[0]

    def size(args: tuple) -> tuple[int, ...]:
        if len(args) != 1:
            raise FileFormatError("torch.Size gets malformed arguments.", path)
        return _int_tuple(args[0], "a torch.Size", path)

    def encode(args: tuple) -> bytes:
        if len(args) != 2 or not isinstance(args[0], str) or args[1] != "latin1":
            raise UnsafeContentError(
                f"_codecs.encode is called with {args!r:.80}, not (str, 'latin1') as pickle "
                f"writes bytes. {_NO_CODE}.", path)
        try:
            return args[0].encode("latin1")
        except UnicodeEncodeError as exc:
            raise FileFormatError(f"malformed bytes object in the pickle ({exc}).", path) from exc

    table: dict[str, Any] = {
        "collections.OrderedDict": _Global("collections.OrderedDict", ordered_dict),
        "torch._utils._rebuild_tensor_v2": _Global("_rebuild_tensor_v2", v2),
        "torch._utils._rebuild_tensor_v3": _Global("_rebuild_tensor_v3", v3),
        "torch._utils._rebuild_parameter": _Global("_rebuild_parameter", parameter),
        "torch._utils._rebuild_parameter_with_state": _Global("_rebuild_parameter", parameter),
        "torch.Size": _Global("torch.Size", size),
        "_codecs.encode": _Global("_codecs.encode", encode),
        "torch.storage.UntypedStorage": _StorageType(None),
        "torch.UntypedStorage": _StorageType(None),
    }
    table.update({f"torch.{k}": _StorageType(v) for k, v in STORAGE_TYPES.items()})
    table.update({f"torch.{k}": _DType(v) for k, v in TORCH_DTYPES.items()})
    return table


def _empty_state(state: object) -> bool:
    if state is None:
        return True
    if isinstance(state, (dict, tuple, list)):
        values = state.values() if isinstance(state, dict) else state
        return all(_empty_state(v) for v in values)
    return False


class _Machine:
    """A pickle stack machine for the opcodes ``torch.save`` writes for state dicts."""

    def __init__(self, path: str, storage_sizes: Mapping[str, int]) -> None:
        self.path = path
        self.sizes = storage_sizes  # record key -> bytes in the zip
        self.globals = _globals(path)
        self.storages: dict[str, _Storage] = {}
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}

    # -- helpers ------------------------------------------------------------------
    def fail(self, why: str) -> FileFormatError:
        return FileFormatError(
            f"data.pkl is malformed: {why}. Fix: the checkpoint is corrupt or hand-made; "
            "re-save it with torch.save.", self.path)

    def pop(self) -> Any:
        if not self.stack:
            raise self.fail("the pickle stack underflows")
        return self.stack.pop()

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise self.fail("an opcode needs a MARK that is missing")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def top(self, kind: type, op: str) -> Any:
        if not self.stack or not isinstance(self.stack[-1], kind):
            got = type(self.stack[-1]).__name__ if self.stack else "nothing"
            raise self.fail(f"{op} applies to a {got}, not a {kind.__name__}")
        return self.stack[-1]

    def setitem(self, d: dict, key: object, value: object) -> None:
        if type(key) not in (str, int):
            raise self.fail(f"a dict key is a {type(key).__name__} ({key!r:.60}); only str "
                            "and int keys are supported")
        d[key] = value

    def global_(self, module: object, name: object) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.fail("a global is named by non-strings")
        qualname = f"{module}.{name}"
        value = self.globals.get(qualname)
        if value is None:
            raise UnsafeContentError(
                f"the checkpoint references the global {qualname!r}, which is not a tensor or "
                f"plain container; loading it with pickle could run code. {_NO_CODE}.",
                self.path)
        return value

    def persistent(self, pid: object) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise self.fail(f"persistent id {pid!r:.100} is not a storage reference")
        _, stype, key, _location, numel = pid
        itemsize = 1 if stype.dtype is None else lookup(stype.dtype).itemsize
        nbytes = _int(numel, f"the size of storage {key!r}", self.path) * itemsize
        have = self.sizes.get(key)
        if have is None:
            raise FileFormatError(
                f"storage {key!r} has no record data/{key} in the archive. Fix: the checkpoint "
                "is incomplete; save it again.", self.path)
        if have != nbytes:
            raise FileFormatError(
                f"storage record data/{key} holds {have} bytes but the pickle declares "
                f"{nbytes}. Fix: the checkpoint is corrupt or truncated; save it again.",
                self.path)
        storage = _Storage(key, stype.dtype, nbytes)
        old = self.storages.setdefault(key, storage)
        if old != storage:
            raise self.fail(f"storage {key!r} is declared twice with different types")
        return storage

    # -- the loop -----------------------------------------------------------------
    def run(self, data: bytes) -> Any:
        handlers: dict[str, Any] = {}
        for op, arg, pos in pickletools.genops(io.BytesIO(data)):
            name = op.name
            handler = handlers.get(name)
            if handler is None:
                handler = handlers[name] = getattr(self, "op_" + name, None)
            if handler is None:
                raise UnsafeContentError(
                    f"data.pkl uses the pickle opcode {name!r} at byte {pos}, which state dicts "
                    f"never need (it can build arbitrary objects). {_NO_CODE}.", self.path)
            if name == "STOP":
                result = self.pop()
                if self.stack or self.marks:
                    raise self.fail("values are left on the stack at STOP")
                return result
            handler(arg)
        raise self.fail("the pickle has no STOP opcode")

    def op_PROTO(self, arg: int) -> None:
        pass

    def op_FRAME(self, arg: int) -> None:
        pass

    def op_STOP(self, arg: None) -> None:  # handled in run(); listed as allowed
        pass

    def op_MARK(self, arg: None) -> None:
        self.marks.append(self.stack)
        self.stack = []

    def op_EMPTY_DICT(self, arg: None) -> None:
        self.stack.append({})

    def op_EMPTY_LIST(self, arg: None) -> None:
        self.stack.append([])

    def op_EMPTY_TUPLE(self, arg: None) -> None:
        self.stack.append(())

    def op_SETITEM(self, arg: None) -> None:
        value, key = self.pop(), self.pop()
        self.setitem(self.top(dict, "SETITEM"), key, value)

    def op_SETITEMS(self, arg: None) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise self.fail("SETITEMS gets an odd number of items")
        d = self.top(dict, "SETITEMS")
        for i in range(0, len(items), 2):
            self.setitem(d, items[i], items[i + 1])

    def op_APPEND(self, arg: None) -> None:
        value = self.pop()
        self.top(list, "APPEND").append(value)

    def op_APPENDS(self, arg: None) -> None:
        items = self.pop_mark()
        self.top(list, "APPENDS").extend(items)

    def op_TUPLE(self, arg: None) -> None:
        items = tuple(self.pop_mark())  # pop_mark swaps self.stack: evaluate it first
        self.stack.append(items)

    def _tuple(self, n: int) -> None:
        if len(self.stack) < n:
            raise self.fail("the pickle stack underflows")
        items = tuple(self.stack[-n:])
        del self.stack[-n:]
        self.stack.append(items)

    def op_TUPLE1(self, arg: None) -> None:
        self._tuple(1)

    def op_TUPLE2(self, arg: None) -> None:
        self._tuple(2)

    def op_TUPLE3(self, arg: None) -> None:
        self._tuple(3)

    def _push(self, arg: Any) -> None:
        self.stack.append(arg)

    op_BININT = op_BININT1 = op_BININT2 = op_LONG1 = op_BINFLOAT = _push
    op_BINUNICODE = op_SHORT_BINUNICODE = op_BINUNICODE8 = _push
    op_BINBYTES = op_SHORT_BINBYTES = op_BINBYTES8 = _push

    def op_NEWTRUE(self, arg: None) -> None:
        self.stack.append(True)

    def op_NEWFALSE(self, arg: None) -> None:
        self.stack.append(False)

    def op_NONE(self, arg: None) -> None:
        self.stack.append(None)

    def _put(self, arg: int) -> None:
        if not self.stack:
            raise self.fail("memoizing an empty stack")
        self.memo[arg] = self.stack[-1]

    op_BINPUT = op_LONG_BINPUT = _put

    def op_MEMOIZE(self, arg: None) -> None:
        self._put(len(self.memo))

    def _get(self, arg: int) -> None:
        if arg not in self.memo:
            raise self.fail(f"memo entry {arg} is read before it is written")
        self.stack.append(self.memo[arg])

    op_BINGET = op_LONG_BINGET = _get

    def op_GLOBAL(self, arg: str) -> None:
        module, _, name = arg.partition(" ")
        self.stack.append(self.global_(module, name))

    def op_STACK_GLOBAL(self, arg: None) -> None:
        name, module = self.pop(), self.pop()
        self.stack.append(self.global_(module, name))

    def op_REDUCE(self, arg: None) -> None:
        args, func = self.pop(), self.pop()
        if not isinstance(func, _Global):
            raise UnsafeContentError(
                f"data.pkl calls a {type(func).__name__} ({func!r:.80}), which is not an allowed "
                f"function. {_NO_CODE}.", self.path)
        if not isinstance(args, tuple):
            raise self.fail(f"{func.qualname} is called with a {type(args).__name__}")
        self.stack.append(func.fn(args))

    def op_BINPERSID(self, arg: None) -> None:
        storage = self.persistent(self.pop())
        self.stack.append(storage)

    def op_BUILD(self, arg: None) -> None:
        state = self.pop()
        target = self.stack[-1] if self.stack else None
        if isinstance(target, _ODict) and (state is None or isinstance(state, dict)):
            return  # OrderedDict attributes (state_dict()._metadata): dropped
        if isinstance(target, _Tensor) and _empty_state(state):
            return
        raise UnsafeContentError(
            f"data.pkl sets state {state!r:.80} on a {type(target).__name__}; only empty "
            f"tensor state and OrderedDict attributes are allowed. {_NO_CODE}.", self.path)


def parse_pickle(data: bytes, storage_sizes: Mapping[str, int], path: str = "") -> Any:
    """Evaluate a checkpoint's ``data.pkl`` safely; tensors come back as views of records.

    ``storage_sizes`` maps each ``data/KEY`` record's KEY to its size in bytes.
    """
    with _wrapped(path, "parsing data.pkl"):
        return _Machine(path, storage_sizes).run(data)


# --- flattening the saved object --------------------------------------------------

_SCALARS = (str, int, float, bool, bytes, type(None))


def _flatten(obj: Any, path: str) -> tuple[list[tuple[str, _Tensor]], dict[str, str]]:
    """Split the saved tree into ``(name, tensor)`` pairs and scalar metadata."""
    tensors: list[tuple[str, _Tensor]] = []
    scalars: dict[str, str] = {}
    active: set[int] = set()

    def walk(node: Any, name: str, depth: int) -> None:
        if isinstance(node, _Tensor):
            tensors.append((name, node))
            return
        if isinstance(node, _DType):
            node = f"torch.{node.name}"
        if isinstance(node, _SCALARS):
            if not name:
                return
            if name in scalars:
                raise UnsafeContentError(
                    f"the value name {name!r} appears more than once. Fix: use unique keys.",
                    path)
            scalars[name] = node if isinstance(node, str) else repr(node)
            return
        if not isinstance(node, (dict, list, tuple)):
            raise FileFormatError(
                f"the entry {name or '(top level)'!r} is a {type(node).__name__}, not a tensor, "
                "container or plain value. Fix: save a (nested) dict of tensors.", path)
        if depth > MAX_DEPTH or id(node) in active:
            raise FileFormatError(
                f"the entry {name!r} is nested more than {MAX_DEPTH} deep or contains itself. "
                "Fix: save a flat or shallow dict of tensors.", path)
        active.add(id(node))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            walk(value, f"{name}.{key}" if name else str(key), depth + 1)
        active.discard(id(node))

    walk(obj, "tensor" if isinstance(obj, _Tensor) else "", 0)
    check_unique([n for n, _ in tensors], path)
    return tensors, scalars


# --- the reader --------------------------------------------------------------------

@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    tensor: _Tensor
    member: zipfile.ZipInfo
    data_offset: int  # absolute file offset of the record's bytes (stored records)


def _find_prefix(names: list[str], path: str) -> str:
    first = names[0] if names else ""
    if "/" not in first:
        raise FileFormatError(
            f"the zip has no top-level folder (first entry {first!r}); this is a zip, but not a "
            "PyTorch checkpoint. Fix: pass a file written by torch.save.", path)
    prefix = first.split("/", 1)[0] + "/"
    if prefix + "constants.pkl" in names or any(n.startswith(prefix + "code/") for n in names):
        raise UnsafeContentError(
            "this is a TorchScript archive (torch.jit.save): a compiled program, not a "
            "checkpoint of tensors. Fix: in a trusted environment, load it with torch.jit.load "
            "and save its tensors with torch.save(module.state_dict(), path) or safetensors.",
            path)
    if prefix + "data.pkl" not in names:
        raise FileFormatError(
            f"the zip has no {prefix + 'data.pkl'!r} entry, so it is not a PyTorch checkpoint. "
            "Fix: pass a file written by torch.save.", path)
    return prefix


def _check_magic(head: bytes, size: int, path: str) -> None:
    if size == 0:
        raise FileFormatError(
            "the file is empty. Fix: save the checkpoint again; it was never written or "
            "was truncated to nothing.", path)
    if head[:1] == b"\x80":
        raise FileFormatError(
            "this is a legacy (pre-1.6, non-zip) PyTorch checkpoint: one raw pickle, which "
            "cannot be read without running pickle. Fix: in a trusted environment, load it "
            "with torch and save it again with a modern torch (torch.save(obj, path) writes "
            "the zip format), or as safetensors.", path)
    if head[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise FileFormatError(
            f"the file starts with {head[:8]!r}, not a zip signature, so it is not a PyTorch "
            "checkpoint (torch.save writes a zip archive). Fix: check the file type.", path)


class PtReader(Reader):
    """An open ``torch.save`` zip checkpoint whose pickle and records were validated."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._zip: zipfile.ZipFile | None = None
        self._fd, size = open_regular_file(path)
        try:
            head = bytearray(min(size, 8))
            read_exact_into(self._fd, memoryview(head), 0, path)
            _check_magic(bytes(head), size, path)
            self._open(size)
        except BaseException:
            self.close()
            raise

    def _open(self, size: int) -> None:
        path = self.path
        with _wrapped(path, "reading the zip directory"):
            self._zip = zipfile.ZipFile(path)
            members = self._zip.infolist()
        names = [m.filename for m in members]
        _check_unique_members(names, path)
        prefix = _find_prefix(names, path)
        by_name = {m.filename: m for m in members}
        little = self._byteorder(by_name.get(prefix + "byteorder"))
        self._swap = little != (sys.byteorder == "little")
        records = {n[len(prefix) + 5:]: m for n, m in by_name.items()
                   if n.startswith(prefix + "data/")}
        data = self._small_record(by_name[prefix + "data.pkl"], MAX_PICKLE_BYTES)
        tree = parse_pickle(data, {k: m.file_size for k, m in records.items()}, path)
        del data
        tensors, self.metadata = _flatten(tree, path)
        extra = by_name.get(prefix + METADATA_RECORD)
        if extra is not None:
            self.metadata.update(self._metadata_record(extra))
        used = {t.storage.key for _, t in tensors}
        offsets = {k: self._data_offset(records[k], size) for k in used}
        self._entries = {
            name: _Entry(TensorInfo(name, t.dtype, t.shape), t, records[t.storage.key],
                         offsets[t.storage.key])
            for name, t in tensors
        }

    def _small_record(self, member: zipfile.ZipInfo, limit: int) -> bytes:
        if member.file_size > limit:
            raise FileFormatError(
                f"the entry {member.filename!r} is {member.file_size} bytes, over the {limit}-"
                "byte limit. Fix: this is not a normal checkpoint; re-save it.", self.path)
        with _wrapped(self.path, f"reading {member.filename!r}"):
            assert self._zip is not None
            return self._zip.read(member)

    def _byteorder(self, member: zipfile.ZipInfo | None) -> bool:
        """True for little-endian storages."""
        if member is None:
            return True
        text = self._small_record(member, 16)
        if text not in (b"little", b"big"):
            raise FileFormatError(
                f"the byteorder record says {text!r}, not 'little' or 'big'. Fix: the "
                "checkpoint is corrupt; save it again.", self.path)
        return text == b"little"

    def _metadata_record(self, member: zipfile.ZipInfo) -> dict[str, str]:
        raw = self._small_record(member, MAX_METADATA_BYTES)
        with _wrapped(self.path, f"parsing {member.filename!r}"):
            meta = json.loads(raw.decode("utf-8"))
        if not isinstance(meta, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise FileFormatError(
                f"{member.filename!r} is not a JSON object of strings. Fix: the checkpoint is "
                "corrupt; save it again.", self.path)
        return meta

    def _data_offset(self, member: zipfile.ZipInfo, size: int) -> int:
        """Where a stored record's bytes start, checked against the file size."""
        if member.flag_bits & 0x1:
            raise FileFormatError(
                f"the entry {member.filename!r} is encrypted. Fix: save the checkpoint "
                "again without encryption.", self.path)
        if member.compress_type != zipfile.ZIP_STORED:
            return -1  # read through zipfile, which checks sizes and CRC
        header = bytearray(30)
        assert self._fd is not None
        if member.header_offset + 30 > size:
            raise self._truncated(member)
        read_exact_into(self._fd, memoryview(header), member.header_offset, self.path)
        sig, *_, name_len, extra_len = struct.unpack("<4s5H3I2H", header)
        start = member.header_offset + 30 + name_len + extra_len
        if sig != b"PK\x03\x04" or start + member.file_size > size \
                or member.compress_size != member.file_size:
            raise self._truncated(member)
        return start

    def _truncated(self, member: zipfile.ZipInfo) -> FileFormatError:
        return FileFormatError(
            f"the entry {member.filename!r} has a bad local header or runs past the end of the "
            "file. Fix: the checkpoint is truncated or corrupt; download or save it again.",
            self.path)

    # -- Reader API ----------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        return self._entry(name).info

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise FileFormatError(
                f"no tensor named {name!r}. Fix: use one of {self.keys()[:20]!r}"
                + (" ..." if len(self._entries) > 20 else "") + ".", self.path) from None

    def _read_bytes(self, entry: _Entry, lo: int, hi: int) -> np.ndarray:
        buf = np.empty(hi - lo, dtype=np.uint8)
        if self._fd is None or self._zip is None:
            raise FileFormatError("the file is closed. Fix: open it again.", self.path)
        if entry.data_offset >= 0:
            read_exact_into(self._fd, memoryview(buf), entry.data_offset + lo, self.path)
            return buf
        with _wrapped(self.path, f"decompressing {entry.member.filename!r}"):
            with self._zip.open(entry.member) as f:
                f.seek(lo)
                if f.readinto(memoryview(buf)) != hi - lo:
                    raise self._truncated(entry.member)
        return buf

    def read(self, name: str) -> np.ndarray:
        entry = self._entry(name)
        t = entry.tensor
        dtype = lookup(t.dtype).numpy
        itemsize = dtype.itemsize
        if entry.info.size == 0:
            return np.empty(t.shape, dtype=dtype)
        last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride))
        buf = self._read_bytes(entry, t.offset * itemsize, (last + 1) * itemsize).view(dtype)
        contiguous = buf.size == entry.info.size and all(
            s == int(np.prod(t.shape[i + 1:], dtype=np.int64)) for i, s in enumerate(t.stride)
            if t.shape[i] > 1)
        if contiguous:
            out = buf.reshape(t.shape)
        else:  # as_strided needs a builtin dtype: use raw units of the same width
            unit = np.dtype(f"u{itemsize}" if itemsize <= 8 else f"V{itemsize}")
            view = np.lib.stride_tricks.as_strided(
                buf.view(unit), t.shape, tuple(s * itemsize for s in t.stride), writeable=False)
            out = view.copy(order="C").view(dtype)
        if self._swap and itemsize > 1:
            unit = itemsize // 2 if lookup(t.dtype).kind == "complex" else itemsize
            out.view(f"u{unit}").byteswap(inplace=True)
        return out

    def close(self) -> None:
        with self._lock:
            if self._zip is not None:
                self._zip.close()
                self._zip = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _check_unique_members(names: list[str], path: str) -> None:
    """A zip holding one entry name twice is ambiguous: readers disagree on which wins."""
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise UnsafeContentError(
                f"the zip holds the entry {n!r} twice; different readers would pick different "
                "copies. Fix: save the checkpoint again with torch.save.", path)
        seen.add(n)


# --- the writer ----------------------------------------------------------------------

def _op_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(1 << 31) <= n < (1 << 31):
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _op_str(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    if len(raw) >= 1 << 32:
        raise ConversionError(f"a tensor name is {len(raw)} bytes long. Fix: use shorter names.")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _op_tuple(items: Sequence[bytes]) -> bytes:
    body = b"".join(items)
    if len(items) == 0:
        return b")"
    if len(items) <= 3:
        return body + b"\x85\x86\x87"[len(items) - 1:len(items)]
    return b"(" + body + b"t"


def _op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode("ascii")


def _tensor_pickle(info: TensorInfo, key: str) -> bytes:
    """``_rebuild_tensor_v2/_v3`` of a C-contiguous tensor on record ``key``, as torch writes."""
    legacy = _LEGACY_BY_DTYPE.get(info.dtype)
    count = info.size
    strides, acc = [], 1
    for d in reversed(info.shape):
        strides.append(acc)
        acc *= d
    strides.reverse()
    if legacy:
        stype, numel = _op_global("torch", legacy), count
    else:
        stype, numel = _op_global("torch.storage", "UntypedStorage"), info.nbytes
    pid = b"(" + _op_str("storage") + stype + _op_str(key) + _op_str("cpu") + _op_int(numel) \
        + b"tQ"
    args = [pid, _op_int(0), _op_tuple([_op_int(d) for d in info.shape]),
            _op_tuple([_op_int(s) for s in strides]), b"\x89",
            _op_global("collections", "OrderedDict") + b")R"]
    if not legacy:
        args.append(_op_global("torch", info.dtype))
    fn = "_rebuild_tensor_v2" if legacy else "_rebuild_tensor_v3"
    return _op_global("torch._utils", fn) + b"(" + b"".join(args) + b"tR"


def _state_dict_pickle(infos: Sequence[TensorInfo]) -> bytes:
    """A protocol-2 pickle of ``{name: tensor}`` with storage keys ``0, 1, ...``."""
    parts = [b"\x80\x02}"]
    for start in range(0, len(infos), 1000):
        parts.append(b"(")
        for i in range(start, min(start + 1000, len(infos))):
            parts.append(_op_str(infos[i].name) + _tensor_pickle(infos[i], str(i)))
        parts.append(b"u")
    parts.append(b".")
    return b"".join(parts)


def _check_writable(info: TensorInfo, path: str) -> None:
    if info.dtype not in _WRITABLE:
        raise ConversionError(
            f"{path}: tensor {info.name!r} has dtype {info.dtype!r}, which PyTorch does not "
            "have. Fix: save as .npz or .h5, or convert it first (e.g. --dtype float32); "
            "PyTorch holds: " + ", ".join(sorted(_WRITABLE)) + ".")
    lookup(info.dtype)
    if any(type(d) is not int or d < 0 for d in info.shape):
        raise ConversionError(f"{path}: tensor {info.name!r} has shape {info.shape!r}. Fix: use "
                              "non-negative integer dimensions.")


def _aligned_info(name: str, size: int, offset: int) -> zipfile.ZipInfo:
    """A stored ZipInfo whose data will start at a multiple of :data:`ALIGNMENT`.

    Padding goes into an extra field ``FB`` as torch's writer does. zipfile appends a
    20-byte zip64 extra when it decides (from ``file_size``) that zip64 is needed.
    """
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = 20 if size * 1.05 > zipfile.ZIP64_LIMIT else 0
    base = offset + 30 + len(name.encode("utf-8")) + zip64 + 4
    pad = -base % ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info


def _add(zf: zipfile.ZipFile, f: Any, name: str, pieces: Sequence[Any], size: int) -> None:
    info = _aligned_info(name, size, f.tell())
    with zf.open(info, "w") as w:
        for piece in pieces:
            w.write(piece)


def _native_bytes(arr: np.ndarray) -> memoryview:
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    arr = np.ascontiguousarray(arr)
    return memoryview(arr.reshape(-1).view(np.uint8))


class PtFormat(Format):
    """PyTorch ``torch.save`` zip checkpoints, without torch and without unpickling."""

    name = "pt"
    suffixes = (".pt", ".pth", ".bin")
    description = ("PyTorch checkpoint (torch.save zip); read with a safe pickle-opcode "
                   "interpreter, written as a flat state dict that torch.load(weights_only=True) "
                   "loads. Holds: " + ", ".join(sorted(_WRITABLE)) + ".")

    def open(self, path: str) -> PtReader:
        return PtReader(os.fspath(path))

    def write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        fetch: Callable[[str], np.ndarray],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Stream ``infos`` into a torch zip checkpoint at ``path``, atomically."""
        path = os.fspath(path)
        infos = list(infos)
        check_unique([i.name for i in infos], path)
        for info in infos:
            _check_writable(info, path)
        meta = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ConversionError(f"{path}: metadata must map str to str, got {meta!r:.100}. "
                                  "Fix: convert keys and values to strings.")
        pickle_bytes = _state_dict_pickle(infos)
        small = [("data.pkl", pickle_bytes), (".format_version", b"1"),
                 (".storage_alignment", str(ALIGNMENT).encode()),
                 ("byteorder", sys.byteorder.encode())]
        with atomic_write(path) as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, raw in small:
                    _add(zf, f, f"{ARCHIVE}/{name}", [raw], len(raw))
                for i, info in enumerate(infos):
                    arr = check_fetched(fetch(info.name), info, path)
                    data = _native_bytes(arr)
                    _add(zf, f, f"{ARCHIVE}/data/{i}", [data], len(data))
                    del arr, data
                _add(zf, f, f"{ARCHIVE}/version", [b"3\n"], 2)
                if meta:
                    raw = json.dumps(meta, sort_keys=True).encode("utf-8")
                    _add(zf, f, f"{ARCHIVE}/{METADATA_RECORD}", [raw], len(raw))


FORMAT = PtFormat()
