"""convert --workers N and --scheduler ADDRESS: byte-identical to one process, atomic, clean.

The cluster tests start a real dask.distributed LocalCluster with worker processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import pytest

import tensorbridge as tb
from tensorbridge.cli import main
from tensorbridge.cli.convert_cmd import convert_file
from tensorbridge.errors import ConversionError, FileFormatError


def _digest(path):
    path = str(path)
    if os.path.isdir(path):
        return {f: _digest(os.path.join(path, f)) for f in sorted(os.listdir(path))}
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("par")
    rng = np.random.default_rng(0)
    tree = {
        f"layer.{i}.weight": rng.standard_normal((64, 48)).astype(np.float32) for i in range(10)
    }
    tree["ids"] = np.arange(7, dtype=np.int64)
    tree["mask"] = rng.integers(0, 2, (5, 5)).astype(bool)
    src = f"{d}/src/"
    tb.save(tree, src, max_shard_size="40KB")
    assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) > 3
    return d, src


def _leftovers(directory):
    return [n for n in os.listdir(directory) if ".tb-" in n]


@pytest.mark.parametrize(
    "dst", ["out.safetensors", "out.npz", "out.h5", "out.pt", "shards/", "out.zarr"]
)
def test_workers_write_the_same_bytes_as_one_process(source, dst):
    d, src = source
    outs = []
    for workers in (1, 2):
        out = f"{d}/w{workers}-{dst}"
        summary = convert_file(src, out, dtype="bfloat16", workers=workers)
        assert summary["verified"] == 12 and summary["cast"] == 10
        outs.append(out)
    assert _digest(outs[0]) == _digest(outs[1])
    back = tb.load(outs[1])
    assert back["layer.3.weight"].dtype.name == "bfloat16" and back["ids"].tolist() == list(
        range(7)
    )
    assert not _leftovers(d)


def test_a_failing_task_leaves_the_destination_untouched(tmp_path):
    src = tmp_path / "bad.safetensors"
    tb.save({"a": np.ones((4, 4), np.float32), "b": np.zeros(3, bool)}, src)
    raw = bytearray(src.read_bytes())
    raw[-1] = 7  # a bool byte that is neither 0 nor 1: reading "b" fails in its worker
    src.write_bytes(bytes(raw))
    dst = tmp_path / "out.npz"
    tb.save({"old": np.arange(3)}, dst)
    before = _digest(dst)
    with pytest.raises(FileFormatError, match="(?i)bool"):
        convert_file(str(src), str(dst), dtype="float16", workers=2)
    assert _digest(dst) == before
    assert not _leftovers(tmp_path)


def test_workers_must_be_positive(tmp_path, capsys):
    tb.save({"a": np.ones(2)}, tmp_path / "a.npz")
    with pytest.raises(ConversionError, match="positive"):
        convert_file(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), workers=0)
    assert (
        main(
            [
                "convert",
                str(tmp_path / "a.npz"),
                str(tmp_path / "c.npz"),
                "--workers",
                "2",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["workers"] == 2


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        scheduler_port=0,
        silence_logs=50,
    ) as c:
        yield c


def test_a_dask_cluster_converts_byte_identically(source, cluster):
    d, src = source
    one = f"{d}/one/"
    convert_file(src, one, dtype="float16")
    on_cluster = f"{d}/cluster/"
    summary = convert_file(src, on_cluster, dtype="float16", scheduler=cluster.scheduler_address)
    assert summary["scheduler"] == cluster.scheduler_address and summary["verified"] == 12
    assert _digest(one) == _digest(on_cluster)
    assert not _leftovers(d)


def test_a_cluster_failure_leaves_nothing_half_written(tmp_path, cluster):
    src = tmp_path / "bad.safetensors"
    tb.save({"a": np.ones((4, 4), np.float32), "b": np.zeros(3, bool)}, src)
    raw = bytearray(src.read_bytes())
    raw[-1] = 9
    src.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match="(?i)bool"):
        convert_file(
            str(src), f"{tmp_path}/out/", dtype="float16", scheduler=cluster.scheduler_address
        )
    assert not os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    assert not _leftovers(tmp_path)


def test_an_unreachable_scheduler_is_a_clear_error(tmp_path):
    pytest.importorskip("distributed")
    tb.save({"a": np.ones(2, np.float32)}, tmp_path / "a.safetensors")
    with pytest.raises(ConversionError, match="no scheduler answered"):
        convert_file(
            str(tmp_path / "a.safetensors"),
            str(tmp_path / "b.safetensors"),
            dtype="float16",
            scheduler="tcp://127.0.0.1:1",
        )


def test_workers_are_forked_only_where_it_is_safe():
    from tests.hostile.bounded import run_bounded

    r = run_bounded("""
        from tensorbridge.parallel import start_method
        before = start_method()
        import jax.numpy
        RESULT = [before, start_method()]
    """)
    assert r.outcome == "ok" and r.result == ["fork", "spawn"], r


# --- direct writes: workers fill the output in place ----------------------------------


@pytest.mark.parametrize("dst", ["out.safetensors", "shards/"])
def test_split_tensors_and_copies_write_the_same_bytes(tmp_path, monkeypatch, dst):
    """Tensors split into row pieces (cast or copied as they are), bool and empty tensors,
    0-d tensors: the workers' in-place writes give the one-process bytes."""
    import tensorbridge.parallel as par

    rng = np.random.default_rng(1)
    tree = {
        "big": rng.standard_normal((301, 17)).astype(np.float32),
        "copied": rng.integers(-9, 9, (257, 3)).astype(np.int16),
        "mask": rng.integers(0, 2, (40,)).astype(bool),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.float64(2.5),
        "half": rng.standard_normal((64, 8)).astype(np.float16),
    }
    src = tmp_path / "src.safetensors"
    tb.save(tree, src)
    monkeypatch.setattr(par, "PIECE_BYTES", 1000)  # planned in this process: many pieces
    monkeypatch.setattr(par, "FILES_AT_ONCE", 3)  # the 4 shards: a group of 3, then 1
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}" / dst
        out.parent.mkdir()
        opts = {"max_shard_size": "1KB"} if dst.endswith("/") else {}
        summary = convert_file(str(src), str(out), dtype="bfloat16", workers=workers, **opts)
        assert summary["verified"] == 6 and summary["cast"] == 4
        outs.append(out)
    assert _digest(outs[0]) == _digest(outs[1])
    if dst.endswith("/"):
        assert len(os.listdir(outs[1])) > 3  # several shards, written at once
    back = tb.load(str(outs[1]))
    assert back["copied"].tobytes() == tree["copied"].tobytes()
    assert back["mask"].tobytes() == tree["mask"].tobytes()
    assert not _leftovers(outs[1].parent if not dst.endswith("/") else outs[1])


