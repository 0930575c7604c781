"""A reader closed by one thread while another reads from it: the read finishes on the
file it started on (its descriptor is closed by the last read, so its number cannot be
reused by another file meanwhile), and later reads are refused."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.errors import FileFormatError


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_a_read_under_way_is_not_cut_off_by_close(tmp_path, monkeypatch, fmt):
    a = np.arange(40_000, dtype=np.float32)  # 160 KB: read from the file, not at open
    p = str(tmp_path / f"m.{fmt}")
    tb.save({"a": a}, p)
    other = tmp_path / "other.bin"
    other.write_bytes(b"\xff" * 400_000)
    r = tb.open(p)
    real = os.preadv
    waiting = threading.Event()
    go = threading.Event()

    def preadv(fd, buffers, offset):  # type: ignore[no-untyped-def]
        if threading.current_thread().name == "reader" and not waiting.is_set():
            waiting.set()
            assert go.wait(10)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    out: dict[str, np.ndarray] = {}
    t = threading.Thread(target=lambda: out.update(a=r.read("a")), name="reader")
    t.start()
    assert waiting.wait(10)
    r.close()  # while the read is about to read
    taken = [os.open(other, os.O_RDONLY) for _ in range(16)]  # the numbers closing would free
    try:
        go.set()
        t.join(10)
    finally:
        for fd in taken:
            os.close(fd)
    assert out["a"].tobytes() == a.tobytes()
    with pytest.raises(FileFormatError, match="the file is closed"):
        r.read("a")
