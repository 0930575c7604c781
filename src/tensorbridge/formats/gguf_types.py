"""GGUF's tables, as data: tensor types (``ggml_type``) and metadata value types.

The numbers and block sizes are those of llama.cpp's ``ggml.h`` and gguf-py's
``GGML_QUANT_SIZES``; tensorbridge reads them from here, never from gguf-py.
A tensor of a quantised type holds ``n / block_size`` blocks of ``type_size``
bytes each, along its fastest axis (``ne[0]``, the last NumPy axis).

>>> TYPES_BY_NAME["Q4_K"].block_size, TYPES_BY_NAME["Q4_K"].type_size
(256, 144)
>>> round(TYPES_BY_NAME["Q4_K"].bits_per_weight, 2)
4.5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "DTYPE_TO_TYPE",
    "PLAIN_DTYPES",
    "QK_K",
    "TYPES",
    "TYPES_BY_NAME",
    "VALUE_TYPES",
    "VALUE_TYPE_IDS",
    "GGMLType",
]

QK_K = 256


@dataclass(frozen=True)
class GGMLType:
    """One GGUF tensor type."""

    id: int
    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block
    dtype: str | None = None  # canonical dtype of an unquantised type (stored as is)

    @property
    def quantized(self) -> bool:
        return self.dtype is None

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


_ROWS: list[tuple[Any, ...]] = [
    (0, "F32", 1, 4, "float32"),
    (1, "F16", 1, 2, "float16"),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1, "int8"),
    (25, "I16", 1, 2, "int16"),
    (26, "I32", 1, 4, "int32"),
    (27, "I64", 1, 8, "int64"),
    (28, "F64", 1, 8, "float64"),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2, "bfloat16"),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
    (41, "Q1_0", 128, 18),
]

#: type id -> type
TYPES: dict[int, GGMLType] = {int(r[0]): GGMLType(*r) for r in _ROWS}
#: type name (``"Q4_K"``) -> type
TYPES_BY_NAME: dict[str, GGMLType] = {t.name: t for t in TYPES.values()}
#: canonical dtypes GGUF stores as they are, and their type
PLAIN_DTYPES: dict[str, GGMLType] = {t.dtype: t for t in TYPES.values() if t.dtype}
DTYPE_TO_TYPE = PLAIN_DTYPES

#: metadata value type id -> (name, struct code or None, byte size or None)
VALUE_TYPES: dict[int, tuple[str, str | None, int | None]] = {
    0: ("UINT8", "B", 1),
    1: ("INT8", "b", 1),
    2: ("UINT16", "H", 2),
    3: ("INT16", "h", 2),
    4: ("UINT32", "I", 4),
    5: ("INT32", "i", 4),
    6: ("FLOAT32", "f", 4),
    7: ("BOOL", "?", 1),
    8: ("STRING", None, None),
    9: ("ARRAY", None, None),
    10: ("UINT64", "Q", 8),
    11: ("INT64", "q", 8),
    12: ("FLOAT64", "d", 8),
}
#: value type name -> id
VALUE_TYPE_IDS: dict[str, int] = {v[0]: k for k, v in VALUE_TYPES.items()}
