"""atomic.fsync_together: every job flushed once, errors returned, its own failures raised."""

from __future__ import annotations

import errno
import threading

import pytest

from tensorbridge.formats.atomic import fsync_together


def test_every_job_once_and_oserrors_returned_in_order():
    calls: list[int] = []
    lock = threading.Lock()

    def flush(job: int) -> None:
        with lock:
            calls.append(job)
        if job == 2:
            raise OSError(errno.EIO, "I/O error")

    got = fsync_together([0, 1, 2, 3], flush)
    assert sorted(calls) == [0, 1, 2, 3]
    assert [type(e).__name__ if e else None for e in got] == [None, None, "OSError", None]


def test_a_flush_that_fails_otherwise_is_raised_not_run_again():
    calls: list[int] = []
    lock = threading.Lock()

    def flush(job: int) -> None:
        with lock:
            calls.append(job)
        if job == 1:
            raise RuntimeError("not an fsync error")

    with pytest.raises(RuntimeError, match="not an fsync error"):
        fsync_together([0, 1, 2], flush)
    assert sorted(calls) == [0, 1, 2]  # each once (no second, serial round)


def test_up_to_serial_jobs_run_in_this_thread():
    seen: list[str] = []
    fsync_together([0, 1], lambda job: seen.append(threading.current_thread().name), serial=2)
    assert seen == [threading.current_thread().name] * 2
