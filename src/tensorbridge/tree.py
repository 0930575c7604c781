"""Nested structures of tensors: walk them, rebuild them, name the path on error.

One registry says how to take each kind of container apart and put it back
together. Every container comes back as the same type, with all its items
converted and its instance attributes kept (``state_dict()._metadata``,
``BatchEncoding``'s encodings), or is refused with an error that names its
path. Known kinds, subclasses included (their ``__init__`` is never called):

- ``dict`` (``OrderedDict``, ``defaultdict`` with its factory, ``Counter``...),
  ``list``, ``tuple``, namedtuples and struct sequences (``torch.return_types``),
  ``collections.deque`` (with ``maxlen``), ``UserDict`` (Hugging Face's
  ``BatchEncoding``), ``UserList``, ``ChainMap``, ``types.MappingProxyType``,
  ``types.SimpleNamespace`` and dataclass instances.
- Other containers (anything implementing the ``Mapping``, ``Sequence`` or
  ``Set`` ABCs that is not above, sets, or a known container whose instance
  attributes hold tensors) are refused when they hold tensors, since they would
  come back with their tensors unconverted; without tensors they are leaves.
- ``None`` is structure; strings, bytes and every other object are leaves.

Register your own containers with :func:`register_container`::

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

import array
import collections
import collections.abc as abc
import copy
import dataclasses
import sys
import threading
import types
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConversionError, TensorBridgeError, message

__all__ = ["register_container", "tree_map", "tree_leaves", "tree_leaves_with_path", "format_path"]

Flatten = Callable[[Any], "tuple[Sequence[Any], Sequence[Hashable], Any]"]
Unflatten = Callable[[Any, list], Any]


@dataclass(frozen=True)
class _Node:
    """A kind of container: how to split it into children and rebuild it."""

    type: type
    flatten: Flatten  # obj -> (children, keys, aux)
    unflatten: Unflatten  # (aux, children) -> obj
    #: a kind tensorbridge cannot rebuild: a leaf when it holds no tensor, else refused
    opaque: str = ""


#: containers registered by users, by exact type
_REGISTRY: dict[type, _Node] = {}
_LOCK = threading.Lock()
#: type -> its node, or None for a leaf; resolved once per type, cleared on registration
_KINDS: dict[type, _Node | None] = {}
# Types already seen to be leaves; lets the walks skip the lookups. Cleared with _KINDS.
_LEAF_TYPES: set[type] = set()
# Never containers, although str, bytes... implement the Sequence ABC.
_ATOMS = (str, bytes, bytearray, memoryview, range, array.array, int, float, complex)
_BUILTINS = (dict, list, tuple, type(None))


def register_container(cls: type, flatten: Flatten, unflatten: Unflatten, /) -> None:
    """Teach tensorbridge to walk instances of ``cls`` (exactly this type).

    ``flatten(obj)`` returns ``(children, keys, aux)``: the child objects, a key
    for each (used in error paths and file names), and anything needed to
    rebuild. ``unflatten(aux, children)`` returns a new container.
    Thread-safe; registering a type twice replaces the first entry.
    """
    if not isinstance(cls, type):
        raise TypeError(f"Expected a class, got {cls!r}.")
    if cls in _BUILTINS:
        raise TypeError(
            f"Expected a class of your own, got the built-in {cls.__name__!r}; "
            "register a subclass instead."
        )
    with _LOCK:
        _REGISTRY[cls] = _Node(cls, flatten, unflatten)
        _KINDS.clear()
        _LEAF_TYPES.clear()


def format_path(keys: Sequence[Hashable]) -> str:
    """``('layers', 1, 'weight')`` -> ``"['layers'][1]['weight']"``."""
    return "".join(f"[{k!r}]" for k in keys)


# -- rebuilding without calling __init__ ----------------------------------------


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _slots(cls: type) -> list[str]:
    names = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for s in (slots,) if isinstance(slots, str) else slots:
            if s not in ("__dict__", "__weakref__"):
                names.append(s)
    return names


def _attributes(obj: Any, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The instance attributes of ``obj`` (``__dict__`` and slots), less ``skip``."""
    state = getattr(obj, "__dict__", None)
    out = {k: v for k, v in state.items() if k not in skip} if isinstance(state, dict) else {}
    for s in _slots(type(obj)):
        if s in skip:
            continue
        try:
            out[s] = object.__getattribute__(obj, s)
        except AttributeError:
            pass
    return out


