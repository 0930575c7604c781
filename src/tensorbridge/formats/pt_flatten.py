"""The object a checkpoint saved, as a flat table of named tensors plus metadata.

Nested dicts, lists and tuples are walked and their keys joined with ``.``
(``{"model": {"w": t}, "layers": [t0]}`` gives ``model.w`` and ``layers.0``); a
bare saved tensor is named ``tensor``. Plain leaves that are not tensors (ints,
floats, complex numbers, bools, None, strings, bytes, torch dtypes) become metadata
text under their joined path: ``repr`` text, a string as itself.
"""

from __future__ import annotations

from typing import Any

from ..errors import FileFormatError, UnsafeContentError
from .names import check_unique
from .pt_pickle import _DType, _Tensor

__all__ = ["MAX_DEPTH", "flatten"]

#: Containers nested deeper than this are refused (flattening recurses).
MAX_DEPTH = 100

_SCALARS = (str, int, float, complex, bool, bytes, type(None))


def flatten(obj: Any, path: str) -> tuple[list[tuple[str, _Tensor]], dict[str, str]]:
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
