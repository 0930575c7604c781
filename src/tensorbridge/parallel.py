"""Parallel conversion on worker processes, or on the workers of a ``dask.distributed`` cluster.

**Safetensors and sharded outputs are written in place by the workers.** Their layout is
known before a byte is written: the command plans it (each file's header and every
tensor's offset), creates each output file's temporary file with its header written and its
data region sized (:meth:`~tensorbridge.formats.safetensors.SafetensorsFormat.placed`), and
hands the workers :class:`Piece` tasks: rows ``[lo, hi)`` of one tensor (a tensor larger than
:data:`PIECE_BYTES` whose source rows can be read alone is split, so memory per worker stays
bounded whatever the tensor's size), to be read, cast, and written at their planned offset
with ``pwrite`` (or copied kernel-side, when no cast is needed). Each worker then reads its
bytes back and compares them with what it meant to write (as the one-process writer checks
a copy right after it lands), so the command itself only writes headers and the index,
fsyncs and renames: every byte-heavy step runs in parallel. The bytes are those the
one-process writer writes (the same header, the same offsets): the output is
byte-identical. A failed task fails the command; a lost local worker (killed, out of
memory) is retried on a fresh pool, twice, as a lost cluster worker is retried by Dask;
every task is idempotent (the same bytes at the same offsets). On any failure the temporary
files are removed, a sharded output's renamed shards too, and the destination is untouched.
Workers open the temporary files without creating them, so a task still running on a
cluster after the command gave up cannot leave a file behind.

**Other outputs** (npz, h5, pt, zarr), whose writers lay out the file themselves, get the
tensors that need work through spool files (:class:`Spooler`): each task reads one tensor from the source file (the worker opens it itself, by path),
converts it, and writes its little-endian bytes to a spool file beside the destination.
The writer then takes each result in file order: a span of the spool file (copied
kernel-side into safetensors and sharded outputs) or a read-only map of it (other
formats). Because the same writer writes the same bytes in the same order, the output is
byte-identical to a one-process run, and it appears atomically as ever: a failure anywhere
(a task, a worker, the write) leaves the destination untouched, and every spool file is
removed. At most ``2 × workers`` results wait on disk at a time, so memory per worker is
one tensor, and the spool space is a few tensors.

With a cluster, every worker must see the same paths as the command (a shared file
system): the source, and the destination's directory, where the temporary output files (or
the spool files) are written. A task whose worker is lost is retried (twice) on another
worker; if it still fails, the command fails and nothing is written.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .errors import (
    CheckpointChangedError,
    ConversionError,
    FileFormatError,
    TensorBridgeError,
    message,
)
from .formats.atomic import remove_stale, temp_name
from .formats.base import RawSpan, TensorInfo

if TYPE_CHECKING:
    from .formats.base import Reader
    from .formats.safetensors import Placed

__all__ = ["Spooler", "spool_one", "SPOOL_MARKER", "Piece", "write_piece", "write_placed"]

SPOOL_MARKER = ".tb-spool-"
#: Open readers in this worker process, by (source, format, conversion), least recently
#: used first. A dask worker outlives the command: a reader kept across conversions would
#: read a source that was replaced since from its old file, so each conversion opens its own.
_READERS: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
_KEEP_READERS = 4


def _reader(src: str, fmt: str, token: str) -> Any:
    """One open reader per source and conversion in each worker process (reused by its
    tasks); the least recently used beyond :data:`_KEEP_READERS` are closed."""
    key = (src, fmt, token)
    reader = _READERS.get(key)
    if reader is None:
        from .formats import get_format

        reader = _READERS[key] = get_format(fmt).open(src)
        while len(_READERS) > _KEEP_READERS:
            _, old = _READERS.popitem(last=False)
            with contextlib.suppress(Exception):
                old.close()
    else:
        with contextlib.suppress(KeyError):
            _READERS.move_to_end(key)
    return reader


def spool_one(
    src: str, fmt: str, name: str, dtype: str, spool: str, want_digest: bool, token: str = ""
) -> tuple[int, bytes | None]:
    """Read ``name`` from ``src``, cast it to ``dtype``, write its little-endian bytes to
    the new file ``spool``; returns ``(nbytes, digest)``. Runs in a worker."""
    from .cli.convert_cmd import _fetch_as, digest
    from .formats.base import TensorInfo
    from .formats.safetensors import iter_le_bytes

    reader = _reader(src, fmt, token)
    info = reader.info(name)
    arr = _fetch_as(reader, TensorInfo(name, dtype, info.shape))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(spool, flags, 0o600)
    except FileExistsError:  # a retry: the attempt on a lost worker left its partial spool
        os.unlink(spool)
        fd = os.open(spool, flags, 0o600)
    nbytes = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in iter_le_bytes(arr):
                f.write(piece)
                nbytes += len(piece)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(spool)
        raise
    return nbytes, (digest(arr) if want_digest else None)


#: Frameworks that start threads of their own: forking a process that imported one is unsafe
#: (JAX warns; a lock held by one of its threads would stay held in the child).
_THREADED = ("jax", "tensorflow", "torch", "mlx", "cupy")


def start_method() -> str:
    """``"fork"`` where it is safe (Linux, one thread, no threaded framework imported): a
    forked worker starts at once and never re-runs the calling script. Else ``"spawn"``,
    which needs the usual ``if __name__ == "__main__":`` guard in a calling script."""
    import sys
    import threading

    if (
        sys.platform.startswith("linux")
        and threading.active_count() == 1
        and not any(m in sys.modules for m in _THREADED)
    ):
        return "fork"
    return "spawn"


def _die_with_parent(parent: int) -> None:
    """A local worker's initializer: the worker ends when the command that started it
    dies. Killed with SIGKILL, the command cannot stop its pool, and a forked worker
    holds the pool's pipes open itself, so it would wait for tasks forever (an orphan
    holding the command's stdout and stderr). On Linux the kernel sends it SIGKILL
    (``PR_SET_PDEATHSIG``); elsewhere a thread checks the parent every second."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # it died before the prctl
                os._exit(1)
            return

    def watch() -> None:
        import time

        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="tensorbridge-parent-watch", daemon=True).start()


