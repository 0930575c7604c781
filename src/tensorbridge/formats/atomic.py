"""Atomic file replacement: a failed or killed write never touches the old file.

``with atomic_write(path) as f: f.write(...)`` writes into a temporary file in
the destination's directory, flushes and fsyncs it, gives it the destination's
mode, ``os.replace``\\ s it over the destination, then fsyncs the directory. A
symlinked destination updates the link's target (``follow_symlinks=False``
replaces the link itself instead). A destination that exists but is not a
regular file (a FIFO, socket or device node) is refused, never replaced. On any
exception the temporary file is removed and the destination is byte-identical
to before.

``with atomic_path(path) as tmp: ...`` is the same mechanism for libraries
(h5py) that must open the file themselves: it yields the temporary file's
*path* (an empty file already exists there) instead of an open file object.

While :func:`atomic_write`'s file is written, every :data:`WRITEBACK_CHUNK` bytes are
handed to the kernel's writeback (:func:`start_writeback`, Linux ``sync_file_range``
with ``SYNC_FILE_RANGE_WRITE``, which starts writing and does not wait), so the disk
works while the next bytes are produced and the final ``fsync`` waits only for the
tail. It is a hint: where the call is missing (not Linux, no libc symbol) or refused
(``ENOSYS``, ``EINVAL``, ...), nothing changes, and the ``fsync`` stays what makes the
data durable either way (it also reports any write-back error, which starting
writeback does not consume).

Replacing a large file frees it, which costs (its cached pages and blocks: ~15 ms for
64 MiB); that freeing happens on a daemon thread after the write has returned (as it does
for the old shards a sharded save removes: :func:`unlink_later`), the
replaced file held open until then (``O_PATH``, Linux; :func:`wait_released` waits
for it; a process forked meanwhile closes its inherited copy at once, so a long-lived
child does not keep the old file alive). Nothing about durability changes: the new
file, its name and the directory are on disk before the write returns, whoever frees
the old one.

A SIGKILL can leave the temporary file behind; its name is recognisable
(``.NAME.tb-tmp-PID-RANDOM``). The writer holds a lock on its temporary file
for the whole write: ``flock(LOCK_EX)`` for :func:`atomic_write` (and for the
spool files of :class:`tensorbridge.writer.Writer`), and a Linux open-file-
description byte-range lock for :func:`atomic_path` (HDF5 takes its own
``flock`` on the file it opens, which ours would block). A lock dies with its
process whatever PID namespace or host it ran in, so the next write to the same
destination (:func:`remove_stale`), or a sharded write to the same directory
(:func:`remove_stale_in`), removes a leftover only after taking both locks
itself without waiting; the PID in the name is informative only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import secrets
import stat
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO, NamedTuple, TypeVar

from ..errors import FileFormatError, TensorBridgeError

T = TypeVar("T")

__all__ = [
    "atomic_write",
    "atomic_path",
    "temp_name",
    "remove_stale",
    "remove_stale_in",
    "new_locked_directory",
    "release_directory",
    "remove_stale_directories",
    "fsync_dir",
    "fsync_together",
    "start_writeback",
    "wait_released",
    "WRITEBACK_CHUNK",
    "lock_new_file",
    "lock_directory",
    "Commit",
    "TMP_MARKER",
    "SPOOL_MARKER",
]

TMP_MARKER = ".tb-tmp-"
#: The marker of :class:`tensorbridge.writer.Writer`'s spool files (kept equal to writer.SPOOL_MARKER).
SPOOL_MARKER = ".tb-spool-"
_MARKERS = (TMP_MARKER, SPOOL_MARKER)
#: errnos meaning "this file system does not do locks": writing goes on without one.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

# Open-file-description locks (Linux >= 3.15): owned by the open file, not the process, and
# independent of flock() on local file systems. struct flock is {short, short, off_t, off_t,
# pid_t} padded to 32 bytes on 64-bit Linux.
_OFD = (
    sys.platform.startswith("linux") and hasattr(fcntl, "F_OFD_SETLK") and struct.calcsize("P") == 8
)
_FLOCK_STRUCT = "@hhqqi4x"


def _ofd_lock(fd: int, wait: bool) -> bool:
    """Take a whole-file OFD write lock on ``fd``; False where it is held elsewhere."""
    arg = struct.pack(_FLOCK_STRUCT, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, arg)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if exc.errno in _NO_LOCKS:
            return True
        raise
    return True


def _flock(fd: int, wait: bool) -> bool:
    """``flock(LOCK_EX)`` on ``fd``; False where another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            return False
        if exc.errno in _NO_LOCKS:
            return True
        raise
    return True


