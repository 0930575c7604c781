"""Crash safety of writes: an existing destination stays byte-identical and no temporary
file is left, whatever goes wrong. After SIGKILL a ``.NAME.tb-tmp-PID-...`` file may
remain; the next write to the same destination removes it.

    pytest tests/hostile/test_crash_safety.py

Faults injected: SIGKILL during ``save``, CLI ``convert`` and ``Writer.close`` (in a
subprocess, killed once the temporary file exists and has grown); an exception in the
middle of a write; a full disk (``RLIMIT_FSIZE`` with SIGXFSZ ignored, and a real
1 MiB tmpfs when this process may mount one); a read-only directory (``chattr +i``
and a read-only tmpfs mount when available, since chmod does not stop root; and
always a destination whose parent is a regular file); a symlinked destination;
writing over the file being read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import tensorbridge.files as tbf
from tensorbridge.errors import TensorBridgeError
from tensorbridge.formats.atomic import TMP_MARKER

FORMATS = ["safetensors", "npz", "pt", "h5", "npy"]
SUFFIX = {"safetensors": ".safetensors", "npz": ".npz", "pt": ".pt", "h5": ".h5", "npy": ".npy"}
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


def _old_tree(fmt):
    if fmt == "npy":
        return np.arange(1000, dtype=np.float32)
    return {"old": np.arange(1000, dtype=np.float32), "keep": np.ones(3, np.int8)}


def _new_tree(fmt, n=24, size=1 << 18):
    """~1 MiB per tensor (float32), ``n`` tensors (one for .npy)."""
    if fmt == "npy":
        return np.full(size * 8, 7, np.float32)
    return {f"t{i}": np.full(size, i, np.float32) for i in range(n)}


def _leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n not in keep)


def _only_tmp_leftovers(names: list[str], base: str) -> bool:
    return all(n.startswith(f".{base}{TMP_MARKER}") for n in names)


# --- SIGKILL in a subprocess ------------------------------------------------------------

_CHILD = {
    # the fetch of each tensor is slowed down, as for a slow device-to-host copy
    "save": """
        import sys, time, numpy as np, tensorbridge.files as tbf
        from tests.hostile.test_crash_safety import _new_tree
        orig = tbf.to_host
        def slow(*a, **k):
            time.sleep(0.15)
            return orig(*a, **k)
        tbf.to_host = slow
        import tensorbridge.formats.npy as npy
        orig_pieces = npy.iter_le_bytes
        def slow_pieces(arr):
            # a .npy holds one tensor: slow its data down too, 1 MiB at a time, so the
            # temporary file is seen half-written however fast the disk is
            for piece in orig_pieces(arr):
                view = memoryview(piece).cast("B")
                for start in range(0, len(view), 1 << 20):
                    time.sleep(0.1)
                    yield view[start : start + (1 << 20)]
        npy.iter_le_bytes = slow_pieces
        fmt, dst = sys.argv[1], sys.argv[2]
        tbf.save(_new_tree(fmt), dst)
        print("FINISHED")
    """,
    "convert": """
        import sys, time
        import tensorbridge.cli.convert_cmd as cc
        from tensorbridge.cli import main
        orig = cc._fetch_as
        def slow(*a, **k):
            time.sleep(0.15)
            return orig(*a, **k)
        cc._fetch_as = slow
        fmt, dst, src = sys.argv[1], sys.argv[2], sys.argv[3]
        sys.exit(main(["convert", "--no-verify", src, dst]))
    """,
    "writer": """
        import sys, time, numpy as np
        from tensorbridge.writer import Writer
        orig = Writer._fetch
        def slow(self, name):
            time.sleep(0.15)
            return orig(self, name)
        Writer._fetch = slow
        fmt, dst = sys.argv[1], sys.argv[2]
        with Writer(dst) as w:
            for _ in range(2):
                w.append(**{f"t{i}": np.full((1 << 17,), i, np.float32) for i in range(24)})
            print("APPENDED", flush=True)
        print("FINISHED")
    """,
}


def _spawn(kind: str, fmt: str, dst: Path, *extra: str) -> subprocess.Popen:
    repo = Path(__file__).resolve().parents[2]
    code = textwrap.dedent(_CHILD[kind])
    return subprocess.Popen(
        [sys.executable, "-c", code, fmt, str(dst), *extra],
        cwd=repo,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_when_tmp_grows(
    proc: subprocess.Popen, directory: Path, base: str, min_size: int, timeout: float = 60
) -> int:
    """SIGKILL ``proc`` once its temporary file for ``base`` exists with >= ``min_size`` bytes."""
    prefix = f".{base}{TMP_MARKER}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the writer finished before it could be killed: {out}{err}")
        for name in os.listdir(directory):
            if name.startswith(prefix):
                try:
                    size = os.path.getsize(directory / name)
                except FileNotFoundError:
                    continue
                if size >= min_size:
                    proc.send_signal(signal.SIGKILL)
                    proc.communicate()  # reap it and close its pipes
                    assert proc.returncode == -signal.SIGKILL
                    return size
        time.sleep(0.005)
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"no temporary file appeared: {out}{err}")


def _check_killed(directory: Path, dst: Path, before: bytes, fmt: str) -> list[str]:
    assert dst.read_bytes() == before, "the killed write changed the destination"
    left = _leftovers(directory, {dst.name})
    assert _only_tmp_leftovers(left, dst.name), left
    return left


def _rewrite_cleans_up(directory: Path, dst: Path, fmt: str, keep: set[str] = frozenset()) -> None:
    tbf.save(_old_tree(fmt) if fmt == "npy" else {"fresh": np.arange(5)}, dst)
    assert _leftovers(directory, {dst.name, *keep}) == [], "the next write left leftovers"
    got = tbf.load(dst)
    if fmt == "npy":
        assert got.tobytes() == _old_tree(fmt).tobytes()
    else:
        assert got["fresh"].tobytes() == np.arange(5).tobytes()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", FORMATS)
def test_sigkill_during_save(fmt, tmp_path):
    dst = tmp_path / f"model{SUFFIX[fmt]}"
    tbf.save(_old_tree(fmt), dst)
    before = dst.read_bytes()
    proc = _spawn("save", fmt, dst)
    _kill_when_tmp_grows(proc, tmp_path, dst.name, 1 if fmt == "npy" else 2 << 20)
    left = _check_killed(tmp_path, dst, before, fmt)
    assert left, "SIGKILL mid-write should leave the recognisable temporary file"
    _rewrite_cleans_up(tmp_path, dst, fmt)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["safetensors", "npz", "pt", "h5"])
def test_sigkill_during_cli_convert(fmt, tmp_path):
    src = tmp_path / "src" / "big.safetensors"
    src.parent.mkdir()
    tbf.save(_new_tree(fmt), src)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / f"model{SUFFIX[fmt]}"
    tbf.save(_old_tree(fmt), dst)
    before = dst.read_bytes()
    proc = _spawn("convert", fmt, dst, str(src))
    _kill_when_tmp_grows(proc, out, dst.name, 2 << 20)
    _check_killed(out, dst, before, fmt)
    _rewrite_cleans_up(out, dst, fmt)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["safetensors", "npz", "h5"])
def test_sigkill_during_writer_close(fmt, tmp_path):
    dst = tmp_path / f"db{SUFFIX[fmt]}"
    tbf.save(_old_tree(fmt), dst)
    before = dst.read_bytes()
    proc = _spawn("writer", fmt, dst)
    _kill_when_tmp_grows(proc, tmp_path, dst.name, 2 << 20)
    left = _leftovers(tmp_path, {dst.name})
    assert dst.read_bytes() == before
    tmp = [n for n in left if n.startswith(f".{dst.name}{TMP_MARKER}")]
    spools = [n for n in left if ".tb-spool-" in n]
    assert sorted(tmp + spools) == left, left
    _rewrite_cleans_up(tmp_path, dst, fmt, keep=set(spools))


@pytest.mark.timeout(120)
def test_sigkill_during_writer_close_leaves_no_spool_after_next_write(tmp_path):
    """Spool files of a killed Writer (``.NAME.tb-spool-PID-...``) go with the next Writer."""
    from tensorbridge.writer import Writer

    dst = tmp_path / "db.npz"
    tbf.save(_old_tree("npz"), dst)
    proc = _spawn("writer", "npz", dst)
    _kill_when_tmp_grows(proc, tmp_path, dst.name, 2 << 20)
    with Writer(dst) as w:
        w.append(x=np.arange(4))
    assert _leftovers(tmp_path, {dst.name}) == []


# --- exceptions mid-write ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS + ["sharded"])
def test_exception_mid_write_leaves_destination(fmt, tmp_path, monkeypatch):
    dst = tmp_path / ("ckpt" if fmt == "sharded" else f"m{SUFFIX[fmt]}")
    opts = {"format": "sharded", "max_shard_size": 1 << 20} if fmt == "sharded" else {}
    tbf.save(_old_tree(fmt), dst, **opts)
    snap = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    calls = []
    orig = tbf.to_host

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3 or fmt == "npy":
            raise RuntimeError("injected failure")
        return orig(*a, **k)

    monkeypatch.setattr(tbf, "to_host", failing)
    with pytest.raises(RuntimeError, match="injected"):
        tbf.save(_new_tree(fmt, n=6, size=1000), dst, **opts)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == snap


# --- full disk ---------------------------------------------------------------------------

_FSIZE_CHILD = """
import json, resource, signal, sys
import numpy as np, tensorbridge.files as tbf
from tensorbridge.errors import TensorBridgeError
from tests.hostile.test_crash_safety import _new_tree
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    tbf.save(_new_tree(sys.argv[1], n=8), sys.argv[2])
    print(json.dumps({"result": "saved"}))
