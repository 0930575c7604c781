"""The public file API: save a tree of tensors, load it back, or open a file lazily.

Every format goes through the table in :mod:`tensorbridge.formats`; the format
comes from ``format=`` or the path's suffix (``.npy``, ``.npz``,
``.safetensors``, ``.pt``, ``.h5``, a sharded ``*.index.json``).

Names. A tree is flattened to ``.``-joined names:
``{"enc": {"w": a, "layers": [b, c]}}`` is saved as ``enc.w``,
``enc.layers.0`` and ``enc.layers.1``. A single bare tensor is named
``"array"`` (the name a ``.npy`` file's one tensor has). ``load(nested=True)``
splits names on ``.`` again and turns dicts whose keys are exactly
``0..n-1`` into lists.

Leaves. Every leaf must be a tensor of a framework that is in use (NumPy,
torch, TensorFlow, JAX, CuPy) or a Python ``bool``/``int``/``float``/``complex``
(saved as a 0-d array). Anything else is refused, naming its path, before a
byte is written. Tensors are converted to NumPy one at a time, while they are
written, so a tree of GPU tensors never sits in host memory all at once.

>>> import numpy as np, tempfile, os, tensorbridge.files as tbf
>>> p = os.path.join(tempfile.mkdtemp(), "m.npz")
>>> tbf.save({"enc": {"w": np.ones(2, np.float32), "layers": [np.zeros(1), np.arange(2)]}}, p)
>>> sorted(tbf.load(p))
['enc.layers.0', 'enc.layers.1', 'enc.w']
>>> tbf.load(p, nested=True)["enc"]["layers"][1]
array([0, 1])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from .convert import convert
from .dtypes import canonical_name
from .errors import (
    CheckpointChangedError,
    ConversionError,
    FileFormatError,
    TensorBridgeError,
    message,
)
from .formats import Reader, TensorInfo, format_for_path
from .formats.base import Format, check_metadata
from .formats.mapping import LoadReads, should_map
from .formats.names import check_unique
from .frameworks import backend_of, describe, get_backend
from .frameworks.numpy import refuse_masked
from .frameworks.protocol import stand_in
from .tree import format_path, tree_leaves_with_path

__all__ = [
    "save",
    "load",
    "open",
    "iter_tensors",
    "flatten_names",
    "unflatten_names",
    "tensor_info",
    "to_host",
    "check_metadata",
    "write_options",
    "file_path",
    "open_reader",
]

#: The name a single bare tensor gets (and the name of a .npy file's tensor).
BARE_NAME = "array"
_SCALARS = (bool, int, float, complex)


def flatten_names(tree: Any, /) -> dict[str, Any]:
    """Flatten a tree to ``{dotted name: leaf}`` in tree order.

    ``None`` leaves are skipped; a bare leaf is named ``"array"``. Names that
    repeat (``{"a.b": x, "a": {"b": y}}``) are refused.

    >>> flatten_names({"enc": {"w": 1, "layers": [2, 3]}})
    {'enc.w': 1, 'enc.layers.0': 2, 'enc.layers.1': 3}
    """
    named = [(name, leaf) for name, _, leaf in _named_leaves(tree)]
    check_unique([name for name, _ in named])
    return dict(named)


def _named_leaves(tree: Any) -> Iterator[tuple[str, tuple[Any, ...], Any]]:
    """``(dotted name, keys, leaf)`` for every leaf; keys must be str or int."""
    for keys, leaf in tree_leaves_with_path(tree):
        for k in keys:
            if type(k) not in (str, int):
                raise ConversionError(
                    message(
                        f"the key {k!r} at {format_path(keys)}",
                        f"a {type(k).__name__} key cannot be written as a tensor name and read back",
                        "use string keys (or list positions) in trees you save",
                    )
                )
        yield (".".join(str(k) for k in keys) if keys else BARE_NAME), keys, leaf


def _listify(root: dict) -> Any:
    """Dicts keyed exactly ``0..n-1`` become lists, innermost first; iterative, so a name
    of thousands of dotted parts cannot exhaust the recursion limit."""
    order: list[tuple[dict, Any, Any]] = []  # (node, parent, key in parent), parents first
    stack: list[tuple[dict, Any, Any]] = [(root, None, None)]
    while stack:
        node, parent, key = stack.pop()
        order.append((node, parent, key))
        stack.extend((v, node, k) for k, v in node.items() if isinstance(v, dict))
    out: Any = root
    for node, parent, key in reversed(order):  # children before their parents
        value: Any = node
        if node and len(node) == len(set(node)) and set(node) == {str(i) for i in range(len(node))}:
            value = [node[str(i)] for i in range(len(node))]
        if parent is None:
            out = value
        else:
            parent[key] = value
    return out


def unflatten_names(flat: Mapping[str, Any], /) -> dict[str, Any] | list[Any]:
    """Rebuild nesting from dotted names; dicts keyed exactly ``0..n-1`` become lists.

    >>> unflatten_names({"enc.w": 1, "enc.layers.0": 2, "enc.layers.1": 3})
    {'enc': {'w': 1, 'layers': [2, 3]}}
    """
    root: dict[str, Any] = {}
    for name, value in flat.items():
        parts = name.split(".")
        node = root
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConversionError(
                    message(
                        f"tensor name {name!r}",
                        f"{'.'.join(parts[: i + 1])!r} is also a tensor, "
                        "so it cannot hold other tensors",
                        "load with nested=False to get flat names",
                    )
                )
            node = child
        if parts[-1] in node:
            raise ConversionError(
                message(
                    f"tensor name {name!r}",
                    "other tensors are nested under this name",
                    "load with nested=False to get flat names",
                )
            )
        node[parts[-1]] = value
    return _listify(root)


def tensor_info(name: str, leaf: Any, keys: tuple[Any, ...] = ()) -> tuple[TensorInfo, Any]:
    """``(TensorInfo, leaf)`` for a tensor of any framework, without touching its data.

    Python scalars become 0-d NumPy arrays; anything else that is not a tensor
    is refused with :class:`ConversionError` naming its path.
    """
    if type(leaf) is np.ndarray:  # the common leaf: only its dtype and shape are asked for
        try:
            return TensorInfo(name, canonical_name(leaf.dtype), leaf.shape), leaf
        except TensorBridgeError as exc:
            raise exc.at(format_path(keys) or "(root)") from exc.__cause__
    if type(leaf) in _SCALARS:
        leaf = np.asarray(leaf)
    backend = backend_of(type(leaf))
    where = format_path(keys) or "(root)"
    if backend is None:  # an array protocol on the instance (as NumPy finds it)
        try:
            found = stand_in(leaf)
        except TensorBridgeError as exc:
            raise exc.at(where) from exc.__cause__
        if found is not None:
            leaf, backend = found, backend_of(type(found))
    refuse_masked(
        leaf,
        f"a NumPy masked array at {where} (tensor name {name!r})",
        "tensor files have no place for its mask",
    )
    if backend is None:
        raise ConversionError(
            message(
                f"{describe(leaf)} at {where} (tensor name {name!r})",
                "tensor files hold only tensors, and this is not one",
                "remove it from the tree, or convert it to an array first "
                "(e.g. np.asarray(x)); keep strings and other settings in metadata= or a "
                "separate JSON file",
            )
        )
    try:
        facts = backend.facts(leaf)
    except TensorBridgeError as exc:
        raise exc.at(where) from exc.__cause__
    return TensorInfo(name, facts.dtype, tuple(int(d) for d in facts.shape)), leaf


def to_host(leaf: Any) -> np.ndarray:
    """One leaf as a host NumPy array (converted now, for a writer's ``fetch``)."""
    arr = convert(leaf, to="numpy")
    return arr if isinstance(arr, np.ndarray) else np.asarray(arr)


def write_options(fmt: Format, options: Mapping[str, Any], file: object = "") -> dict[str, Any]:
    """Refuse options ``fmt.write`` does not take (or values it refuses), before anything
    is written (see :meth:`~tensorbridge.formats.base.Format.check_write`)."""
    fmt.check_write(str(file), [], None, options)
    return dict(options)


def save(
    tree: Any,
    path: str | os.PathLike[str],
    /,
    *,
    format: str | None = None,
    metadata: Mapping[str, str] | None = None,
    **options: Any,
) -> None:
    """Save a tensor or a tree of tensors (any framework) to ``path``, atomically.

    Names are the tree paths joined with ``.``; a bare tensor is named
    ``"array"``. ``options`` go to the format's writer (``compress=True`` for
    ``.npz``, ``max_shard_size="2GB"`` for sharded checkpoints). Everything is
    checked before a byte is written; the destination is replaced only when
    the new file is complete.

    >>> import numpy as np, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "a.npy")
    >>> save(np.arange(3), p); load(p)
    array([0, 1, 2])
    """
    path = file_path(path)
    fmt = format_for_path(path, format)
    if path.endswith(("/", os.sep)) and fmt.name != "sharded":
        raise ConversionError(
            message(
                f"format={fmt.name!r} for {path!r}",
                f"a path ending in / names a directory, and a .{fmt.name} file is a single file",
                "name the file (e.g. out/model." + fmt.name + "), or save a sharded checkpoint "
                "(format='sharded')",
            )
        )
    meta = check_metadata(metadata, path)
    opts = write_options(fmt, options, path)
    leaves: dict[str, Any] = {}
    infos: list[TensorInfo] = []
    names = []
    for name, keys, leaf in _named_leaves(tree):
        info, leaf = tensor_info(name, leaf, keys)
        names.append(name)
        infos.append(info)
        leaves[name] = leaf
    check_unique(names, path, writing=True)

    def fetch(name: str) -> np.ndarray:
        return to_host(leaves[name])

    fmt.write(path, infos, fetch, meta, **opts)


def open(
    path: str | os.PathLike[str],
    /,
    *,
    format: str | None = None,  # noqa: A001
    variant: str | None = None,
    void_as: str | None = None,
) -> Reader:
    """Open a tensor file lazily: ``keys()``, ``info(name)``, ``r[name]``.

    Use it as a context manager. Only headers are read until a tensor is asked for.
    ``variant`` picks a Hugging Face variant in a checkpoint directory
    (``save_pretrained(variant="fp16")``: ``model.safetensors.index.fp16.json``).
    ``void_as`` (``.npy``/``.npz``) says what raw-bytes arrays hold, e.g.
    ``void_as="bfloat16"`` for ``np.save`` of an ``ml_dtypes.bfloat16`` array (descr
    ``'<V2'``, which names no dtype); files MLX wrote need no option.

    >>> import numpy as np, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "m.npz")
    >>> save({"w": np.ones((2, 3), np.float32)}, p)
    >>> with open(p) as r:
    ...     r.keys(), r.info("w").shape
    (['w'], (2, 3))
    """
    path = file_path(path)
    return open_reader(format_for_path(path, format), path, variant, void_as)


def open_reader(
    fmt: Format,
    path: str,
    variant: str | None,
    void_as: str | None = None,
    hold: bool = False,
    keep: bool = False,
) -> Reader:
    """``fmt.open(path)``, with ``variant`` for a sharded checkpoint and ``void_as`` for
    ``.npy``/``.npz`` files (each refused for the others); ``hold``: a sharded reader
    keeps its shards' checked descriptors for mappings (see :class:`.ShardedReader`);
    ``keep``: every tensor is read once, at once (a ``.npz`` reader keeps small members
    inflated at open for that read, see :class:`.NpzReader`)."""
    if variant is not None and fmt.name != "sharded":
        raise ConversionError(
            message(
                f"variant={variant!r} for the .{fmt.name} file {path!r}",
                "variants are files of a "
                "checkpoint directory (model.safetensors.index.VARIANT.json)",
                "pass the checkpoint's directory, or leave variant out",
            )
        )
    if void_as is not None and fmt.name not in ("npy", "npz"):
        raise ConversionError(
            message(
                f"void_as={void_as!r:.80} for the .{fmt.name} file {path!r}",
                "void_as says what raw-bytes arrays ('<V2') of .npy/.npz files hold, and "
                f".{fmt.name} files record their dtypes",
                "leave void_as out",
            )
        )
    if fmt.name == "npz":
        return fmt.open(path, void_as=void_as, keep=keep)  # type: ignore[call-arg]
    if void_as is not None:
        return fmt.open(path, void_as=void_as)  # type: ignore[call-arg]
    if fmt.name == "sharded":
        return fmt.open(path, variant=variant, hold=hold)  # type: ignore[call-arg]
    if variant is not None:
        return fmt.open(path, variant=variant)  # type: ignore[call-arg]
    return fmt.open(path)


def file_path(path: Any) -> str:
    """``path`` as a ``str``: ``os.PathLike`` and ``bytes`` paths are accepted (decoded as
    the file system does); a NUL character or another type is refused.

    >>> file_path(b"m.npz")
    'm.npz'
    """
    try:
        text = os.fsdecode(os.fspath(path))
    except TypeError:
        raise ConversionError(
            message(
                f"the path {describe(path)}",
                "a path is a str, bytes or os.PathLike",
                "pass the file's path as a string",
            )
        ) from None
    if "\x00" in text:
        raise ConversionError(
            message(
                f"the path {text!r:.200}",
                "it contains a NUL character, which no file name can hold",
                "remove the NUL character from the path",
            )
        )
    return text


def _check_names(names: Iterable[str]) -> list[str]:
    """``names`` as a list; refuse a bare string (it would be read letter by letter)
    and names given twice."""
    if isinstance(names, (str, bytes)):
        raise ConversionError(
            message(
                f"names={names!r}",
                "names is a list of tensor names, and a string would be taken letter by letter",
                f"pass a list, e.g. names=[{names!r}]",
            )
        )
    keys = list(names)
    seen: set[str] = set()
    twice: list[str] = []
    for n in keys:
        if n in seen and n not in twice:
            twice.append(n)
        seen.add(n)
    if twice:
        raise ConversionError(
            message(
                f"names with {twice[:10]!r} given more than once",
                "each tensor is loaded once under its name",
                "list every name once",
            )
        )
    return keys


def iter_tensors(
    reader: Reader,
    names: Iterable[str] | None = None,
    read: Callable[[Reader, str], np.ndarray] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` one tensor at a time, in file order or ``names`` order.

    Every name is checked against the file before the first tensor is read.
    ``read(reader, name)`` replaces ``reader.read(name)`` (``load`` maps with it).
    """
    keys = reader.keys() if names is None else _check_names(names)
    for name in keys:
        reader.info(name)
    for name in keys:
        yield name, (reader.read(name) if read is None else read(reader, name))


def load(
    path: str | os.PathLike[str],
    /,
    *,
    to: str = "numpy",
    nested: bool = False,
    format: str | None = None,
    device: Any = None,
    names: Iterable[str] | None = None,
    variant: str | None = None,
    mmap: bool | None = None,
    void_as: str | None = None,
) -> Any:
    """Load a tensor file as a flat ``{name: tensor}`` dict (a ``.npy`` file: the array).

    ``to`` picks the framework (``"numpy"``, ``"torch"``, ``"jax"``, ...),
    ``device`` the device; tensors are converted one at a time. ``names``
    loads only those tensors. ``nested=True`` rebuilds the tree from dotted
    names, with lists where the keys are ``0..n-1``. ``variant`` picks a
    Hugging Face variant in a checkpoint directory (see :func:`open`), ``void_as``
    what raw-bytes arrays of a ``.npy``/``.npz`` file hold (see :func:`open`).

    By default (``mmap=None``) loads to NumPy and to torch on the CPU map the
    file's bytes instead of copying them (safetensors, sharded checkpoints,
    stored ``.pt`` records, ``.npy``, stored ``.npz`` members), so a load costs
    what the headers cost (for ``.npz``, a pass over each member for its CRC),
    and the arrays still never change: a file replaced afterwards leaves them
    as they were, and on Linux a read lease turns a rewrite in place into a
    copy of the mapped bytes before the writer may go on. Where no lease can be
    held (another OS, a file open for writing, NFS) the default copies.
    ``mmap=True`` maps without a lease: a file rewritten in place shows through,
    and a truncated one kills the process (SIGBUS) when a lost page is touched.
    ``mmap=False`` always copies. The arrays are writable; writes stay in
    memory. See :mod:`tensorbridge.formats.mapping`.

    A file (or a sharded checkpoint's shard) that another process rewrites in
    place while it is being loaded is read again (up to three times): the
    result is one version of each file, or
    :class:`~tensorbridge.errors.CheckpointChangedError`. (A version is told by the
    file's size, inode and times: a writer that overwrites the same bytes in place,
    without truncating, can go unseen; see docs/formats.md, "One version per load".)
    A ``.safetensors`` file of at most 64 KiB is read whole, with one ``pread``.

    >>> import numpy as np, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "m.npz")
    >>> save({"layers": [np.zeros(1), np.ones(1)]}, p)
    >>> load(p, nested=True)
    {'layers': [array([0.]), array([1.])]}
    """
    path = file_path(path)
    if names is not None:
        names = _check_names(names)  # before anything is opened
    if mmap is not None and not isinstance(mmap, (bool, np.bool_)):
        raise ConversionError(
            message(
                f"mmap={mmap!r:.80}",
                "mmap is None (map where the file cannot change under the arrays), True "
                "(map) or False (copy)",
                "pass mmap=True, mmap=False, or leave it out",
            )
        )
    # a small file is read whole, at once, without a reader (Format.load_whole); until it
    # is found to be a directory (a sharded checkpoint), its suffix names its format
    whole = names is None and not mmap and variant is None and void_as is None
    fmt = format_for_path(path, format, look=not whole)
    plain = to in ("numpy", "np") and device is None
    if not plain:
        get_backend(to).load()  # unknown or missing frameworks fail before any reading
    flat = None
    for attempt in range(3 if whole else 0):  # (read again while it is being rewritten)
        try:
            flat = fmt.load_whole(path)
            break
        except CheckpointChangedError:
            if attempt == 2:
                raise
    if flat is None:
        if whole:  # (not a small regular file: a larger one, or a directory)
            fmt = format_for_path(path, format)
        flat = _load_by_reader(fmt, path, to, device, names, variant, mmap, void_as)
        if not isinstance(flat, dict):  # (a .npy file: its array)
            return flat
    elif not plain:
        flat = {name: _loaded(arr, name, to, device) for name, arr in flat.items()}
    return unflatten_names(flat) if nested else flat


def _loaded(arr: np.ndarray, name: str, to: str, device: Any) -> Any:
    """Tensor ``name`` of a file, read as ``arr``, converted for ``load(to=...)``."""
    try:
        return convert(arr, to=to, device=device)
    except TensorBridgeError as exc:  # say which tensor of the file
        raise (exc.at(f"[{name!r}]") if name else exc) from exc.__cause__


def _load_by_reader(
    fmt: Format,
    path: str,
    to: str,
    device: Any,
    names: list[str] | None,
    variant: str | None,
    mmap: bool | None,
    void_as: str | None,
) -> Any:
    """What ``load`` returns before ``nested`` (a dict; a ``.npy`` file: the array), read
    through ``fmt``'s reader."""
    plain = to in ("numpy", "np") and device is None
    # One arena only where the arrays are kept as they are (numpy, or torch sharing them):
    # a target that copies would hold the whole arena until the last tensor is converted.
    keep = plain or (to == "torch" and device is None)
    mode = should_map(path, mmap)
    for attempt in range(3):
        reads = LoadReads(mode, names, keep)
        reader: Reader | None = None
        try:
            # a sharded reader keeps the descriptors its shards were checked through,
            # for the mappings (see FileMaps)
            with open_reader(
                fmt,
                path,
                variant,
                void_as,
                hold=reads.maps,
                keep=names is None,
            ) as reader:
                if fmt.name == "npy" and names is None:
                    arr = reads(reader, reader.keys()[0])
                    if reads.copied:  # (NpyReader.read verifies what it reads)
                        reader.verify()
                    return arr if plain else _loaded(arr, "", to, device)
                if names is None and plain:  # (the common case, without a call per tensor)
                    flat = {name: reads(reader, name) for name in reader.keys()}
                else:
                    flat = {
                        name: arr if plain else _loaded(arr, name, to, device)
                        for name, arr in iter_tensors(reader, names, reads)
                    }
                # a file rewritten in place while it was read by copies (between two
                # tensors, or within one) is read again, never returned half old, half new
                if reads.copied is not None:
                    reader.verify()
            return flat
        except CheckpointChangedError:
            if attempt == 2:
                raise
        except FileFormatError as exc:
            # a file rewritten in place while it was read may look corrupt (a CRC that
            # fails, a short read): a file that changed is read again, not called corrupt
            if reader is None or not reader.changed():
                raise
            if attempt == 2:
                raise CheckpointChangedError(
                    "the file was modified in place while it was read, three times (a save "
                    "was under way, or its permissions or links kept changing). Fix: load "
                    "it again once the save is done.",
                    path,
                ) from exc
        finally:
            reads.close()
    raise AssertionError("unreachable")  # pragma: no cover