def _same_file(fd: int, path: str, dir_fd: int | None = None) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def lock_new_file(fd: int, path: str, *, ofd: bool = False, dir_fd: int | None = None) -> bool:
    """Lock the just-created ``path`` (open as ``fd``) for as long as ``fd``'s open file lives.

    Returns False when a cleaner removed ``path`` between its creation and the lock
    (it judged it stale before the lock existed): the caller closes ``fd`` and makes
    another file. ``ofd`` uses an OFD byte-range lock instead of ``flock``. ``dir_fd``:
    ``path`` is relative to that directory.
    """
    try:
        if ofd:
            if _OFD:
                _ofd_lock(fd, wait=True)
        else:
            _flock(fd, wait=True)
    except OSError:
        pass  # no lock at all: a cleaner's own lock attempt then fails too, or succeeds late
    return _same_file(fd, path, dir_fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _owner_alive_here(name: str, marker: str) -> bool:
    """Pre-filter: the PID in ``.BASE{marker}PID-RANDOM`` is a live process of this PID
    namespace (this process included). A dead PID proves nothing (another namespace or
    host may own the file): the lock decides then."""
    pid_text = name.rsplit(marker, 1)[-1].split("-", 1)[0]
    return pid_text.isdigit() and _pid_alive(int(pid_text))


def _remove_if_dead(path: str, dir_fd: int | None = None) -> None:
    """Unlink the regular file ``path`` if no open file anywhere holds its locks."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError:
        return  # not ours to judge (permissions, a link, gone already)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        try:
            if not _flock(fd, wait=False):
                return
            if _OFD and not _ofd_lock(fd, wait=False):
                return
        except OSError:
            return  # cannot tell: keep it
        if _same_file(fd, path, dir_fd):
            with contextlib.suppress(OSError):
                os.unlink(path, dir_fd=dir_fd)
    finally:
        os.close(fd)  # releases both locks


def temp_name(directory: str, base: str, marker: str = TMP_MARKER) -> str:
    """A fresh, recognisable temporary path for ``base``: ``.BASE{marker}PID-RANDOM``."""
    return os.path.join(directory, f".{base}{marker}{os.getpid()}-{secrets.token_hex(4)}")


def _listdir(directory: str | int) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def remove_stale(
    directory: str, base: str, marker: str = TMP_MARKER, dir_fd: int | None = None
) -> None:
    """Remove temporary files of ``base`` whose writer is gone (no one holds their lock);
    with ``dir_fd``, in that directory (``directory`` is then unused)."""
    prefix = f".{base}{marker}"
    for name in _listdir(directory if dir_fd is None else dir_fd):
        if name.startswith(prefix) and not _owner_alive_here(
            name[len(prefix) - len(marker) :], marker
        ):
            _remove_if_dead(*_at(os.path.join(directory, name), dir_fd))


def remove_stale_in(directory: str, dir_fd: int | None = None) -> None:
    """Remove every abandoned ``.*.tb-tmp-*`` and ``.*.tb-spool-*`` file in ``directory``
    (with ``dir_fd``, in that directory: ``directory`` is then unused)."""
    for name in _listdir(directory if dir_fd is None else dir_fd):
        marker = next((m for m in _MARKERS if m in name[1:]), None)
        if name.startswith(".") and marker and not _owner_alive_here(name, marker):
            _remove_if_dead(*_at(os.path.join(directory, name), dir_fd))


#: temporary directories this process is making or writing (until
#: :func:`release_directory`): never taken for stale here, whatever their lock says
#: (a file system without locks grants every lock)
_live: set[str] = set()


def new_locked_directory(directory: str, base: str) -> tuple[str, int]:
    """A new, empty temporary directory for ``base`` in ``directory`` (named as
    :func:`temp_name` names files) and a descriptor of it that holds its ``flock``: until
    that descriptor is closed, :func:`remove_stale_directories` leaves it (in this
    process: until :func:`release_directory`). Nothing is left by an exception (an
    interrupt too) before it returns."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = temp_name(directory, base)
        made: str | None = tmp
        fd: int | None = None
        _live.add(tmp)
        try:
            try:
                os.mkdir(tmp)
            except OSError as exc:
                made = None  # not made here
                raise FileFormatError(
                    f"cannot create a directory in {directory!r} ({exc.strerror}). Fix: check "
                    "that the directory exists and is writable, or choose another destination.",
                    os.path.join(directory, base),
                ) from exc
            fd = os.open(tmp, flags)
            if lock_new_file(fd, tmp):
                return tmp, fd
        except BaseException:
            _live.discard(tmp)
            if made is not None:
                with contextlib.suppress(OSError):
                    os.rmdir(made)
            _close_quietly(fd)
            raise
        _live.discard(tmp)
        os.close(fd)  # a cleaner took it before our lock existed: another name


def release_directory(tmp: str, fd: int) -> None:
    """The end of a :func:`new_locked_directory`'s save: its lock is released, and
    whatever is left at ``tmp`` may be taken for stale by the next save."""
    try:
        os.close(fd)
    finally:
        _live.discard(tmp)


def remove_stale_directories(directory: str, base: str) -> None:
    """Remove the temporary directories of ``base`` (:func:`new_locked_directory`) that a
    writer left and no one holds the lock of any more: a killed writer's, and this
    process's own that a failed save could not remove (or that a library's thread made
    again after it). One whose writer is another live process here is left: it may not
    have locked it yet (this process knows which of its own are still in use)."""
    import shutil

    prefix = f".{base}{TMP_MARKER}"
    mine = f"{TMP_MARKER}{os.getpid()}-"
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW | os.O_NONBLOCK
    for name in _listdir(directory):
        if not name.startswith(prefix):
            continue
        path = os.path.join(directory, name)
        tail = name[len(prefix) - len(TMP_MARKER) :]  # (from the marker on)
        if tail.startswith(mine):
            if path in _live:
                continue
        elif _owner_alive_here(tail, TMP_MARKER):
            continue
        try:
            fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue  # a file (not ours to judge here), gone, or not readable
        try:
            if _flock(fd, wait=False) and _same_file(fd, path):
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # cannot tell: keep it
        finally:
            os.close(fd)


@contextlib.contextmanager
def lock_directory(directory: str) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``directory`` (through a read-only descriptor of the
    directory itself, so no lock file is left behind) for the block; yields that
    descriptor."""
    try:
        fd = os.open(
            directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
        )
    except OSError as exc:
        raise FileFormatError(
            f"cannot open the directory ({exc.strerror}). Fix: check that it exists and is "
            "readable.",
            directory,
        ) from exc
    try:
        with contextlib.suppress(OSError):  # a file system without locks: go on unlocked
            _flock(fd, wait=True)
        yield fd
    finally:
        os.close(fd)


#: Bytes written between two calls of :func:`start_writeback` in :func:`atomic_write`.
WRITEBACK_CHUNK = 2 * 1024 * 1024
_PAGE = 4096
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait
_UNSET: Any = object()
_sync_file_range: Any = _UNSET  # the libc function, None where missing; looked up once


def _lookup_sync_file_range() -> Any:
    """libc's ``sync_file_range`` as a ctypes function, or None (not Linux, no symbol)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (ImportError, OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int, end: int = 0) -> bool:
    """Start writing ``fd``'s dirty pages in ``[0, end)`` to disk without waiting for
    them (``end`` 0: the whole file); True if the kernel took the request.

    Advisory only: durability still comes from ``fsync``, which waits for these
    pages too and reports their errors (``SYNC_FILE_RANGE_WRITE`` alone does not
    consume a write-back error). ``end`` is rounded down to a page, so a partly
    written last page is not written twice. Without ``sync_file_range`` (not Linux,
    or refused with ``ENOSYS``/``EINVAL``/... by the file system) it does nothing and
    returns False.
    """
    global _sync_file_range
    fn = _sync_file_range
    if fn is _UNSET:
        fn = _sync_file_range = _lookup_sync_file_range()
    if fn is None:
        return False
    if end:
        end -= end % _PAGE
        if end <= 0:
            return False
    if fn(fd, 0, end, _SYNC_FILE_RANGE_WRITE) == 0:
        return True
    import ctypes

    if ctypes.get_errno() == errno.ENOSYS:  # the kernel lacks it: stop asking
        _sync_file_range = None
    return False  # any other error: fsync decides (and reports real I/O errors)


class _WritebackFile(io.FileIO):
    """A raw file that calls :func:`start_writeback` after each :data:`WRITEBACK_CHUNK`
    bytes written (a large write is split into chunks for that), so that writeback
    overlaps with producing the rest of the file."""

    _pending = 0  # bytes written since the last start_writeback
    _high = 0  # the largest end of a write seen so far

    def write(self, b: Any, /) -> int:
        try:
            view = memoryview(b).cast("B")
        except TypeError:  # not C-contiguous: FileIO's own write refuses it as before
            return super().write(b)
        n = len(view)
        done = 0
        while done < n:
            got = super().write(view[done : done + WRITEBACK_CHUNK])
            if not got:  # nothing written (never for a regular file): report what was
                return done
            done += got
            self._pending += got
            if self._pending >= WRITEBACK_CHUNK:
                self._pending = 0
                self._high = max(self._high, self.tell())
                start_writeback(self.fileno(), self._high)
        return done


#: A replaced destination at least this large is freed after the write returns.
RELEASE_LATER_BYTES = 1024 * 1024
_releasing: list[threading.Thread] = []  # threads still closing a replaced file
_held: set[int] = set()  # descriptors of replaced files not yet handed to os.close
_held_lock = threading.Lock()


def _forget_held_in_child() -> None:
    """In a forked child: close the inherited descriptors of replaced files at once (no
    release thread runs there), so that a long-lived child (a DataLoader worker forked
    right after a save) does not keep the old file, and its disk space, alive."""
    for fd in _held:
        _close_quietly(fd)
    _held.clear()
    _held_lock.release()  # taken in the parent by the before-fork hook


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_held_lock.acquire,
        after_in_parent=_held_lock.release,
        after_in_child=_forget_held_in_child,
    )


