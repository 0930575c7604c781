"""The table of frameworks. Add one by adding a module with ``BACKEND`` and a row.

Framework modules never import their framework at import time; a backend is
asked about an object only when that framework is already in ``sys.modules``,
so ``import tensorbridge`` pulls in no framework.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from ..errors import ConversionError, message
from .base import Backend, Facts, Step

__all__ = [
    "FRAMEWORK_MODULES",
    "TARGETS",
    "ALIASES",
    "get_backend",
    "backend_of",
    "Backend",
    "Facts",
    "Step",
]

#: public framework name -> (module under tensorbridge.frameworks, top-level module it serves).
#: "protocol" serves no module: any object that speaks DLPack or an array interface, consulted
#: after the frameworks; it is a source only (see TARGETS).
FRAMEWORK_MODULES: dict[str, tuple[str, str]] = {
    "numpy": ("numpy", "numpy"),
    "torch": ("torch", "torch"),
    "tensorflow": ("tensorflow", "tensorflow"),
    "jax": ("jax", "jax"),
    "cupy": ("cupy", "cupy"),
    "mlx": ("mlx", "mlx.core"),
    "protocol": ("protocol", ""),
}
#: the names ``to=`` takes
TARGETS = tuple(name for name, (_, top) in FRAMEWORK_MODULES.items() if top)
ALIASES = {"np": "numpy", "pytorch": "torch", "tf": "tensorflow", "cp": "cupy", "mx": "mlx"}

_BACKENDS: dict[str, Backend] = {}
_BY_TYPE: dict[type, Backend | None] = {}


def get_backend(name: str) -> Backend:
    """The backend for a framework name (``"torch"``, ``"tf"``, ...)."""
    key = ALIASES.get(name, name)
    backend = _BACKENDS.get(key)
    if backend is None:
        row = FRAMEWORK_MODULES.get(key)
        if row is None:
            raise ConversionError(
                message(
                    f"to={name!r}",
                    "it is not a framework tensorbridge knows",
                    "use one of " + ", ".join(TARGETS),
                )
            )
        backend = importlib.import_module(f"{__name__}.{row[0]}").BACKEND
        _BACKENDS[key] = backend
    return backend


def backend_of(tp: type) -> Backend | None:
    """The backend whose tensors have type ``tp``, or None. Cached per type;
    only frameworks already imported by the caller are consulted."""
    try:
        return _BY_TYPE[tp]
    except KeyError:
        pass
    found = None
    for name, (_, top) in FRAMEWORK_MODULES.items():
        if not top or top in sys.modules:
            backend = get_backend(name)
            if backend.owns(tp):
                found = backend
                break
    # An instance of a framework type only exists once its framework is imported,
    # so a miss can be cached too.
    _BY_TYPE[tp] = found
    return found


def describe(x: Any) -> str:
    """A short human description of a value, for messages."""
    backend = backend_of(type(x))
    if backend is None:
        return f"a {type(x).__module__}.{type(x).__qualname__}"
    try:
        f = backend.facts(x)
    except Exception:
        return f"a {backend.name} {type(x).__name__}"
    return f"{backend.name} {type(x).__name__} {f.dtype}{list(f.shape)} on {f.device}"
