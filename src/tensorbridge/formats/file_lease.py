"""Private mappings that stay snapshots: a read lease turns a rewrite of the file into a
copy of the mapped bytes first (Linux).

A private mapping (``MAP_PRIVATE``) costs nothing to make, but it is not a snapshot: a file
rewritten in place (``np.save``, ``torch.save`` and ``save_file`` open the same inode with
``O_TRUNC``) shows through on every page not yet written, and touching a page past the end
of a truncated file kills the process with SIGBUS. A **read lease** (``fcntl(F_SETLEASE,
F_RDLCK)``) closes that gap: the kernel holds back any ``open`` for writing and any
``truncate`` of the file, and signals the lease holder, until the holder gives the lease up
or ``/proc/sys/fs/lease-break-time`` (45 s by default) has passed. On that signal the
handler here copies each mapping of the file into fresh anonymous memory at the same
address (``mremap`` moves the copy over the mapping, so arrays and tensors over it keep
their pointers and their bytes), then gives the lease up, and the writer goes on.

So a load that maps costs what the headers cost, the arrays never change, and the copy is
paid only by the rare load whose file is rewritten while its arrays are alive.
:func:`guarded_map` returns ``None`` wherever that cannot be promised, and the caller copies:

- not Linux, or no ``libc`` to call ``mmap``/``mremap`` through;
- a file under :data:`MIN_BYTES` (copying it costs less than a lease's system calls), or
  :func:`leases_left` is 0 (each lease holds two descriptors; at most a quarter of the
  open-file limit goes to leases);
- a lease is refused: the file is open for writing somewhere (``EAGAIN``), the process
  neither owns the file nor has ``CAP_LEASE`` (``EACCES``), the file system has no leases
  (``EINVAL``: NFS, FUSE), ``fs.leases-enable`` is 0;
- the signal handler is not installed yet and this is not the main thread (Python installs
  handlers from the main thread only), or every candidate real-time signal already has a
  handler of someone else's.

What it costs others, and its limits: a writer of a leased file waits until the main
thread runs the handler (the break signal is directed at the main thread; the copies are
made in a thread of their own, so a KeyboardInterrupt cannot stop one half way). That is
milliseconds, plus the copy of a large file. A main thread held in one C call, or a
stopped process, holds writers up to the lease-break time; after it the kernel lets them
go on, and the arrays then behave as ``mmap=True`` arrays do (a rewrite shows through; a
truncation makes lost pages SIGBUS), as they do when no memory can be had for the copy.
The same holds for a main thread that waits in ``signal.sigwait`` (glibc retries it when
interrupted, so the handler never runs): a daemon that blocks SIGTERM and sigwaits for it
in the main thread should load with ``mmap=False``.
Also:

- the copy is of the whole mapped file, even where one small tensor of it is still
  alive, and each process holding the mapping (a child made by ``fork`` too) makes its own;
- a write into the arrays by another thread while the copy is made is kept if it runs
  Python code (the copy and the move are made back to back from C, keeping the GIL), but
  may be lost if it runs without the GIL (a torch op in another thread);
- the mapping is made through an open file description of its own, so closing the
  lease's descriptor gives the lease up even where ``F_UNLCK`` is refused (privileges
  dropped since the load);
- a writer that opens the file with ``O_NONBLOCK`` (coreutils ``truncate``) gets
  ``EAGAIN`` instead of waiting; ``os.truncate(path)`` of a leased file from this very
  process raises ``InterruptedError`` once (Python does not retry that call), and so does
  ``torch.save`` to it (its C++ ``open`` is interrupted; nothing is written, and a second
  call works); a writer in this very process that holds the GIL while its open waits
  (HDF5 in the main thread, which retries the interrupted open; ``torch.save`` or HDF5 in
  any other thread) waits for the lease-break time, since the handler cannot run; after
  it the arrays behave as ``mmap=True`` ones (a handler that then finds the file shorter
  than its mapping leaves the mapping as it is rather than fault copying it);
- a KeyboardInterrupt raised just after a system call of this module returns, before
  its result is stored, can leave one descriptor (and its lease) open: Python runs the
  handler there, and offers no way to defer it;
- ``open(path, O_RDONLY | O_TRUNC)`` truncates without breaking a read lease (a kernel
  gap): arrays over a file truncated that way fault (SIGBUS) on lost pages.

A child made by ``fork`` takes its own leases for the mappings it inherits (copying any it
cannot lease at once). At exit, the lease signal is ignored (Python restores default
handlers after ``atexit``, and the default would end the process).
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import ctypes
import fcntl
import functools
import gc
import itertools
import mmap
import operator
import os
import resource
import signal
import struct
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_LEASES", "MIN_BYTES", "guarded_map", "guards", "leases_left"]

_F_SETSIG = getattr(fcntl, "F_SETSIG", 10)
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)
_MREMAP_MAYMOVE = 1
_MREMAP_FIXED = 2


@dataclass
class _Guard:
    fd: int  # the leased descriptor (its own open file description)
    #: the mapping (a weak reference whose callback gives the lease up); None until mapped
    mapping: weakref.ref[mmap.mmap] | None = None


#: files smaller than this are copied: a copy of them costs less than a lease's syscalls
MIN_BYTES = 1 << 20
#: mappings leased at once at most (fewer under a low open-file limit: see leases_left)
MAX_LEASES = 1024

_GUARDS: dict[int, _Guard] = {}  # by token, not descriptor: numbers are reused
_TOKENS = itertools.count()
_SIGNAL: int | None = None
_LIBC: Any = None
_MAIN_TID = 0  # the thread the break signal is sent to (Python runs handlers there)
_F_SETOWN_EX = getattr(fcntl, "F_SETOWN_EX", 15)
_F_OWNER_TID = 0
_OWNER = b""  # F_SETOWN_EX's argument for _MAIN_TID (struct f_owner_ex)


def _set_main(tid: int) -> None:
    global _MAIN_TID, _OWNER
    _MAIN_TID = tid
    _OWNER = struct.pack("ii", _F_OWNER_TID, tid)


def guards() -> int:
    """How many mappings are guarded by a lease now."""
    return len(_GUARDS)


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        # PyDLL: the calls keep the GIL, so no Python thread writes into a mapping while
        # it is copied and moved
        libc = ctypes.PyDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.mremap.restype = ctypes.c_void_p
        libc.mremap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.memmove.restype = ctypes.c_void_p
        libc.memmove.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        _LIBC = libc
    return _LIBC


def _install() -> bool:
    """Install the lease-break handler once (main thread only); whether it is installed."""
    global _SIGNAL
    if _SIGNAL is not None:
        return True
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return False
    try:
        _libc()
    except (OSError, AttributeError):
        return False
    # From the top of the real-time range down: libraries that use one take the lowest.
    for sig in range(signal.SIGRTMAX - 2, signal.SIGRTMAX - 8, -1):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _on_break)
            _SIGNAL = sig
            break
    else:
        return False
    # The kernel falls back to SIGIO, whose default action ends the process, when it
    # cannot queue the real-time signal: take SIGIO too, unless someone else has it.
    if signal.getsignal(signal.SIGIO) == signal.SIG_DFL:
        signal.signal(signal.SIGIO, _on_break)
    _set_main(threading.get_native_id())
    os.register_at_fork(after_in_child=_after_fork)
    atexit.register(_at_exit)
    return True


def _at_exit() -> None:
    """Python puts its handlers back to the defaults after ``atexit``, and the default action
    of the lease signal ends the process: ignore it instead (a writer then waits until this
    process has exited, when the kernel drops its leases)."""
    if _SIGNAL is not None:
        signal.signal(_SIGNAL, signal.SIG_IGN)
    if signal.getsignal(signal.SIGIO) is _on_break:
        signal.signal(signal.SIGIO, signal.SIG_IGN)


def _lease(fd: int) -> None:
    """Take a read lease on ``fd`` whose break signal goes to the main thread. (The kernel
    sends it to the thread that took the lease: one that has ended gets nothing, and
    another one may leave the main thread uninterrupted.)"""
    assert _SIGNAL is not None
    fcntl.fcntl(fd, _F_SETSIG, _SIGNAL)
    fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
    fcntl.fcntl(fd, _F_SETOWN_EX, _OWNER)


def guarded_map(fd: int, size: int | None = None) -> mmap.mmap | None:
    """A private, writable mapping of ``fd``'s whole file, kept a snapshot by a read lease
    on ``fd``, or ``None``: the file is smaller than :data:`MIN_BYTES` (a copy costs less
    than a lease), :func:`leases_left` is 0, or a lease cannot be held (then the caller
    copies). ``fd`` must be open read-only in its own open file description, and belongs
    to this function: it is closed at once, or when the mapping dies or the lease breaks.
    ``size``: the file's size, where the caller has just read it from ``fd``'s ``fstat``."""
    try:
        if size is None:
            size = os.fstat(fd).st_size
        usable = _install() and size >= MIN_BYTES and leases_left() > 0
    except BaseException:  # (a KeyboardInterrupt too: the descriptor is ours to close)
        os.close(fd)
        raise
    if not usable:
        os.close(fd)
        return None
    token = next(_TOKENS)
    guard = _Guard(fd)
    _GUARDS[token] = guard  # before the lease: a break that comes at once finds it
    try:
        _lease(fd)
        # mapped through an open file description of its own: closing ``fd`` then gives the
        # lease up even where F_UNLCK is refused (privileges dropped since: EACCES)
        own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            mapped = mmap.mmap(own, 0, access=mmap.ACCESS_COPY)
        finally:
            os.close(own)
    except (OSError, ValueError):  # refused (EAGAIN, EACCES, EINVAL); ValueError: empty
        _release(token)  # (unless a break came first and did it)
        return None
    except BaseException:  # interrupted (KeyboardInterrupt): no lease or descriptor is left
        _release(token)
        raise
    guard.mapping = weakref.ref(mapped, functools.partial(_released, token))
    if token not in _GUARDS:  # the lease broke before the mapping was there: a rewrite is
        mapped.close()  # under way, and what was mapped may be part old, part new
        return None
    return mapped


def leases_left() -> int:
    """How many more mappings may be leased: each holds two descriptors (the lease's and
    the mapping's own), and leases take at most a quarter of the open-file limit."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    budget = soft // 8 if soft != resource.RLIM_INFINITY and soft > 0 else 4096
    return min(budget, MAX_LEASES) - len(_GUARDS)


def _give_up(fd: int) -> None:
    """Give the lease of ``fd`` up and close it (closing gives it up where ``F_UNLCK`` is
    refused: the mapping holds an open file description of its own)."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
    os.close(fd)


def _released(token: int, _ref: object) -> None:
    _release(token)


def _release(token: int) -> None:
    """The mapping died: give the lease up."""
    guard = _GUARDS.pop(token, None)
    if guard is not None:
        _give_up(guard.fd)


def _snapshot(mapped: mmap.mmap) -> bool:
    """Replace ``mapped``'s pages by anonymous memory holding the same bytes, in place."""
    view = ctypes.c_char.from_buffer(mapped)
    address = ctypes.addressof(view)
    del view  # (an export would keep the mapping from closing)
    length = len(mapped)
    libc = _libc()
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    copy = libc.mmap(None, length, prot, flags, -1, 0)
    if copy is None or copy == ctypes.c_void_p(-1).value:
        return False
    # No thread switch between the copy and the move (a write in between would be lost):
    # the calls keep the GIL, and are made one after the other from C (map), where the
    # interpreter never offers the GIL to another thread; no collection runs in between.
    steps = (
        functools.partial(libc.memmove, copy, address, length),
        functools.partial(
            libc.mremap, copy, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, address
        ),
    )
    collecting = gc.isenabled()
    gc.disable()
    try:
        moved = list(map(operator.methodcaller("__call__"), steps))[1]  # (3.10: no operator.call)
    finally:
        if collecting:
            gc.enable()
    if moved != address:
        libc.munmap(copy, length)
        return False
    return True


def _whole(fd: int, mapped: mmap.mmap) -> bool:
    """Whether the file is still as long as its mapping: a copy of a file truncated since
    would fault (SIGBUS) past its new end. A writer held back by the lease cannot have
    truncated it; one the kernel stopped holding back (``lease-break-time``) may have.
    (Only the size tells: ``touch`` and ``os.utime`` change the times without a lease
    break holding them back, and the mapping is still the file's bytes then.)"""
    try:
        return os.fstat(fd).st_size >= len(mapped)
    except OSError:
        return False


def _settle(guards: list[_Guard]) -> None:
    """Leases of these files are breaking: copy their mappings, then let the writers on.
    A mapping whose file is shorter already is left as it is (it then behaves as an
    ``mmap=True`` one does): its copy would die of SIGBUS."""
    for guard in guards:
        try:
            mapped = guard.mapping() if guard.mapping is not None else None
            if mapped is not None and not mapped.closed and _whole(guard.fd, mapped):
                _snapshot(mapped)  # (held while copied: never unmapped)
            del mapped
        finally:
            _give_up(guard.fd)


def _on_break(signum: int, frame: object) -> None:
    breaking = []
    for token, guard in list(_GUARDS.items()):
        try:
            lease = fcntl.fcntl(guard.fd, _F_GETLEASE)
        except OSError:
            lease = fcntl.F_UNLCK
        if lease != fcntl.F_RDLCK and _GUARDS.pop(token, None) is not None:  # breaking
            breaking.append(guard)
    if not breaking:
        return
    # The copies are made in a thread of their own: Python runs signal handlers (a
    # KeyboardInterrupt) in the main thread only, so none can stop a copy half way. This
    # thread waits for it (a KeyboardInterrupt may end the wait; the copies go on). A bare
    # _thread: threading's own locks may be held by the code this handler interrupted.
    done = _thread.allocate_lock()
    done.acquire()

    def work() -> None:
        try:
            _settle(breaking)
        finally:
            done.release()

    try:
        _thread.start_new_thread(work, ())
    except RuntimeError:  # no new threads (interpreter shutdown): copy here
        _settle(breaking)
        return
    done.acquire()


def _after_fork() -> None:
    """In a child: the leases are the parent's. Lease a new descriptor of each mapped file
    (copy the mapping where that is refused); close the inherited descriptors."""
    _set_main(threading.get_native_id())  # (the forking thread is the child's main thread)
    inherited = list(_GUARDS.values())
    _GUARDS.clear()
    for guard in inherited:
        mapped = guard.mapping() if guard.mapping is not None else None
        try:
            if mapped is None or mapped.closed:
                continue
            try:
                fd = os.open(f"/proc/self/fd/{guard.fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                if _whole(guard.fd, mapped):
                    _snapshot(mapped)
                continue
        finally:
            os.close(guard.fd)  # the parent's lease lives on in the parent's descriptor
        token = next(_TOKENS)
        _GUARDS[token] = _Guard(fd, weakref.ref(mapped, functools.partial(_released, token)))
        try:
            _lease(fd)
        except OSError:
            _GUARDS.pop(token, None)
            if _whole(fd, mapped):
                _snapshot(mapped)
            os.close(fd)