def _blank(obj: Any) -> Any:
    """A new, empty instance of ``type(obj)`` with the same instance attributes, made
    without calling ``__init__`` (whose signature tensorbridge cannot know)."""
    cls: Any = type(obj)
    try:
        new = cls.__new__(cls)
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict) and state:
            object.__getattribute__(new, "__dict__").update(state)
        for s in _slots(cls):
            try:
                object.__setattr__(new, s, object.__getattribute__(obj, s))
            except AttributeError:
                pass
    except Exception as exc:
        raise ConversionError(
            message(
                f"a {_name(cls)}",
                f"it cannot be rebuilt without calling its constructor "
                f"({type(exc).__name__}: {exc})",
                f"register it with tb.register_container({cls.__name__}, flatten, unflatten)",
            )
        ) from exc
    return new


def _check_attributes(obj: Any, skip: Sequence[str] = ()) -> None:
    """Instance attributes are kept as they are: refuse the ones that hold tensors,
    which would come back unconverted."""
    for name, value in _attributes(obj, skip).items():
        if _holds_tensor(value, set()):
            raise ConversionError(
                message(
                    f"the attribute {name!r} of a {_name(type(obj))}",
                    "instance attributes are kept as they are, so its tensors would be left unconverted",
                    "move the tensors into the container's items, or register the type with "
                    "tb.register_container",
                )
            ).at(f".{name}")


def _dict_flatten(d: dict) -> tuple[list, list, Any]:
    if type(d) is dict:
        return list(d.values()), list(d), (d, None)
    # the items as stored: a subclass's __iter__/__getitem__ may compute or hide items
    keys = list(
        collections.OrderedDict.keys(d) if isinstance(d, collections.OrderedDict) else dict.keys(d)
    )
    items = [dict.__getitem__(d, k) for k in keys]
    # attributes that are the very object of the item of their name (transformers'
    # ModelOutput) are rebuilt from the converted item
    attrs = _attributes(d)
    mirrored = [
        k
        for k, v in zip(keys, items, strict=True)
        if isinstance(k, str) and k in attrs and attrs[k] is v
    ]
    _check_attributes(d, mirrored)
    return items, keys, (d, keys, mirrored)


def _dict_unflatten(aux: Any, kids: list) -> dict:
    d, keys = aux[:2]
    if type(d) is dict:
        return dict(zip(d, kids, strict=True))
    new = _blank(d)
    if isinstance(d, collections.defaultdict):
        new.default_factory = d.default_factory
    # the base class's own setitem: a subclass's __setitem__ may transform or refuse items
    setitem = (
        collections.OrderedDict.__setitem__
        if isinstance(d, collections.OrderedDict)
        else dict.__setitem__
    )
    for k, v in zip(keys, kids, strict=True):
        setitem(new, k, v)
    for k in aux[2]:
        object.__setattr__(new, k, dict.__getitem__(new, k))
    return new


def _list_flatten(x: list) -> tuple[list, range, Any]:
    if type(x) is not list:
        _check_attributes(x)
    return list(x), range(len(x)), x


def _list_unflatten(x: list, kids: list) -> list:
    if type(x) is list:
        return kids
    new = _blank(x)
    list.extend(new, kids)
    return new


def _tuple_flatten(x: tuple) -> tuple[list, Sequence, Any]:
    if type(x) is not tuple:
        _check_attributes(x)
    fields = getattr(type(x), "_fields", None)
    keys = fields if isinstance(fields, tuple) and len(fields) == len(x) else range(len(x))
    return list(x), keys, x