# A worker that writes half of its first piece, then reports its PID and waits to be killed
# (pid file written atomically; it never goes on by itself). With "always" every worker
# kills itself there instead; with "flip" its bytes land with one bit changed. A fresh
# interpreter forks its workers (and the retry pools), so they run the patched module.
_DYING = """
import os, signal, sys
import tensorbridge.parallel as par
from tensorbridge.cli import main

mode, marker, pidfile, *argv = sys.argv[1:]
real = par._write_at

def dying(fd, data, offset):
    if mode == "flip":  # a bit flipped on its way to the disk
        bad = bytearray(data)
        bad[0] ^= 1
        return real(fd, memoryview(bad), offset)
    real(fd, data[: len(data) // 2], offset)  # half of the piece lands in the output
    if mode == "always":
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:  # not the first piece: write normally
        return real(fd, data, offset)
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    while True:
        signal.pause()  # until the test kills this process

par._write_at = dying
assert par.start_method() == "fork", par.start_method()
sys.exit(main(argv))
"""


def _dying_convert(tmp_path, mode, src, dst, dtype="bfloat16"):
    import subprocess
    import sys
    import time

    marker, pidfile = tmp_path / "marker", tmp_path / "worker.pid"
    proc = subprocess.Popen(
        [sys.executable, "-c", _DYING, mode, str(marker), str(pidfile)]
        + ["convert", str(src), str(dst), "--dtype", dtype, "--workers", "2", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = None
    try:
        if mode == "once":  # the worker waits in pause() until this kill: no race
            deadline = time.monotonic() + 120
            while not pidfile.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert pidfile.exists(), proc.communicate(timeout=5)
            killed = int(pidfile.read_text())
            os.kill(killed, 9)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err, killed


@pytest.fixture(scope="module")
def cast_source(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill")
    rng = np.random.default_rng(2)
    tree = {f"w{i}": rng.standard_normal((256, 256)).astype(np.float32) for i in range(6)}
    src = d / "src"
    tb.save(tree, f"{src}/", max_shard_size="300KB")
    return src


def test_a_killed_local_worker_is_retried_and_the_output_is_the_same(tmp_path, cast_source):
    one = tmp_path / "one"
    convert_file(f"{cast_source}/", f"{one}/", dtype="bfloat16")
    dst = tmp_path / "out"
    rc, err, killed = _dying_convert(tmp_path, "once", cast_source, f"{dst}/")
    assert rc == 0, err
    assert killed is not None and err == ""
    with pytest.raises(ProcessLookupError):  # the killed worker is gone for good
        os.kill(killed, 0)
    assert _digest(one) == _digest(dst)
    assert not _leftovers(dst) and not _leftovers(tmp_path)


@pytest.mark.parametrize("dst", ["out.safetensors", "out/"])
def test_workers_killed_every_time_fail_cleanly(tmp_path, cast_source, dst):
    out = tmp_path / dst
    target = f"{out}/" if dst.endswith("/") else str(out)
    tb.save({"old": np.arange(3)}, target)
    before = _digest(out)
    rc, err, _ = _dying_convert(tmp_path, "always", cast_source, target)
    assert rc == 2
    assert "tensorbridge: error:" in err and "died 3 times" in err and "Traceback" not in err
    assert _digest(out) == before  # untouched: no new shard, no new index
    assert not _leftovers(tmp_path) and not _leftovers(out if dst.endswith("/") else tmp_path)


def test_a_killed_cluster_worker_is_retried_and_the_output_is_the_same(
    tmp_path, cast_source, cluster
):
    """A LocalCluster worker process SIGKILLs itself halfway through writing its first
    piece (once: a marker file); Dask reschedules the task on a live worker, the nanny
    restarts the dead one, and the output is the one-process bytes."""
    distributed = pytest.importorskip("distributed")
    from distributed.diagnostics.plugin import WorkerPlugin

    class DieOnce(WorkerPlugin):
        name = "tb-die-once"

        def __init__(self, marker):
            self.marker = marker

        def setup(self, worker):
            import os
            import signal

            import tensorbridge.parallel as par

            real, marker = par._write_at, self.marker

            def dying(fd, data, offset):
                real(fd, data[: len(data) // 2], offset)
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return real(fd, data, offset)
                os.kill(os.getpid(), signal.SIGKILL)

            par._write_at = dying

    one = tmp_path / "one"
    convert_file(f"{cast_source}/", f"{one}/", dtype="bfloat16")
    marker = tmp_path / "marker"
    out = tmp_path / "out"
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
        client.register_plugin(DieOnce(str(marker)))
        try:
            summary = convert_file(
                f"{cast_source}/", f"{out}/", dtype="bfloat16", scheduler=cluster.scheduler_address
            )
        finally:
            client.unregister_worker_plugin(DieOnce.name)
    assert marker.exists()  # a worker died halfway through a piece
    assert summary["verified"] == 6
    assert _digest(one) == _digest(out)
    assert not _leftovers(out) and not _leftovers(tmp_path)


def test_a_failure_in_a_later_group_of_shards_leaves_the_destination_untouched(
    tmp_path, cast_source, monkeypatch
):
    """Shards are filled FILES_AT_ONCE at a time; the groups renamed before a failure are
    removed again, the old checkpoint stays whole and no temporary file is left."""
    import tensorbridge.parallel as par

    out = tmp_path / "out"
    tb.save({"old": np.arange(3)}, f"{out}/")
    before = _digest(out)
    monkeypatch.setattr(par, "FILES_AT_ONCE", 2)
    real, calls = par.run_pieces, []

    def second_group_fails(*args, **kwargs):
        calls.append(len(os.listdir(out)))
        if len(calls) == 2:  # the first group's shards are in place by now
            raise ConversionError("the second group failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(par, "run_pieces", second_group_fails)
    with pytest.raises(ConversionError, match="second group"):
        convert_file(
            f"{cast_source}/", f"{out}/", dtype="bfloat16", workers=2, max_shard_size="300KB"
        )  # 3 shards: a group of 2, then 1
    assert calls[1] > calls[0]  # renamed shards (and temporary files) were there
    assert _digest(out) == before
    assert not _leftovers(out)


def test_the_workers_compare_what_they_wrote(tmp_path):
    """A worker whose bytes do not read back as written fails the command: the
    destination stays as it was and no temporary file is left."""
    src = tmp_path / "src.safetensors"
    tb.save({"a": np.ones((64, 4), np.float32), "b": np.ones(3, np.float32)}, src)
    dst = tmp_path / "out.safetensors"
    tb.save({"old": np.arange(3)}, dst)
    before = _digest(dst)
    rc, err, _ = _dying_convert(tmp_path, "flip", src, dst, dtype="float16")
    assert rc == 2 and "reads back different from what was written" in err, err
    assert _digest(dst) == before
    assert not _leftovers(tmp_path)


def test_memory_per_worker_is_one_piece_not_the_tensor(tmp_path):
    """A 256 MiB float32 tensor (a sparse file) cast to bfloat16 by two workers: each
    worker's peak RSS (VmHWM, measured in the worker after each piece) stays near one
    64 MiB piece and its cast, far below the tensor and its cast (384 MiB), and the command
    itself never holds tensor bytes."""
    from tests.formats.test_lazy import _sparse_safetensors
    from tests.hostile.bounded import MIB, run_bounded

    src = tmp_path / "big.safetensors"
    _sparse_safetensors(src, 1 << 16, 1024)
    r = run_bounded(
        """
        import tensorbridge.parallel as par
        from tensorbridge.cli import main
        real = par.write_piece
        def measured(*args):
            out = real(*args)
            hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
            with open(ARGS[2], "a") as f:
                f.write(hwm.split()[1] + "\\n")
            return out
        par.write_piece = measured
        assert par.start_method() == "fork"
        rc = main(["convert", ARGS[0], ARGS[1], "--dtype", "bfloat16", "--workers", "2", "-q"])
        RESULT = [rc, [int(k) * 1024 for k in open(ARGS[2]).read().split()]]
        """,
        [str(src), str(tmp_path / "out.safetensors"), str(tmp_path / "hwm")],
        timeout=120,
        mem_limit=0,
    )
    assert r.outcome == "ok", r
    rc, peaks = r.result
    assert rc == 0 and len(peaks) == 4  # four pieces of 16384 rows
    assert max(peaks) < 240 * MIB, [p // MIB for p in peaks]
    assert r.peak_rss < 150 * MIB
    from tensorbridge.dtypes import numpy_dtype

    with tb.open(tmp_path / "out.safetensors") as f:  # row 5 holds 0..1023, the rest 0
        rows = f.read_slice("big", slice(4, 7))
    want = np.zeros((3, 1024), np.float32)
    want[1] = np.arange(1024)
    assert rows.tobytes() == want.astype(numpy_dtype("bfloat16")).tobytes()


def test_workers_beyond_the_machine_are_refused(tmp_path):
    """--workers 100000 forked 100000 processes at once (a forked pool starts them all)."""
    import tensorbridge.parallel as par

    tb.save({"a": np.ones(2, np.float32)}, tmp_path / "a.safetensors")
    too_many = par.max_local_workers() + 1
    with pytest.raises(ConversionError, match=rf"--workers {too_many}.*pass at most"):
        convert_file(str(tmp_path / "a.safetensors"), str(tmp_path / "b.npz"), workers=too_many)
    assert not os.path.exists(tmp_path / "b.npz")


@pytest.mark.parametrize("dst", ["out.safetensors", "out.npz"])
def test_a_pool_has_no_more_processes_than_tasks(tmp_path, monkeypatch, dst):
    """Into safetensors (direct writes) and npz (spooled): 2 tensors to cast, 16 workers
    asked for, 2 processes started."""
    import tensorbridge.parallel as par

    sizes = []
    real = par._Local.__init__

    def counting(self, workers, tasks):
        real(self, workers, tasks)
        sizes.append(self._pool._max_workers)

    monkeypatch.setattr(par._Local, "__init__", counting)
    src = tmp_path / "a.safetensors"
    tb.save({"a": np.ones((3, 2), np.float32), "b": np.zeros(4, np.float32)}, src)
    convert_file(str(src), str(tmp_path / dst), dtype="float16", workers=16)
    assert sizes == [2]
    assert tb.load(tmp_path / dst)["a"].dtype == np.float16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_command_ends_its_workers(tmp_path, cast_source):
    """SIGKILL of the command: its workers end too (they waited for tasks forever, holding
    the command's stdout and stderr open), and the next run removes the stale temporary
    file and writes the same output."""
    import subprocess
    import sys
    import time

    marker, pidfile = tmp_path / "marker", tmp_path / "worker.pid"
    out = tmp_path / "out.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-c", _DYING, "once", str(marker), str(pidfile)]
        + ["convert", f"{cast_source}/", str(out), "--dtype", "bfloat16", "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:  # the worker waits in pause() until it is killed: no race
        deadline = time.monotonic() + 120
        while not pidfile.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pidfile.exists(), proc.poll()
        worker = int(pidfile.read_text())
        proc.kill()
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60  # the kernel signals it at once; a margin for CI
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{worker}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break  # a zombie (reaped by init): it ran no further
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            os.kill(worker, 9)
            raise AssertionError(f"worker {worker} outlived the killed command")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists() and _leftovers(tmp_path)  # the killed command's temporary file
    one = tmp_path / "one.safetensors"
    convert_file(f"{cast_source}/", str(one), dtype="bfloat16")
    convert_file(f"{cast_source}/", str(out), dtype="bfloat16", workers=2)
    assert _digest(one) == _digest(out) and not _leftovers(tmp_path)


@pytest.mark.parametrize("dst", ["out.npz", "out.h5"])
def test_spool_files_of_a_killed_convert_are_removed_by_the_next(tmp_path, dst):
    """Spool files (into npz, h5, pt, zarr) of a convert killed with SIGKILL stayed forever:
    the next convert to the same destination removes those whose process is gone."""
    import subprocess
    import sys

    from tensorbridge.parallel import SPOOL_MARKER

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a PID no live process has (reused only after a wrap-around)
    stale = tmp_path / f".{dst}{SPOOL_MARKER}{gone.pid}-0123abcd"
    stale.write_bytes(b"half a tensor")
    src = tmp_path / "a.safetensors"
    tb.save({"a": np.ones((3, 2), np.float32), "b": np.zeros(4, np.float32)}, src)
    convert_file(str(src), str(tmp_path / dst), dtype="float16", workers=2)
    assert not stale.exists() and not _leftovers(tmp_path)


def test_a_scheduler_address_of_no_known_kind_is_refused_cleanly(tmp_path):
    """--scheduler nonsense://x gave the error, then Dask's half-made Client hung 20 s at
    exit and printed a traceback; an address without a scheme (tcp, as Dask reads it)
    where nothing listens is refused at once, as tcp://... is."""
    import subprocess
    import sys

    pytest.importorskip("distributed")
    tb.save({"a": np.ones(2, np.float32)}, tmp_path / "a.safetensors")
    for address, why in [
        ("nonsense://x", "not a scheduler address (unknown address scheme 'nonsense'"),
        ("127.0.0.1:1", "ConnectionRefusedError"),
    ]:
        r = subprocess.run(
            [sys.executable, "-m", "tensorbridge", "convert", "-q", "--scheduler", address]
            + [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2 and why in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    assert not (tmp_path / "b.safetensors").exists()


def test_a_full_disk_in_a_worker_says_so(tmp_path):
    """A spool worker's EFBIG (RLIMIT_FSIZE, as a full disk) told the user to check that
    workers see the same paths; it now says to free space."""
    import subprocess
    import sys

    src = tmp_path / "a.safetensors"
    tb.save({f"w{i}": np.ones((128, 128), np.float32) for i in range(3)}, src)
    dst = tmp_path / "out.npz"
    tb.save({"old": np.arange(3)}, dst)
    before = _digest(dst)
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        "from tensorbridge.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "convert", "-q", "--workers", "2", "--dtype", "float16"]
        + [str(src), str(dst)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "File too large" in r.stderr and "free space" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert _digest(dst) == before and not _leftovers(tmp_path)
