"""Reading a checkpoint's ``data.pkl`` without unpickling: a restricted opcode interpreter.

``data.pkl`` is walked opcode by opcode (:func:`pickletools.genops`, lazily: no list of
every opcode is built) by a small stack machine that knows only data opcodes (those of
protocols 0-5 that build numbers, strings, bytes, lists, tuples and dicts, the memo
and the stack) and only the globals in :func:`_globals` (``collections.OrderedDict``,
the ``torch._utils._rebuild_*`` functions, storage types, ``torch.<dtype>``,
``torch.Size``, ``_codecs.encode``, ``complex``). Every other global or opcode raises
:class:`~tensorbridge.errors.UnsafeContentError` before anything is built; no global
is ever imported or called: "calls" are evaluated by pure functions of this module.

Tensor state that changes values is applied or refused: the conjugate and negative
bits (``metadata`` of ``_rebuild_tensor_v2/_v3``) travel on :class:`_Tensor` and the
reader applies them; backward hooks must be empty; ``requires_grad``, ``Parameter``
and its attributes change no value and are dropped. Tensors tensorbridge recognises
but does not read (sparse, quantized, nested, meta, dtypes such as ``complex32``)
become :class:`_Refused` values, refused with their name and a fix when flattened.

Work is budgeted: every opcode and every object the machine builds is charged against
an allowance proportional to the size of ``data.pkl`` (:data:`WORK_PER_BYTE`), so a
small pickle cannot make the reader allocate much more than it is. Values from the
file are shown in messages through :func:`brief`, which never formats more than it
prints.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

from ..dtypes import lookup
from ..errors import FileFormatError, UnsafeContentError
from .pt_errors import wrapped

__all__ = [
    "MAX_BROADCAST_BYTES",
    "MAX_NDIM",
    "OPAQUE_DTYPES",
    "STORAGE_TYPES",
    "TORCH_DTYPES",
    "WORK_PER_BYTE",
    "brief",
    "parse_pickle",
]

MAX_NDIM = 64
#: A tensor may claim more bytes than its storage holds only through zero strides
#: (``expand``); reading it materialises the copy, so that growth is capped.
MAX_BROADCAST_BYTES = 64 << 20
#: Work units (opcodes, container items, bytes of built strings, ~bytes of objects) the
#: interpreter may spend per byte of ``data.pkl``, plus :data:`WORK_FLOOR`. A real
#: state dict costs 11-16 per byte (long or short names); a pickle of tiny objects ~65.
WORK_PER_BYTE = 32
WORK_FLOOR = 16 << 20

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
    **{
        n: n
        for n in (
            "bool",
            "int8",
            "int16",
            "int32",
            "int64",
            "uint8",
            "uint16",
            "uint32",
            "uint64",
            "float16",
            "float32",
            "float64",
            "bfloat16",
            "complex64",
            "complex128",
            "float8_e4m3fn",
            "float8_e5m2",
            "float8_e4m3fnuz",
            "float8_e5m2fnuz",
            "float8_e8m0fnu",
        )
    },
    "half": "float16",
    "float": "float32",
    "double": "float64",
    "short": "int16",
    "int": "int32",
    "long": "int64",
    "cfloat": "complex64",
    "cdouble": "complex128",
}

_QUANTIZED_FIX = (
    "save it dequantized, t.dequantize(), or its integers t.int_repr() with "
    "t.q_scale()/t.q_zero_point() as separate values"
)
_PACKED_FIX = "save its packed bytes, t.view(torch.uint8), or a float copy"
#: torch dtypes tensorbridge knows but does not read -> (itemsize, how to save instead).
OPAQUE_DTYPES: dict[str, tuple[int, str]] = {
    "complex32": (4, "save t.to(torch.complex64), which keeps both parts exactly"),
    "chalf": (4, "save t.to(torch.complex64), which keeps both parts exactly"),
    "float4_e2m1fn_x2": (1, _PACKED_FIX),
    "bit": (1, "save t.view(torch.uint8)"),
    "bits8": (1, "save t.view(torch.uint8)"),
    "bits16": (2, "save t.view(torch.int16)"),
    "bits1x8": (1, "save t.view(torch.uint8)"),
    "bits2x4": (1, "save t.view(torch.uint8)"),
    "bits4x2": (1, "save t.view(torch.uint8)"),
    "quint8": (1, _QUANTIZED_FIX),
    "qint8": (1, _QUANTIZED_FIX),
    "qint32": (4, _QUANTIZED_FIX),
    "quint4x2": (1, _QUANTIZED_FIX),
    "quint2x4": (1, _QUANTIZED_FIX),
    **{f"{s}int{n}": (1, "save it unpacked as int8/uint8") for s in ("", "u") for n in range(1, 8)},
}
#: storage types of quantized tensors -> their opaque dtype
_OPAQUE_STORAGES = {
    "QUInt8Storage": "quint8",
    "QInt8Storage": "qint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}

_NO_CODE = (
    "no code was run: tensorbridge reads checkpoints without unpickling. Fix: if you "
    "trust the file, load it with torch and re-save only the tensors, e.g. "
    "safetensors.torch.save_file(model.state_dict(), 'model.safetensors') or "
    "torch.save(model.state_dict(), path)"
)

#: torch rebuild functions of tensors tensorbridge does not read -> (what it is, fix).
_UNSUPPORTED_REBUILDS: dict[str, tuple[str, str]] = {
    "_rebuild_sparse_tensor": (
        "a sparse tensor",
        (
            "save it dense, t.to_dense(), or its parts (for COO: "
            "t.coalesce().indices() and .values()) as separate tensors"
        ),
    ),
    "_rebuild_sparse_csr_tensor": ("a sparse tensor", "save it dense, t.to_dense()"),
    "_rebuild_qtensor": ("a quantized tensor", _QUANTIZED_FIX),
    "_rebuild_nested_tensor": (
        "a nested tensor",
        "save its parts, list(t.unbind()), or t.to_padded_tensor(0)",
    ),
    "_rebuild_meta_tensor_no_storage": (
        "a meta tensor, which has a shape but no data",
        (
            "materialise the weights before saving (load real weights, or "
            "module.to_empty(device='cpu') and initialise them)"
        ),
    ),
    "_rebuild_wrapper_subclass": (
        "a tensor subclass without a storage",
        "save plain tensors, t.as_subclass(torch.Tensor)",
    ),
    "_rebuild_device_tensor_from_numpy": (
        "a tensor of a non-CPU backend saved through NumPy",
        "move it to the CPU first, t.cpu()",
    ),
    "_rebuild_xla_tensor": (
        "a tensor of a non-CPU backend saved through NumPy",
        "move it to the CPU first, t.cpu()",
    ),
    "_rebuild_device_tensor_from_cpu_tensor": (
        "a tensor of a non-CPU backend",
        "move it to the CPU first, t.cpu()",
    ),
    "_rebuild_mkldnn_tensor": ("an MKL-DNN tensor", "save t.to_dense()"),
}


class _Full(Exception):
    """brief() has formatted enough."""


def brief(obj: object, limit: int = 80) -> str:
    """A ``repr`` of ``obj`` cut to about ``limit`` characters, built without ever
    formatting more than that (the object may be a huge or self-sharing structure)."""
    out: list[str] = []
    used = 0

    def emit(text: str) -> None:
        nonlocal used
        out.append(text)
        used += len(text)
        if used > limit:
            raise _Full

    def walk(o: object) -> None:
        if isinstance(o, (str, bytes, bytearray)):
            emit(repr(o[: limit + 1]))
        elif type(o) is int:
            emit(repr(o) if o.bit_length() <= 256 else f"<int of {o.bit_length()} bits>")
        elif isinstance(o, (float, complex, bool, type(None), int)):
            emit(repr(o))
        elif isinstance(o, dict):
            emit("{")
            for i, (k, v) in enumerate(o.items()):
                emit(", " if i else "")
                walk(k)
                emit(": ")
                walk(v)
            emit("}")
        elif isinstance(o, (list, tuple)):
            emit("[" if isinstance(o, list) else "(")
            for i, v in enumerate(o):
                emit(", " if i else "")
                walk(v)
            emit("]" if isinstance(o, list) else ",)" if len(o) == 1 else ")")
        elif isinstance(o, _Global):
            emit(o.qualname)
        else:
            emit(f"<{type(o).__name__}>")

    try:
        walk(obj)
    except _Full:
        return "".join(out)[:limit] + "..."
    return "".join(out)


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
class _Marker:
    """An allowed global that is only ever an argument (``torch.Tensor``, a qscheme)."""

    qualname: str


@dataclass(frozen=True)
class _Storage:
    """A persistent-id storage: record ``key``, element ``dtype`` (None: bytes), size."""

    key: str
    dtype: str | None
    nbytes: int


@dataclass(frozen=True, eq=False)
class _Tensor:
    """A rebuilt tensor: a strided view (in elements) of a storage record.

    ``neg``/``conj`` are torch's lazy negation and conjugation bits: the values are
    the stored ones negated / with their imaginary parts negated."""

    storage: _Storage
    dtype: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    neg: bool = False
    conj: bool = False


@dataclass(frozen=True, eq=False)
class _Refused:
    """A tensor tensorbridge recognises but does not read; refused where it is named."""

    what: str
    fix: str


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
            f"{what} is {brief(x)}; a non-negative integer is required. Fix: the checkpoint "
            "is corrupt or hand-made; re-save it with torch.save.",
            path,
        )
    return x


def _int_tuple(x: object, what: str, path: str) -> tuple[int, ...]:
    if not isinstance(x, tuple) or len(x) > MAX_NDIM:
        raise FileFormatError(
            f"{what} is {brief(x)}; a tuple of at most {MAX_NDIM} non-negative integers is "
            "required. Fix: the checkpoint is corrupt or hand-made; re-save it.",
            path,
        )
    return tuple(_int(v, what, path) for v in x)


def _math_bits(metadata: object, dtype: str, path: str) -> tuple[bool, bool]:
    """The (neg, conj) bits of ``_rebuild_tensor_v2/_v3``'s ``metadata`` argument."""
    if metadata is None:
        return False, False
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and type(v) is bool for k, v in metadata.items()
    ):
        raise FileFormatError(
            f"a tensor's metadata is {brief(metadata)}, not a dict of flags. Fix: the "
            "checkpoint is corrupt or hand-made; re-save it with torch.save.",
            path,
        )
    unknown = sorted(k for k, v in metadata.items() if v and k not in ("neg", "conj"))
    if unknown:
        raise FileFormatError(
            f"a tensor carries the state {brief(unknown)}, which tensorbridge does not know "
            "and which may change its values. Fix: save t.clone() (a plain tensor).",
            path,
        )
    neg, conj = bool(metadata.get("neg")), bool(metadata.get("conj"))
    kind = lookup(dtype).kind
    if conj and kind != "complex":
        raise FileFormatError(
            f"a {dtype} tensor has the conjugate bit, which only complex tensors have. Fix: "
            "the checkpoint is corrupt or hand-made; re-save it with torch.save.",
            path,
        )
    if neg and (kind in ("bool", "uint") and dtype != "uint8" or dtype.startswith("float8")):
        raise FileFormatError(
            f"a {dtype} tensor has the negative bit, which torch itself cannot apply to "
            f"{dtype}. Fix: save t.resolve_neg() or t.clone() from where it was made.",
            path,
        )
    return neg, conj


