"""Helpers shared by the format tests (and tests/test_cli.py, tests/test_files.py):
random bit patterns with the awkward floats up front, byte-exact comparison, and
write/read through a format with names, dtypes and metadata as given."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tensorbridge.dtypes import DTYPES, canonical_name
from tensorbridge.formats.base import TensorInfo


def sample(name: str, shape: tuple[int, ...] = (3, 5), seed: int = 0) -> np.ndarray:
    """Random bits of dtype ``name``, with subnormal, -0.0 and NaN payloads up front.

    Floats (and each half of a complex) start with the bit patterns 1, the sign
    bit alone, all ones, all ones but the sign, and all ones but bit 1, as far
    as the array has room.
    """
    dt = DTYPES[name].numpy
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if name == "bool":
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    raw = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8)
    kind = DTYPES[name].kind
    if kind in ("float", "complex"):
        width = dt.itemsize if kind == "float" else dt.itemsize // 2
        bits = 8 * width
        patterns = [
            1,
            1 << (bits - 1),
            (1 << bits) - 1,
            ((1 << bits) - 1) ^ (1 << (bits - 1)),
            ((1 << bits) - 1) ^ 2,
        ]  # subnormal, -0.0, NaNs with payloads
        words = raw.view(f"<u{width}")
        words[: len(patterns)] = patterns[: len(words)]
    return raw.view(dt).reshape(shape).copy()


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, same shape and the same bytes (so NaN payloads and -0.0 count)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def write_with(
    fmt, path, arrays: dict[str, np.ndarray], metadata: Mapping[str, str] | None = None, **options
) -> None:
    """Write ``arrays`` with ``fmt``, each under its own name and dtype."""
    infos = [TensorInfo(k, canonical_name(v.dtype), v.shape) for k, v in arrays.items()]
    fmt.write(str(path), infos, arrays.__getitem__, metadata, **options)


def read_all_with(fmt, path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of ``path`` read with ``fmt``, and its metadata."""
    with fmt.open(str(path)) as r:
        return {k: r.read(k) for k in r.keys()}, r.metadata