except TensorBridgeError as e:
    print(json.dumps({"result": "error", "type": type(e).__name__, "message": str(e)}))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", FORMATS)
def test_full_disk_rlimit_fsize(fmt, tmp_path):
    dst = tmp_path / f"m{SUFFIX[fmt]}"
    tbf.save(_old_tree(fmt), dst)
    before = dst.read_bytes()
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", _FSIZE_CHILD, fmt, str(dst), str(1 << 20)],
        capture_output=True,
        text=True,
        cwd=repo,
        env=ENV,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.splitlines()[-1])
    assert res["result"] == "error", res
    assert "largest file this process may write" in res["message"], res["message"]
    assert "ulimit -f" in res["message"] and str(dst) in res["message"]
    assert dst.read_bytes() == before
    assert _leftovers(tmp_path, {dst.name}) == []


@pytest.fixture
def mount_tmpfs(tmp_path):
    mounted = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", FORMATS)
def test_full_disk_real_tmpfs(fmt, mount_tmpfs):
    disk = mount_tmpfs("small", "size=1m")
    dst = disk / f"m{SUFFIX[fmt]}"
    tbf.save(_old_tree(fmt), dst)
    before = dst.read_bytes()
    with pytest.raises(TensorBridgeError) as err:
        tbf.save(_new_tree(fmt, n=8), dst)
    assert "disk" in str(err.value) or "space" in str(err.value), str(err.value)
    assert dst.read_bytes() == before
    assert _leftovers(disk, {dst.name}) == []


