"""Sharded checkpoints in the Hugging Face layout: an index plus shard files.

A sharded checkpoint is a directory holding ``model.safetensors.index.json``::

    {"metadata": {"total_size": 123456},
     "weight_map": {"embed.weight": "model-00001-of-00002.safetensors",
                    "lm_head.weight": "model-00002-of-00002.safetensors", ...}}

and the shard files it names. Paths accepted by :meth:`ShardedFormat.open`:

- the ``*.index.json`` file itself;
- a directory with exactly one ``*.index.json``;
- a directory without an index but with ``model.safetensors`` (preferred) or
  ``pytorch_model.bin``: a single-file checkpoint.

Reading checks, before any tensor is read: the index is a JSON object with a
``weight_map`` of unique, safe tensor names to shard file names; every shard
name is a plain file name in the same directory (no ``/``, ``..``, NUL, and no
symlink resolving outside the directory); every shard exists and is a regular
file; and every shard holds exactly the names the map gives it. Shards are
opened through :func:`tensorbridge.formats.format_for_path` (safetensors or
``.bin``/``.pt`` shards). At most one shard is open at a time. The index's
``metadata`` values are returned as strings (``total_size`` as its digits).

Writing fills ``{prefix}-00001-of-0000N.safetensors`` greedily in the order of
``infos``, so that each shard's tensor bytes stay within ``max_shard_size``
(default 5GB, as ``transformers``; one larger tensor gets a shard of its own).
Each shard gets the safetensors metadata ``{"format": "pt"}``, which
``transformers`` requires. The user's metadata and ``total_size`` go into the
index (a user ``total_size`` key is refused: it is the index's own field).

A rewrite never touches a file the current index references before the new
index is in place: the whole write holds an exclusive ``flock`` on the
directory (so concurrent saves take turns), first removes temporary files of
killed writers, then writes each shard atomically under a name that does not
exist yet (the standard names, or, if any is taken, ``{prefix}-<8 hex>-0000K-of-0000N``
for every shard), then the index atomically (a symlinked index, as in a Hugging
Face cache snapshot, is replaced as a link, never written through), and only then
removes the old index's shards and leftover ``{prefix}[-<8 hex>]-NNNNN-of-MMMMM.safetensors``
files the new index does not list, as ``save_pretrained`` does. A failure before
the index lands removes the new shards: the old checkpoint stays byte-identical.

>>> parse_size("5GB"), parse_size("10KiB"), parse_size(123)
(5000000000, 10240, 123)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
import threading
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..errors import ConversionError, FileFormatError, TensorBridgeError, UnsafeContentError, message
from . import atomic
from .atomic import atomic_write
from .base import Format, RawSpan, Reader, TensorInfo
from .names import check_unique
from .safetensors import FORMAT as SAFETENSORS
from .safetensors import build_header, open_regular_file, read_exact_into

__all__ = ["FORMAT", "ShardedFormat", "ShardedReader", "parse_size", "plan_shards", "destination",
           "DEFAULT_MAX_SHARD_SIZE", "INDEX_SUFFIX"]

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
INDEX_SUFFIX = ".index.json"
_ST_INDEX_SUFFIX = ".safetensors.index.json"
_DEFAULT_INDEX = "model.safetensors.index.json"
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
#: An index larger than this is refused before it is read into memory.
MAX_INDEX_SIZE = 100_000_000

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?(b)?\s*", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse a byte size: ``5GB`` (10**9), ``500MB``, ``10KiB`` (2**10), ``1.5GiB``, or an int.

    >>> parse_size("500MB"), parse_size("1.5GiB"), parse_size("42")
    (500000000, 1610612736, 42)
    """
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        match = _SIZE_RE.fullmatch(str(text)) if isinstance(text, str) else None
        if match is None:
            raise ConversionError(message(
                f"the size {text!r}", "it is not a number of bytes with an optional unit",
                "write it like 5GB, 500MB, 10KiB, 2GiB or 1048576"))
        unit = (match.group(2) or "").lower()
        value = int(float(match.group(1)) * _UNITS[unit]) if "." in match.group(1) \
            else int(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ConversionError(message(
            f"the size {text!r}", "a shard size must be positive", "give e.g. 5GB"))
    return value


def plan_shards(infos: Sequence[TensorInfo], max_shard_size: int) -> list[list[TensorInfo]]:
    """Group ``infos`` in order, greedily, so each group's bytes stay within the limit.

    >>> [len(s) for s in plan_shards([TensorInfo(str(i), "uint8", (4,)) for i in range(5)], 8)]
    [2, 2, 1]
    """
    shards: list[list[TensorInfo]] = [[]]
    used = 0
    for info in infos:
        if shards[-1] and used + info.nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(info)
        used += info.nbytes
    return shards


# --- locating and validating ----------------------------------------------------

def _load_json(path: str) -> Any:
    fd, size = open_regular_file(path)
    try:
        if size > MAX_INDEX_SIZE:
            raise FileFormatError(
                f"the index is {size} bytes, over the {MAX_INDEX_SIZE}-byte limit. Fix: this "
                "is not a checkpoint index, or it is corrupt.", path)
        raw = bytearray(size)
        read_exact_into(fd, memoryview(raw), 0, path)
    finally:
        os.close(fd)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise UnsafeContentError(
                    f"the index has the key {key!r} more than once; other readers would keep "
                    "only the last one. Fix: write the index with unique keys.", path)
            out[key] = value
        return out

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except TensorBridgeError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError too
        raise FileFormatError(
            f"the index is not valid UTF-8 JSON ({exc}). Fix: restore the "
            "*.index.json from the original checkpoint.", path) from exc


def _locate(path: str) -> tuple[str | None, str, str | None]:
    """Return ``(index_path, directory, single_file)``; exactly one of the paths is set."""
    if os.path.isdir(path):
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise FileFormatError(
                f"cannot list the directory ({exc.strerror}). Fix: check its permissions.",
                path) from exc
        indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
        if len(indexes) == 1:
            return os.path.join(path, indexes[0]), path, None
        if len(indexes) > 1:
            raise FileFormatError(
                f"the directory holds several indexes {indexes!r}. Fix: pass the path of the "
                "one to read, e.g. " + repr(os.path.join(path, indexes[0])) + ".", path)
        for single in _SINGLE_FILES:
            if single in names:
                return None, path, os.path.join(path, single)
        raise FileFormatError(
            "the directory holds no *.index.json, model.safetensors or pytorch_model.bin. Fix: "
            "pass the path of a checkpoint file or a sharded checkpoint directory.", path)
    if path.endswith(INDEX_SUFFIX):
        return path, os.path.dirname(path) or ".", None
    raise FileFormatError(
        "it is neither a directory nor a *.index.json file. Fix: pass a sharded checkpoint's "
        "directory or its index.", path)


_HF_REPO = re.compile(r"(models|datasets|spaces)--.+")


def _hf_blobs(root: str) -> str | None:
    """``REPO/blobs`` when ``root`` lies in ``REPO/snapshots/REV/`` of a Hugging Face hub
    cache (``REPO`` named ``models--ORG--NAME`` and the like), where every file is a
    symlink into ``REPO/blobs/``: shards may link there, and nowhere else outside."""
    parts = root.split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots":
            repo = os.sep.join(parts[:i])
            if _HF_REPO.fullmatch(parts[i - 1]) and os.path.isdir(os.path.join(repo, "blobs")):
                return os.path.join(repo, "blobs")
            return None
    return None


def _shard_path(directory: str, shard: object, index_path: str) -> str:
    """The checked path of a shard named in the index."""
    why = None
    if not isinstance(shard, str):
        why = f"it is a {type(shard).__name__}, not a file name"
    elif shard in ("", ".", ".."):
        why = "it is not a file name"
    elif "\x00" in shard:
        why = "it contains a NUL character"
    elif "/" in shard or "\\" in shard or os.path.isabs(shard) or shard[1:2] == ":":
        why = "it is a path, not a plain file name in the index's directory"
    if why:
        raise UnsafeContentError(
            f"shard {shard!r} is refused: {why}. Fix: shards must be plain file names next "
            "to the index, e.g. 'model-00001-of-00002.safetensors'.", index_path)
    assert isinstance(shard, str)  # (for the type checker: anything else was refused above)
    full = os.path.join(directory, shard)
    root = os.path.realpath(directory)
    real = os.path.realpath(full)
    if os.path.dirname(real) != root and os.path.dirname(real) != _hf_blobs(root):
        raise UnsafeContentError(
            f"shard {shard!r} is a symlink that resolves to {real!r}, outside {root!r}. Fix: "
            "copy the shard into the checkpoint directory instead of linking to it.", index_path)
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise FileFormatError(
            f"shard {shard!r} is listed in the index but does not exist. Fix: download the "
            "missing shard, or restore the complete checkpoint.", index_path) from None
    except OSError as exc:
        raise FileFormatError(
            f"shard {shard!r} cannot be read ({exc.strerror}). Fix: check its permissions.",
            index_path) from exc
    if not stat.S_ISREG(mode):
        raise FileFormatError(
            f"shard {shard!r} is not a regular file. Fix: replace it with the shard file.",
            index_path)
    return full


def _open_shard(path: str) -> Reader:
    from . import format_for_path, get_format

    if path.endswith(".safetensors"):  # the common cases, without loading the whole table
        return SAFETENSORS.open(path)
    if path.endswith((".bin", ".pt", ".pth")):
        return get_format("pt").open(path)
    fmt = format_for_path(path)
    if fmt.name == "sharded":
        raise UnsafeContentError(
            f"shard {os.path.basename(path)!r} is itself an index; nested indexes are not "
            "supported. Fix: list the shard files in a single index.", path)
    return fmt.open(path)


def _stringify_metadata(raw: object, index_path: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise FileFormatError(
            f"the index's 'metadata' is a {type(raw).__name__}, not an object. Fix: make it "
            'an object such as {"total_size": 123}.', index_path)
    out = {}
    for key, value in raw.items():
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, (int, float, bool)):
            out[key] = json.dumps(value)
        else:
            raise FileFormatError(
                f"the index's metadata {key!r} is {value!r}; only strings and numbers are "
                "supported. Fix: store it as a string.", index_path)
    total = raw.get("total_size")
    if total is not None and (not isinstance(total, (int, float)) or isinstance(total, bool)
                              or total < 0):
        raise FileFormatError(
            f"the index's total_size {total!r} is not a non-negative number. Fix: set it to "
            "the sum of the tensors' bytes.", index_path)
    return out


class ShardedReader(Reader):
    """A validated sharded checkpoint; shards are opened one at a time on demand."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._current: tuple[str, Reader] | None = None
        self._closed = False
        index_path, directory, single = _locate(path)
        if single is not None:
            with _open_shard(single) as r:
                self._infos = {i.name: i for i in r.infos()}
                self.metadata = dict(r.metadata)
            self._where = {name: single for name in self._infos}
            return
        assert index_path is not None
        self.path = index_path
        index = _load_json(index_path)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            got = type(index).__name__ if not isinstance(index, dict) else sorted(index)
            raise FileFormatError(
                f"the index must be a JSON object with a 'weight_map' object, got {got!r}. Fix: "
                "restore the *.index.json from the original checkpoint.", index_path)
        weight_map: dict[str, Any] = index["weight_map"]
        check_unique(weight_map, index_path)
        self.metadata = _stringify_metadata(index.get("metadata"), index_path)
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(_shard_path(directory, shard, index_path), []).append(name)
        found: dict[str, TensorInfo] = {}
        for shard_path, listed in by_shard.items():
            with _open_shard(shard_path) as r:
                held = r.keys()
                missing = sorted(set(listed) - set(held))
                extra = sorted(set(held) - set(listed))
                if missing:
                    raise FileFormatError(
                        f"the index puts {missing[:10]!r} in shard "
                        f"{os.path.basename(shard_path)!r}, which does not hold them. Fix: "
                        "restore the matching index and shards.", index_path)
                if extra:
                    raise FileFormatError(
                        f"shard {os.path.basename(shard_path)!r} holds {extra[:10]!r}, which the "
                        "index's weight_map does not list there. Fix: restore the matching "
                        "index and shards.", index_path)
                for name in listed:
                    found[name] = r.info(name)
        self._infos = {name: found[name] for name in weight_map}
        self._where = {name: os.path.join(directory, weight_map[name]) for name in weight_map}

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise self.missing(name) from None

    def shard_of(self, name: str) -> str:
        """The path of the shard holding ``name``."""
        self.info(name)
        return self._where[name]

    def _shard_reader(self, name: str) -> Reader:
        """The open reader of ``name``'s shard (call with ``self._lock`` held)."""
        shard = self.shard_of(name)
        if self._closed:
            raise FileFormatError("the file is closed. Fix: open it again.", self.path)
        if self._current is None or self._current[0] != shard:
            self._drop_current()
            self._current = (shard, _open_shard(shard))
        return self._current[1]

    def _drop_current(self) -> None:
        if self._current is not None:
            reader = self._current[1]
            self._current = None
            reader.close()

    def read(self, name: str) -> np.ndarray:
        with self._lock:
            return self._shard_reader(name).read(name)

    def read_slice(self, name: str, index: int | slice) -> np.ndarray:
        with self._lock:
            return self._shard_reader(name).read_slice(name, index)

    def raw_span(self, name: str) -> RawSpan | None:
        """The byte range in its shard, as the shard's reader gives it (checked again,
        by file identity, whenever it is opened)."""
        with self._lock:
            return self._shard_reader(name).raw_span(name)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_current()


# --- writing --------------------------------------------------------------------

def destination(path: str) -> tuple[str, str, str]:
    """``(directory, index_name, shard_prefix)`` for a directory or index path."""
    if path.endswith(INDEX_SUFFIX):
        index_name = os.path.basename(path)
        if not index_name.endswith(_ST_INDEX_SUFFIX) or index_name == _ST_INDEX_SUFFIX:
            raise FileFormatError(
                "tensorbridge writes safetensors shards, so the index must be named "
                "'NAME.safetensors.index.json'. Fix: use e.g. "
                f"{os.path.join(os.path.dirname(path), _DEFAULT_INDEX)!r}, or pass a directory.",
                path)
        return os.path.dirname(path) or ".", index_name, index_name[: -len(_ST_INDEX_SUFFIX)]
    return path, _DEFAULT_INDEX, "model"


def _shard_names(prefix: str, count: int, tag: str = "") -> list[str]:
    tag = f"-{tag}" if tag else ""
    return [f"{prefix}{tag}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _shard_pattern(prefix: str) -> re.Pattern[str]:
    """Shard names of ``prefix``: standard ones and those with a uniqueness tag."""
    return re.compile(re.escape(prefix) + r"(?:-[0-9a-f]{8})?-\d{5}-of-\d{5}\.safetensors")


def _old_index_shards(index_path: str) -> set[str]:
    """The shard names the current index at ``index_path`` lists (plain ``.safetensors``
    file names only: an odd or hostile index never gets other files removed)."""
    try:
        index = _load_json(index_path)
    except (TensorBridgeError, OSError):
        return set()
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return set()
    return {v for v in weight_map.values()
            if isinstance(v, str) and v.endswith(".safetensors") and not v.startswith(".")
            and "/" not in v and "\\" not in v and "\x00" not in v}


def _remove_old_shards(directory: str, prefix: str, old: set[str], keep: set[str]) -> None:
    """After the new index is in place: remove the shards the old index listed and any
    leftover shard of ``prefix`` (e.g. of a killed save) that the new index does not list."""
    pattern = _shard_pattern(prefix)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name not in keep and (name in old or pattern.fullmatch(name)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def _unlink_all(paths: list[str]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)


class ShardedFormat(Format):
    """A directory of safetensors shards plus a Hugging Face ``*.index.json``."""

    name = "sharded"
    suffixes = (INDEX_SUFFIX,)
    description = ("Hugging Face sharded checkpoint: model.safetensors.index.json plus "
                   "model-0000K-of-0000N.safetensors shards (reads .bin shards too).")

    options = ("max_shard_size",)

    def check_info(self, info: TensorInfo, path: str) -> None:
        SAFETENSORS.check_info(info, path)  # every shard is a safetensors file

    def check_write(self, path: str, infos: Sequence[TensorInfo],
                    metadata: Mapping[str, str] | None = None,
                    options: Mapping[str, Any] | None = None) -> dict[str, str]:
        meta = super().check_write(path, infos, metadata, options)
        parse_size((options or {}).get("max_shard_size", DEFAULT_MAX_SHARD_SIZE))
        if "total_size" in meta:
            raise ConversionError(
                f"{path}: metadata key 'total_size' is refused: in a sharded checkpoint it is "
                "the index's own field (the sum of the tensors' bytes), which tensorbridge "
                "writes itself. Fix: rename the key (e.g. 'source_total_size'), or leave it "
                "out; nothing was written.")
        build_header(infos, None, path)  # the reserved name and the header size limit
        return meta

    def open(self, path: str) -> ShardedReader:
        return ShardedReader(os.fspath(path))

    def write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        fetch: Callable[[str], np.ndarray],
        metadata: Mapping[str, str] | None = None,
        *,
        landed: Callable[[str, int, int, int], None] | None = None,
        **options: Any,
    ) -> None:
        """Write shards of at most ``max_shard_size`` bytes (option; default 5GB), then the index.

        ``landed`` is handed to each shard's safetensors writer (see its ``write``)."""
        path = os.fspath(path)
        user_metadata = self.check_write(path, infos, metadata, options)
        max_shard_size = parse_size(options.get("max_shard_size", DEFAULT_MAX_SHARD_SIZE))
        directory, index_name, prefix = destination(path)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise FileFormatError(
                f"cannot create the directory ({exc.strerror}). Fix: choose a writable place.",
                directory) from exc
        groups = plan_shards(infos, max_shard_size)
        index_path = os.path.join(directory, index_name)
        # One sharded write per directory at a time: another's cleanup must not meet our
        # shards half-way (its old index is read and its old shards removed under the lock).
        with atomic.lock_directory(directory):
            atomic.remove_stale_in(directory)  # leftovers of killed writers only (unlocked)
            old = _old_index_shards(index_path)
            names = _shard_names(prefix, len(groups))
            # Never overwrite a file the current index may reference: if any standard name
            # is taken, every new shard gets a fresh, unique name.
            while any(os.path.lexists(os.path.join(directory, n)) for n in names):
                names = _shard_names(prefix, len(groups), secrets.token_hex(4))
            written: list[str] = []
            try:
                for shard, group in zip(names, groups, strict=True):
                    final = os.path.join(directory, shard)
                    written.append(final)  # safetensors' atomic write removes its own temp
                    SAFETENSORS.write(final, group, fetch, {"format": "pt"}, landed=landed,
                                      checked=True)
                atomic.fsync_dir(directory)
                index = {
                    "metadata": {**user_metadata, "total_size": sum(i.nbytes for i in infos)},
                    "weight_map": {i.name: shard for shard, group in zip(names, groups, strict=True)
                                   for i in group},
                }
                # the link itself is replaced, as the shards are (a Hugging Face cache
                # snapshot links into content-addressed blobs that must not change)
                with atomic_write(index_path, follow_symlinks=False) as f:
                    f.write((json.dumps(index, indent=2, ensure_ascii=False) + "\n")
                            .encode("utf-8"))
            except BaseException:
                _unlink_all(written)  # the old index and its shards were never touched
                atomic.fsync_dir(directory)
                raise
            _remove_old_shards(directory, prefix, old, set(names) | {index_name})
            atomic.fsync_dir(directory)


FORMAT = ShardedFormat()