def _rebuild(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    dtype: str | None,
    path: str,
    rest: tuple = (),
) -> _Tensor | _Refused:
    """``_rebuild_tensor_v2/_v3``; ``rest`` is (requires_grad, backward_hooks[, metadata])."""
    if not isinstance(storage, _Storage):
        raise FileFormatError(
            f"a tensor is rebuilt from {type(storage).__name__}, not from a storage record. "
            "Fix: the checkpoint is corrupt or hand-made; re-save it with torch.save.",
            path,
        )
    dtype = dtype or storage.dtype
    if dtype is None:
        raise FileFormatError(
            f"storage {brief(storage.key)} is untyped and no dtype was given. Fix: re-save the "
            "checkpoint with torch.save.",
            path,
        )
    if storage.dtype is not None and storage.dtype != dtype:
        raise FileFormatError(
            f"storage {brief(storage.key)} holds {storage.dtype} but a tensor reads it as "
            f"{dtype}. Fix: re-save the checkpoint with torch.save.",
            path,
        )
    if rest:
        if type(rest[0]) is not bool:
            raise FileFormatError(
                f"a tensor's requires_grad is {brief(rest[0])}, not a bool. "
                "Fix: re-save the checkpoint with torch.save.",
                path,
            )
        _no_hooks(rest[1], path)
    if dtype in OPAQUE_DTYPES:
        return _Refused(
            f"a tensor of dtype torch.{dtype}, which tensorbridge does not support "
            "(no NumPy or file format here holds it)",
            OPAQUE_DTYPES[dtype][1],
        )
    neg, conj = _math_bits(rest[2] if len(rest) > 2 else None, dtype, path)
    shape = _int_tuple(size, "a tensor shape", path)
    strides = _int_tuple(stride, "a tensor stride", path)
    if len(strides) != len(shape):
        raise FileFormatError(
            f"a tensor has shape {list(shape)} but stride {brief(list(strides))}. Fix: the "
            "checkpoint is corrupt; re-save it.",
            path,
        )
    # a stride along an axis of length <= 1 is never used: normalise it (2**62 there is legal)
    strides = tuple(s if d > 1 else 0 for d, s in zip(shape, strides, strict=True))
    tensor = _Tensor(
        storage, dtype, _int(offset, "a storage offset", path), shape, strides, neg, conj
    )
    _check_extent(tensor, path)
    return tensor


