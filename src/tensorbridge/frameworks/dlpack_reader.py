"""Read a DLPack capsule from any producer into a NumPy view, for every dtype.

``np.from_dlpack`` refuses bfloat16 and float8, which is exactly where conversions go
wrong. This reader takes the capsule's description (DLPack 1.x, or the legacy layout),
checks it, and returns a NumPy view of the producer's host memory in the canonical
dtype (ml_dtypes for bfloat16/float8). The capsule is not consumed: the view keeps it
alive, and when the view goes the capsule's own destructor returns the memory to the
producer, as the DLPack protocol specifies for unconsumed capsules.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ..dtypes import NUMPY_NATIVE, lookup, numpy_dtype
from ..errors import ConversionError, message

__all__ = ["host_view", "DEVICE_TYPES"]

#: DLPack device type -> tensorbridge device kind (kDLCPU, kDLCUDA, kDLCUDAHost, ...)
DEVICE_TYPES = {
    1: "cpu",
    2: "cuda",
    3: "cpu",
    4: "opencl",
    7: "vulkan",
    8: "mps",
    9: "vpi",
    10: "rocm",
    11: "cpu",
    13: "cuda",
    14: "oneapi",
}

#: (DLDataTypeCode, bits) -> canonical dtype name (dtypes are data)
_DTYPES = {
    (0, 8): "int8",
    (0, 16): "int16",
    (0, 32): "int32",
    (0, 64): "int64",
    (1, 8): "uint8",
    (1, 16): "uint16",
    (1, 32): "uint32",
    (1, 64): "uint64",
    (2, 16): "float16",
    (2, 32): "float32",
    (2, 64): "float64",
    (4, 16): "bfloat16",
    (5, 64): "complex64",
    (5, 128): "complex128",
    (6, 8): "bool",
    (7, 8): "float8_e3m4",
    (8, 8): "float8_e4m3",
    (9, 8): "float8_e4m3b11fnuz",
    (10, 8): "float8_e4m3fn",
    (11, 8): "float8_e4m3fnuz",
    (12, 8): "float8_e5m2",
    (13, 8): "float8_e5m2fnuz",
    (14, 8): "float8_e8m0fnu",
}
_READ_ONLY = 1  # DLPACK_FLAG_BITMASK_READ_ONLY


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _Device),
        ("ndim", ctypes.c_int32),
        ("dtype", _DataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _Managed(ctypes.Structure):  # legacy "dltensor"
    _fields_ = [
        ("dl_tensor", _Tensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
    ]


class _ManagedVersioned(ctypes.Structure):  # DLPack >= 1.0, "dltensor_versioned"
    _fields_ = [
        ("major", ctypes.c_uint32),
        ("minor", ctypes.c_uint32),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _Tensor),
    ]


_api = ctypes.pythonapi
_api.PyCapsule_GetName.restype = ctypes.c_char_p
_api.PyCapsule_GetName.argtypes = [ctypes.py_object]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


class _Holder:
    """Keeps the capsule alive for as long as the NumPy view over its memory."""

    def __init__(self, capsule: Any, interface: dict[str, Any]) -> None:
        self.capsule = capsule
        self.__array_interface__ = interface


def _capsule(x: Any) -> Any:
    try:
        return x.__dlpack__(max_version=(1, 0))
    except TypeError as exc:  # a producer from before DLPack 1.0 takes no max_version
        if "max_version" not in str(exc):  # a refusal (pyarrow's ArrowTypeError is one)
            raise
        return x.__dlpack__()


def host_view(x: Any, what: str) -> np.ndarray:
    """A NumPy view of the host memory that ``x.__dlpack__()`` describes (no copy)."""
    try:
        capsule = _capsule(x)
    except Exception as exc:  # the producer's own refusal: say whose, and why
        raise ConversionError(
            message(
                what,
                f"its __dlpack__ refused to export its memory ({type(exc).__name__}: {exc})",
                "make it exportable in its own library first (no missing values, a numeric "
                "dtype; pyarrow: x.fill_null(...) or x.to_numpy(zero_copy_only=False)), or "
                "pass np.asarray(x), which copies",
            )
        ) from exc
    if type(capsule).__name__ != "PyCapsule":
        raise ConversionError(
            message(
                what,
                f"its __dlpack__ returned a {type(capsule).__qualname__}, not a DLPack capsule",
                "fix the producer's __dlpack__, or pass np.asarray(x)",
            )
        )
    name = _api.PyCapsule_GetName(capsule)
    if name not in (b"dltensor", b"dltensor_versioned"):
        raise ConversionError(
            message(
                what,
                f"its __dlpack__ returned a capsule named {name!r}, not a DLPack tensor",
                "fix the producer's __dlpack__",
            )
        )
    ptr = _api.PyCapsule_GetPointer(capsule, name)
    read_only = False
    if name == b"dltensor_versioned":
        managed = _ManagedVersioned.from_address(ptr)
        if managed.major != 1:
            raise ConversionError(
                message(
                    what,
                    f"it exports DLPack {managed.major}.{managed.minor}, and version 1.x is read",
                    "ask the producer for DLPack 1.x",
                )
            )
        read_only = bool(managed.flags & _READ_ONLY)
        t = managed.dl_tensor
    else:
        t = _Managed.from_address(ptr).dl_tensor
    kind = DEVICE_TYPES.get(t.device.device_type, f"DLPack device type {t.device.device_type}")
    if kind != "cpu":
        raise ConversionError(
            message(
                what,
                f"its memory is on {kind}:{t.device.device_id}, which NumPy cannot address",
                "convert it with its own framework, or to='torch'/'cupy'",
            )
        )
    dtype = _DTYPES.get((t.dtype.code, t.dtype.bits))
    if dtype is None or t.dtype.lanes != 1:
        raise ConversionError(
            message(
                what,
                f"its DLPack dtype (code {t.dtype.code}, {t.dtype.bits} bits, {t.dtype.lanes} "
                "lanes) has no counterpart in tensorbridge",
                "cast it in its own framework first",
            )
        )
    if not 0 <= t.ndim <= 64:
        raise ConversionError(message(what, f"its DLPack ndim is {t.ndim}", "fix the producer"))
    shape = tuple(t.shape[i] for i in range(t.ndim))
    itemsize = lookup(dtype).itemsize
    strides = None if not t.strides else tuple(t.strides[i] * itemsize for i in range(t.ndim))
    if any(n < 0 for n in shape):
        raise ConversionError(
            message(what, f"its DLPack shape {shape} is negative", "fix the producer")
        )
    # bfloat16/float8 go in as raw bits and come out as their ml_dtypes view
    bits = numpy_dtype(dtype) if dtype in NUMPY_NATIVE else np.dtype(f"u{itemsize}")
    address = (t.data or 0) + t.byte_offset
    if not t.data:
        if 0 not in shape:
            raise ConversionError(
                message(what, "its DLPack data pointer is NULL", "fix the producer")
            )
        address = 64  # NumPy wants a non-null pointer for an empty array; nothing is read
    holder = _Holder(
        capsule,
        {
            "version": 3,
            "shape": shape,
            "typestr": bits.str,
            "strides": strides,
            "data": (address, read_only),
        },
    )
    a = np.asarray(holder)
    return a if a.dtype == numpy_dtype(dtype) else a.view(numpy_dtype(dtype))
