"""Reading a checkpoint's ``data.pkl`` without unpickling: a restricted opcode interpreter.

``data.pkl`` is walked opcode by opcode (:func:`pickletools.genops`) by a small stack
machine that knows only the opcodes ``torch.save`` writes for state dicts, and only
the globals in :func:`_globals` (``collections.OrderedDict``, the
``torch._utils._rebuild_*`` functions, storage types, ``torch.<dtype>``,
``torch.Size`` and ``_codecs.encode``). Every other global or opcode raises
:class:`~tensorbridge.errors.UnsafeContentError` before anything is built; no global
is ever imported or called: "calls" are evaluated by pure functions of this module.

:func:`parse_pickle` returns the saved object with tensors as :class:`_Tensor`
views of storage records (validated against the records' sizes); its reading
is left to :mod:`.pt`. The value classes keep their leading underscore because
their names appear in error messages.
"""

from __future__ import annotations

import io
import pickletools
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..dtypes import lookup
from ..errors import FileFormatError, UnsafeContentError
from .pt_errors import wrapped

__all__ = [
    "MAX_BROADCAST_BYTES",
    "MAX_NDIM",
    "STORAGE_TYPES",
    "TORCH_DTYPES",
    "parse_pickle",
]

MAX_NDIM = 64
#: A tensor may claim more bytes than its storage holds only through zero strides
#: (``expand``); reading it materialises the copy, so that growth is capped.
MAX_BROADCAST_BYTES = 64 << 20

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

_NO_CODE = ("no code was run: tensorbridge reads checkpoints without unpickling. Fix: if you "
            "trust the file, load it with torch and re-save only the tensors, e.g. "
            "safetensors.torch.save_file(model.state_dict(), 'model.safetensors') or "
            "torch.save(model.state_dict(), path)")


# --- the values the interpreter builds -------------------------------------------

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

    def complex_number(args: tuple) -> complex:
        if len(args) != 2 or not all(type(a) in (int, float) for a in args):
            raise FileFormatError(f"complex() is called with {args!r:.80}, not two numbers. "
                                  "Fix: re-save the checkpoint with torch.save.", path)
        return complex(*args)

    table: dict[str, Any] = {
        # torch's weights_only loader allows complex; protocol 2 spells it __builtin__
        "builtins.complex": _Global("complex", complex_number),
        "__builtin__.complex": _Global("complex", complex_number),
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
        for op, arg, pos in _opcodes(data, self.path):
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



_GENOPS_LOCK = threading.Lock()


def _opcodes(data: bytes, path: str) -> list:
    """Decode every opcode first. pickletools escape-decodes text arguments, so a
    crafted ``GLOBAL`` can raise a DeprecationWarning (or a decoding error) from
    inside it; both become a :class:`FileFormatError` here. The lock keeps the
    temporary warning filter from racing with another thread's reader."""
    with _GENOPS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            return list(pickletools.genops(io.BytesIO(data)))
        except DeprecationWarning as exc:
            raise FileFormatError(f"data.pkl holds malformed text ({exc}). Fix: re-save the "
                                  "checkpoint with torch.save, or obtain an intact copy.", path) from exc


def parse_pickle(data: bytes, storage_sizes: Mapping[str, int], path: str = "") -> Any:
    """Evaluate a checkpoint's ``data.pkl`` safely; tensors come back as views of records.

    ``storage_sizes`` maps each ``data/KEY`` record's KEY to its size in bytes.
    """
    with wrapped(path, "parsing data.pkl"):
        return _Machine(path, storage_sizes).run(data)