def _no_hooks(hooks: object, path: str) -> None:
    if hooks is not None and not (isinstance(hooks, dict) and not hooks):
        raise UnsafeContentError(
            f"a tensor carries backward hooks {brief(hooks)}; torch.save never stores hooks "
            f"(they are code). {_NO_CODE}.",
            path,
        )


def _check_extent(t: _Tensor, path: str) -> None:
    """The view must lie inside its storage; broadcasting may not blow it up too far."""
    itemsize = lookup(t.dtype).itemsize
    count = 1
    for d in t.shape:
        count *= d
    if count == 0:
        return
    last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride, strict=True))
    need = (last + 1) * itemsize
    if need > t.storage.nbytes:
        raise FileFormatError(
            f"a {t.dtype} tensor of shape {brief(list(t.shape))}, stride {brief(list(t.stride))}, "
            f"offset {brief(t.offset)} needs {brief(need)} bytes of storage {brief(t.storage.key)}, "
            f"which holds only {t.storage.nbytes}. Fix: the checkpoint is corrupt or truncated; save it again.",
            path,
        )
    if count * itemsize > max(t.storage.nbytes, MAX_BROADCAST_BYTES):
        raise FileFormatError(
            f"a {t.dtype} tensor of shape {brief(list(t.shape))} would take "
            f"{brief(count * itemsize)} bytes but its storage {brief(t.storage.key)} holds only {t.storage.nbytes} (zero "
            "strides); reading it would allocate what the file merely claims. Fix: save the "
            "tensor materialised, e.g. t.contiguous().",
            path,
        )


