"""Atomic file replacement: a failed or killed write never touches the old file.

``with atomic_write(path) as f: f.write(...)`` writes into a temporary file in
the destination's directory, flushes and fsyncs it, gives it the destination's
mode, ``os.replace``\\ s it over the destination, then fsyncs the directory. A
symlinked destination updates the link's target. On any exception the
temporary file is removed and the destination is byte-identical to before.

``with atomic_path(path) as tmp: ...`` is the same mechanism for libraries
(h5py) that must open the file themselves: it yields the temporary file's
*path* (an empty file already exists there) instead of an open file object.

A SIGKILL can leave the temporary file behind; its name is recognisable
(``.NAME.tb-tmp-PID-RANDOM``) and the next write to the same destination
removes leftovers whose process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from typing import BinaryIO, Iterator

from ..errors import FileFormatError, TensorBridgeError

__all__ = ["atomic_write", "atomic_path", "temp_name", "remove_stale", "fsync_dir", "TMP_MARKER"]

TMP_MARKER = ".tb-tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_name(directory: str, base: str, marker: str = TMP_MARKER) -> str:
    """A fresh, recognisable temporary path for ``base``: ``.BASE{marker}PID-RANDOM``."""
    return os.path.join(directory, f".{base}{marker}{os.getpid()}-{secrets.token_hex(4)}")


def remove_stale(directory: str, base: str, marker: str = TMP_MARKER) -> None:
    """Remove temporary files of ``base`` left behind by processes that no longer exist."""
    prefix = f".{base}{marker}"
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        pid_text = name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def _fsync_path(path: str) -> None:
    """Flush a file (or a directory's entries) that is not open here to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        _fsync_path(directory)


def _new_file_mode(target: str) -> int:
    """The destination's current mode, or what a plain ``open()`` would give a new file."""
    try:
        return os.stat(target).st_mode & 0o7777
    except (FileNotFoundError, NotADirectoryError):  # creating the temporary file reports it
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def _replacing(path: str | os.PathLike, example: str) -> Iterator[tuple[str, int]]:
    """Create a temporary sibling of ``path``; on success move it over ``path``.

    Yields the temporary file's path and a write-only descriptor the caller must
    close. The caller's block writes and fsyncs the file; this then gives it the
    destination's mode, replaces the destination and fsyncs the directory. On any
    exception the temporary file is removed, and an ``OSError`` is reported as a
    :class:`FileFormatError`. ``example`` names a file for the "is a directory" hint.
    """
    target = os.path.realpath(os.fspath(path))  # a symlink's target gets the update
    directory = os.path.dirname(target) or "."
    base = os.path.basename(target)
    if os.path.isdir(target):
        raise FileFormatError(
            "the destination is a directory. Fix: give a file name, e.g. "
            f"{os.path.join(os.fspath(path), example)!r}.",
            path,
        )
    remove_stale(directory, base)
    mode = _new_file_mode(target)
    tmp = temp_name(directory, base)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise FileFormatError(
            f"cannot create a file in {directory!r} ({exc.strerror}). Fix: check that the "
            "directory exists and is writable, or choose another destination.",
            path,
        ) from exc
    try:
        yield tmp, fd
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, TensorBridgeError):
            why = ("the disk is full" if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
                   else exc.strerror or str(exc))
            raise FileFormatError(
                f"writing failed ({why}); the destination was left unchanged. Fix: free space "
                "or choose another destination, then retry.",
                path,
            ) from exc
        raise
    fsync_dir(directory)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file that replaces ``path`` when the block succeeds."""
    with _replacing(path, "model.safetensors") as (_tmp, fd):
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Like :func:`atomic_write`, but yields a temporary *path* for libraries
    (h5py) that must open the file themselves. It replaces ``path`` on success."""
    with _replacing(path, "model.h5") as (tmp, fd):
        os.close(fd)
        yield tmp
        _fsync_path(tmp)