def _tuple_unflatten(x: tuple, kids: list) -> tuple:
    cls = type(x)
    if cls is tuple:
        return tuple(kids)
    if all(a is b for a, b in zip(kids, x, strict=True)):
        return x  # immutable, and nothing in it changed (torch.Size, a tuple of ints)
    # a struct sequence (os.stat_result, torch.return_types) is built from its sequence;
    # namedtuples too, through tuple.__new__, which skips a __new__ that takes the fields.
    # tuple.__new__ refuses C subclasses (torch.Size): those take their sequence.
    try:
        new = cls(kids) if hasattr(cls, "n_sequence_fields") else tuple.__new__(cls, kids)
    except TypeError:
        new = cls(kids)
    attrs = _attributes(x)
    if attrs:
        object.__getattribute__(new, "__dict__").update(attrs)
    return new


def _deque_flatten(x: collections.deque) -> tuple[list, range, Any]:
    _check_attributes(x)
    return list(x), range(len(x)), x


def _deque_unflatten(x: collections.deque, kids: list) -> collections.deque:
    new = _blank(x)
    collections.deque.__init__(new, kids, x.maxlen)
    return new


def _userdict_flatten(x: collections.UserDict) -> tuple[list, list, Any]:
    _check_attributes(x, ("data",))
    children, keys, aux = _dict_flatten(x.data)
    return children, keys, (x, aux)


def _userdict_unflatten(aux: Any, kids: list) -> collections.UserDict:
    x, data = aux
    new = _blank(x)
    new.data = _dict_unflatten(data, kids)
    return new


def _userlist_flatten(x: collections.UserList) -> tuple[list, range, Any]:
    _check_attributes(x, ("data",))
    return list(x.data), range(len(x.data)), x


def _userlist_unflatten(x: collections.UserList, kids: list) -> collections.UserList:
    new = _blank(x)
    new.data = _list_unflatten(x.data, kids)
    return new


def _chainmap_flatten(x: collections.ChainMap) -> tuple[list, range, Any]:
    _check_attributes(x, ("maps",))
    return list(x.maps), range(len(x.maps)), x


def _chainmap_unflatten(x: collections.ChainMap, kids: list) -> collections.ChainMap:
    new = _blank(x)
    new.maps = kids
    return new


def _proxy_flatten(x: types.MappingProxyType) -> tuple[list, list, Any]:
    under = x.copy()  # a shallow copy of the mapping behind the proxy, of its own type
    if not isinstance(under, dict):
        under = dict(under)
    children, keys, aux = _dict_flatten(under)
    return children, keys, aux


def _proxy_unflatten(aux: Any, kids: list) -> types.MappingProxyType:
    return types.MappingProxyType(_dict_unflatten(aux, kids))


def _namespace_flatten(x: types.SimpleNamespace) -> tuple[list, list, Any]:
    names = list(vars(x))
    return [getattr(x, n) for n in names], names, (x, names)


def _namespace_unflatten(aux: Any, kids: list) -> types.SimpleNamespace:
    x, names = aux
    new = _blank(x)
    for n, v in zip(names, kids, strict=True):
        setattr(new, n, v)
    return new


def _dataclass_flatten(x: Any) -> tuple[list, list, Any]:
    names = [f.name for f in dataclasses.fields(x)]
    _check_attributes(x, names)
    return [getattr(x, n) for n in names], names, (x, names)


def _dataclass_unflatten(aux: Any, kids: list) -> Any:
    x, names = aux
    new = copy.copy(x)
    for name, value in zip(names, kids, strict=True):
        object.__setattr__(new, name, value)
    return new


def _opaque_items(x: Any) -> Any:
    return x.values() if isinstance(x, abc.Mapping) else x


# (base class, flatten, unflatten), most specific first; the first base a type derives from wins
_KNOWN: list[tuple[type, Flatten, Unflatten]] = [
    (collections.UserDict, _userdict_flatten, _userdict_unflatten),
    (collections.UserList, _userlist_flatten, _userlist_unflatten),
    (collections.ChainMap, _chainmap_flatten, _chainmap_unflatten),
    (collections.deque, _deque_flatten, _deque_unflatten),
    (types.MappingProxyType, _proxy_flatten, _proxy_unflatten),
    (types.SimpleNamespace, _namespace_flatten, _namespace_unflatten),
    (dict, _dict_flatten, _dict_unflatten),
    (list, _list_flatten, _list_unflatten),
    (tuple, _tuple_flatten, _tuple_unflatten),
]
_SET = "a set has no order to keep, and NumPy arrays cannot be set members"
_UNKNOWN = "tensorbridge does not know how to rebuild it, so its tensors would be left unconverted"