def _globals(path: str) -> dict[str, Any]:
    """Allowed ``module.name`` globals -> the value the interpreter pushes for them."""

    def ordered_dict(args: tuple) -> _ODict:
        if args != () and args != ([],):
            raise FileFormatError("OrderedDict is called with arguments. Fix: re-save it.", path)
        return _ODict()

    def v1(args: tuple) -> _Tensor | _Refused:
        # _rebuild_tensor(storage, offset, size, stride): no requires_grad, hooks or bits
        if len(args) != 4:
            raise FileFormatError(f"_rebuild_tensor gets {len(args)} arguments.", path)
        return _rebuild(*args, None, path)

    def device(args: tuple) -> str:
        # torch.device('cuda', 0) in a checkpoint's metadata: kept as its text
        if (
            not 1 <= len(args) <= 2
            or not isinstance(args[0], str)
            or (len(args) == 2 and type(args[1]) is not int)
        ):
            raise FileFormatError(
                f"torch.device is called with {brief(args)}. Fix: re-save "
                "the checkpoint with torch.save.",
                path,
            )
        return args[0] if len(args) == 1 else f"{args[0]}:{args[1]}"

    def v2(args: tuple) -> _Tensor | _Refused:
        if len(args) not in (6, 7):
            raise FileFormatError(f"_rebuild_tensor_v2 gets {len(args)} arguments.", path)
        return _rebuild(args[0], args[1], args[2], args[3], None, path, args[4:])

    def v3(args: tuple) -> _Tensor | _Refused:
        if len(args) not in (7, 8) or not isinstance(args[6], _DType):
            raise FileFormatError("_rebuild_tensor_v3 gets malformed arguments.", path)
        return _rebuild(
            args[0], args[1], args[2], args[3], args[6].name, path, args[4:6] + args[7:]
        )

    def parameter(args: tuple) -> _Tensor | _Refused:
        # (data, requires_grad, backward_hooks[, state]): state is Python attributes
        # set on the Parameter; it changes no value and is dropped like OrderedDict's
        if (
            len(args) not in (3, 4)
            or not isinstance(args[0], (_Tensor, _Refused))
            or type(args[1]) is not bool
        ):
            raise FileFormatError("_rebuild_parameter gets malformed arguments.", path)
        _no_hooks(args[2], path)
        return args[0]

    def from_type(args: tuple) -> Any:
        # torch._tensor._rebuild_from_type_v2(func, new_type, args, state): a subclass
        # whose class is an allowed global (torch.Tensor, Parameter) only
        if (
            len(args) != 4
            or not isinstance(args[0], _Global)
            or not isinstance(args[2], tuple)
            or args[1] not in (_Marker("torch.Tensor"), _Marker("torch.nn.Parameter"))
        ):
            raise FileFormatError("_rebuild_from_type_v2 gets malformed arguments.", path)
        return args[0].fn(args[2])

    def unsupported(name: str) -> _Global:
        what, fix = _UNSUPPORTED_REBUILDS[name]
        return _Global(
            name,
            lambda args: _Refused(
                f"{what}, which tensorbridge does not read (it reads dense, strided tensors)", fix
            ),
        )

    def size(args: tuple) -> tuple[int, ...]:
        if len(args) != 1:
            raise FileFormatError("torch.Size gets malformed arguments.", path)
        return _int_tuple(
            tuple(args[0]) if isinstance(args[0], list) else args[0], "a torch.Size", path
        )

    def layout(args: tuple) -> str:
        if len(args) != 1 or not isinstance(args[0], str):
            raise FileFormatError("_get_layout gets malformed arguments.", path)
        return args[0]

    def encode(args: tuple) -> bytes:
        if len(args) != 2 or not isinstance(args[0], str) or args[1] != "latin1":
            raise UnsafeContentError(
                f"_codecs.encode is called with {brief(args)}, not (str, 'latin1') as pickle "
                f"writes bytes. {_NO_CODE}.",
                path,
            )
        try:
            return args[0].encode("latin1")
        except UnicodeEncodeError as exc:
            raise FileFormatError(
                "malformed bytes object in the pickle (a character beyond "
                "latin-1). Fix: re-save the checkpoint.",
                path,
            ) from exc

    def complex_number(args: tuple) -> complex:
        if len(args) != 2 or not all(type(a) in (int, float) for a in args):
            raise FileFormatError(
                f"complex() is called with {brief(args)}, not two numbers. "
                "Fix: re-save the checkpoint with torch.save.",
                path,
            )
        try:
            return complex(*args)
        except OverflowError as exc:
            raise FileFormatError(
                "complex() is called with a number too large for a float. "
                "Fix: re-save the checkpoint.",
                path,
            ) from exc

    table: dict[str, Any] = {
        # torch's weights_only loader allows complex; protocol 2 spells it __builtin__
        "builtins.complex": _Global("complex", complex_number),
        "__builtin__.complex": _Global("complex", complex_number),
        "collections.OrderedDict": _Global("collections.OrderedDict", ordered_dict),
        "torch._utils._rebuild_tensor": _Global("_rebuild_tensor", v1),
        "torch._utils._rebuild_tensor_v2": _Global("_rebuild_tensor_v2", v2),
        "torch.device": _Global("torch.device", device),
        "torch._utils._rebuild_tensor_v3": _Global("_rebuild_tensor_v3", v3),
        "torch._utils._rebuild_parameter": _Global("_rebuild_parameter", parameter),
        "torch._utils._rebuild_parameter_with_state": _Global("_rebuild_parameter", parameter),
        "torch._tensor._rebuild_from_type_v2": _Global("_rebuild_from_type_v2", from_type),
        "torch.Tensor": _Marker("torch.Tensor"),
        "torch._tensor.Tensor": _Marker("torch.Tensor"),
        "torch.nn.parameter.Parameter": _Marker("torch.nn.Parameter"),
        "torch.Size": _Global("torch.Size", size),
        "torch.serialization._get_layout": _Global("_get_layout", layout),
        "_codecs.encode": _Global("_codecs.encode", encode),
        "torch.storage.UntypedStorage": _StorageType(None),
        "torch.UntypedStorage": _StorageType(None),
    }
    table.update({f"torch._utils.{k}": unsupported(k) for k in _UNSUPPORTED_REBUILDS})
    table.update({f"torch.{k}": _StorageType(v) for k, v in STORAGE_TYPES.items()})
    table.update({f"torch.{k}": _StorageType(v) for k, v in _OPAQUE_STORAGES.items()})
    table.update({f"torch.{k}": _DType(v) for k, v in TORCH_DTYPES.items()})
    table.update({f"torch.{k}": _DType(k) for k in OPAQUE_DTYPES})
    table.update(
        {
            f"torch.{q}": _Marker(f"torch.{q}")
            for q in (
                "per_tensor_affine",
                "per_tensor_symmetric",
                "per_channel_affine",
                "per_channel_symmetric",
                "per_channel_affine_float_qparams",
            )
        }
    )
    return table


