"""Nested structures of tensors: walk them, rebuild them, name the path on error.

Containers walked by default: ``dict`` and its subclasses (``OrderedDict``,
``defaultdict`` keep their type and default factory), ``list``, ``tuple``,
namedtuples and dataclass instances. ``None`` and every other object is a
leaf. Register your own containers with :func:`register_container`::

    >>> import tensorbridge as tb
    >>> class Pair:
    ...     def __init__(self, a, b): self.a, self.b = a, b
    >>> tb.register_container(Pair, lambda p: ([p.a, p.b], ["a", "b"], None),
    ...                       lambda aux, kids: Pair(*kids))
    >>> tb.tree_map(lambda x: x * 2, Pair(1, 2)).b
    4

An error raised for one leaf names where it is, e.g. ``at ['layers'][1]['weight']``.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Sequence

from .errors import ConversionError, TensorBridgeError, message

__all__ = ["register_container", "tree_map", "tree_leaves", "tree_leaves_with_path", "format_path"]

Flatten = Callable[[Any], "tuple[Sequence[Any], Sequence[Hashable], Any]"]
Unflatten = Callable[[Any, list], Any]


@dataclass(frozen=True)
class _Node:
    """A registered container: how to split it into children and rebuild it."""

    type: type
    flatten: Flatten  # obj -> (children, keys, aux)
    unflatten: Unflatten  # (aux, children) -> obj


_REGISTRY: dict[type, _Node] = {}
_LOCK = threading.Lock()
# Types already seen to be leaves; lets tree_map skip the container checks.
# Cleared whenever the registry changes.
_LEAF_TYPES: set[type] = set()


def register_container(cls: type, flatten: Flatten, unflatten: Unflatten, /) -> None:
    """Teach tensorbridge to walk instances of ``cls``.

    ``flatten(obj)`` returns ``(children, keys, aux)``: the child objects, a key
    for each (used in error paths and file names), and anything needed to
    rebuild. ``unflatten(aux, children)`` returns a new container.
    Thread-safe; registering a type twice replaces the first entry.
    """
    if not isinstance(cls, type):
        raise TypeError(f"Expected a class, got {cls!r}.")
    with _LOCK:
        _REGISTRY[cls] = _Node(cls, flatten, unflatten)
        _LEAF_TYPES.clear()


def format_path(keys: Sequence[Hashable]) -> str:
    """``('layers', 1, 'weight')`` -> ``"['layers'][1]['weight']"``."""
    return "".join(f"[{k!r}]" for k in keys)


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _rebuild_dict(tree: dict, items: dict) -> dict:
    t = type(tree)
    if t is dict:
        return items
    if isinstance(tree, defaultdict):
        return t(tree.default_factory, items)
    return t(items)


def _rebuild_dataclass(tree: Any, names: list[str], values: list) -> Any:
    new = copy.copy(tree)
    for name, value in zip(names, values):
        object.__setattr__(new, name, value)
    return new


def tree_map(fn: Callable[[Any], Any], tree: Any, /) -> Any:
    """Apply ``fn`` to every leaf and rebuild the containers around the results.

    >>> tree_map(lambda x: x + 1, {"a": [1, (2, 3)], "b": None})
    {'a': [2, (3, 4)], 'b': None}
    """
    try:
        return _map(fn, tree)
    except RecursionError:
        raise _too_deep() from None


def _too_deep() -> ConversionError:
    return ConversionError(message(
        "the structure", "it contains itself, or is nested deeper than Python's recursion limit",
        "break the cycle (a list or dict that holds itself), or flatten the structure"))


def _map(fn: Callable[[Any], Any], tree: Any) -> Any:
    t = type(tree)
    leaf = _LEAF_TYPES
    if t in leaf:
        return fn(tree)
    key: Any = None
    try:
        node = _REGISTRY.get(t)
        if node is not None:
            children, keys, aux = node.flatten(tree)
            res = []
            for key, value in zip(keys, children):
                res.append(_map(fn, value))
            return node.unflatten(aux, res)
        # Leaves of known type are mapped in place, saving a call per leaf.
        if t is dict or isinstance(tree, dict):
            out = {}
            for key, value in tree.items():
                out[key] = fn(value) if type(value) in leaf else _map(fn, value)
            return out if t is dict else _rebuild_dict(tree, out)
        if t is list or t is tuple:
            res = []
            for key, value in enumerate(tree):
                res.append(fn(value) if type(value) in leaf else _map(fn, value))
            return res if t is list else tuple(res)
        if tree is None:
            return None
        if _is_namedtuple(tree):
            res = []
            for key, value in zip(tree._fields, tree):
                res.append(_map(fn, value))
            return t(*res)
        if isinstance(tree, (list, tuple)):
            res = []
            for key, value in enumerate(tree):
                res.append(_map(fn, value))
            return t(res)
        if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
            names = [f.name for f in dataclasses.fields(tree)]
            res = []
            for key in names:
                res.append(_map(fn, getattr(tree, key)))
            return _rebuild_dataclass(tree, names, res)
    except TensorBridgeError as exc:
        raise exc.at(format_path([key])) from exc.__cause__
    _LEAF_TYPES.add(t)
    return fn(tree)


def tree_leaves(tree: Any, /) -> list[Any]:
    """Every leaf in order, as :func:`tree_leaves_with_path` yields them, without
    building paths (the fast walk; find a path afterwards if one is needed).

    >>> tree_leaves({"enc": {"w": 1, "layers": [2, 3]}, "skip": None})
    [1, 2, 3]
    """
    out: list[Any] = []
    try:
        _collect(tree, out)
    except RecursionError:
        raise _too_deep() from None
    return out


def _collect(tree: Any, out: list[Any]) -> None:
    t = type(tree)
    leaf = _LEAF_TYPES
    if t in leaf:
        out.append(tree)
        return
    if tree is None:
        return
    node = _REGISTRY.get(t)
    children: Any
    if node is not None:
        children = node.flatten(tree)[0]
    elif isinstance(tree, dict):
        children = tree.values()
    elif isinstance(tree, (list, tuple)):  # namedtuples too, in field order
        children = tree
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        children = [getattr(tree, f.name) for f in dataclasses.fields(tree)]
    else:
        out.append(tree)
        return
    for value in children:
        if type(value) in leaf:
            out.append(value)
        else:
            _collect(value, out)


def tree_leaves_with_path(tree: Any, /) -> Iterator[tuple[tuple, Any]]:
    """Yield ``(path, leaf)`` pairs in order; ``path`` is a tuple of keys.

    ``None`` is skipped (it is structure, not data).

    >>> list(tree_leaves_with_path({"enc": {"w": 1, "layers": [2, 3]}}))
    [(('enc', 'w'), 1), (('enc', 'layers', 0), 2), (('enc', 'layers', 1), 3)]
    """
    try:
        yield from _leaves(tree, ())
    except RecursionError:
        raise _too_deep() from None


def _leaves(tree: Any, path: tuple) -> Iterator[tuple[tuple, Any]]:
    if tree is None:
        return
    t = type(tree)
    if t in _REGISTRY:
        children, keys, _ = _REGISTRY[t].flatten(tree)
        items: Any = zip(keys, children)
    elif isinstance(tree, dict):
        items = tree.items()
    elif _is_namedtuple(tree):
        items = zip(tree._fields, tree)
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        items = ((f.name, getattr(tree, f.name)) for f in dataclasses.fields(tree))
    else:
        yield path, tree
        return
    for key, value in items:
        yield from _leaves(value, path + (key,))
