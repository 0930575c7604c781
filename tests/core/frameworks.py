"""Build test tensors in each framework from raw bytes, and read their raw bytes back,
using only the frameworks' own APIs (never tensorbridge), so tests are independent."""

from __future__ import annotations

import numpy as np

import tensorbridge.dtypes as D

FRAMEWORKS = ["numpy", "torch", "tensorflow", "jax"]

TORCH_DTYPES = {
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
    "bfloat16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
}
TF_DTYPES = {
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
    "bfloat16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e4m3b11fnuz",
}
SUPPORTS = {
    "numpy": set(D.DTYPES),
    "torch": TORCH_DTYPES,
    "tensorflow": TF_DTYPES,
    "jax": set(D.DTYPES),
}

_SPECIAL = {  # bit patterns that break naive conversions: NaN payloads, -0.0, subnormals, inf
    "float16": [0x7E01, 0xFC01, 0x8000, 0x0001, 0x7C00, 0xFC00],
    "bfloat16": [0x7FC1, 0xFF81, 0x8000, 0x0001, 0x7F80, 0xFF80],
    "float32": [0x7FC00001, 0xFFA00001, 0x80000000, 0x00000001, 0x7F800000],
    "float64": [0x7FF8000000000001, 0xFFF4000000000001, 0x8000000000000000, 1, 0x7FF0000000000000],
}


def raw_bytes(dtype: str, n: int = 32, seed: int = 0) -> bytes:
    """n elements of raw bit patterns for dtype: random bits plus the special values."""
    info = D.lookup(dtype)
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, n, dtype=np.uint8).tobytes()
    data = bytearray(rng.integers(0, 256, n * info.itemsize, dtype=np.uint8).tobytes())
    specials = _SPECIAL.get(dtype, [])
    if dtype in ("complex64", "complex128"):
        part = "float32" if dtype == "complex64" else "float64"
        specials, info_size = _SPECIAL[part], info.itemsize // 2
        for i, v in enumerate(specials[: 2 * n]):
            data[i * info_size : (i + 1) * info_size] = v.to_bytes(info_size, "little")
        return bytes(data)
    for i, v in enumerate(specials[:n]):
        data[i * info.itemsize : (i + 1) * info.itemsize] = v.to_bytes(info.itemsize, "little")
    return bytes(data)


def make(framework: str, dtype: str, raw: bytes, shape=None):
    a = np.frombuffer(raw, D.numpy_dtype(dtype)).copy()
    if shape is not None:
        a = a.reshape(shape)
    if framework == "numpy":
        return a
    if framework == "torch":
        import torch

        if not raw:
            return torch.empty(a.shape, dtype=getattr(torch, dtype))
        t = torch.frombuffer(bytearray(raw), dtype=getattr(torch, dtype))
        return t.reshape(a.shape)
    if framework == "tensorflow":
        import tensorflow as tf

        return tf.constant(a)
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(a)
    raise ValueError(framework)


def bytes_of(x) -> bytes:
    """The raw bytes of a tensor's values in C order, by the framework's own means."""
    mod = type(x).__module__.split(".")[0]
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x).tobytes()
    if mod == "torch":
        import torch

        t = x.detach().resolve_conj().resolve_neg().contiguous().cpu()
        if t.is_complex():
            t = torch.view_as_real(t)
        bits = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}[t.element_size()]
        return t.view(bits).numpy().tobytes()
    if mod in ("tensorflow", "keras"):
        return x.numpy().tobytes()
    return np.asarray(x).tobytes()  # jax


def dtype_of(x) -> str:
    """Canonical dtype name of a tensor, by the framework's own dtype name."""
    if isinstance(x, np.ndarray):
        return D.canonical_name(x.dtype)
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        return str(x.dtype).replace("torch.", "")
    if mod == "tensorflow":
        return x.dtype.name
    return D.canonical_name(np.dtype(x.dtype))


def framework_of(x) -> str:
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__.split(".")[0]
    return {"jaxlib": "jax", "jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}[mod]
