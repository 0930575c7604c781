"""Parallel conversion: tensors that need work (a cast, or bytes that cannot be copied as
they are) are read and converted by worker processes, or by the workers of a
``dask.distributed`` cluster, while the writer streams the results into the output in order.

Each task reads one tensor from the source file (the worker opens it itself, by path),
converts it, and writes its little-endian bytes to a spool file beside the destination.
The writer then takes each result in file order: a span of the spool file (copied
kernel-side into safetensors and sharded outputs) or a read-only map of it (other
formats). Because the same writer writes the same bytes in the same order, the output is
byte-identical to a one-process run, and it appears atomically as ever: a failure anywhere
(a task, a worker, the write) leaves the destination untouched, and every spool file is
removed. At most ``2 × workers`` results wait on disk at a time, so memory per worker is
one tensor, and the spool space is a few tensors.

With a cluster, every worker must see the same paths as the command (a shared file
system): the source, and the destination's directory, where the spool files are written.
A task whose worker is lost is retried (twice) on another worker; if it still fails, the
command fails and nothing is written.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import ConversionError, TensorBridgeError, message
from .formats.atomic import temp_name
from .formats.base import RawSpan

__all__ = ["Spooler", "spool_one", "SPOOL_MARKER"]

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


class _Local:
    """A pool of worker processes, started with :func:`start_method`."""

    def __init__(self, workers: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context(start_method())
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._pool.submit(fn, *args)

    def result(self, future: Any) -> Any:
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


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
        try:
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
        self._exec: _Local | _Cluster = _Cluster(scheduler) if scheduler else _Local(workers)
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
            raise ConversionError(
                message(
                    f"tensor {name!r}",
                    f"its worker failed ({type(exc).__name__}: {exc})",
                    "run again; with --scheduler, check that every worker sees the source and "
                    "the destination's directory at the same paths",
                )
            ) from exc
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
