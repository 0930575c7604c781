"""The default load maps under a read lease: the arrays are the file's pages (proven by
/proc/self/maps), and a rewrite or truncation of the file, by this process or another,
leaves them as they were loaded, without SIGBUS. Where no lease can be held, it copies."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import tensorbridge as tb
from tensorbridge.formats import file_lease
from tests.hostile.bounded import run_bounded

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="read leases are Linux's")

A = np.arange(1 << 18, dtype=np.float32)  # 1 MiB: file_lease.MIN_BYTES
B = np.arange(12, dtype=np.int64).reshape(3, 4)
KINDS = ["safetensors", "sharded", "pt", "npy", "npz"]


def write(kind: str, d) -> str:
    tree = {"a": A, "b": B}
    if kind == "safetensors":
        p = str(d / "m.safetensors")
        save_file(tree, p)  # the reference writer
    elif kind == "sharded":
        p = str(d / "ck") + "/"
        tb.save(tree, p, max_shard_size=64 << 10)  # (a alone in a shard)
    elif kind == "npz":
        p = str(d / "m.npz")
        tb.save(tree, p)  # stored members, data 64-byte aligned (np.savez's are not aligned)
    elif kind == "pt":
        p = str(d / "m.pt")
        torch.save({k: torch.from_numpy(v) for k, v in tree.items()}, p)
    else:
        p = str(d / "a.npy")
        np.save(p, A)
    return p


def region(address: int) -> str:
    """The /proc/self/maps line of the mapping that holds ``address``."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return line.rstrip("\n")
    raise AssertionError(f"{address:#x} is not mapped")


def backing(address: int) -> str:
    """The file a mapping holds (path), or "" for anonymous memory (and the heap)."""
    fields = region(address).split(None, 5)
    return fields[5] if len(fields) > 5 and fields[5].startswith("/") else ""


def files_of(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(os.path.join(path, n) for n in os.listdir(path) if not n.endswith(".json"))
    return [path]


def other_process(code: str, *args: str) -> None:
    subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], check=True, timeout=60)


def a_of(got, kind: str) -> np.ndarray:
    return got if kind == "npy" else got["a"]


@pytest.mark.parametrize("kind", KINDS)
def test_default_load_maps_and_a_rewrite_elsewhere_does_not_show(tmp_path, kind):
    p = write(kind, tmp_path)
    got = tb.load(p)
    a = a_of(got, kind)
    assert a.tobytes() == A.tobytes() and a.flags.writeable
    assert os.path.realpath(backing(a.ctypes.data)) in map(os.path.realpath, files_of(p))
    before = file_lease.guards()
    assert before >= 1
    # another program rewrites every file in place (same inode, O_TRUNC), with other values
    for f in files_of(p):
        other_process("import sys; open(sys.argv[1], 'r+b').write(bytes(range(256)) * 4096)", f)
    assert a.tobytes() == A.tobytes()
    assert backing(a.ctypes.data) == ""  # the mapping became a private copy
    if kind != "npy":
        assert got["b"].tobytes() == B.tobytes()
    a[0] = 5  # still writable, still private
    assert a[0] == 5


@pytest.mark.parametrize("kind", ["safetensors", "npy"])
def test_a_rewrite_in_this_process_does_not_show(tmp_path, kind):
    p = write(kind, tmp_path)
    a = a_of(tb.load(p), kind)
    assert backing(a.ctypes.data)
    with open(p, "wb") as f:  # np.save/torch.save/save_file write like this
        f.write(b"\0" * 100)
    assert a.tobytes() == A.tobytes()
    assert os.path.getsize(p) == 100  # the writer went on


@pytest.mark.parametrize("how", ["utime", "touch -d"])
def test_new_times_before_a_rewrite_keep_the_arrays(tmp_path, how):
    """``os.utime`` and ``touch`` change a file's times without a lease break holding them
    back; a rewrite after them must still find the arrays copied, not showing through."""
    p = write("npy", tmp_path)
    a = tb.load(p)
    assert backing(a.ctypes.data)
    if how == "utime":
        os.utime(p, ns=(10**9, 10**9))
    else:
        subprocess.run(["touch", "-d", "2001-01-01", p], check=False, timeout=60)
    other_process("import numpy as np, sys; np.save(sys.argv[1], np.full(8, 7.0))", p)
    assert a.tobytes() == A.tobytes()
    assert os.path.getsize(p) < A.nbytes  # the writer went on


def test_torch_tensors_share_the_leased_mapping(tmp_path):
    p = write("safetensors", tmp_path)
    t = tb.load(p, to="torch")["a"]
    assert backing(t.data_ptr())
    other_process("import sys, numpy as np; np.save(sys.argv[1], np.zeros(3))", p)
    assert t.numpy().tobytes() == A.tobytes()