def _empty_state(state: object) -> bool:
    """None, or a dict / a (dict, dict) pair of slots with nothing in it (bounded: no walk)."""
    if state is None or (isinstance(state, dict) and not state):
        return True
    return (
        isinstance(state, tuple)
        and len(state) == 2
        and all(s is None or (isinstance(s, dict) and not s) for s in state)
    )


_STR_LIKE = (str, bytes, bytearray)


class _Machine:
    """A pickle stack machine for data opcodes and the allowed globals, on a work budget."""

    def __init__(self, path: str, storage_sizes: Mapping[str, int] | None, budget: int) -> None:
        self.path = path
        self.sizes = storage_sizes  # record key -> bytes in the zip (None: checked later)
        self.globals = _globals(path)
        self.storages: dict[str, _Storage] = {}
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.budget = budget
        self.work = 0
        self.ops = 0

    # -- helpers ------------------------------------------------------------------
    def fail(self, why: str) -> FileFormatError:
        return FileFormatError(
            f"data.pkl is malformed: {why}. Fix: the checkpoint is corrupt or hand-made; "
            "re-save it with torch.save.",
            self.path,
        )

    def charge(self, units: int) -> None:
        self.work += units
        if self.work > self.budget:
            raise FileFormatError(
                f"data.pkl would take more than {self.budget} units of work and memory to "
                "evaluate, far more than a pickle of its size needs (memo reuse or many "
                "tiny objects: an amplification attack or a corrupt file). Fix: re-save the "
                "checkpoint with torch.save, or as safetensors.",
                self.path,
            )

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
            raise self.fail(
                f"a dict key is a {type(key).__name__} ({brief(key, 60)}); only str "
                "and int keys are supported"
            )
        d[key] = value

    def in_subclass(self) -> bool:
        for frame in [self.stack] + self.marks[-2:]:
            if any(
                isinstance(v, _Global) and v.qualname == "_rebuild_from_type_v2" for v in frame[-3:]
            ):
                return True
        return False

    def global_(self, module: object, name: object) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.fail("a global is named by non-strings")
        qualname = f"{module}.{name}"
        value = self.globals.get(qualname)
        if value is None:
            if self.in_subclass():
                raise UnsafeContentError(
                    f"the checkpoint holds a tensor subclass {brief(qualname)}; its class would "
                    "have to be imported, which could run code. Fix: save plain tensors, "
                    "t.as_subclass(torch.Tensor) (no code was run).",
                    self.path,
                )
            raise UnsafeContentError(
                f"the checkpoint references the global {brief(qualname)}, which is not a "
                f"tensor or plain container; loading it with pickle could run code. {_NO_CODE}.",
                self.path,
            )
        return value

    def persistent(self, pid: object) -> _Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) in (5, 6)
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
        ):
            raise self.fail(f"persistent id {brief(pid, 100)} is not a storage reference")
        if len(pid) == 6 and pid[5] is not None:  # legacy format: a view of another storage
            raise self.fail(
                "a storage is a view of another storage (pre-1.0 torch); re-save "
                "the checkpoint with a modern torch"
            )
        stype, key, numel = pid[1], pid[2], pid[4]
        dtype = stype.dtype
        itemsize = (
            1
            if dtype is None
            else (OPAQUE_DTYPES[dtype][0] if dtype in OPAQUE_DTYPES else lookup(dtype).itemsize)
        )
        nbytes = _int(numel, "the size of a storage", self.path) * itemsize
        if self.sizes is not None:
            have = self.sizes.get(key)
            if have is None:
                raise FileFormatError(
                    f"storage {brief(key)} has no record data/{key[:80]} in the archive. Fix: "
                    "the checkpoint is incomplete; save it again.",
                    self.path,
                )
            if have != nbytes:
                raise FileFormatError(
                    f"storage record data/{key[:80]} holds {have} bytes but the pickle declares "
                    f"{nbytes}. Fix: the checkpoint is corrupt or truncated; save it again.",
                    self.path,
                )
        storage = _Storage(key, dtype, nbytes)
        old = self.storages.setdefault(key, storage)
        if old != storage:
            raise self.fail(f"storage {brief(key)} is declared twice with different types")
        return storage

    # -- the loop -----------------------------------------------------------------
    def run(self, ops: Any) -> Any:
        handlers: dict[str, Any] = {}
        for op, arg, pos in ops:
            self.ops += 1
            self.work += 1 + (len(arg) if isinstance(arg, _STR_LIKE) else 0)
            if self.work > self.budget:
                self.charge(0)
            name = op.name
            handler = handlers.get(name)
            if handler is None:
                handler = handlers[name] = getattr(self, "op_" + name, None)
            if handler is None:
                raise UnsafeContentError(
                    f"data.pkl uses the pickle opcode {name!r} at byte {pos}, which builds "
                    f"objects other than plain data and which state dicts never need. "
                    f"{_NO_CODE}.",
                    self.path,
                )
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

    def op_POP(self, arg: None) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    def op_POP_MARK(self, arg: None) -> None:
        self.pop_mark()

    def op_DUP(self, arg: None) -> None:
        if not self.stack:
            raise self.fail("DUP of an empty stack")
        self.stack.append(self.stack[-1])

    def _new(self, value: Any) -> None:
        self.charge(64)
        self.stack.append(value)

    def op_EMPTY_DICT(self, arg: None) -> None:
        self._new({})

    def op_EMPTY_LIST(self, arg: None) -> None:
        self._new([])

    def op_EMPTY_TUPLE(self, arg: None) -> None:
        self.stack.append(())

    def op_DICT(self, arg: None) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise self.fail("DICT gets an odd number of items")
        self.charge(64 + 8 * len(items))
        d: dict = {}
        for i in range(0, len(items), 2):
            self.setitem(d, items[i], items[i + 1])
        self.stack.append(d)

    def op_LIST(self, arg: None) -> None:
        items = self.pop_mark()
        self.charge(64 + 8 * len(items))
        self.stack.append(items)

    def op_SETITEM(self, arg: None) -> None:
        value, key = self.pop(), self.pop()
        self.charge(16)
        self.setitem(self.top(dict, "SETITEM"), key, value)

    def op_SETITEMS(self, arg: None) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise self.fail("SETITEMS gets an odd number of items")
        self.charge(8 * len(items))
        d = self.top(dict, "SETITEMS")
        for i in range(0, len(items), 2):
            self.setitem(d, items[i], items[i + 1])

    def op_APPEND(self, arg: None) -> None:
        value = self.pop()
        self.charge(8)
        self.top(list, "APPEND").append(value)

    def op_APPENDS(self, arg: None) -> None:
        items = self.pop_mark()
        self.charge(8 * len(items))
        self.top(list, "APPENDS").extend(items)

    def op_TUPLE(self, arg: None) -> None:
        items = tuple(self.pop_mark())  # pop_mark swaps self.stack: evaluate it first
        self.charge(64 + 8 * len(items))
        self.stack.append(items)

    def _tuple(self, n: int) -> None:
        if len(self.stack) < n:
            raise self.fail("the pickle stack underflows")
        items = tuple(self.stack[-n:])
        del self.stack[-n:]
        self._new(items)

    def op_TUPLE1(self, arg: None) -> None:
        self._tuple(1)

    def op_TUPLE2(self, arg: None) -> None:
        self._tuple(2)

    def op_TUPLE3(self, arg: None) -> None:
        self._tuple(3)

    def _push(self, arg: Any) -> None:
        self.charge(32)
        self.stack.append(arg)

    op_BININT = op_BININT1 = op_BININT2 = op_LONG1 = op_BINFLOAT = _push
    op_BINUNICODE = op_SHORT_BINUNICODE = op_BINUNICODE8 = _push
    op_BINBYTES = op_SHORT_BINBYTES = op_BINBYTES8 = _push
    # protocols 0-1: the same values written as text (pickletools decodes them)
    op_INT = op_LONG = op_FLOAT = op_UNICODE = op_STRING = _push
    op_BINSTRING = op_SHORT_BINSTRING = _push

    def op_BYTEARRAY8(self, arg: bytes) -> None:
        self._push(bytes(arg))

    def op_NEWTRUE(self, arg: None) -> None:
        self.stack.append(True)

    def op_NEWFALSE(self, arg: None) -> None:
        self.stack.append(False)

    def op_NONE(self, arg: None) -> None:
        self.stack.append(None)

    def _put(self, arg: int) -> None:
        if not self.stack:
            raise self.fail("memoizing an empty stack")
        self.charge(32)
        self.memo[arg] = self.stack[-1]

    op_BINPUT = op_LONG_BINPUT = op_PUT = _put

    def op_MEMOIZE(self, arg: None) -> None:
        self._put(len(self.memo))

    def _get(self, arg: int) -> None:
        if arg not in self.memo:
            raise self.fail(f"memo entry {brief(arg)} is read before it is written")
        self.stack.append(self.memo[arg])

    op_BINGET = op_LONG_BINGET = op_GET = _get

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
                f"data.pkl calls a {type(func).__name__} ({brief(func)}), which is not an allowed "
                f"function. {_NO_CODE}.",
                self.path,
            )
        if not isinstance(args, tuple):
            raise self.fail(f"{func.qualname} is called with a {type(args).__name__}")
        self.charge(256)
        self.stack.append(func.fn(args))

    def op_BINPERSID(self, arg: None) -> None:
        storage = self.persistent(self.pop())
        self.stack.append(storage)

    def op_PERSID(self, arg: str) -> None:
        raise FileFormatError(
            "data.pkl was written with pickle protocol 0, which stores storage references as "
            "text that torch.load cannot read either. Fix: save it again with the default "
            "protocol, torch.save(obj, path).",
            self.path,
        )

    def op_BUILD(self, arg: None) -> None:
        state = self.pop()
        target = self.stack[-1] if self.stack else None
        if isinstance(target, _ODict) and (state is None or isinstance(state, dict)):
            return  # OrderedDict attributes (state_dict()._metadata): dropped
        if isinstance(target, (_Tensor, _Refused)) and _empty_state(state):
            return
        raise UnsafeContentError(
            f"data.pkl sets state {brief(state)} on a {type(target).__name__}; only empty "
            f"tensor state and OrderedDict attributes are allowed. {_NO_CODE}.",
            self.path,
        )