def _is_tensor_type(tp: type) -> bool:
    from .frameworks import backend_of

    return backend_of(tp) is not None


def _is_mlx_module(tp: type) -> bool:
    nn = sys.modules.get("mlx.nn")
    module = getattr(nn, "Module", None)
    return isinstance(module, type) and issubclass(tp, module)


def _foreign_to_mlx(x: Any) -> bool:
    """True when a tensor that is not an MLX array is somewhere inside ``x`` (a model's
    items: arrays, modules, and the dicts, lists and tuples that hold them)."""
    if isinstance(x, dict):
        return any(_foreign_to_mlx(v) for v in dict.values(x))
    if isinstance(x, (list, tuple)):
        return any(_foreign_to_mlx(v) for v in x)
    tp = type(x)
    return _is_tensor_type(tp) and not tp.__module__.startswith("mlx.")


def _mlx_module_unflatten(aux: Any, kids: list) -> Any:
    """An ``mlx.nn.Module`` (a dict of its parameters and submodules) rebuilt with MLX
    arrays; with another framework's tensors it would be a model that cannot run."""
    if any(_foreign_to_mlx(k) for k in kids):
        cls = type(aux[0])
        raise ConversionError(
            message(
                f"an MLX model ({_name(cls)})",
                "its parameters would become other tensors inside an mlx.nn.Module, which "
                "could then not run",
                "convert its parameters: model.parameters() (nested dicts and lists; "
                "model.update() takes them back), or dict(mlx.utils.tree_flatten("
                "model.parameters())) for flat names such as 'layers.0.weight'; "
                "tb.save(model, path) saves it as it is",
            )
        )
    return _dict_unflatten(aux, kids)


def _resolve(tp: type) -> _Node | None:
    if tp in _REGISTRY:
        return _REGISTRY[tp]
    if issubclass(tp, _ATOMS) or _is_tensor_type(tp):
        return None
    if _is_mlx_module(tp):
        return _Node(tp, _dict_flatten, _mlx_module_unflatten)
    for base, flatten, unflatten in _KNOWN:
        if issubclass(tp, base):
            return _Node(tp, flatten, unflatten)
    if dataclasses.is_dataclass(tp):
        return _Node(tp, _dataclass_flatten, _dataclass_unflatten)
    if issubclass(tp, (abc.Set, abc.Mapping, abc.Sequence)):
        why = _SET if issubclass(tp, abc.Set) else _UNKNOWN
        return _Node(tp, _no_flatten, _no_flatten, opaque=why)
    return None


def _no_flatten(*args: Any) -> Any:
    raise AssertionError("opaque containers are never taken apart")


def _node_of(tp: type) -> _Node | None:
    """The node for containers of type ``tp``, or None for a leaf (cached per type)."""
    try:
        return _KINDS[tp]
    except KeyError:
        node = _KINDS[tp] = _resolve(tp)
        return node


_PLAIN = {int, float, str, bool, bytes, type(None)}


def _holds_tensor(x: Any, seen: set[int]) -> bool:
    """True when a tensor of any framework is somewhere inside ``x`` (opaque containers too)."""
    tp = type(x)
    if tp is dict or tp is list or tp is tuple:
        if id(x) in seen:
            return False
        seen.add(id(x))
        return any(
            _holds_tensor(c, seen)
            for c in (x.values() if tp is dict else x)
            if type(c) not in _PLAIN
        )
    if x is None or tp in _PLAIN:
        return False
    node = _node_of(tp)
    if node is None:
        return _is_tensor_type(tp)
    if id(x) in seen:
        return False
    seen.add(id(x))
    try:
        children = _opaque_items(x) if node.opaque else node.flatten(x)[0]
        return any(_holds_tensor(c, seen) for c in children)
    except TensorBridgeError:
        return True  # an attribute inside holds a tensor
    except Exception:  # noqa: BLE001 - a container that cannot even be iterated
        return False


