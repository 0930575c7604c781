"""Canonical dtype names, and the NumPy dtype behind each.

Dtypes are data. Every framework module maps its own dtypes to the canonical
names below; files store these names; errors print them. Names follow NumPy
(``float32``, ``bfloat16``, ``float8_e4m3fn``). Types NumPy lacks come from
``ml_dtypes``.

>>> numpy_dtype("bfloat16").itemsize
2
>>> canonical_name(np.dtype(">f4"))
'float32'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from .errors import ConversionError, message

__all__ = [
    "DType",
    "DTYPES",
    "NUMPY_NATIVE",
    "BITS",
    "canonical_name",
    "numpy_dtype",
    "lookup",
    "is_floating",
]


@dataclass(frozen=True)
class DType:
    """One canonical dtype: its name, kind, width, and its NumPy dtype."""

    name: str
    kind: str  # "bool" | "int" | "uint" | "float" | "complex"
    itemsize: int
    numpy: np.dtype
    safetensors: str | None  # the safetensors header code, where it has one


def _row(name: str, kind: str, st: str | None, np_type: Any) -> DType:
    dt = np.dtype(np_type)
    return DType(name, kind, dt.itemsize, dt, st)


_ROWS = [
    ("bool", "bool", "BOOL", np.bool_),
    ("int8", "int", "I8", np.int8),
    ("int16", "int", "I16", np.int16),
    ("int32", "int", "I32", np.int32),
    ("int64", "int", "I64", np.int64),
    ("uint8", "uint", "U8", np.uint8),
    ("uint16", "uint", "U16", np.uint16),
    ("uint32", "uint", "U32", np.uint32),
    ("uint64", "uint", "U64", np.uint64),
    ("float16", "float", "F16", np.float16),
    ("float32", "float", "F32", np.float32),
    ("float64", "float", "F64", np.float64),
    ("complex64", "complex", "C64", np.complex64),
    ("complex128", "complex", None, np.complex128),
    ("bfloat16", "float", "BF16", ml_dtypes.bfloat16),
    ("float8_e4m3fn", "float", "F8_E4M3", ml_dtypes.float8_e4m3fn),
    ("float8_e5m2", "float", "F8_E5M2", ml_dtypes.float8_e5m2),
    ("float8_e4m3fnuz", "float", "F8_E4M3FNUZ", ml_dtypes.float8_e4m3fnuz),
    ("float8_e5m2fnuz", "float", "F8_E5M2FNUZ", ml_dtypes.float8_e5m2fnuz),
    ("float8_e8m0fnu", "float", "F8_E8M0", ml_dtypes.float8_e8m0fnu),
    ("float8_e4m3", "float", None, ml_dtypes.float8_e4m3),
    ("float8_e3m4", "float", None, ml_dtypes.float8_e3m4),
    ("float8_e4m3b11fnuz", "float", None, ml_dtypes.float8_e4m3b11fnuz),
]

#: Every canonical dtype by name, in a stable order.
DTYPES: dict[str, DType] = {r[0]: _row(*r) for r in _ROWS}

#: Canonical dtypes NumPy itself has; the others (bfloat16, float8) are ml_dtypes types,
#: which other frameworks cannot import from NumPy and which travel as raw bits.
NUMPY_NATIVE = frozenset(
    {
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
        "complex64",
        "complex128",
    }
)
#: itemsize -> the unsigned integer dtype name of that width, for moving raw bits
BITS = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}

# NumPy dtype (native byte order) -> canonical name. ml_dtypes types compare
# by identity of their scalar type, so key on the type, not the dtype.
_BY_NUMPY_TYPE: dict[type, str] = {d.numpy.type: d.name for d in DTYPES.values()}


def canonical_name(dtype: Any) -> str:
    """The canonical name of a NumPy dtype (any byte order).

    Raises :class:`ConversionError` for dtypes no tensor framework has
    (object, strings, structured, datetime).
    """
    dt = np.dtype(dtype)
    name = _BY_NUMPY_TYPE.get(dt.type)
    if name is None and dt.kind in "iu" and dt.fields is None:
        # np.longlong / np.ulonglong ('q'/'Q'): other scalar types, the same integers
        name = f"{'int' if dt.kind == 'i' else 'uint'}{dt.itemsize * 8}"
    if name is None and dt.kind in "fc" and dt.fields is None:
        standard = {
            ("f", 2): "float16",
            ("f", 4): "float32",
            ("f", 8): "float64",
            ("c", 8): "complex64",
            ("c", 16): "complex128",
        }
        name = standard.get((dt.kind, dt.itemsize))  # a long double that is a double
    if name is None and dt.kind in "fc" and dt.fields is None:
        raise ConversionError(
            message(
                f"numpy dtype {dt!r}",
                f"{dt.itemsize * 8}-bit extended precision (long double) has no counterpart in "
                "any tensor framework",
                "cast it first, e.g. a.astype(np.float64) (or np.complex128)",
            )
        )
    if dt.names == ("float0",):  # jax.dtypes.float0
        raise ConversionError(
            message(
                "a JAX float0 array",
                "float0 is the dtype JAX gives gradients with respect to integer inputs: it holds no "
                "values (zero bytes per element)",
                "drop it, or take gradients only with respect to float inputs "
                "(jax.grad(..., allow_int=True) makes these)",
            )
        )
    if name is None and dt.type.__module__ == "ml_dtypes":
        bits = _ML_DTYPE_BITS.get(dt.name)
        width = f"{bits}-bit " if bits else ""
        floating = dt.name.startswith("float")
        raise ConversionError(
            message(
                f"numpy dtype {dt.name} (ml_dtypes)",
                f"it is a {width}{'float' if floating else 'integer'} type that no tensor file format "
                "and not every framework has, so tensorbridge does not carry it between them",
                f"cast it first, e.g. a.astype({'np.float32' if floating else 'np.int8'}) "
                "(every value fits), or keep it in the framework it came from",
            )
        )
    if name is None or dt.fields is not None:
        raise ConversionError(
            message(
                f"numpy dtype {dt!r}",
                "it is not a numeric tensor dtype (object, string, structured and "
                "datetime arrays hold no numbers a tensor framework can share)",
                "convert it to a numeric dtype first, e.g. a.astype(np.float32); "
                "for text, keep it as a Python list or encode it to bytes yourself",
            )
        )
    return name


#: widths of the ml_dtypes types that are not canonical dtypes, for messages
_ML_DTYPE_BITS = {
    "int2": 2,
    "uint2": 2,
    "int4": 4,
    "uint4": 4,
    "float4_e2m1fn": 4,
    "float6_e2m3fn": 6,
    "float6_e3m2fn": 6,
}


def lookup(name: Any) -> DType:
    """The :class:`DType` for a canonical name, any NumPy-parsable alias, or a
    framework's dtype object (``torch.bfloat16``, ``tf.float32``, ``jnp.int8``)."""
    row = DTYPES.get(name) if isinstance(name, str) else None
    if row is not None:
        return row
    if not isinstance(name, (str, np.dtype, type)):  # torch.float32, tf.float32 (DType)
        text = getattr(name, "name", None)
        text = text if isinstance(text, str) else str(name).rpartition(".")[2]
        if text in DTYPES:
            return DTYPES[text]
    try:
        return DTYPES[canonical_name(np.dtype(name))]
    except (TypeError, ValueError) as exc:
        raise ConversionError(
            message(
                f"dtype {name!r}",
                "it is not a known tensor dtype",
                "use one of: " + ", ".join(DTYPES),
            )
        ) from exc


def numpy_dtype(name: str) -> np.dtype:
    """The native-byte-order NumPy dtype for a canonical name."""
    return lookup(name).numpy


def is_floating(name: str) -> bool:
    """True for real floating dtypes (float16/32/64, bfloat16, float8)."""
    return lookup(name).kind == "float"