def max_local_workers() -> int:
    """The most local worker processes a conversion starts: 4 per CPU, at least 32 (more
    only compete for the CPUs and memory; a forked pool starts them all at once)."""
    return max(32, 4 * (os.cpu_count() or 1))


class _Local:
    """A pool of worker processes, started with :func:`start_method`: no more than
    ``tasks`` (a forked pool starts every process at once, needed or not)."""

    def __init__(self, workers: int, tasks: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(
            max_workers=max(1, min(workers, tasks, max_local_workers())),
            mp_context=multiprocessing.get_context(start_method()),
            initializer=_die_with_parent,
            initargs=(os.getpid(),),
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._pool.submit(fn, *args)

    def result(self, future: Any) -> Any:
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _refused_at_once(address: str) -> None:
    """Raise ``ConnectionRefusedError`` at once for a ``tcp://HOST:PORT`` where nothing
    listens (Dask's client would retry for its whole timeout); anything else is left to
    the client."""
    import socket
    from urllib.parse import urlsplit

    try:
        url = urlsplit(address)
        host, port = url.hostname, url.port
    except ValueError:
        return
    if url.scheme != "tcp" or not host or port is None:
        return
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        raise
    except OSError:
        return  # unreachable, slow, ...: the client reports it after its timeout


class _Cluster:
    """The workers of a running ``dask.distributed`` scheduler."""

    def __init__(self, address: str) -> None:
        try:
            from distributed import Client
        except ImportError as exc:
            raise ConversionError(
                message(
                    f"--scheduler {address}",
                    "dask.distributed is not installed",
                    "pip install 'tensorbridge[dask]'",
                )
            ) from exc
        from distributed.comm.addressing import parse_address
        from distributed.comm.registry import get_backend

        try:
            scheme, location = parse_address(address)  # no scheme: tcp
            get_backend(scheme)
        except ValueError as exc:  # checked first: a Client made of it hangs at exit
            raise ConversionError(
                message(
                    f"--scheduler {address}",
                    f"it is not a scheduler address ({exc})",
                    "pass the address `dask scheduler` prints, e.g. tcp://host:8786",
                )
            ) from exc
        try:
            _refused_at_once(f"{scheme}://{location}")
            self._client = Client(address, timeout="10s", set_as_default=False)
        except Exception as exc:  # OSError, TimeoutError, ...
            raise ConversionError(
                message(
                    f"--scheduler {address}",
                    f"no scheduler answered ({type(exc).__name__}: {exc})",
                    "start one (`dask scheduler`, then `dask worker ADDRESS` on each "
                    "machine) and pass its address, e.g. tcp://host:8786",
                )
            ) from exc

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._client.submit(fn, *args, pure=False, retries=2)

    def result(self, future: Any) -> Any:
        return future.result()

    def close(self) -> None:
        self._client.close()


class Spooler:
    """Runs :func:`spool_one` for ``names`` (in write order) on workers, a window ahead of
    the writer; :meth:`take` waits for one and hands its spool to the writer."""

    def __init__(
        self,
        src: str,
        src_format: str,
        work: dict[str, str],
        order: list[str],
        spool_dir: str,
        base: str,
        *,
        workers: int = 2,
        scheduler: str | None = None,
        want_digest: bool = True,
    ) -> None:
        self._src = os.path.abspath(src)
        self._fmt = src_format
        self._work = work
        self._queue = deque(n for n in order if n in work)
        self._dir = spool_dir
        self._base = base
        self._want_digest = want_digest
        self._window = 2 * max(1, workers)
        self._token = os.urandom(8).hex()  # this conversion's readers, on every worker
        self._futures: dict[str, tuple[Any, str]] = {}
        self.spools: list[str] = []
        # spool files a killed conversion to the same destination left (its PID is gone
        # and no one holds a lock on them)
        remove_stale(spool_dir, base, SPOOL_MARKER)
        self._exec: _Local | _Cluster = (
            _Cluster(scheduler) if scheduler else _Local(workers, len(self._queue))
        )
        self._fill()

    def __contains__(self, name: object) -> bool:
        return name in self._work

    def _fill(self) -> None:
        while self._queue and len(self._futures) < self._window:
            name = self._queue.popleft()
            spool = temp_name(self._dir, self._base, SPOOL_MARKER)
            self.spools.append(spool)
            try:
                future = self._exec.submit(
                    spool_one,
                    self._src,
                    self._fmt,
                    name,
                    self._work[name],
                    spool,
                    self._want_digest,
                    self._token,
                )
            except Exception as exc:  # a pool broken by a dead worker: take() reports it
                from concurrent.futures import Future

                future = Future()
                future.set_exception(exc)
            self._futures[name] = (future, spool)

    def take(self, name: str) -> tuple[RawSpan, bytes | None]:
        """Wait for ``name``'s result: its spool file as a span, and its digest."""
        future, spool = self._futures.pop(name)
        try:
            nbytes, dg = self._exec.result(future)
        except TensorBridgeError:
            raise
        except Exception as exc:
            raise _failed(name, exc) from exc
        self._fill()  # not after a failure: a broken pool would raise over its message
        st = os.stat(spool)
        return RawSpan(spool, 0, nbytes, (st.st_dev, st.st_ino)), dg

    def close(self) -> None:
        """Stop the workers and remove every spool file."""
        try:
            self._exec.close()
        finally:
            for p in self.spools:
                with contextlib.suppress(OSError):
                    os.unlink(p)
            self.spools.clear()


def spool_array(span: RawSpan, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only map of a spool file's bytes as the tensor (for writers without spans)."""
    if span.nbytes == 0:
        return np.empty(shape, dtype)
    le = dtype.newbyteorder("<") if dtype.itemsize > 1 and dtype.kind in "iufcb" else dtype
    return np.memmap(span.path, dtype=le, mode="r", shape=shape)


# --- direct writes: workers fill the planned output files -----------------------------

#: The most bytes (read or written) one task handles, for a tensor whose source rows can be
#: read alone (its bytes are stored plain: safetensors, sharded, .npy, stored .pt records):
#: a bigger tensor is split by rows. It bounds a worker's memory and balances the work.
PIECE_BYTES = 64 * 1024 * 1024
#: Fresh local pools started after a worker process was lost (Dask retries cluster tasks).
LOCAL_RETRIES = 2

#: Output files being filled at once (each holds a locked descriptor until it is renamed):
#: a checkpoint of thousands of shards stays well inside the usual 1024 open files.
FILES_AT_ONCE = 128

#: ``(file identity, offset, nbytes)`` of a tensor's bytes in the written file.
Place = tuple[tuple[int, int], int, int]


class Piece(NamedTuple):
    """One task of a direct write: rows ``[lo, hi)`` of tensor ``name`` (all of it when
    ``lo`` is None) as ``dtype``, that is ``nbytes`` little-endian bytes at ``offset`` of the
    existing file ``path``. ``copy``: the source stores exactly those bytes, copied as they
    are. ``source``: the tensor's dtype and shape when the command planned the write."""

    name: str
    dtype: str
    source: tuple[str, tuple[int, ...]]
    lo: int | None
    hi: int | None
    path: str
    offset: int
    nbytes: int
    copy: bool


def plan_pieces(reader: Reader, placed: Placed, infos: Sequence[TensorInfo]) -> Iterator[Piece]:
    """The tasks that fill ``placed`` with ``infos`` read from ``reader``."""
    for info in infos:
        offset, nbytes = placed.offsets[info.name]
        if nbytes == 0:
            continue
        src = reader.info(info.name)
        # bool: read whole (its bytes are checked on read), verified by digest: see write_piece
        span = reader.raw_span(info.name) if info.dtype != "bool" else None
        copy = span is not None and src.dtype == info.dtype and span.nbytes == nbytes
        source = (src.dtype, tuple(src.shape))
        rows = info.shape[0] if info.shape else 0
        biggest = max(nbytes, src.nbytes)
        if span is None or rows < 2 or biggest <= PIECE_BYTES:
            yield Piece(
                info.name, info.dtype, source, None, None, placed.path, offset, nbytes, copy
            )
            continue
        step = max(1, rows * PIECE_BYTES // biggest)
        row_bytes = nbytes // rows
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            yield Piece(
                info.name,
                info.dtype,
                source,
                lo,
                hi,
                placed.path,
                offset + lo * row_bytes,
                (hi - lo) * row_bytes,
                copy,
            )


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    """``pwrite`` all of ``data`` at ``offset``."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _little_endian(arr: np.ndarray) -> np.ndarray:
    """``arr`` as a C-contiguous array of its little-endian bytes (the stored layout)."""
    dt = arr.dtype
    if dt.itemsize > 1 and (
        dt.byteorder == ">" or (dt.byteorder == "=" and sys.byteorder == "big")
    ):
        arr = arr.astype(dt.newbyteorder("<"))
    return np.ascontiguousarray(arr)


_LOCAL = threading.local()  # each worker thread's reused buffers (see _buffer)


def _buffer(which: str, nbytes: int) -> memoryview:
    """``nbytes`` of this thread's buffer ``which``, reused from task to task: a worker's
    memory stays about two pieces, and the pages are not faulted in afresh for each one."""
    buf: bytearray | None = getattr(_LOCAL, which, None)
    if buf is None or len(buf) < nbytes:
        buf = bytearray(nbytes)
        setattr(_LOCAL, which, buf)
    return memoryview(buf)[:nbytes]


def _read_cast(span: RawSpan, info: TensorInfo, piece: Piece) -> np.ndarray:
    """Rows ``[lo, hi)`` of a tensor stored plain at ``span``, cast to ``piece.dtype``: read
    with ``pread`` and cast into reused buffers (the result is valid until the next call)."""
    from .dtypes import numpy_dtype
    from .formats.safetensors import open_span, read_exact_into

    shape = tuple(info.shape)
    rows = shape[0] if shape else 1
    lo, hi = (0, rows) if piece.lo is None or piece.hi is None else (piece.lo, piece.hi)
    part = ((hi - lo), *shape[1:]) if shape else ()
    row_bytes = span.nbytes // max(1, rows)
    src_bytes = _buffer("read", (hi - lo) * row_bytes)
    fd = open_span(span)
    try:
        read_exact_into(fd, src_bytes, span.offset + lo * row_bytes, span.path)
    finally:
        os.close(fd)
    src = np.frombuffer(src_bytes, numpy_dtype(info.dtype)).reshape(part)
    if info.dtype == piece.dtype:
        return src
    target = numpy_dtype(piece.dtype)
    out = np.frombuffer(_buffer("cast", src.size * target.itemsize), target).reshape(part)
    np.copyto(out, src, casting="unsafe")
    return out


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing the piece's pages to disk now, without waiting (as the one-process
    writer does every 16 MiB), so the command's fsync at the end has little left to wait
    for: on Linux ``POSIX_FADV_DONTNEED`` starts the writeback of dirty pages (and leaves
    those in the cache). Purely advisory."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


def write_piece(src: str, fmt: str, token: str, piece: Piece, check: bool) -> bytes | None:
    """Write ``piece`` into its file; with ``check``, read the bytes back and compare them
    with what was meant. Returns the digest of a bool tensor (with ``check``), else None.
    Runs in a worker; idempotent (a retry writes the same bytes)."""
    from .cli.convert_cmd import _array_fill, _Comparer, _fetch_as, _span_fill, digest
    from .dtypes import canonical_name, numpy_dtype
    from .formats.safetensors import copy_span

    reader = _reader(src, fmt, token)
    info = reader.info(piece.name)
    if (info.dtype, tuple(info.shape)) != piece.source:
        raise CheckpointChangedError(
            f"tensor {piece.name!r} is {info.dtype}{list(info.shape)} in this worker's view "
            f"of the source, but was {piece.source[0]}{list(piece.source[1])} when the "
            "conversion was planned (the source was replaced meanwhile). Fix: run again "
            "once it is written; with --scheduler, check that every worker sees the same "
            "files at the same paths.",
            src,
        )
    comparer = _Comparer()
    # never O_CREAT: a temporary file removed after a failure must stay removed
    fd = os.open(piece.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        out = RawSpan(piece.path, piece.offset, piece.nbytes)
        dg = None
        if piece.copy:
            span = reader.raw_span(piece.name)
            if span is None or span.nbytes != info.nbytes:
                raise CheckpointChangedError(
                    f"tensor {piece.name!r} is no longer stored as it was planned. Fix: run again.",
                    src,
                )
            skip = (piece.lo or 0) * (span.nbytes // max(1, info.shape[0] if info.shape else 1))
            part = RawSpan(span.path, span.offset + skip, piece.nbytes, span.file_id)
            copy_span(comparer.fd(part), part, fd, piece.offset)
            fill = _span_fill(part, comparer)
        else:
            span = reader.raw_span(piece.name) if sys.byteorder == "little" else None
            if span is not None:  # stored plain: read and cast into this thread's buffers
                arr = _read_cast(span, info, piece)
            elif piece.lo is None:
                arr = _fetch_as(reader, TensorInfo(piece.name, piece.dtype, info.shape))
            else:
                arr = np.asarray(reader.array(piece.name)[piece.lo : piece.hi])
                if canonical_name(arr.dtype) != piece.dtype:
                    arr = arr.astype(numpy_dtype(piece.dtype))
            le = _little_endian(arr)
            if le.nbytes != piece.nbytes:
                raise ConversionError(
                    f"tensor {piece.name!r}: rows {piece.lo}:{piece.hi} gave {le.nbytes} bytes, "
                    f"{piece.nbytes} were planned. Fix: report this as a bug."
                )
            _write_at(fd, le.reshape(-1).view(np.uint8).data, piece.offset)
            fill = _array_fill(le)
            if check and piece.dtype == "bool":  # the reader has no byte range for bool
                dg = digest(arr)  # tensors (it checks their bytes): verified by digest
        if check and not comparer.same(out, fill):
            raise FileFormatError(
                f"verification failed: tensor {piece.name!r} reads back different from what "
                "was written right after it was written, so the write was abandoned and the "
                "destination was left unchanged. Fix: retry; if it happens again, check the "
                "disk and report it as a bug.",
                piece.path,
            )
        _start_writeback(fd, piece.offset, piece.nbytes)
        return dg
    finally:
        os.close(fd)
        comparer.close()


def _failed(name: str, exc: BaseException) -> ConversionError:
    """The error for a task that raised ``exc`` on its worker; the fix depends on why."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        fix = (
            "free space where the destination is written (or raise the file-size limit, "
            "`ulimit -f`), then run again"
        )
    else:
        fix = (
            "run again; with --scheduler, check that every worker sees the source and "
            "the destination's directory at the same paths"
        )
    return ConversionError(
        message(f"tensor {name!r}", f"its worker failed ({type(exc).__name__}: {exc})", fix)
    )


def _worker_failed(piece: Piece, exc: BaseException) -> ConversionError:
    return _failed(piece.name, exc)


def run_pieces(
    src: str,
    fmt: str,
    pieces: Sequence[Piece],
    done: Callable[[Piece, bytes | None], None],
    *,
    workers: int,
    scheduler: str | None,
    check: bool,
) -> None:
    """Run :func:`write_piece` for every piece on local workers or a cluster; ``done``
    is called in this process as each finishes. Raises on the first failure (after the
    local workers stopped)."""
    args = (os.path.abspath(src), fmt, os.urandom(8).hex())
    if scheduler is not None:
        cluster = _Cluster(scheduler)
        try:
            submitted = [(cluster.submit(write_piece, *args, p, check), p) for p in pieces]
            for future, piece in submitted:  # in order: a failure stops the command
                try:
                    dg = cluster.result(future)
                except TensorBridgeError:
                    raise
                except Exception as exc:  # KilledWorker after Dask's own retries, ...
                    raise _worker_failed(piece, exc) from exc
                done(piece, dg)
        finally:
            cluster.close()
        return
    from concurrent.futures import as_completed
    from concurrent.futures.process import BrokenProcessPool

    pending = list(pieces)
    lost: BaseException | None = None
    for _attempt in range(1 + LOCAL_RETRIES):
        pool = _Local(workers, len(pending))
        finished: set[Piece] = set()
        try:
            futures: dict[Any, Piece] = {}
            for p in pending:
                try:
                    futures[pool.submit(write_piece, *args, p, check)] = p
                except BrokenProcessPool as exc:  # a worker died already: resubmit the rest
                    lost = exc
                    break
            for future in as_completed(futures):
                piece = futures[future]
                try:
                    dg = future.result()
                except BrokenProcessPool as exc:
                    lost = exc
                    break
                except TensorBridgeError:
                    raise
                except Exception as exc:
                    raise _worker_failed(piece, exc) from exc
                finished.add(piece)
                done(piece, dg)
        finally:
            pool.close()  # every worker has stopped: none writes after this
        pending = [p for p in pending if p not in finished]
        if not pending:
            return
    raise ConversionError(
        message(
            f"{len(pending)} of the conversion's tasks",
            f"a worker process died {1 + LOCAL_RETRIES} times while running them ({lost}); "
            "killed from outside, or by the kernel for lack of memory",
            "check free memory (`dmesg` names an out-of-memory kill) and run again, with "
            "fewer --workers",
        )
    ) from lost


def write_placed(
    reader: Reader,
    src: str,
    fmt: str,
    jobs: Sequence[tuple[str, Sequence[TensorInfo], dict[str, str] | None]],
    *,
    checked: bool,
    workers: int,
    scheduler: str | None,
    check: bool,
    advance: Callable[[str, int], None] | None = None,
    within: int | None = None,
) -> tuple[dict[str, Place], dict[str, bytes]]:
    """Write each ``(path, infos, metadata)`` job as a safetensors file whose tensors the
    workers write in place (see the module docstring), :data:`FILES_AT_ONCE` files at a
    time: each such group replaces its paths once all its files are filled, or none does
    (the sharded writer removes the groups renamed before a failure; its index comes last). ``checked``: the jobs' checks ran already (a sharded
    write). Returns where each tensor's bytes lie (compared by a worker right after they
    were written, with ``check``) and the digests of bool tensors. ``within``: the
    descriptor of the directory every file must land in (a sharded write's)."""
    from .formats.safetensors import FORMAT as SAFETENSORS

    places: dict[str, Place] = {}
    digests: dict[str, bytes] = {}

    def done(piece: Piece, dg: bytes | None) -> None:
        if dg is not None:
            digests[piece.name] = dg
        if advance is not None:
            advance(piece.name, piece.nbytes)

    for start in range(0, len(jobs), FILES_AT_ONCE):
        with contextlib.ExitStack() as stack:
            planned: list[list[Piece]] = []
            for path, infos, meta in jobs[start : start + FILES_AT_ONCE]:
                placed = stack.enter_context(
                    SAFETENSORS.placed(path, infos, meta, checked=checked, within=within)
                )
                planned.append(list(plan_pieces(reader, placed, infos)))
                for i in infos:
                    offset, nbytes = placed.offsets[i.name]
                    places[i.name] = (placed.file_id, offset, nbytes)
            # one file after another, round robin: workers running at once write different
            # files (writes into one file take its lock in turn)
            pieces = [p for row in itertools.zip_longest(*planned) for p in row if p is not None]
            run_pieces(src, fmt, pieces, done, workers=workers, scheduler=scheduler, check=check)
    return places, digests