def _refuse(x: Any, node: _Node) -> None:
    """An opaque container: a leaf when it holds no tensor, else refused."""
    if _holds_tensor(x, set()):
        tp = type(x)
        fix = (
            "put the tensors in a list or tuple"
            if node.opaque is _SET
            else (
                f"convert a dict or list of its items instead (e.g. dict(x) or list(x)), or "
                f"register the type with tb.register_container({tp.__name__}, flatten, unflatten)"
            )
        )
        raise ConversionError(message(f"a {_name(tp)} holding tensors", node.opaque, fix))


def _unflatten(node: _Node, aux: Any, children: list) -> Any:
    try:
        return node.unflatten(aux, children)
    except TensorBridgeError:
        raise
    except Exception as exc:
        if _REGISTRY.get(node.type) is node:
            raise  # the user's own function: their exception, as it is
        raise ConversionError(
            message(
                f"a {_name(node.type)}",
                f"it could not be rebuilt ({type(exc).__name__}: {exc})",
                f"register it with tb.register_container({node.type.__name__}, flatten, unflatten)",
            )
        ) from exc


# -- the walks ------------------------------------------------------------------


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
    return ConversionError(
        message(
            "the structure",
            "it contains itself, or is nested deeper than Python's recursion limit",
            "break the cycle (a list or dict that holds itself), or flatten the structure",
        )
    )


def _map(fn: Callable[[Any], Any], tree: Any) -> Any:
    t = type(tree)
    leaf = _LEAF_TYPES
    if t in leaf:
        return fn(tree)
    key: Any = None
    try:
        # The plain kinds first, with leaves of known type mapped in place (a call per leaf saved).
        if t is dict:
            out = {}
            for key, value in tree.items():
                out[key] = fn(value) if type(value) in leaf else _map(fn, value)
            return out
        if t is list or t is tuple:
            res = []
            for key, value in enumerate(tree):  # noqa: B007 - key names the path if it raises
                res.append(fn(value) if type(value) in leaf else _map(fn, value))
            return res if t is list else tuple(res)
        if tree is None:
            return None
        node = _node_of(t)
        if node is None:
            leaf.add(t)
            return fn(tree)
        if node.opaque:
            _refuse(tree, node)
            return fn(tree)
        children, keys, aux = node.flatten(tree)
        res = []
        for key, value in zip(keys, children, strict=True):  # noqa: B007 - as above
            res.append(fn(value) if type(value) in leaf else _map(fn, value))
    except TensorBridgeError as exc:
        if key is not None:
            exc.at(format_path([key]))
        raise exc from exc.__cause__
    return _unflatten(node, aux, res)


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
    except TensorBridgeError:
        for _ in tree_leaves_with_path(tree):  # walk again to raise it with its path
            pass
        raise
    return out


def _collect(tree: Any, out: list[Any]) -> None:
    t = type(tree)
    leaf = _LEAF_TYPES
    if t in leaf:
        out.append(tree)
        return
    if tree is None:
        return
    children: Any
    if t is dict:
        children = tree.values()
    elif t is list or t is tuple:
        children = tree
    else:
        node = _node_of(t)
        if node is None or node.opaque:
            if node is not None:
                _refuse(tree, node)
            out.append(tree)
            return
        children = node.flatten(tree)[0]
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
    if t is dict:
        items: Any = tree.items()
    elif t is list or t is tuple:
        items = enumerate(tree)
    else:
        node = _node_of(t)
        if node is None or node.opaque:
            if node is not None:
                try:
                    _refuse(tree, node)
                except TensorBridgeError as exc:
                    raise exc.at(format_path(path)) from exc.__cause__
            yield path, tree
            return
        try:
            children, keys, _ = node.flatten(tree)
        except TensorBridgeError as exc:
            raise exc.at(format_path(path)) from exc.__cause__
        items = zip(keys, children, strict=True)
    for key, value in items:
        yield from _leaves(value, path + (key,))
