"""Sharded checkpoints in the Hugging Face layout: an index plus shard files.

A sharded checkpoint is a directory holding ``model.safetensors.index.json``::

    {"metadata": {"total_size": 123456},
     "weight_map": {"embed.weight": "model-00001-of-00002.safetensors",
                    "lm_head.weight": "model-00002-of-00002.safetensors", ...}}

and the shard files it names. Paths accepted by :meth:`ShardedFormat.open`:

- the index file itself (``*.index.json``, or ``*.index.VARIANT.json`` as
  ``save_pretrained(variant="fp16")`` writes it, with ``model.fp16-0000K-of-0000N`` shards);
- a directory. ``variant=`` picks a variant's files; without it the plain files are read,
  or the only variant when there is nothing else (said in ``reader.notes``; several
  variants and no plain files are refused, naming them). Of one variant, safetensors are
  read before ``.bin``, as ``transformers`` does: an index, else ``model[.VARIANT].safetensors``,
  else ``pytorch_model[.VARIANT].bin.index.json``, else ``pytorch_model[.VARIANT].bin``.
  When ``.bin`` files were passed over, ``reader.notes`` says so.

Reading checks, before any tensor is read: the index is JSON within
:mod:`.safejson`'s budget (nesting, containers per byte, no NaN/Infinity, unique keys) with a
``weight_map`` of unique, safe tensor names to shard file names; every shard name is a
plain file name in the same directory (no ``/``, ``..``, NUL, lone surrogate); every file
read (the index, each shard, a single-file checkpoint) resolves inside the directory, or
into the ``blobs/`` of a Hugging Face cache snapshot, and no other link is followed (each
shard is resolved once, however many names it holds); every shard is a regular file and
holds exactly the names the map gives it. Shards are opened through
:func:`tensorbridge.formats.format_for_path` (safetensors or ``.bin``/``.pt`` shards). At
most one shard is open for reading at a time (a load that maps the shards keeps the
descriptors they were checked through, and maps those: ``ShardedReader(hold=True)``).
The index's ``metadata`` values are returned as strings in ``reader.metadata``, except
``total_size``, the index's own bookkeeping, which is ``reader.total_size`` (an int;
negative numbers, NaN and Infinity are refused).

One version at a time: the identity of each shard (device, inode, size, modification and
change times) is recorded when the checkpoint is opened and checked whenever a shard is
opened again; tensorbridge's saves also write a generation into the index
(``tensorbridge_generation``) and into every shard's metadata, and the reader checks that
they agree. A reader that meets a shard of another save raises
:class:`~tensorbridge.errors.CheckpointChangedError` (``load`` retries up to three times)
instead of mixing versions.

Writing fills ``{prefix}-00001-of-0000N.safetensors`` greedily in the order of
``infos``, so that each shard's tensor bytes stay within ``max_shard_size``
(default 5GB, as ``transformers``; one larger tensor gets a shard of its own; at most
2**63 - 1). The prefix is ``model``, or taken from the index name
(``adapter.safetensors.index.json``: ``adapter``; ``model.safetensors.index.fp16.json``:
``model.fp16``). Each shard gets the safetensors metadata ``{"format": "pt"}``, which
``transformers`` requires, plus the generation. The user's metadata and ``total_size`` go
into the index (a user ``total_size`` key is refused: it is the index's own field). A
directory named like a single file (``x.npz``, ``m.safetensors``) is refused as a
destination.

A rewrite never touches a file the current index references before the new
index is in place: the whole write holds an exclusive ``flock`` on the
directory (so concurrent saves take turns), first removes temporary files of
killed writers, then writes each shard atomically under a name that does not
exist yet (the standard names, or, if any is taken, ``{prefix}-<8 hex>-0000K-of-0000N``
for every shard), then the index atomically (a symlinked index, as in a Hugging
Face cache snapshot, is replaced as a link, never written through). The files are
written as temporary files and flushed together (:class:`.atomic.Commit`: one ``fsync``
per file, all at once, from several threads, so the file system commits them together
rather than one journal commit after another); then the shards' names land and the
directory is fsynced, and only then the index's name, and the directory again (a save
of more than :data:`PENDING_SHARDS` shards lands them in groups of that many, all
before the index). Every shard and the index are durable before the save returns. Last, it
removes the files named ``{prefix}[-<8 hex>]-NNNNN-of-MMMMM.safetensors`` that the new index
does not list (the previous save's shards, a killed save's), and the single file
``{prefix}.safetensors`` the index supersedes (``from_pretrained`` reads it before the index,
so it would load the old weights), as ``save_pretrained`` does.
Nothing else is removed, whatever the old index lists. A failure before the index
lands removes the new shards: the old checkpoint stays byte-identical.

>>> parse_size("5GB"), parse_size("10KiB"), parse_size(123)
(5000000000, 10240, 123)
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import (
    CheckpointChangedError,
    ConversionError,
    FileFormatError,
    UnsafeContentError,
    message,
)
from . import atomic, safejson
from .atomic import atomic_write
from .base import Format, RawSpan, Reader, TensorInfo, file_stamp
from .names import check_unique, text_is_utf8
from .safetensors import FORMAT as SAFETENSORS
from .safetensors import SafetensorsReader, build_header, open_regular_stat, read_exact_into

__all__ = [
    "FORMAT",
    "ShardedFormat",
    "ShardedReader",
    "parse_size",
    "plan_shards",
    "destination",
    "DEFAULT_MAX_SHARD_SIZE",
    "INDEX_SUFFIX",
    "GENERATION_KEY",
    "is_index_name",
]

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
#: The index key (beside ``metadata`` and ``weight_map``) and the shard metadata key that
#: hold a save's generation, a random token: a reader checks that they agree.
GENERATION_KEY = "tensorbridge_generation"
INDEX_SUFFIX = ".index.json"
_ST_INDEX_SUFFIX = ".safetensors.index.json"
_DEFAULT_INDEX = "model.safetensors.index.json"
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
#: The largest max_shard_size (2**63 - 1: a file offset's limit).
MAX_SHARD_SIZE = 2**63 - 1
#: Written shards that wait (each holding a descriptor) to be flushed together; past
#: this many (or a sixteenth of the open-file limit, if less) they land, and the next
#: ones form another group, all before the index.
PENDING_SHARDS = 64


def _pending_limit() -> int:
    """How many written shards may wait for their flush: :data:`PENDING_SHARDS`, or less
    under a low open-file limit (each waiting shard holds a descriptor)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return PENDING_SHARDS
    if soft == resource.RLIM_INFINITY:
        return PENDING_SHARDS
    return max(1, min(PENDING_SHARDS, soft // 16))


#: Shards whose checked descriptors a reader opened with ``hold=True`` keeps for the
#: mappings of a load (or a sixteenth of the open-file limit, if less); the others are
#: opened again by path.
HELD_SHARDS = 64


#: Shard descriptors held now by every reader in this process (one budget for all of
#: them: readers in many threads must not take the open-file limit between them).
_held_now = 0
_HELD_LOCK = threading.Lock()


def _reserve_held(limit: int) -> bool:
    """Count one more held descriptor, unless ``limit`` are held already."""
    global _held_now
    with _HELD_LOCK:
        if _held_now >= limit:
            return False
        _held_now += 1
        return True


def _unreserve_held() -> None:
    global _held_now
    with _HELD_LOCK:
        _held_now -= 1


def _held_limit() -> int:
    """How many shard descriptors readers may hold, all of them together:
    :data:`HELD_SHARDS`, or less under a low open-file limit."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return HELD_SHARDS
    if soft == resource.RLIM_INFINITY:
        return HELD_SHARDS
    return max(0, min(HELD_SHARDS, soft // 16))


#: An index larger than this is refused before it is read into memory.
MAX_INDEX_SIZE = 100_000_000

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?(b)?\s*", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse a byte size: ``5GB`` (10**9), ``500MB``, ``10KiB`` (2**10), ``1.5GiB``, or an int.

    >>> parse_size("500MB"), parse_size("1.5GiB"), parse_size("42")
    (500000000, 1610612736, 42)
    """
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        match = _SIZE_RE.fullmatch(text) if isinstance(text, str) and len(text) <= 64 else None
        if match is None:
            raise ConversionError(
                message(
                    f"the size {safejson.short(text)}",
                    "it is not a number of bytes with an optional unit",
                    "write it like 5GB, 500MB, 10KiB, 2GiB or 1048576",
                )
            )
        unit = (match.group(2) or "").lower()
        try:
            value = (
                int(float(match.group(1)) * _UNITS[unit])
                if "." in match.group(1)
                else int(match.group(1)) * _UNITS[unit]
            )
        except (OverflowError, ValueError):  # inf, or past the int-to-str digit limit
            value = MAX_SHARD_SIZE + 1
    if value <= 0:
        raise ConversionError(
            message(
                f"the size {safejson.short(text)}", "a shard size must be positive", "give e.g. 5GB"
            )
        )
    if value > MAX_SHARD_SIZE:
        raise ConversionError(
            message(
                f"the size {safejson.short(text)}",
                f"it is over {MAX_SHARD_SIZE} bytes (8 EiB), more than any file can hold",
                "give e.g. 5GB",
            )
        )
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

#: An index file name: ``NAME.index.json``, or ``NAME.index.VARIANT.json`` (``save_pretrained(variant=...)``).
_INDEX_RE = re.compile(r"(?P<base>.+)\.index(?:\.(?P<variant>[^./\\\x00]+))?\.json")
_VARIANT_RE = re.compile(r"[A-Za-z0-9_+-]+")
#: A single-file checkpoint, plain or of a variant (not a shard: ``model.fp16-00001-of-00002``).
_SINGLE_RE = re.compile(
    r"(?P<stem>model|pytorch_model)(?:\.(?P<variant>[^./\\\x00]+))?"
    r"\.(?P<ext>safetensors|bin)"
)
_SHARD_SUFFIX_RE = re.compile(r".*-\d{5}-of-\d{5}")


def is_index_name(path: str) -> bool:
    """Whether ``path`` names a sharded index (``*.index.json`` or ``*.index.VARIANT.json``).

    >>> is_index_name("d/model.safetensors.index.fp16.json"), is_index_name("config.json")
    (True, False)
    """
    return _INDEX_RE.fullmatch(os.path.basename(os.fspath(path))) is not None


def _load_json(path: str, dir_fd: int | None = None) -> tuple[Any, tuple[int, ...]]:
    """The parsed index (under :mod:`.safejson`'s budget) and the stamp of the file read
    (taken before it is read: a change while it is read shows in a later comparison).
    ``dir_fd``: ``path`` is relative to that directory."""
    fd, st = open_regular_stat(path, dir_fd)
    stamp, size = _stamp(st), st.st_size
    try:
        if size > MAX_INDEX_SIZE:
            raise FileFormatError(
                f"the index is {size} bytes, over the {MAX_INDEX_SIZE}-byte limit. Fix: this "
                "is not a checkpoint index, or it is corrupt.",
                path,
            )
        raw = bytearray(size)
        read_exact_into(fd, memoryview(raw), 0, path)
    finally:
        os.close(fd)
    return safejson.loads(raw, path, "the index"), stamp


_stamp = file_stamp


def _check_variant(variant: object) -> str | None:
    if variant is None:
        return None
    if not isinstance(variant, str) or not _VARIANT_RE.fullmatch(variant):
        raise ConversionError(
            message(
                f"variant={safejson.short(variant)}",
                "a variant is a plain word such as 'fp16' "
                "(the VARIANT of model.safetensors.index.VARIANT.json)",
                "pass the variant's name, e.g. variant='fp16'",
            )
        )
    return variant


class _Layout:
    """What a checkpoint directory holds, by kind (safetensors or bin) and variant."""

    def __init__(self, names: list[str]) -> None:
        self.indexes: dict[tuple[str, str | None], list[str]] = {}
        self.singles: dict[tuple[str, str | None], list[str]] = {}
        for n in names:
            m = _INDEX_RE.fullmatch(n)
            if m:
                kind = "bin" if m["base"].endswith(".bin") else "safetensors"
                self.indexes.setdefault((kind, m["variant"]), []).append(n)
                continue
            m = _SINGLE_RE.fullmatch(n)
            if (
                m
                and not (m["variant"] and _SHARD_SUFFIX_RE.fullmatch(m["variant"]))
                and (m["stem"], m["ext"]) in (("model", "safetensors"), ("pytorch_model", "bin"))
            ):
                kind = "safetensors" if m["ext"] == "safetensors" else "bin"
                self.singles.setdefault((kind, m["variant"]), []).append(n)

    def variants(self) -> list[str]:
        return sorted({v for (_, v) in [*self.indexes, *self.singles] if v is not None})

    def pick(self, variant: str | None, path: str) -> tuple[str, bool, str] | None:
        """``(file name, is_index)`` for ``variant``: safetensors first (an index, then
        ``model[.VARIANT].safetensors``), then .bin, as ``transformers`` prefers."""
        for kind in ("safetensors", "bin"):
            found = self.indexes.get((kind, variant), [])
            if len(found) > 1:
                raise FileFormatError(
                    f"the directory holds several indexes {safejson.short(sorted(found))}. Fix: "
                    "pass the path of the one to read, e.g. "
                    f"{safejson.short(os.path.join(path, sorted(found)[0]))}.",
                    path,
                )
            if found:
                return found[0], True, kind
            single = self.singles.get((kind, variant))
            if single:
                return single[0], False, kind
        return None

    def other_kind(self, variant: str | None) -> list[str]:
        """The .bin files of ``variant`` that the safetensors choice leaves unread."""
        return sorted(
            self.indexes.get(("bin", variant), []) + self.singles.get(("bin", variant), [])
        )


def _locate(path: str, variant: str | None) -> tuple[str | None, str, str | None, list[str]]:
    """Return ``(index_path, directory, single_file, notes)``; one of the two paths is set.
    ``notes`` says what was chosen over what (see :attr:`ShardedReader.notes`)."""
    if os.path.isdir(path):
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise FileFormatError(
                f"cannot list the directory ({exc.strerror}). Fix: check its permissions.", path
            ) from exc
        layout = _Layout(names)
        notes: list[str] = []
        chosen = layout.pick(variant, path)
        if chosen is None and variant is None and len(layout.variants()) == 1:
            only = layout.variants()[0]
            chosen = layout.pick(only, path)
            notes.append(
                f"the directory holds only the {only!r} variant; it was read "
                f"(pass variant={only!r} to say so)"
            )
            variant = only
        if chosen is None:
            if variant is not None:
                raise FileFormatError(
                    f"the directory holds no variant {variant!r} (no "
                    f"*.index.{variant}.json, model.{variant}.safetensors or "
                    f"pytorch_model.{variant}.bin). Fix: pass one of its variants "
                    f"{layout.variants()!r}, or variant=None for the plain files.",
                    path,
                )
            if layout.variants():
                raise FileFormatError(
                    f"the directory holds several variants {layout.variants()!r} and no plain "
                    "checkpoint. Fix: choose one, e.g. tb.load(path, variant="
                    f"{layout.variants()[0]!r}), or pass the path of its index.",
                    path,
                )
            raise FileFormatError(
                "the directory holds no *.index.json, model.safetensors or pytorch_model.bin. "
                "Fix: pass the path of a checkpoint file or a sharded checkpoint directory.",
                path,
            )
        name, is_index, kind = chosen
        if kind == "safetensors":
            unread = layout.other_kind(variant)
            if unread:
                notes.append(
                    f"read the safetensors files ({name}); the .bin files "
                    f"{unread!r} hold the same model and were not read, as "
                    "transformers prefers safetensors"
                )
        full = os.path.join(path, name)
        return (full, path, None, notes) if is_index else (None, path, full, notes)
    if is_index_name(path):
        m = _INDEX_RE.fullmatch(os.path.basename(path))
        assert m is not None
        if variant is not None and m["variant"] != variant:
            raise ConversionError(
                message(
                    f"variant={variant!r} with the index {safejson.short(path)}",
                    f"that index is of {'no variant' if m['variant'] is None else repr(m['variant'])}",
                    "pass the checkpoint's directory with variant=, or the index alone",
                )
            )
        return path, os.path.dirname(path) or ".", None, []
    raise FileFormatError(
        "it is neither a directory nor a *.index.json file. Fix: pass a sharded checkpoint's "
        "directory or its index.",
        path,
    )


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


def _said(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


class _Place:
    """The link policy of one checkpoint directory: a file it names must resolve inside
    the directory itself or, in a Hugging Face cache snapshot, inside the repo's
    ``blobs/``. Applied to the index, to every shard and to a single-file checkpoint.
    The directory is resolved once (not once per tensor name), and only when a name is a
    link (a plain file's name needs one ``lstat``)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    @functools.cached_property
    def root(self) -> str:
        return os.path.realpath(self.directory)

    @functools.cached_property
    def blobs(self) -> str | None:
        return _hf_blobs(self.root)

    def check(self, name: str, what: str | Callable[[], str], where: str) -> str:
        """``os.path.join(directory, name)`` once its target is known to be allowed and to
        be a regular file; ``what`` names the file in messages (or makes that name, only
        when a message needs it), ``where`` is the file blamed."""
        full = os.path.join(self.directory, name)
        if name not in ("", ".", "..") and "/" not in name and os.sep not in name:
            # A plain name that is not a link resolves to root/name: one lstat instead
            # of realpath's one per component of the path.
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                raise self._missing(_said(what), where) from None
            except OSError:
                pass  # said below, as realpath and stat find it
            else:
                if not stat.S_ISLNK(st.st_mode):
                    if not stat.S_ISREG(st.st_mode):
                        raise self._not_regular(_said(what), where)
                    return full
        real = os.path.realpath(full)
        if os.path.dirname(real) not in (self.root, self.blobs):
            raise UnsafeContentError(
                f"{_said(what)} is a symlink that resolves to {safejson.short(real)}, outside "
                f"{safejson.short(self.root)}; links may only point into a Hugging Face cache's "
                "blobs/. Fix: copy the file into the checkpoint directory instead of linking "
                "to it.",
                where,
            )
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError:
            raise self._missing(_said(what), where) from None
        except OSError as exc:
            raise FileFormatError(
                f"{_said(what)} cannot be read ({exc.strerror}). Fix: check its permissions.", where
            ) from exc
        if not stat.S_ISREG(mode):
            raise self._not_regular(_said(what), where)
        return full

    @staticmethod
    def _missing(what: str, where: str) -> FileFormatError:
        return FileFormatError(
            f"{what} does not exist. Fix: download the missing file, or restore the "
            "complete checkpoint.",
            where,
        )

    @staticmethod
    def _not_regular(what: str, where: str) -> FileFormatError:
        return FileFormatError(
            f"{what} is not a regular file. Fix: replace it with the file.", where
        )


def _shard_name_problem(shard: object) -> str | None:
    if not isinstance(shard, str):
        return f"it is a {type(shard).__name__}, not a file name"
    if shard in ("", ".", ".."):
        return "it is not a file name"
    if "\x00" in shard:
        return "it contains a NUL character"
    if "/" in shard or "\\" in shard or os.path.isabs(shard) or shard[1:2] == ":":
        return "it is a path, not a plain file name in the index's directory"
    if not text_is_utf8(shard):
        return "it is not valid Unicode (a lone surrogate), so no file can have that name"
    return None


def _shard_path(place: _Place, shard: object, index_path: str) -> str:
    """The checked path of a shard named in the index."""
    why = _shard_name_problem(shard)
    if why:
        raise UnsafeContentError(
            f"shard {safejson.short(shard)} is refused: {why}. Fix: shards must be plain "
            "file names next to the index, e.g. 'model-00001-of-00002.safetensors'.",
            index_path,
        )
    assert isinstance(shard, str)
    return place.check(shard, lambda: f"shard {safejson.short(shard)}", index_path)


def _open_shard(path: str) -> Reader:
    from . import format_for_path, get_format

    if path.endswith(".safetensors"):  # the common cases, without loading the whole table
        return SAFETENSORS.open(path)
    if path.endswith((".bin", ".pt", ".pth")):
        return get_format("pt").open(path)
    fmt = format_for_path(path)
    if fmt.name == "sharded":
        raise UnsafeContentError(
            f"shard {safejson.short(os.path.basename(path))} is itself an index; nested "
            "indexes are not supported. Fix: list the shard files in a single index.",
            path,
        )
    return fmt.open(path)


def _reader_stamp(reader: Reader, path: str) -> tuple[int, ...]:
    stamp = getattr(reader, "stamp", None)
    return tuple(stamp) if stamp is not None else _stamp(os.stat(path))


def _stringify_metadata(raw: object, index_path: str) -> tuple[dict[str, str], int | None]:
    """The index's metadata as strings, less ``total_size``, and ``total_size``."""
    if raw is None:
        return {}, None
    if not isinstance(raw, dict):
        raise FileFormatError(
            f"the index's 'metadata' is a {type(raw).__name__}, not an object. Fix: make it "
            'an object such as {"total_size": 123}.',
            index_path,
        )
    out = {}
    for key, value in raw.items():
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, (int, float, bool)):
            out[key] = json.dumps(value)
        else:
            raise FileFormatError(
                f"the index's metadata {safejson.short(key)} is {safejson.short(value)}; only "
                "strings and numbers are supported. Fix: store it as a string.",
                index_path,
            )
    total = raw.get("total_size")
    if total is not None and (
        not isinstance(total, (int, float)) or isinstance(total, bool) or total < 0
    ):
        raise FileFormatError(
            f"the index's total_size {safejson.short(total)} is not a non-negative number. "
            "Fix: set it to the sum of the tensors' bytes.",
            index_path,
        )
    out.pop("total_size", None)
    return out, (None if total is None else int(total))


def _changed(what: str, path: str) -> CheckpointChangedError:
    return CheckpointChangedError(
        f"the checkpoint changed while it was being read ({what}); nothing read from it "
        "mixes two versions. Fix: open or load it again (a save into this directory was "
        "under way, or a shard's permissions or links changed).",
        path,
    )


class ShardedReader(Reader):
    """A validated sharded checkpoint; shards are opened one at a time on demand.

    ``notes`` lists what was chosen when the directory offered more than one checkpoint
    (safetensors over ``.bin``, the only variant); ``total_size`` is the index's
    ``total_size`` (``None`` without an index), which is not part of ``metadata``.

    One version: each shard's identity (device, inode, size, change times) is recorded
    when the checkpoint is opened, and each later opening of a shard checks it, and
    checks the shard's generation against the index's when tensorbridge wrote them: a
    shard replaced by a later save raises :class:`~tensorbridge.errors.CheckpointChangedError`
    instead of returning data of another version.

    ``hold=True`` (what ``load`` asks for when it maps): the descriptor each safetensors
    shard was checked through at open stays open (at most :data:`HELD_SHARDS` shards,
    in all readers of the process together), until :meth:`take_descriptor` hands it over
    or :meth:`close` closes it, so that a mapping of the shard maps the very file that was
    checked, without opening it again.
    """

    def __init__(self, path: str, variant: str | None = None, *, hold: bool = False) -> None:
        #: shard path -> the descriptor it was checked through (hold=True)
        self._held: dict[str, int] = {}
        self._hold = _held_limit() if hold else 0
        try:
            self._open(path, variant)
        except BaseException:
            self._close_held()
            raise

    def _open(self, path: str, variant: str | None) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._current: tuple[str, Reader] | None = None
        self._closed = False
        self.total_size: int | None = None
        self._generation: str | None = None
        self._stamps: dict[str, tuple[int, ...]] = {}
        #: safetensors shards' spans, taken while each shard was open to be checked, so
        #: that asking for them opens no shard again (its header would be parsed again)
        self._spans: dict[str, RawSpan | None] = {}
        #: the shard whose identity was last checked against its stamp for a span
        self._span_shard: str | None = None
        #: shards tensors were read or spans asked from, and those mapped: a shard read
        #: by copies is compared with its stamp again at the end (verify)
        self._read_from: set[str] = set()
        self._mapped: set[str] = set()
        index_path, directory, single, self.notes = _locate(path, _check_variant(variant))
        place = _Place(directory)
        if single is not None:
            single = place.check(
                os.path.basename(single), safejson.short(os.path.basename(single)), path
            )
            with _open_shard(single) as r:
                self._infos = {i.name: i for i in r.infos()}
                self.metadata = dict(r.metadata)
                self._stamps[single] = _reader_stamp(r, single)
                self._keep_spans(r, list(self._infos))
                if self._hold and type(r) is SafetensorsReader and _reserve_held(self._hold):
                    fd = r.detach()
                    if fd is not None:
                        self._held[single] = fd
                    else:
                        _unreserve_held()
            self._where = {name: single for name in self._infos}
            return
        assert index_path is not None
        place.check(
            os.path.basename(index_path),
            lambda: f"the index {safejson.short(os.path.basename(index_path))}",
            index_path,
        )
        self.path = index_path
        index, index_stamp = _load_json(index_path)
        try:
            self._validate(index, index_path, place)
        except FileFormatError as exc:
            if isinstance(exc, CheckpointChangedError):
                raise
            try:
                now = _stamp(os.stat(index_path))
            except OSError:
                now = ()
            if now != index_stamp:
                raise _changed(
                    "its index was replaced while the shards were checked", index_path
                ) from exc
            raise

    def _validate(self, index: Any, index_path: str, place: _Place) -> None:
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            got = type(index).__name__ if not isinstance(index, dict) else sorted(index)
            raise FileFormatError(
                f"the index must be a JSON object with a 'weight_map' object, got "
                f"{safejson.short(got)}. Fix: restore the *.index.json from the original "
                "checkpoint.",
                index_path,
            )
        weight_map: dict[str, Any] = index["weight_map"]
        check_unique(weight_map, index_path)
        self.metadata, self.total_size = _stringify_metadata(index.get("metadata"), index_path)
        generation = index.get(GENERATION_KEY)
        self._generation = generation if isinstance(generation, str) else None
        by_shard: dict[str, list[str]] = {}
        paths: dict[object, str] = {}  # shard name -> checked path, once per shard
        where: dict[str, str] = {}
        for name, shard in weight_map.items():
            key = shard if isinstance(shard, str) else id(shard)
            full = paths.get(key)
            if full is None:
                full = paths[key] = _shard_path(place, shard, index_path)
            by_shard.setdefault(full, []).append(name)
            where[name] = full
        found: dict[str, TensorInfo] = {}
        for shard_path, listed in by_shard.items():
            with _open_shard(shard_path) as r:
                self._check_version(r, shard_path)
                held = r.keys()
                missing = sorted(set(listed) - set(held))
                extra = sorted(set(held) - set(listed))
                if missing:
                    raise FileFormatError(
                        f"the index puts {safejson.short(missing[:10])} in shard "
                        f"{safejson.short(os.path.basename(shard_path))}, which does not hold "
                        "them. Fix: restore the matching index and shards.",
                        index_path,
                    )
                if extra:
                    raise FileFormatError(
                        f"shard {safejson.short(os.path.basename(shard_path))} holds "
                        f"{safejson.short(extra[:10])}, which the index's weight_map does not "
                        "list there. Fix: restore the matching index and shards.",
                        index_path,
                    )
                for name in listed:
                    found[name] = r.info(name)
                self._stamps[shard_path] = _reader_stamp(r, shard_path)
                self._keep_spans(r, listed)
                if self._hold and type(r) is SafetensorsReader and _reserve_held(self._hold):
                    fd = r.detach()  # (the file whose header and stamp were just taken)
                    if fd is not None:
                        self._held[shard_path] = fd
                    else:
                        _unreserve_held()
        self._infos = {name: found[name] for name in weight_map}
        self._where = where

    def _keep_spans(self, reader: Reader, names: list[str]) -> None:
        if type(reader) is SafetensorsReader:  # a span there is an offset in a parsed header
            for name in names:
                self._spans[name] = reader.raw_span(name)

    def _check_version(self, reader: Reader, shard_path: str) -> None:
        """A shard written by tensorbridge carries its save's generation: it must be the
        index's."""
        if self._generation is not None and reader.metadata.get(GENERATION_KEY) != self._generation:
            raise _changed(
                f"shard {safejson.short(os.path.basename(shard_path))} belongs to "
                "another save than the index",
                self.path,
            )

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
        self._read_from.add(shard)
        if self._closed:
            raise FileFormatError("the file is closed. Fix: open it again.", self.path)
        if self._current is None or self._current[0] != shard:
            self._drop_current()
            try:
                reader = _open_shard(shard)
            except FileFormatError as exc:
                if isinstance(exc, CheckpointChangedError):
                    raise
                raise _changed(
                    f"shard {safejson.short(os.path.basename(shard))} cannot be opened again",
                    self.path,
                ) from exc
            try:
                if _reader_stamp(reader, shard) != self._stamps[shard]:
                    raise _changed(
                        f"shard {safejson.short(os.path.basename(shard))} was "
                        "replaced or modified since it was opened",
                        self.path,
                    )
                self._check_version(reader, shard)
            except BaseException:
                reader.close()
                raise
            self._current = (shard, reader)
        return self._current[1]

    def _drop_current(self) -> None:
        self._span_shard = None  # the next span of any shard checks its identity again
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
        by file identity, whenever it is opened).

        A safetensors shard's spans were taken when it was checked at open: instead of
        opening and parsing the shard again, its identity (device, inode, size, change
        times) is compared with the one recorded then, whenever the spans asked for move
        to another shard, as opening it again would compare them."""
        with self._lock:
            shard = self.shard_of(name)
            if name not in self._spans or self._closed:
                return self._shard_reader(name).raw_span(name)
            self._read_from.add(shard)
            if self._span_shard != shard:
                held = self._held.get(shard)
                try:  # a held descriptor is of the file checked: it cannot have been replaced
                    now = _stamp(os.stat(shard) if held is None else os.fstat(held))
                except OSError:
                    now = ()
                if now != self._stamps[shard]:
                    raise _changed(
                        f"shard {safejson.short(os.path.basename(shard))} was "
                        "replaced or modified since it was opened",
                        self.path,
                    )
                self._span_shard = shard
            return self._spans[name]

    def take_descriptor(self, span: RawSpan, smallest: int = 0) -> tuple[int, int] | None:
        """``(descriptor, size)``: the descriptor ``span``'s shard was checked through at
        open (``hold=True``), for the caller to map and close, and the shard's size;
        ``None`` when none is held, or the shard is smaller than ``smallest`` bytes (it
        will not be mapped: open it by path, :func:`.safetensors.open_span`). A shard
        modified since it was checked (size or change times) raises
        :class:`~tensorbridge.errors.CheckpointChangedError`."""
        with self._lock:
            stamp = self._stamps.get(span.path)
            if stamp is not None and stamp[2] < smallest:
                return None
            fd = self._held.pop(span.path, None)
            if fd is None:
                return None
            _unreserve_held()  # (the caller's now: a lease counts it, or it is closed)
            try:  # (when raw_span has just compared them, not again)
                if (
                    self._span_shard != span.path
                    and _stamp(os.fstat(fd)) != self._stamps[span.path]
                ):
                    raise _changed(
                        f"shard {safejson.short(os.path.basename(span.path))} was "
                        "modified since it was opened",
                        self.path,
                    )
            except BaseException:
                os.close(fd)
                raise
            return fd, self._stamps[span.path][2]

    def mapped(self, span: RawSpan) -> None:
        """``span``'s shard is mapped now (under a lease, nothing can rewrite it any more):
        it must still be the version checked at open, else the mapping may hold another
        version's bytes at this version's offsets (:class:`CheckpointChangedError`)."""
        with self._lock:
            self._mapped.add(span.path)
            self._unchanged(span.path)

    def verify(self) -> None:
        """Every shard read by copies is still the version checked at open: one rewritten
        in place while its tensors were read (between two of them) would have given
        tensors of two versions (:class:`CheckpointChangedError`: ``load`` reads again)."""
        with self._lock:
            for shard in self._read_from - self._mapped:
                self._unchanged(shard)

    def _unchanged(self, shard: str) -> None:
        try:
            now = _stamp(os.stat(shard))
        except OSError:
            now = ()
        if now != self._stamps[shard]:
            raise _changed(
                f"shard {safejson.short(os.path.basename(shard))} was modified while it was read",
                self.path,
            )

    def _close_held(self) -> None:
        while self._held:
            os.close(self._held.popitem()[1])
            _unreserve_held()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_current()
            self._close_held()


# --- writing --------------------------------------------------------------------


def destination(path: str) -> tuple[str, str, str]:
    """``(directory, index_name, shard_prefix)`` for a directory or index path; an index
    of a variant (``model.safetensors.index.fp16.json``) gets ``model.fp16-0000K-of-0000N``
    shards, as ``save_pretrained(variant="fp16")`` names them."""
    if is_index_name(path):
        index_name = os.path.basename(path)
        m = _INDEX_RE.fullmatch(index_name)
        assert m is not None
        base = m["base"]
        if not base.endswith(".safetensors") or base == ".safetensors":
            raise FileFormatError(
                "tensorbridge writes safetensors shards, so the index must be named "
                "'NAME.safetensors.index.json' (or 'NAME.safetensors.index.VARIANT.json'). Fix: "
                f"use e.g. {os.path.join(os.path.dirname(path), _DEFAULT_INDEX)!r}, or pass a "
                "directory.",
                path,
            )
        prefix = base[: -len(".safetensors")]
        if m["variant"]:
            prefix += "." + m["variant"]
        return os.path.dirname(path) or ".", index_name, prefix
    return path, _DEFAULT_INDEX, "model"


def _shard_names(prefix: str, count: int, tag: str = "") -> list[str]:
    tag = f"-{tag}" if tag else ""
    return [f"{prefix}{tag}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _shard_pattern(prefix: str) -> re.Pattern[str]:
    """Shard names of ``prefix``: standard ones and those with a uniqueness tag."""
    return re.compile(re.escape(prefix) + r"(?:-[0-9a-f]{8})?-\d{5}-of-\d{5}\.safetensors")


def _remove_old_shards(within: int, prefix: str, keep: set[str]) -> None:
    """After the new index is in place: remove the shards of ``prefix`` (the standard names
    and tagged ones, which are this writer's own names: those of the previous save, of a
    killed one) that the new index does not list. Nothing else is removed, whatever the
    old index listed: a hostile index cannot get other files deleted. ``within``: the
    directory's descriptor (the one this save locked, wherever its path now leads)."""
    pattern = _shard_pattern(prefix)
    single = f"{prefix}.safetensors"  # superseded; from_pretrained would read it first
    try:
        names = os.listdir(within)
    except OSError:
        return
    names.sort(key=lambda n: n != single)  # the one from_pretrained would load first
    for name in names:
        if name not in keep and (pattern.fullmatch(name) or name == single):
            with contextlib.suppress(OSError):
                atomic.unlink_later(name, within)  # (freed after return)


def new_generation(previous: str | None, infos: Sequence[TensorInfo], prefix: str) -> str:
    """A save's generation: 16 hex digits of a hash of the previous save's generation (the
    index being replaced) and of what is written. Every save into a directory differs from
    the one it replaces, and the same tree saved into a fresh directory gives the same
    bytes every time (a parallel convert is byte-identical to one process)."""
    digest = hashlib.sha256(
        json.dumps(
            [previous or "", prefix, [[i.name, i.dtype, list(i.shape)] for i in infos]],
            ensure_ascii=True,
        ).encode()
    )
    return digest.hexdigest()[:16]


def _previous_generation(index_name: str, within: int) -> str | None:
    """The generation of the index ``index_name`` in the directory ``within`` (a
    descriptor): the one about to be replaced (``None`` when there is none)."""
    try:
        index, _ = _load_json(index_name, within)
    except (FileFormatError, OSError):
        return None
    value = index.get(GENERATION_KEY) if isinstance(index, dict) else None
    return value if isinstance(value, str) else None


def _refuse_file_named_directory(directory: str) -> None:
    """A directory named like a single file (``x.npz``, ``m.safetensors``) is not written
    into: that was a single file meant, and a sharded checkpoint would hide in it."""
    from . import FORMAT_MODULES, get_format

    suffix = os.path.splitext(os.path.basename(os.path.normpath(directory)))[1].lower()
    for name in FORMAT_MODULES:
        fmt = get_format(name)
        if name == "zarr" and suffix in fmt.suffixes:  # (a zarr store is a directory)
            raise FileFormatError(
                "the destination is a .zarr store's path with a trailing '/', which names a "
                "sharded checkpoint's directory. Fix: to write (or replace) the zarr store, "
                f"drop the trailing '/' ({os.path.normpath(directory)!r}); for a sharded "
                "checkpoint, choose a directory name without a file suffix.",
                directory,
            )
        if name != "sharded" and suffix in fmt.suffixes:
            raise FileFormatError(
                f"the destination is a directory named like a .{name} file ({suffix}); a "
                "sharded checkpoint would be written inside it. Fix: to write one "
                f"{suffix} file, remove or rename that directory; for a sharded checkpoint, "
                "choose a directory name without a file suffix.",
                directory,
            )


def _unlink_all(names: list[str], within: int) -> None:
    """Remove the files ``names`` from the directory ``within`` (a descriptor)."""
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=within)


