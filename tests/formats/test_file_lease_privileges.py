"""Regression test from attacking the read-lease mapping: a process that loads as the file's
owner (or root) and then drops privileges (``os.setuid``/``os.seteuid``, as servers do after
loading their models) can no longer give a lease up with ``F_SETLEASE, F_UNLCK``: the kernel
checks the caller's fsuid against the file's owner for every lease operation (``EACCES``).
Closing the lease's descriptor gives the lease up only if no other descriptor shares its open
file description; the mapping's own (``mmap`` dups the descriptor) does. A writer then waits
the whole ``fs.lease-break-time`` (45 s) after every break, though the arrays were copied at
once. Checked without timing: after the copy is made, /proc/locks must hold no lease on the
file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="read leases are Linux's"),
    pytest.mark.skipif(
        sys.platform != "linux" or os.geteuid() != 0,
        reason="dropping privileges (seteuid) needs root",
    ),
]

A = np.arange(1 << 18, dtype=np.float32)  # 1 MiB: file_lease.MIN_BYTES


def test_a_lease_is_given_up_after_a_break_when_privileges_were_dropped(tmp_path):
    p = str(tmp_path / "m.safetensors")
    save_file({"a": A}, p)
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import os, subprocess, sys, time
                import numpy as np
                import tensorbridge as tb
                p = sys.argv[1]
                a = tb.load(p)["a"]
                ino = os.stat(p).st_ino
                # the writer is started as root; it opens O_NONBLOCK: the break starts, and
                # the open fails at once with EAGAIN instead of waiting
                w = subprocess.Popen([sys.executable, "-c",
                    "import os, sys; sys.stdin.readline()\\n"
                    "try: os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK)\\n"
                    "except BlockingIOError: print('EAGAIN')",
                    p], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                os.seteuid(65534)
                w.stdin.write("go\\n"); w.stdin.flush()
                assert w.stdout.readline().strip() == "EAGAIN"
                w.wait()
                def backed():
                    return any(p in line for line in open("/proc/self/maps"))
                deadline = time.monotonic() + 30  # the handler runs at once; 30 s: a loaded CI
                while backed() and time.monotonic() < deadline:
                    time.sleep(0.01)
                # the handler ran in this (main) thread and has returned: copy made, lease given up
                print("copied", not backed())
                print("leases", sum(f":{ino} " in l and "LEASE" in l for l in open("/proc/locks")))
                print("equal", a.tobytes() == np.arange(1 << 18, dtype=np.float32).tobytes())
                """
            ),
            p,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:3] == ["copied True", "leases 0", "equal True"], r.stdout
