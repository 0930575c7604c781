"""The object a checkpoint saved, as a flat table of named tensors plus metadata.

Nested dicts, lists and tuples are walked and their keys joined with ``.``
(``{"model": {"w": t}, "layers": [t0]}`` gives ``model.w`` and ``layers.0``); a
bare saved tensor is named ``tensor``. Plain leaves that are not tensors (ints,
floats, complex numbers, bools, None, strings, bytes, torch dtypes) become metadata
text under their joined path: ``repr`` text, a string as itself.

The walk is budgeted: a pickle can reuse one container through its memo many times
(a "billion laughs"), so the number of entries visited and the characters of names
and metadata text built are capped in proportion to the pickle (see :func:`flatten`).
"""

from __future__ import annotations

from typing import Any

from ..errors import FileFormatError, UnsafeContentError
from .names import check_unique
from .pt_pickle import _DType, _Refused, _Tensor, brief

__all__ = ["MAX_DEPTH", "flatten"]

#: Entries the walk may visit per opcode of the pickle, plus a floor: without memo
#: reuse every entry is visited once, so a real checkpoint stays far below.
VISITS_PER_OP = 4
VISITS_FLOOR = 100_000
#: Characters of names and metadata text per byte of the pickle, plus a floor.
TEXT_PER_BYTE = 16
TEXT_FLOOR = 16 << 20

#: Containers nested deeper than this are refused (flattening recurses).
MAX_DEPTH = 100

_SCALARS = (str, int, float, complex, bool, bytes, type(None))


def flatten(
    obj: Any,
    path: str,
    ops: int = 0,
    nbytes: int = 0,
) -> tuple[list[tuple[str, _Tensor]], dict[str, str]]:
    """Split the saved tree into ``(name, tensor)`` pairs and scalar metadata.

    ``ops`` and ``nbytes`` (the pickle's opcode count and size) set the budget: at most
    ``VISITS_PER_OP * ops + VISITS_FLOOR`` entries are visited and
    ``TEXT_PER_BYTE * nbytes + TEXT_FLOOR`` characters of names and text built.
    """
    tensors: list[tuple[str, _Tensor]] = []
    scalars: dict[str, str] = {}
    active: set[int] = set()
    visits = VISITS_PER_OP * ops + VISITS_FLOOR
    text = TEXT_PER_BYTE * nbytes + TEXT_FLOOR

    def amplified() -> FileFormatError:
        return FileFormatError(
            "the saved object reuses its containers so often (through the pickle memo) that "
            "listing it would build far more than the file holds (an amplification attack, "
            "or a very unusual checkpoint). Fix: save a plain dict of tensors, each container "
            "once.",
            path,
        )

    def walk(node: Any, name: str, depth: int) -> None:
        nonlocal visits, text
        visits -= 1
        text -= len(name)
        if visits < 0 or text < 0:
            raise amplified()
        if isinstance(node, _Tensor):
            tensors.append((name, node))
            return
        if isinstance(node, _Refused):
            raise FileFormatError(
                f"the entry {brief(name or 'tensor')} is {node.what}. Fix: {node.fix}.", path
            )
        if isinstance(node, _DType):
            node = f"torch.{node.name}"
        if isinstance(node, _SCALARS):
            if not name:
                return
            if name in scalars:
                raise UnsafeContentError(
                    f"the value name {brief(name)} appears more than once. Fix: use unique keys.",
                    path,
                )
            value = node if isinstance(node, str) else repr(node)
            text -= len(value)
            if text < 0:
                raise amplified()
            scalars[name] = value
            return
        if not isinstance(node, (dict, list, tuple)):
            raise FileFormatError(
                f"the entry {brief(name or '(top level)')} is a {type(node).__name__}, not a "
                "tensor, container or plain value. Fix: save a (nested) dict of tensors.",
                path,
            )
        if depth > MAX_DEPTH or id(node) in active:
            raise FileFormatError(
                f"the entry {brief(name)} is nested more than {MAX_DEPTH} deep or contains "
                "itself. Fix: save a flat or shallow dict of tensors.",
                path,
            )
        active.add(id(node))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            walk(value, f"{name}.{key}" if name else str(key), depth + 1)
        active.discard(id(node))

    walk(obj, "tensor" if isinstance(obj, (_Tensor, _Refused)) else "", 0)
    check_unique([n for n, _ in tensors], path)
    return tensors, scalars