class ShardedFormat(Format):
    """A directory of safetensors shards plus a Hugging Face ``*.index.json``."""

    name = "sharded"
    suffixes = (INDEX_SUFFIX,)
    description = (
        "Hugging Face sharded checkpoint: model.safetensors.index.json plus "
        "model-0000K-of-0000N.safetensors shards (reads .bin shards too)."
    )

    options = ("max_shard_size",)

    def check_info(self, info: TensorInfo, path: str) -> None:
        SAFETENSORS.check_info(info, path)  # every shard is a safetensors file

    def check_write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        metadata: Mapping[str, str] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        meta = super().check_write(path, infos, metadata, options)
        parse_size((options or {}).get("max_shard_size", DEFAULT_MAX_SHARD_SIZE))
        if "total_size" in meta:
            raise ConversionError(
                f"{path}: metadata key 'total_size' is refused: in a sharded checkpoint it is "
                "the index's own field (the sum of the tensors' bytes), which tensorbridge "
                "writes itself. Fix: rename the key (e.g. 'source_total_size'), or leave it "
                "out; nothing was written."
            )
        build_header(infos, None, path)  # the reserved name and the header size limit
        return meta

    def open(self, path: str, *, variant: str | None = None, hold: bool = False) -> ShardedReader:
        """Open a sharded checkpoint (see the module docstring); ``variant`` picks the
        files of ``save_pretrained(variant=...)`` in a directory; ``hold``: see
        :class:`ShardedReader`."""
        return ShardedReader(os.fspath(path), variant, hold=hold)

    def write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        fetch: Callable[[str], np.ndarray],
        metadata: Mapping[str, str] | None = None,
        *,
        landed: Callable[[str, int, int, int], None] | None = None,
        write_shards: Callable[[list[tuple[str, list[TensorInfo], dict[str, str]]], int], None]
        | None = None,
        **options: Any,
    ) -> None:
        """Write shards of at most ``max_shard_size`` bytes (option; default 5GB), then the index.

        ``landed`` is handed to each shard's safetensors writer (see its ``write``).
        ``write_shards(jobs, within)``, when given, writes the shards instead (all at
        once, e.g. with :meth:`SafetensorsFormat.placed`; ``fetch`` is not called): each
        job is ``(path, infos, metadata)`` for a checked ``SAFETENSORS.write`` call, and
        ``within`` is the locked directory's descriptor, that every file must land in
        (``placed(..., within=within)``)."""
        path = os.fspath(path)
        user_metadata = self.check_write(path, infos, metadata, options)
        max_shard_size = parse_size(options.get("max_shard_size", DEFAULT_MAX_SHARD_SIZE))
        directory, index_name, prefix = destination(path)
        _refuse_file_named_directory(directory)
        # One sharded write per directory at a time: another's cleanup must not meet our
        # shards half-way (its old index is read and its old shards removed under the lock).
        # A failed save into a directory it made removes it (under the lock; a save waiting
        # for the lock then makes it again).
        with _locked_directory(directory) as within:
            self._write_locked(
                directory,
                within,
                index_name,
                prefix,
                infos,
                fetch,
                user_metadata,
                max_shard_size,
                landed,
                write_shards,
            )

    def _write_locked(
        self,
        directory: str,
        within: int,
        index_name: str,
        prefix: str,
        infos: Sequence[TensorInfo],
        fetch: Callable[[str], np.ndarray],
        user_metadata: dict[str, str],
        max_shard_size: int,
        landed: Callable[[str, int, int, int], None] | None,
        write_shards: Callable[[list[tuple[str, list[TensorInfo], dict[str, str]]], int], None]
        | None,
    ) -> None:
        """Write into ``directory``, locked through ``within`` (its descriptor): every name
        is checked, made, replaced and removed inside that directory only, so a save whose
        directory was removed or replaced meanwhile (another checkpoint there, a link to
        one) fails without touching what its path now leads to."""
        groups = plan_shards(infos, max_shard_size)
        index_path = os.path.join(directory, index_name)
        atomic.remove_stale_in(directory, within)  # leftovers of killed writers (unlocked)
        generation = new_generation(_previous_generation(index_name, within), infos, prefix)
        names = _shard_names(prefix, len(groups))
        # Never overwrite a file the current index may reference: if any standard name
        # is taken, every new shard gets a fresh, unique name.
        while any(_exists_in(n, within) for n in names):
            names = _shard_names(prefix, len(groups), secrets.token_hex(4))
        keep = set(names) | {index_name}  # (what the new index names, and itself)
        written: list[str] = []
        shard_meta = {"format": "pt", GENERATION_KEY: generation}
        try:
            # Every file is written first and flushed together (one journal commit for
            # all, not one each); then the shards' names land and are made durable, and
            # only then the index's: a crash leaves the old index (whose shards were
            # never touched) or the new one with every shard it names.
            with atomic.Commit(within) as commit:
                pending = _pending_limit()
                if write_shards is not None:  # the names are new: removing them is safe
                    jobs = [
                        (os.path.join(directory, n), g, shard_meta)
                        for n, g in zip(names, groups, strict=True)
                    ]
                    written.extend(names)
                    write_shards(jobs, within)  # each shard fsynced and renamed, its directory too
                else:
                    for shard, group in zip(names, groups, strict=True):
                        final = os.path.join(directory, shard)
                        written.append(shard)  # the commit removes its temporary file
                        SAFETENSORS.write(
                            final,
                            group,
                            fetch,
                            shard_meta,
                            landed=landed,
                            checked=True,
                            commit=commit,
                        )
                        if len(commit) >= pending:  # bounded open files
                            commit.publish()  # new names: the old index never sees them
                shards = len(commit)
                index = {
                    "metadata": {**user_metadata, "total_size": sum(i.nbytes for i in infos)},
                    "weight_map": {
                        i.name: shard
                        for shard, group in zip(names, groups, strict=True)
                        for i in group
                    },
                    GENERATION_KEY: generation,
                }
                # the link itself is replaced, as the shards are (a Hugging Face cache
                # snapshot links into content-addressed blobs that must not change)
                with atomic_write(index_path, follow_symlinks=False, commit=commit) as f:
                    f.write(
                        (json.dumps(index, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
                    )
                commit.flush()  # every shard's bytes and the index's, all at once
                commit.publish(shards)  # the shards' names, then the directory
                if write_shards is not None:
                    atomic.fsync_dir(within)
                commit.publish()  # the index, then the directory
            _remove_old_shards(within, prefix, keep)
        except BaseException:
            # Before the new index landed, the old index and its shards were never
            # touched: remove what this save wrote. After (a signal during the last
            # directory fsync), the new checkpoint is complete: keep it, and remove what
            # it supersedes as a finished save does (an old model.safetensors left
            # beside it would be what from_pretrained loads).
            if _previous_generation(index_name, within) != generation:
                _unlink_all(written, within)
            else:
                _remove_old_shards(within, prefix, keep)
            atomic.fsync_dir(within)
            raise
        atomic.fsync_dir(within)


def _exists_in(name: str, within: int) -> bool:
    """Whether the directory ``within`` (a descriptor) holds an entry ``name`` (a link counts)."""
    try:
        os.stat(name, dir_fd=within, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # (cannot tell: a fresh name is safe)
    return True


def _makedirs(name: str, created: list[str]) -> None:
    """``os.makedirs(name, exist_ok=True)``, noting in ``created`` each directory it made
    (by the path it made it through, so ``..`` and links are undone exactly)."""
    head, tail = os.path.split(name)
    if not tail:
        head, tail = os.path.split(head)
    if head and tail and not os.path.exists(head):
        with contextlib.suppress(FileExistsError):
            _makedirs(head, created)
        if tail == os.curdir:
            return
    try:
        os.mkdir(name)
    except FileExistsError:
        if os.path.isdir(name):
            return
        if not os.path.lexists(name):  # there, then removed before it could be checked
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name) from None
        raise
    except OSError:
        if not os.path.isdir(name):
            raise
        return
    created.append(name)


#: how long a save keeps making its directory again while others remove it (seconds)
RECREATE_SECONDS = 30.0


def _removed_meanwhile(exc: BaseException) -> bool:
    """Whether ``exc`` says a directory on the way vanished (another save's cleanup)."""
    cause = exc.__cause__ if isinstance(exc, FileFormatError) else exc
    return isinstance(cause, OSError) and cause.errno == errno.ENOENT


def _names_locked(directory: str, fd: int) -> bool:
    """Whether ``directory`` still names the directory that ``fd`` (its lock) is open on."""
    try:
        here, locked = os.stat(directory), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (locked.st_dev, locked.st_ino)


@contextlib.contextmanager
def _locked_directory(directory: str) -> Iterator[int]:
    """Make ``directory`` and hold its lock for the block, which gets the locked
    directory's descriptor. A failed block removes the
    directories made here, under the lock, where they are still empty and still the ones
    made. A directory removed before or while this waited for the lock (another save's
    cleanup) is made again and locked anew, for up to :data:`RECREATE_SECONDS`."""
    created: list[str] = []
    deadline = time.monotonic() + RECREATE_SECONDS
    attempt = 0
    while True:
        attempt += 1
        with contextlib.ExitStack() as stack:
            try:
                _makedirs(directory, created)
                fd = stack.enter_context(atomic.lock_directory(directory))
            except (OSError, FileFormatError) as exc:
                if not (_removed_meanwhile(exc) and time.monotonic() < deadline):
                    _remove_if_empty(created)
                    if isinstance(exc, FileFormatError):
                        raise
                    raise FileFormatError(
                        f"cannot create the directory ({exc.strerror}). Fix: choose a "
                        "writable place.",
                        directory,
                    ) from exc
            else:
                if _names_locked(directory, fd):
                    try:
                        yield fd
                    except BaseException:
                        if _names_locked(directory, fd):  # (not one made again by another)
                            _remove_if_empty(created)
                        raise
                    return
        if time.monotonic() >= deadline:
            _remove_if_empty(created)
            raise FileFormatError(
                "the directory kept being removed while this save waited for it. Fix: stop "
                "the other program that removes it, then save again.",
                directory,
            )
        if attempt > 2:
            time.sleep(min(0.001 * attempt, 0.05))  # (others' cleanups to end)


def _remove_if_empty(directories: list[str]) -> None:
    """Remove the directories this save made (the deepest last in ``directories``) where
    they are still empty: one that holds anything (another save's files) is kept."""
    for directory in reversed(directories):
        try:
            os.rmdir(directory)
        except OSError:
            return
    directories.clear()


FORMAT = ShardedFormat()
