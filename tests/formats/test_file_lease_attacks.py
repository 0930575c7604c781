"""Regression tests from attacking the read-lease mapping (``tensorbridge.formats.file_lease``):
situations where the lease-break signal does not reach the main thread in time, or reaches a
process that can no longer handle it. Each runs in a child process, and checks bytes and exit
status, not timing (a lost signal makes the writer wait ``fs.lease-break-time``, 45 s)."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="read leases are Linux's")

A = np.arange(1 << 18, dtype=np.float32)  # 1 MiB: file_lease.MIN_BYTES


def child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_load_from_a_thread_that_has_ended_still_keeps_its_arrays(tmp_path):
    """The kernel signals the thread that took the lease (fcntl's owner is set to the
    caller's thread id): once that thread has ended, no one is told of the break, the
    writer waits the whole lease-break time, and then the array shows the rewrite."""
    p = str(tmp_path / "m.safetensors")
    save_file({"a": A}, p)
    r = child(
        """
        import subprocess, sys, threading
        import numpy as np
        import tensorbridge as tb
        p = sys.argv[1]
        tb.load(p)  # the main thread installs the handler
        out = []
        t = threading.Thread(target=lambda: out.append(tb.load(p)["a"]))
        t.start(); t.join()
        a = out[0]
        subprocess.run([sys.executable, "-c",
                        "import sys; open(sys.argv[1], 'r+b').write(b'\\\\xff' * (2 << 20))", p],
                       check=True)
        print(a.tobytes() == np.arange(1 << 18, dtype=np.float32).tobytes())
        """,
        p,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True"]


def test_a_truncation_after_a_load_from_an_ended_thread_does_not_kill_the_reader(tmp_path):
    p = str(tmp_path / "m.safetensors")
    save_file({"a": A}, p)
    r = child(
        """
        import os, subprocess, sys, threading
        import tensorbridge as tb
        p = sys.argv[1]
        tb.load(p)
        out = []
        t = threading.Thread(target=lambda: out.append(tb.load(p)["a"]))
        t.start(); t.join()
        subprocess.run([sys.executable, "-c", "import os, sys; os.truncate(sys.argv[1], 0)", p],
                       check=True)
        print(float(out[0].sum()))
        """,
        p,
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # -7: SIGBUS
    assert float(r.stdout) == float(A.sum())


def test_the_break_signal_is_directed_at_the_main_thread(tmp_path):
    """A signal sent to the whole process may be taken by any thread that does not block
    it (an OpenBLAS or torch pool thread): the main thread is then not interrupted, and a
    main thread waiting in a system call (waitpid, join, epoll) holds the writer for the
    whole lease-break time. Seen about 1 time in 4 with numpy's OpenBLAS thread alive and
    two loads of one file. Directing the signal at the main thread
    (F_SETOWN_EX, F_OWNER_TID) leaves no other thread to take it."""
    p = str(tmp_path / "m.safetensors")
    save_file({"a": A}, p)
    r = child(
        """
        import fcntl, os, struct, sys, threading
        import tensorbridge as tb
        from tensorbridge.formats import file_lease
        p = sys.argv[1]
        kept = [tb.load(p)]
        t = threading.Thread(target=lambda: kept.append(tb.load(p)))
        t.start(); t.join()
        F_GETOWN_EX = 16
        owners = set()
        for g in file_lease._GUARDS.values():
            owners.add(struct.unpack("ii", fcntl.fcntl(g.fd, F_GETOWN_EX, bytes(8))))
        print(len(file_lease._GUARDS), owners == {(0, threading.main_thread().native_id)})
        """,
        p,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["2", "True"]  # F_OWNER_TID == 0


def test_a_rewrite_during_interpreter_shutdown_does_not_kill_the_reader(tmp_path):
    """Python resets its handlers to SIG_DFL early in finalization (before modules and
    their objects are torn down), while the leases live on until the process ends: a
    writer then kills the reader with the lease's real-time signal (default action:
    terminate). The writer here opens the file while the reader is tearing down."""
    p = str(tmp_path / "m.safetensors")
    save_file({"a": A}, p)
    r = child(
        """
        import subprocess, sys, time
        import tensorbridge as tb
        p = sys.argv[1]
        got = tb.load(p)

        class Teardown:  # work done while the interpreter finalizes (after atexit)
            def __del__(self, subprocess=subprocess, sys=sys, time=time, open=open, p=p):
                w = subprocess.Popen([sys.executable, "-c",
                                      "import sys; open(sys.argv[1], 'r+b').write(b'x')", p])
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # until the writer is held by the lease
                    if any("BREAKER" in line for line in open("/proc/locks")):
                        break
                    time.sleep(0.01)
                print("teardown done", flush=True)

        teardown = Teardown()
        print("main done", flush=True)
        """,
        p,
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split("\n")[:2] == ["main done", "teardown done"]


def test_f_getown_ex_is_what_the_test_above_reads():
    """(The constants used above: F_GETOWN_EX 16, struct f_owner_ex {int type; pid_t pid})."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(r, 15, struct.pack("ii", 0, os.getpid()))  # F_SETOWN_EX, F_OWNER_TID
        assert struct.unpack("ii", fcntl.fcntl(r, 16, bytes(8))) == (0, os.getpid())
    finally:
        os.close(r)
        os.close(w)


def test_a_keyboard_interrupt_during_a_copy_does_not_stop_it(tmp_path):
    # The copy is slowed down, and SIGINT sent to the process while it runs: the main
    # thread gets its KeyboardInterrupt, and the copy still completes, the lease is given
    # up (the writer goes on at once, not after the 45 s break time) and nothing leaks.
    p = str(tmp_path / "m.safetensors")
    save_file({"a": A}, p)
    code = """
    import os, signal, subprocess, sys, time
    import numpy as np
    import tensorbridge as tb
    from tensorbridge.formats import file_lease
    # (a shell that starts a job in the background makes it ignore SIGINT; Ctrl-C's
    # KeyboardInterrupt is what this test is about)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real = file_lease._snapshot
    def slow(mapped):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # (the main thread handles SIGINT meanwhile)
        return real(mapped)
    file_lease._snapshot = slow
    fds = len(os.listdir("/proc/self/fd"))
    a = tb.load(sys.argv[1])["a"]
    interrupted = False
    t = time.monotonic()
    try:
        writer = subprocess.Popen([sys.executable, "-c",
            "import sys; open(sys.argv[1], 'wb').write(b'x')", sys.argv[1]])
        writer.wait()
    except KeyboardInterrupt:
        interrupted = True
        writer.wait()
    waited = time.monotonic() - t
    time.sleep(0.2)
    ok = a.tobytes() == np.arange(1 << 18, dtype=np.float32).tobytes()
    del a
    print(interrupted, ok, waited < 30, file_lease.guards(),
          len(os.listdir("/proc/self/fd")) - fds, os.path.getsize(sys.argv[1]))
    """
    r = child(code, p)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", "True", "0", "0", "1"], r.stdout