def test_truncation_by_another_process_does_not_kill_the_reader(tmp_path):
    p = write("safetensors", tmp_path)
    code = """
    import os, subprocess, sys
    import numpy as np
    import tensorbridge as tb
    got = tb.load(ARGS[0])
    subprocess.run([sys.executable, "-c", "import os, sys; os.truncate(sys.argv[1], 0)",
                    ARGS[0]], check=True)
    assert os.path.getsize(ARGS[0]) == 0
    a = got["a"]
    RESULT = [float(a.sum()), a.tobytes() == np.arange(1 << 18, dtype=np.float32).tobytes()]
    """
    r = run_bounded(textwrap.dedent(code), [p], timeout=120)
    assert r.outcome == "ok", r.detail
    assert r.result == [float(A.sum()), True]


def test_small_files_and_leases_past_the_budget_are_copied(tmp_path, monkeypatch):
    small = str(tmp_path / "small.npy")
    np.save(small, A[: (file_lease.MIN_BYTES // 4) - 64])  # just under MIN_BYTES
    assert backing(tb.load(small).ctypes.data) == ""
    p = write("safetensors", tmp_path)
    kept = tb.load(p)
    assert backing(kept["a"].ctypes.data)
    monkeypatch.setattr(file_lease, "MAX_LEASES", file_lease.guards())
    assert file_lease.leases_left() == 0
    a = tb.load(p)["a"]
    assert backing(a.ctypes.data) == "" and a.tobytes() == A.tobytes()


def test_mmap_true_is_not_leased_and_shows_the_rewrite(tmp_path):
    p = write("safetensors", tmp_path)
    before = file_lease.guards()
    a = tb.load(p, mmap=True)["a"]
    assert file_lease.guards() == before
    with open(p, "r+b") as f:
        f.seek(f.read().find(A.tobytes()))
        f.write(np.float32(-7).tobytes())
    assert a[0] == -7


def test_leases_are_given_up_when_the_arrays_die(tmp_path):
    p = write("safetensors", tmp_path)
    gc.collect()
    before = file_lease.guards()
    got = tb.load(p)
    assert file_lease.guards() == before + 1
    a = got["a"]
    del got
    assert file_lease.guards() == before + 1  # one array still holds the mapping
    del a
    gc.collect()
    assert file_lease.guards() == before
    with open(p, "r+b"):  # no lease left to break: the open is not held back
        pass


def test_a_file_open_for_writing_is_copied(tmp_path):
    p = write("safetensors", tmp_path)
    with open(p, "r+b") as writer:  # a lease is refused (EAGAIN): copy
        a = tb.load(p)["a"]
        assert backing(a.ctypes.data) == ""
        writer.seek(writer.read().find(A.tobytes()))
        writer.write(np.float32(-7).tobytes())
        writer.flush()
    assert a.tobytes() == A.tobytes()
    assert tb.load(p)["a"][0] == -7  # (the file did change)


def test_threads_map_once_the_main_thread_installed_the_handler(tmp_path):
    p = write("safetensors", tmp_path)
    code = """
    import threading
    import tensorbridge as tb
    from tensorbridge.formats import file_lease

    def mapped(arr):
        for line in open("/proc/self/maps"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= arr.ctypes.data < hi:
                return len(line.split(None, 5)) > 5
        raise AssertionError

    out = []
    def in_thread():
        out.append(mapped(tb.load(ARGS[0])["a"]))

    t = threading.Thread(target=in_thread); t.start(); t.join()
    out.append(mapped(tb.load(ARGS[0])["a"]))
    t = threading.Thread(target=in_thread); t.start(); t.join()
    RESULT = out
    """
    r = run_bounded(textwrap.dedent(code), [p], timeout=120)
    assert r.outcome == "ok", r.detail
    assert r.result == [False, True, True]  # copy (no handler yet), then mapped


def test_no_free_signal_means_copies(tmp_path):
    p = write("safetensors", tmp_path)
    code = """
    import signal
    for sig in range(signal.SIGRTMIN, signal.SIGRTMAX + 1):
        signal.signal(sig, lambda *a: None)
    import tensorbridge as tb
    from tensorbridge.formats import file_lease
    a = tb.load(ARGS[0])["a"]
    with open(ARGS[0], "r+b") as f:
        f.write(b"\\xff" * 4096 * 64)
    RESULT = [file_lease.guards(), float(a[0]), float(a[1023])]
    """
    r = run_bounded(textwrap.dedent(code), [p], timeout=120)
    assert r.outcome == "ok", r.detail
    assert r.result == [0, 0.0, 1023.0]


def test_a_forked_child_keeps_its_snapshot_too(tmp_path):
    p = write("safetensors", tmp_path)
    code = """
    import os, subprocess, sys
    import numpy as np
    import tensorbridge as tb
    want = np.arange(1 << 18, dtype=np.float32).tobytes()
    a = tb.load(ARGS[0])["a"]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child waits for the rewrite, then checks its own arrays
        os.close(w)
        os.read(r, 1)
        ok = a.tobytes() == want and float(a.sum()) == float(np.frombuffer(want, np.float32).sum())
        os._exit(0 if ok else 3)
    os.close(r)
    subprocess.run([sys.executable, "-c", "import os, sys; os.truncate(sys.argv[1], 0)",
                    ARGS[0]], check=True)
    os.write(w, b"x")
    _, status = os.waitpid(pid, 0)
    RESULT = [os.waitstatus_to_exitcode(status), a.tobytes() == want]
    """
    r = run_bounded(textwrap.dedent(code), [p], timeout=120)
    assert r.outcome == "ok", r.detail
    assert r.result == [0, True]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a reader as another user")
def test_a_file_the_reader_does_not_own_is_copied():
    d = tempfile.mkdtemp(prefix="tb-lease-")  # (pytest's tmp_path is under a 0700 folder)
    os.chmod(d, 0o755)
    p = os.path.join(d, "m.safetensors")
    save_file({"a": A}, p)
    os.chmod(p, 0o644)
    code = """
    import os
    import numpy as np
    import tensorbridge as tb
    from tensorbridge.formats import file_lease
    del tb.load(ARGS[0])["a"]  # (imports what a load needs while it still can)
    assert file_lease.guards() == 0
    os.setgid(65534); os.setuid(65534)  # no CAP_LEASE, not the owner: EACCES
    a = tb.load(ARGS[0])["a"]
    RESULT = [file_lease.guards(), a.tobytes() == np.arange(1 << 18, dtype=np.float32).tobytes()]
    """
    try:
        r = run_bounded(textwrap.dedent(code), [p], timeout=120)
    finally:
        shutil.rmtree(d)
    assert r.outcome == "ok", r.detail
    assert r.result == [0, True]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("where", ["_install", "_lease"])
def test_an_interrupt_inside_guarded_map_leaves_no_descriptor_or_lease(
    tmp_path, monkeypatch, where
):
    """guarded_map owns the descriptor it is given: a KeyboardInterrupt raised inside it
    (before the lease, or while taking it) closes the descriptor and leaves no guard."""
    p = write("npy", tmp_path)
    tb.load(p)  # (handler installed, imports done)
    gc.collect()
    guards, fds = file_lease.guards(), _open_fds()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(file_lease, where, interrupted)
    fd = os.open(p, os.O_RDONLY)
    with pytest.raises(KeyboardInterrupt):
        file_lease.guarded_map(fd)
    assert _open_fds() == fds and file_lease.guards() == guards
    with pytest.raises(KeyboardInterrupt):
        tb.load(p)  # the same through a load: every descriptor it opened is closed
    gc.collect()
    assert _open_fds() == fds and file_lease.guards() == guards


def test_a_break_after_the_writer_went_on_does_not_copy_a_truncated_file(tmp_path):
    """When the kernel stops waiting for a lease to be given up (``lease-break-time``: a
    writer in this process's own main thread, holding the GIL in C, waits that long), the
    writer truncates the file before the handler runs. The handler then leaves the mapping
    as it is (as an ``mmap=True`` one) and gives the lease up; before, its copy read past
    the file's new end and the process died of SIGBUS. Simulated: a truncation that does
    not break the lease (``O_RDONLY | O_TRUNC``), then the handler's settle step."""
    p = str(tmp_path / "a.npy")
    np.save(p, A)
    code = f"""
        import os, numpy as np, tensorbridge as tb
        from tensorbridge.formats import file_lease
        a = tb.load({p!r})
        assert file_lease.guards() == 1
        (token, guard), = file_lease._GUARDS.items()
        os.close(os.open({p!r}, os.O_RDONLY | os.O_TRUNC))  # (keeps the lease)
        assert os.path.getsize({p!r}) == 0
        file_lease._GUARDS.pop(token)
        file_lease._settle([guard])
        try:
            os.fstat(guard.fd)
        except OSError:
            print("lease given up")
        """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "lease given up"


def test_a_break_while_the_writer_waits_still_copies(tmp_path):
    """The usual break: the writer is held back, the file is as it was mapped, and the
    handler's settle step copies the mapping before giving the lease up."""
    p = str(tmp_path / "a.npy")
    np.save(p, A)
    before = set(file_lease._GUARDS)
    a = tb.load(p)
    assert backing(a.ctypes.data) == p
    (token,) = set(file_lease._GUARDS) - before
    guard = file_lease._GUARDS.pop(token)
    file_lease._settle([guard])
    assert backing(a.ctypes.data) == ""  # copied into anonymous memory at the same address
    assert a.tobytes() == A.tobytes()


def test_torch_save_over_a_file_this_process_loaded(tmp_path):
    """As docs/formats.md says: torch.save to the path of a loaded .pt is interrupted once
    (its C++ open does not retry) and writes nothing; the next call writes; the loaded
    tensors keep the old values throughout."""
    p = str(tmp_path / "m.pt")
    old = torch.from_numpy(A.copy())
    torch.save({"a": old}, p)
    got = tb.load(p, to="torch")
    assert backing(got["a"].data_ptr()) == p  # mapped under a lease
    new = {"a": old * 2}
    try:
        torch.save(new, p)
    except RuntimeError as exc:
        assert "Interrupted system call" in str(exc)
        assert torch.equal(torch.load(p, weights_only=True)["a"], old)  # nothing written
        torch.save(new, p)
    assert torch.equal(torch.load(p, weights_only=True)["a"], new["a"])
    assert torch.equal(got["a"], old) and backing(got["a"].data_ptr()) == ""
