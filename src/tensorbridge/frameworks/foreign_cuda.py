"""JAX and CuPy CUDA arrays into torch's pinned staging ring, through DLPack.

``to_numpy`` moves a tree's CUDA torch tensors to the host in one coalesced
transfer (:mod:`.torch_staging`). JAX and CuPy arrays on a CUDA device take the
same path: each is wrapped zero-copy as a torch tensor with ``torch.from_dlpack``
(the producer makes torch's current stream wait until its data is ready, as the
DLPack protocol asks), then staged with the rest.

Nothing here initialises a framework: JAX counts only once its CUDA backend is
already running (an array can then exist on it), CuPy once it is imported.
torch must be importable with CUDA. When torch's CUDA is not running yet (torch
not imported, or imported without touching a GPU), it is imported and started for
this only when the tree's JAX/CuPy CUDA arrays hold at least
:data:`IMPORT_TORCH_BYTES` (that costs seconds, a pinned ring block and a device
memory cache, once, which a transfer of that size repays); smaller trees keep
``jax.device_get`` / ``cupy.ndarray.get``. An array that cannot be wrapped (sharded over several
devices, a dtype torch lacks, a deleted buffer) also keeps its own framework's
path.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["IMPORT_TORCH_BYTES", "jax_cuda_running", "live_types", "cuda_arrays", "wrap"]

#: The least JAX/CuPy CUDA bytes in one call for which torch is imported to stage them.
IMPORT_TORCH_BYTES = 256 * (1 << 20)

_CUDA_PLATFORMS = frozenset({"cuda", "gpu"})


_xla_bridge: Any = None


def jax_cuda_running() -> bool:
    """True when JAX's CUDA backend is initialised (asks without initialising it:
    JAX's table of the backends it has started, where the CUDA one is ``"cuda"``)."""
    global _xla_bridge
    if _xla_bridge is None:
        if "jax" not in sys.modules:
            return False
        try:
            from jax._src import xla_bridge
        except ImportError:
            return False
        _xla_bridge = xla_bridge
    backends = getattr(_xla_bridge, "_backends", None)
    return isinstance(backends, dict) and not _CUDA_PLATFORMS.isdisjoint(backends)


def live_types() -> tuple[type, ...]:
    """The JAX/CuPy array types that may hold CUDA memory in this process now."""
    types: list[type] = []
    if jax_cuda_running():
        types.append(sys.modules["jax"].Array)
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        types.append(cupy.ndarray)
    return tuple(types)


def _on_one_cuda_device(x: Any) -> bool:
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return True
    try:
        devices = x.devices()
        if len(devices) != 1 or not x.is_fully_addressable:
            return False
        return next(iter(devices)).platform in _CUDA_PLATFORMS
    except Exception:  # a tracer, a deleted or donated buffer: its own path reports it
        return False


def cuda_arrays(leaves: list[Any], types: tuple[type, ...]) -> list[Any]:
    """The leaves that are JAX/CuPy arrays on one CUDA device (each once)."""
    found, seen = [], set()
    for leaf in leaves:
        if isinstance(leaf, types) and id(leaf) not in seen and _on_one_cuda_device(leaf):
            seen.add(id(leaf))
            found.append(leaf)
    return found


def _load_torch(arrays: list[Any]) -> Any | None:
    """torch with CUDA, or None. Where torch's CUDA is not running yet, it is
    imported and started here only for big enough transfers: starting it pins a
    64 MiB ring block and gives torch a cache of device memory, for good."""
    torch: Any = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return torch
    except Exception:
        return None
    if sum(int(a.nbytes) for a in arrays) < IMPORT_TORCH_BYTES:
        return None
    try:
        import torch

        return torch if torch.cuda.is_available() else None
    except Exception:  # a broken install (missing shared libraries raise OSError)
        return None


def wrap(arrays: list[Any]) -> list[tuple[Any, Any]]:
    """``(array, torch CUDA tensor sharing its memory)`` for each array that DLPack
    can hand to torch; the others are left out (they take their own path)."""
    if not arrays:
        return []
    torch = _load_torch(arrays)
    if torch is None:
        return []
    from .torch_staging import _numpy_dtype

    pairs = []
    for a in arrays:
        try:
            t = torch.from_dlpack(a)
            if not t.is_cuda or tuple(t.shape) != tuple(a.shape):
                continue
            if _numpy_dtype(t.dtype) != a.dtype:  # one the ring returns, and the same
                continue
        except Exception:
            continue
        pairs.append((a, t))
    return pairs