def _hold_replaced(target: str, dir_fd: int | None = None) -> int | None:
    """An ``O_PATH`` descriptor of the large regular file ``target`` is about to replace.

    Renaming over a file frees it (its cached pages and its blocks: ~15 ms for 64 MiB
    here) inside ``os.replace``, unless someone still holds it open. Held here, it is
    freed when :func:`_release_later` closes the descriptor on another thread, after
    the write (data, rename and directory all durable) has returned. None for small
    files, non-regular ones, or where ``O_PATH`` is missing (not Linux). ``dir_fd``:
    ``target`` is relative to that directory.
    """
    o_path = getattr(os, "O_PATH", 0)
    if not o_path:
        return None
    try:
        st = os.stat(target, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_size < RELEASE_LATER_BYTES:
            return None
        flags = o_path | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        return os.open(target, flags, dir_fd=dir_fd)
    except OSError:
        return None


def _close_quietly(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _release(fd: int) -> None:
    """The release thread: close ``fd``, which frees the replaced file."""
    with _held_lock:  # a fork in between sees it either held (and closes it) or gone
        if fd not in _held:
            return
        _held.discard(fd)
    _close_quietly(fd)


def _release_later(fd: int | None) -> None:
    """Close ``fd`` (the replaced file) on a daemon thread, so that freeing it overlaps
    with whatever the caller does next; closed here where no thread can start."""
    if fd is None:
        return
    _releasing[:] = [t for t in _releasing if t.is_alive()]
    with _held_lock:
        _held.add(fd)
    thread = threading.Thread(target=_release, args=(fd,), name="tensorbridge-release", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # no new threads (interpreter shutting down)
        _release(fd)
        return
    _releasing.append(thread)


def unlink_later(path: str, dir_fd: int | None = None) -> None:
    """Remove ``path``'s name now; a large regular file behind it is freed (its cached
    pages and blocks: ~7 ms for 16 MiB here) on a daemon thread, as a replaced file is.
    ``OSError`` of the unlink propagates. ``dir_fd``: ``path`` is relative to that
    directory."""
    held = _hold_replaced(path, dir_fd)
    try:
        os.unlink(path, dir_fd=dir_fd)
    except BaseException:
        _close_quietly(held)
        raise
    _release_later(held)


def wait_released(timeout: float | None = None) -> None:
    """Wait until the files replaced by earlier writes are freed (their space returned)."""
    for thread in list(_releasing):
        thread.join(timeout)


def _fsync_path(path: str) -> None:
    """Flush a file (or a directory's entries) that is not open here to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | int) -> None:
    """fsync a directory's entries: by its path, or through its descriptor (an ``int``)."""
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        if isinstance(directory, int):
            os.fsync(directory)
        else:
            _fsync_path(directory)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _kind(mode: int) -> str:
    for test, what in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def _check_target(
    path: str | os.PathLike[str],
    target: str,
    follow_symlinks: bool,
    example: str,
    dir_fd: int | None = None,
) -> int:
    """Refuse a destination that is a directory or another non-regular file; return the
    mode the new file gets (the destination's, or what a plain ``open()`` would give).
    ``dir_fd``: ``target`` is relative to that directory."""
    try:
        st = os.stat(target, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
    except (FileNotFoundError, NotADirectoryError):  # creating the temporary file reports it
        return _default_mode()
    except OSError:
        return _default_mode()
    if not follow_symlinks and stat.S_ISLNK(st.st_mode):  # the link itself is replaced
        try:
            st = os.stat(target, dir_fd=dir_fd)
        except OSError:
            return _default_mode()
        return st.st_mode & 0o7777 if stat.S_ISREG(st.st_mode) else _default_mode()
    if stat.S_ISDIR(st.st_mode):
        raise FileFormatError(
            "the destination is a directory. Fix: give a file name, e.g. "
            f"{os.path.join(os.fspath(path), example)!r}.",
            path,
        )
    if not stat.S_ISREG(st.st_mode):
        where = "" if target == os.path.abspath(os.fspath(path)) else f" ({target!r})"
        raise FileFormatError(
            f"the destination{where} is {_kind(st.st_mode)}, not a regular file; writing "
            "would replace it with a regular file. Fix: choose a regular file's path, or "
            "remove it first if replacing it is what you want.",
            path,
        )
    return st.st_mode & 0o7777


@contextlib.contextmanager
def _replacing(
    path: str | os.PathLike[str],
    example: str,
    follow_symlinks: bool,
    ofd: bool,
    commit: Commit | None = None,
    within: int | None = None,
) -> Iterator[tuple[str, int]]:
    """Create a temporary sibling of ``path``; on success move it over ``path``.

    Yields the temporary file's path and a read-write descriptor (a verifier may
    read back what was written) the caller must
    close (the lock on the temporary file is held here until it is renamed). The caller's block
    writes and fsyncs the file; this then gives it the destination's mode,
    replaces the destination and fsyncs the directory. On any exception the
    temporary file is removed, and an ``OSError`` is reported as a
    :class:`FileFormatError`. ``example`` names a file for the "is a directory" hint.
    ``within`` (or ``commit``'s): the descriptor of the directory the file must land in
    (see :func:`_rename`).
    """
    raw = os.fspath(path)
    if commit is not None:
        within = commit.within
    if within is not None:  # the name itself, inside that directory (see _rename)
        directory, base = os.path.dirname(raw) or ".", os.path.basename(raw)
        target = os.path.join(directory, base)  # (its last component: the name in within)
        mode = _check_target(path, base, False, example, within)
    else:
        if follow_symlinks:
            target = os.path.realpath(raw)  # a symlink's target gets the update
        else:  # the directory is resolved, the last component (maybe a link) is replaced
            # (realpath of the directory as given: ``link/..`` is the link's parent, as
            # for the kernel, not the path's lexical parent)
            target = os.path.join(
                os.path.realpath(os.path.dirname(raw) or "."), os.path.basename(raw)
            )
        directory, base = os.path.dirname(target) or ".", os.path.basename(target)
        mode = _check_target(path, target, follow_symlinks, example)
    remove_stale(directory, base, dir_fd=within)
    fd: int | None = None
    made: str | None = None  # the temporary file's name while it may exist
    try:  # from the open on: an exception (a Ctrl-C too) removes what was made
        while True:
            tmp = temp_name(directory, base)
            name, at = _at(tmp, within)
            try:
                # An interrupt can come as the open returns, before its descriptor is
                # kept: the name (ours alone: random) is removed then, the descriptor
                # stays open until the process ends.
                made = name
                fd = os.open(
                    name,
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                    0o600,
                    dir_fd=at,
                )
            except OSError as exc:
                made = None  # not made here (whatever holds the name is not ours)
                raise FileFormatError(
                    f"cannot create a file in {directory!r} ({exc.strerror}). Fix: check that "
                    "the directory exists and is writable, or choose another destination.",
                    path,
                ) from exc
            if lock_new_file(fd, name, ofd=ofd, dir_fd=at):
                break
            taken, fd, made = fd, None, None  # a cleaner took it before our lock existed
            os.close(taken)  # (another name)
        # The lock belongs to the open file: a duplicate descriptor keeps it until the
        # temporary file is renamed or removed, whenever the caller closes ``fd``.
        lock_fd = os.dup(fd)
    except BaseException as exc:
        if made is not None:
            with contextlib.suppress(OSError):
                os.unlink(made, dir_fd=at)
        _close_quietly(fd)
        if isinstance(exc, OSError) and not isinstance(exc, TensorBridgeError):
            raise _write_failed(exc, path) from exc
        raise
    replaced = None
    try:
        yield tmp, fd
        if commit is None:
            os.chmod(name, mode, dir_fd=at)
            replaced = _hold_replaced(*_at(target, within))
            _rename(tmp, target, within)
    except BaseException as exc:
        _close_quietly(replaced)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=at)
        os.close(lock_fd)
        if isinstance(exc, OSError) and not isinstance(exc, TensorBridgeError):
            raise _write_failed(exc, path) from exc
        raise
    if commit is not None:  # fsynced and renamed later, with the others (see Commit)
        commit._pending.append(_Pending(tmp, lock_fd, target, mode, path))
        return
    os.close(lock_fd)
    fsync_dir(directory if within is None else within)
    _release_later(replaced)


def _at(path: str, within: int | None) -> tuple[str, int | None]:
    """``path`` as the ``(path, dir_fd)`` arguments of an ``os`` call: its last component
    inside ``within`` (a directory's descriptor), or itself when ``within`` is None."""
    return (path, None) if within is None else (os.path.basename(path), within)


def _rename(tmp: str, target: str, within: int | None) -> None:
    """Move ``tmp`` over ``target``; with ``within`` (a directory's descriptor), move it
    inside that directory only, to the name ``target`` ends with: a directory renamed or
    replaced by another meanwhile (another checkpoint, a link) never receives it, and
    the rename fails instead (``tmp`` is not there)."""
    if within is None:
        os.replace(tmp, target)
    else:
        name = os.path.basename(target)
        os.replace(os.path.basename(tmp), name, src_dir_fd=within, dst_dir_fd=within)


def _write_failed(exc: OSError, path: str | os.PathLike[str]) -> FileFormatError:
    """The error reported for an ``OSError`` while a replacement was written."""
    if exc.errno in _DISK_FULL:
        why, fix = "the disk is full", "free space or choose another destination"
    elif exc.errno == errno.EFBIG:
        why = "the file would exceed the largest file this process may write"
        fix = (
            "raise the file-size limit (`ulimit -f unlimited`), or write to a file "
            "system that holds larger files, or write a sharded checkpoint"
        )
    else:
        why = exc.strerror or str(exc)
        fix = (
            "check that the destination's directory exists and is writable, or "
            "choose another destination"
        )
    return FileFormatError(
        f"writing failed ({why}); the destination was left unchanged. Fix: {fix}, then retry.",
        path,
    )


#: threads that flush files together (:func:`fsync_together`)
FSYNC_THREADS = 16


def fsync_together(
    jobs: Sequence[T], flush: Callable[[T], None], serial: int = 1
) -> list[OSError | None]:
    """``flush(job)`` for every job (an ``fsync``), all at once from up to
    :data:`FSYNC_THREADS` threads, so the file system commits them in one journal
    transaction instead of one each; one after another, in this thread, for up to
    ``serial`` jobs or where no thread can start (interpreter shutdown). Each job's
    ``OSError`` is returned, not raised, so that every flush runs to its end."""

    def outcome(job: T) -> OSError | None:
        try:
            flush(job)
        except OSError as exc:
            return exc
        return None

    if len(jobs) > serial:
        try:
            from concurrent.futures import ThreadPoolExecutor  # (at shutdown: refused)

            pool = ThreadPoolExecutor(
                min(FSYNC_THREADS, len(jobs)), thread_name_prefix="tensorbridge-fsync"
            )
        except RuntimeError:  # no new threads (interpreter shutdown): one by one
            pool = None
        if pool is not None:
            with pool:
                try:
                    futures = [pool.submit(outcome, job) for job in jobs]
                except RuntimeError:  # refused at shutdown (a job run twice is harmless)
                    futures = None
            if futures is not None:
                return [f.result() for f in futures]  # (a flush's own errors propagate)
    return [outcome(job) for job in jobs]


class _Pending(NamedTuple):
    tmp: str  #: the temporary file, complete but neither fsynced nor renamed
    lock_fd: int  #: holds its lock; fsynced through
    target: str  #: what it replaces
    mode: int  #: the mode it gets
    path: str | os.PathLike[str]  #: as the caller named it (for messages)


class Commit:
    """Atomic replacements that pay their fsyncs together instead of one after another.

    A write opened with ``atomic_write(path, commit=c)`` (or ``atomic_path``) is written
    into its temporary file as usual, but when its block ends the file is neither
    fsynced nor renamed: it waits in ``c``. :meth:`flush` fsyncs every waiting file at
    once, from several threads, so the file system commits them in one journal
    transaction instead of one each; :meth:`publish` then renames the first waiting
    files over their destinations, in the order they were written, and fsyncs their
    directories once. Nothing is renamed before it was fsynced, and a publish returns
    only once its names are durable, so a caller orders what a crash may leave by
    calling :meth:`publish` in steps (a sharded save: every shard, then the index).

    Leaving a ``with c:`` block (by an exception, or with files never published)
    removes every temporary file not yet renamed; what was renamed stays (the caller
    owns it). Errors are :class:`~tensorbridge.errors.FileFormatError`, as for one write.
    """

    def __init__(self, within: int | None = None) -> None:
        #: a directory's descriptor: every file is renamed inside it only (see _rename)
        self.within = within
        self._pending: list[_Pending] = []
        self._flushed = 0  # the first this many pending files are fsynced

    def __len__(self) -> int:
        """How many written files wait to be published."""
        return len(self._pending)

    def __enter__(self) -> Commit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def flush(self) -> None:
        """fsync every waiting file's data, all at once; the first error is raised once
        every flush has ended."""
        todo = self._pending[self._flushed :]
        outcomes = fsync_together([p.lock_fd for p in todo], os.fsync)
        for p, exc in zip(todo, outcomes, strict=True):
            if exc is not None:  # the first error, once every flush has ended
                raise _write_failed(exc, p.path) from exc
        self._flushed = len(self._pending)

    def publish(self, count: int | None = None) -> None:
        """Rename the first ``count`` waiting files (all: ``None``) over their
        destinations, in order, then fsync their directories; they are flushed first
        if :meth:`flush` was not called since they were written."""
        if self._flushed < len(self._pending):
            self.flush()
        n = len(self._pending) if count is None else count
        batch, self._pending = self._pending[:n], self._pending[n:]
        self._flushed -= len(batch)
        directories: list[str] = []
        try:
            while batch:
                p = batch[0]
                try:
                    name, at = _at(p.tmp, self.within)
                    os.chmod(name, p.mode, dir_fd=at)
                    replaced = _hold_replaced(*_at(p.target, self.within))
                    try:
                        _rename(p.tmp, p.target, self.within)
                    except BaseException:
                        _close_quietly(replaced)
                        raise
                except OSError as exc:
                    raise _write_failed(exc, p.path) from exc
                batch.pop(0)
                os.close(p.lock_fd)
                _release_later(replaced)
                d = os.path.dirname(p.target) or "."
                if d not in directories:
                    directories.append(d)
        finally:
            self._pending[:0] = batch  # not renamed (an error): abort removes them
            self._flushed += len(batch)
            for d in directories:  # what was renamed is durable either way
                fsync_dir(d if self.within is None else self.within)

    def abort(self) -> None:
        """Remove every temporary file not yet renamed."""
        pending, self._pending, self._flushed = self._pending, [], 0
        for p in pending:
            name, at = _at(p.tmp, self.within)
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=at)
            _close_quietly(p.lock_fd)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str],
    *,
    follow_symlinks: bool = True,
    commit: Commit | None = None,
    within: int | None = None,
) -> Iterator[BinaryIO]:
    """Open a temporary file that replaces ``path`` when the block succeeds.

    ``follow_symlinks=False`` replaces a symlink at ``path`` itself rather than its target.
    With ``commit``, the complete file waits there to be fsynced and renamed with
    others (see :class:`Commit`). ``within``: the descriptor of the directory it must land
    in (the rename fails if ``path``'s directory is no longer that one).
    """
    with _replacing(path, "model.safetensors", follow_symlinks, False, commit, within) as (
        _tmp,
        fd,
    ):
        with io.BufferedWriter(_WritebackFile(fd, "wb")) as f:
            yield f
            f.flush()
            if commit is None:
                os.fsync(f.fileno())
            else:  # the disk starts on it while the next file is written
                start_writeback(f.fileno())


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str],
    *,
    follow_symlinks: bool = True,
    commit: Commit | None = None,
    within: int | None = None,
) -> Iterator[str]:
    """Like :func:`atomic_write`, but yields a temporary *path* for libraries
    (h5py) that must open the file themselves. It replaces ``path`` on success.

    The temporary file stays locked (an OFD lock, which does not block HDF5's own
    ``flock``) through a descriptor held here until it is renamed or removed.
    """
    with _replacing(path, "model.h5", follow_symlinks, True, commit, within) as (tmp, fd):
        os.close(fd)
        yield tmp
        if commit is None:
            _fsync_path(tmp)