_GENOPS_LOCK = threading.Lock()


def run_pickle(
    stream: IO[bytes], nbytes: int, storage_sizes: Mapping[str, int] | None, path: str = ""
) -> tuple[Any, int, dict[str, _Storage]]:
    """Evaluate one pickle from ``stream`` (``nbytes`` long at most, which sets the work
    budget). Returns (the object, the number of opcodes, the storages it declared).

    pickletools escape-decodes text arguments, so a crafted ``STRING`` can raise a
    DeprecationWarning (or a decoding error) from inside it; both become a
    :class:`FileFormatError`. The lock keeps the temporary warning filter from racing
    with another thread's reader."""
    machine = _Machine(path, storage_sizes, WORK_FLOOR + WORK_PER_BYTE * nbytes)
    with wrapped(path, "parsing data.pkl"), _GENOPS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            obj = machine.run(pickletools.genops(stream))
        except DeprecationWarning as exc:
            raise FileFormatError(
                f"data.pkl holds malformed text ({exc}). Fix: re-save the "
                "checkpoint with torch.save, or obtain an intact copy.",
                path,
            ) from exc
        except RecursionError as exc:
            raise FileFormatError("data.pkl is nested too deeply. Fix: re-save it.", path) from exc
    return obj, machine.ops, machine.storages


def parse_pickle(data: bytes, storage_sizes: Mapping[str, int], path: str = "") -> Any:
    """Evaluate a checkpoint's ``data.pkl`` safely; tensors come back as views of records.

    ``storage_sizes`` maps each ``data/KEY`` record's KEY to its size in bytes.
    """
    return run_pickle(io.BytesIO(data), len(data), storage_sizes, path)[0]