# --- read-only directories -----------------------------------------------------------


def test_parent_is_a_regular_file(tmp_path):
    """Always available, even as root: creating the temporary file fails (ENOTDIR)."""
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(TensorBridgeError) as err:
        tbf.save({"a": np.ones(2)}, tmp_path / "file" / "m.safetensors")
    assert "m.safetensors" in str(err.value)
    assert (tmp_path / "file").read_bytes() == b"x"


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_only_directory_immutable(fmt, tmp_path):
    """chmod does not stop root; ``chattr +i`` does (on file systems that support it)."""
    d = tmp_path / "ro"
    d.mkdir()
    dst = d / f"m{SUFFIX[fmt]}"
    tbf.save(_old_tree(fmt), dst)
    before = dst.read_bytes()
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(TensorBridgeError) as err:
            tbf.save(_new_tree(fmt, n=2, size=100), dst)
        assert str(dst) in str(err.value)
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    assert dst.read_bytes() == before
    assert _leftovers(d, {dst.name}) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_only_mount(fmt, mount_tmpfs):
    disk = mount_tmpfs("ro", "size=1m")
    dst = disk / f"m{SUFFIX[fmt]}"
    tbf.save(_old_tree(fmt), dst)
    before = dst.read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    with pytest.raises(TensorBridgeError) as err:
        tbf.save(_new_tree(fmt, n=2, size=100), dst)
    assert "Read-only" in str(err.value) or "read-only" in str(err.value), str(err.value)
    assert dst.read_bytes() == before
    assert _leftovers(disk, {dst.name}) == []


# --- symlinks and writing over the input ------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_symlinked_destination_updates_target(fmt, tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / f"m{SUFFIX[fmt]}"
    tbf.save(_old_tree(fmt), target)
    os.chmod(target, 0o640)
    link = tmp_path / f"link{SUFFIX[fmt]}"
    os.symlink(target, link)
    new = _new_tree(fmt, n=2, size=100)
    tbf.save(new, link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target.stat().st_mode & 0o777) == 0o640, "the destination's mode was not kept"
    got = tbf.load(target)
    if fmt == "npy":
        assert got.tobytes() == new.tobytes()
    else:
        assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in new.items()}
    assert _leftovers(real_dir, {target.name}) == []
    assert _leftovers(tmp_path, {link.name, "real"}) == []


def _bytes_of(tree):
    if isinstance(tree, np.ndarray):
        return tree.tobytes()
    return {k: v.tobytes() for k, v in tree.items()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_load_same_path(fmt, tmp_path):
    p = tmp_path / f"m{SUFFIX[fmt]}"
    tree = _new_tree(fmt, n=3, size=1000)
    tbf.save(tree, p)
    tbf.save(tbf.load(p), p)
    assert _bytes_of(tbf.load(p)) == _bytes_of(tree)
    # lazily: each tensor is read from the open file while the same path is written
    with tbf.open(p) as r:
        if fmt == "npy":
            tbf.save(r[r.keys()[0]], p)
        else:
            tbf.save({k: r[k] for k in r.keys()}, p)
    assert _bytes_of(tbf.load(p)) == _bytes_of(tree)
    assert _leftovers(tmp_path, {p.name}) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_convert_onto_itself(fmt, tmp_path):
    p = tmp_path / f"m{SUFFIX[fmt]}"
    tree = _new_tree(fmt, n=3, size=1000)
    tbf.save(tree, p)
    before = p.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "tensorbridge", "convert", str(p), str(p)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=100,
    )
    assert "Traceback" not in proc.stderr
    if proc.returncode == 0:  # converted in place: the same tensors, bit-exact
        assert _bytes_of(tbf.load(p)) == _bytes_of(tree)
    else:  # refused, clearly, with the file untouched
        assert proc.returncode == 2, proc.stderr
        assert p.read_bytes() == before
    assert _leftovers(tmp_path, {p.name}) == []
