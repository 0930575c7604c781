"""Kernel-side copies: ``Reader.raw_span`` and the safetensors writer's span path.

Every conversion that takes the raw path is checked byte for byte against the
normal path (arrays read into memory) on the same source, and read back by the
real ``safetensors`` package. Tensors whose stored bytes are not exactly what
would be written (transposed, strided, big-endian, compressed) must not take it.
Broken sources raise ``FileFormatError``, and the atomic-write guarantees hold.
"""

from __future__ import annotations

import errno
import os
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")

from tensorbridge.cli.convert_cmd import convert_file, verify  # noqa: E402
from tensorbridge.errors import ConversionError, FileFormatError  # noqa: E402
from tensorbridge.formats import get_format  # noqa: E402
from tensorbridge.formats import safetensors as st_mod  # noqa: E402
from tensorbridge.formats.base import RawSpan, Reader, TensorInfo  # noqa: E402
from tensorbridge.formats.pt import PtReader  # noqa: E402
from tensorbridge.formats.safetensors import SafetensorsReader  # noqa: E402

SAFETENSORS = get_format("safetensors")
PT = get_format("pt")

TORCH_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.complex64,
]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if dtype.is_complex:
            t = torch.complex(t, -t)
        return t.to(dtype)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.int64).to(dtype)
    return torch.randint(-100, 100, shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.fixture
def pt_file(tmp_path):
    """A torch.save checkpoint: several dtypes, a transposed tensor, a shared-storage view,
    a bool and an empty tensor."""
    sd = {f"w.{i}": _tensor(dt, (7, 5), i) for i, dt in enumerate(TORCH_DTYPES)}
    base = _tensor(torch.float32, (64,), 99)
    sd["view.head"] = base[:16]
    sd["view.mid"] = base[20:44].view(4, 6)  # storage offset 20, contiguous
    sd["transposed"] = _tensor(torch.bfloat16, (6, 3), 7).t()
    sd["strided"] = _tensor(torch.float32, (10,), 8)[::2]
    sd["flag"] = torch.tensor([True, False, True])
    sd["empty"] = torch.zeros((0, 4))
    sd["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    path = tmp_path / "model.pt"
    torch.save(sd, path)
    return path, sd


@pytest.fixture
def st_file(tmp_path):
    sd = {f"t.{i}": _tensor(dt, (3, 11), 50 + i) for i, dt in enumerate(TORCH_DTYPES)}
    sd["flag"] = torch.tensor([[True], [False]])
    sd["empty"] = torch.zeros((2, 0), dtype=torch.bfloat16)
    path = tmp_path / "model.safetensors"
    st_torch.save_file(sd, str(path), metadata={"who": "test"})
    return path, sd


def _no_spans(monkeypatch):
    monkeypatch.setattr(Reader, "raw_span", lambda self, name: None)
    monkeypatch.setattr(PtReader, "raw_span", lambda self, name: None)
    monkeypatch.setattr(SafetensorsReader, "raw_span", lambda self, name: None)


def _spans_taken(monkeypatch) -> list[str]:
    """Record the names for which the safetensors writer received a RawSpan."""
    taken: list[str] = []
    real = st_mod.copy_span

    def spy(src_fd, span, dst_fd, dst_offset):
        taken.append(span)
        return real(src_fd, span, dst_fd, dst_offset)

    monkeypatch.setattr(st_mod, "copy_span", spy)
    return taken


def _same_tensors(path, sd):
    back = st_torch.load_file(str(path))
    assert sorted(back) == sorted(sd)
    for k, t in sd.items():
        want = t.contiguous()
        assert back[k].dtype == want.dtype and back[k].shape == want.shape, k
        assert (
            back[k].view(-1).view(torch.uint8).numpy().tobytes()
            == want.reshape(-1).view(torch.uint8).numpy().tobytes()
        ), k


# --- the readers' spans ---------------------------------------------------------------


def test_pt_raw_spans_only_for_contiguous_little_endian_stored_bytes(pt_file):
    path, sd = pt_file
    with PT.open(path) as r:
        for name in r.keys():
            span = r.raw_span(name)
            if name in ("transposed", "strided", "empty", "flag"):  # bool bytes must be checked
                assert span is None, name
                continue
            assert isinstance(span, RawSpan), name
            assert span.nbytes == r.info(name).nbytes
            with open(path, "rb") as f:
                f.seek(span.offset)
                assert f.read(span.nbytes) == r.read(name).tobytes(), name
        head, mid = r.raw_span("view.head"), r.raw_span("view.mid")
        assert mid.offset - head.offset == 20 * 4  # the same storage record, offset 20


def test_pt_no_raw_span_for_compressed_records(pt_file, tmp_path):
    path, _ = pt_file
    zipped = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item), compress_type=zipfile.ZIP_DEFLATED)
    with PT.open(zipped) as r:
        assert all(r.raw_span(n) is None for n in r.keys())
    out = tmp_path / "o.safetensors"
    convert_file(str(zipped), str(out))
    _same_tensors(out, {k: v for k, v in pt_file[1].items()})


def test_pt_no_raw_span_for_big_endian_storages(pt_file, tmp_path):
    path, _ = pt_file
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = b"big" if item.filename.endswith("/byteorder") else src.read(item)
            dst.writestr(item.filename, data)
    with PT.open(big) as r:
        assert r._swap or not r._little
        assert all(r.raw_span(n) is None for n in r.keys())


def test_safetensors_raw_spans(st_file):
    path, sd = st_file
    with SAFETENSORS.open(path) as r:
        for name in r.keys():
            span = r.raw_span(name)
            if name in ("flag", "empty"):  # BOOL is validated by read(); empty has no bytes
                assert span is None
                continue
            with open(path, "rb") as f:
                f.seek(span.offset)
                assert f.read(span.nbytes) == r.read(name).tobytes(), name


# --- conversions: raw path == normal path -----------------------------------------------


@pytest.mark.parametrize("which", ["pt", "safetensors"])
@pytest.mark.parametrize("check", [True, False])
def test_raw_conversion_is_byte_identical_to_normal_path(
    which, check, pt_file, st_file, tmp_path, monkeypatch
):
    src, sd = pt_file if which == "pt" else st_file
    fast, slow = tmp_path / "fast.safetensors", tmp_path / "slow.safetensors"
    taken = _spans_taken(monkeypatch)
    summary = convert_file(str(src), str(fast), check=check)
    assert summary["verified"] == (len(sd) if check else None)
    assert len(taken) >= len(TORCH_DTYPES)  # the raw path really ran
    with monkeypatch.context() as m:
        _no_spans(m)
        convert_file(str(src), str(slow), check=check)
    assert fast.read_bytes() == slow.read_bytes()
    _same_tensors(fast, sd)


def test_raw_conversion_to_sharded(pt_file, tmp_path, monkeypatch):
    src, sd = pt_file
    taken = _spans_taken(monkeypatch)
    convert_file(str(src), str(tmp_path / "fast") + "/", max_shard_size="600B")
    assert taken
    with monkeypatch.context() as m:
        _no_spans(m)
        convert_file(str(src), str(tmp_path / "slow") + "/", max_shard_size="600B")
    names = sorted(os.listdir(tmp_path / "fast"))
    assert names == sorted(os.listdir(tmp_path / "slow")) and len(names) > 2
    for n in names:
        assert (tmp_path / "fast" / n).read_bytes() == (tmp_path / "slow" / n).read_bytes(), n


def test_cast_does_not_take_the_raw_path(pt_file, tmp_path, monkeypatch):
    src, sd = pt_file
    taken = _spans_taken(monkeypatch)
    out = tmp_path / "half.safetensors"
    convert_file(str(src), str(out), dtype="float16")
    with PT.open(src) as r:
        by_offset = {r.raw_span(n).offset: n for n in r.keys() if r.raw_span(n)}
        copied = {by_offset[s.offset] for s in taken}
        # only tensors left as they are (integers, bool, complex, float16 itself) are copied
        kinds = {n: r.info(n).dtype for n in copied}
        assert copied and all(
            d in ("float16", "bool", "complex64") or "int" in d for d in kinds.values()
        ), kinds
    back = st_torch.load_file(str(out))
    assert back["w.0"].dtype == torch.float16 and back["w.3"].dtype == torch.float16


def test_non_safetensors_destination_reads_arrays(pt_file, tmp_path, monkeypatch):
    src, sd = pt_file
    taken = _spans_taken(monkeypatch)
    convert_file(str(src), str(tmp_path / "o.npz"), include=["w.0", "w.4"])
    assert taken == []


def test_mixed_spans_and_arrays_in_one_file(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    src = tmp_path / "src.safetensors"
    SAFETENSORS.write(src, [TensorInfo("a", "float32", (3, 4))], lambda n: a)
    b = np.arange(5, dtype=">i4")  # big-endian: goes through the chunked path
    infos = [
        TensorInfo("x", "int32", (5,)),
        TensorInfo("a", "float32", (3, 4)),
        TensorInfo("y", "int32", (5,)),
        TensorInfo("a2", "float32", (3, 4)),
    ]
    with SAFETENSORS.open(src) as r:
        span = r.raw_span("a")
        out = tmp_path / "mixed.safetensors"
        SAFETENSORS.write(out, infos, lambda n: span if n.startswith("a") else b)
    back = st_torch.load_file(str(out))
    assert back["a"].numpy().tobytes() == a.tobytes() == back["a2"].numpy().tobytes()
    assert back["x"].numpy().tolist() == list(range(5)) == back["y"].numpy().tolist()


# --- copy fallbacks --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sendfile", "loop", "zero"])
def test_copy_fallbacks(pt_file, tmp_path, monkeypatch, mode):
    src, sd = pt_file

    def refuse(*a, **k):
        raise OSError(errno.EXDEV, "cross-device")

    if mode == "zero":  # a filesystem whose copy_file_range copies nothing
        monkeypatch.setattr(os, "copy_file_range", lambda *a, **k: 0, raising=False)
    else:
        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    if mode == "loop":
        monkeypatch.setattr(os, "sendfile", refuse, raising=False)
    monkeypatch.setattr(st_mod, "CHUNK_BYTES", 64)  # several loop rounds per tensor
    out = tmp_path / "o.safetensors"
    convert_file(str(src), str(out))
    _same_tensors(out, sd)


# --- broken sources, atomicity ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["copy_file_range", "sendfile", "loop"])
def test_truncated_source_raises_and_leaves_destination(st_file, tmp_path, monkeypatch, mode):
    src, sd = st_file
    if mode != "copy_file_range":
        monkeypatch.setattr(
            os,
            "copy_file_range",
            lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no")),
            raising=False,
        )
    if mode == "loop":
        monkeypatch.setattr(
            os,
            "sendfile",
            lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no")),
            raising=False,
        )
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"old contents")
    with SAFETENSORS.open(src) as r:
        infos = [i for i in r.infos() if r.raw_span(i.name)]
        os.truncate(src, os.path.getsize(src) - 100)  # shortened after it was opened
        with pytest.raises(FileFormatError, match="truncated"):
            SAFETENSORS.write(dst, infos, r.raw_span)
    assert dst.read_bytes() == b"old contents"
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "out.safetensors"]


def test_truncated_pt_source_through_convert(pt_file, tmp_path, monkeypatch):
    src, sd = pt_file
    real_open = PtReader.__init__

    def open_then_truncate(self, path):
        real_open(self, path)
        os.truncate(path, os.path.getsize(path) // 3)

    monkeypatch.setattr(PtReader, "__init__", open_then_truncate)
    dst = tmp_path / "o.safetensors"
    with pytest.raises(FileFormatError):
        convert_file(str(src), str(dst))
    assert not dst.exists()


def test_failure_midway_leaves_existing_destination(st_file, tmp_path):
    src, sd = st_file
    dst = tmp_path / "out.safetensors"
    st_torch.save_file({"keep": torch.ones(3)}, str(dst))
    before = dst.read_bytes()
    with SAFETENSORS.open(src) as r:
        infos = r.infos()
        calls = []

        def fetch(name):
            calls.append(name)
            if len(calls) == 4:
                raise RuntimeError("boom")
            return r.raw_span(name) or r.read(name)

        with pytest.raises(RuntimeError, match="boom"):
            SAFETENSORS.write(dst, infos, fetch)
    assert dst.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "out.safetensors"]


def test_replaced_source_is_refused(st_file, tmp_path):
    src, sd = st_file
    with SAFETENSORS.open(src) as r:
        infos = r.infos()
        os.replace(src, tmp_path / "moved.safetensors")
        st_torch.save_file({k: v for k, v in sd.items()}, str(src))  # same layout, new file
        with pytest.raises(FileFormatError, match="replaced"):
            SAFETENSORS.write(tmp_path / "o.safetensors", infos, r.raw_span)
    assert not (tmp_path / "o.safetensors").exists()


def test_span_of_the_wrong_size_is_refused(st_file, tmp_path):
    src, _ = st_file
    with SAFETENSORS.open(src) as r:
        infos = r.infos()
        span = r.raw_span("t.0")
        with pytest.raises(ConversionError, match="byte span"):
            SAFETENSORS.write(
                tmp_path / "o.safetensors",
                infos[:1],
                lambda n: RawSpan(span.path, span.offset, span.nbytes - 1),
            )


# --- verification of copied tensors ----------------------------------------------------


def test_verification_of_copied_tensors_catches_a_corrupt_byte(pt_file, tmp_path):
    src, sd = pt_file
    dst = tmp_path / "o.safetensors"
    convert_file(str(src), str(dst), include=["w.0", "w.2"])
    with PT.open(src) as r:
        planned = [r.info(n) for n in ("w.0", "w.2")]
        spans = {i.name: r.raw_span(i.name) for i in planned}
        fmt = SAFETENSORS
        assert verify(str(dst), fmt, planned, {}, spans) == 2
        with pytest.MonkeyPatch.context() as m:  # a reader without byte ranges: arrays
            m.setattr(SafetensorsReader, "raw_span", lambda self, name: None)
            assert verify(str(dst), fmt, planned, {}, spans) == 2
        with SAFETENSORS.open(dst) as out:
            where = out.raw_span("w.2").offset + 17
        data = bytearray(dst.read_bytes())
        data[where] ^= 0x01
        dst.write_bytes(bytes(data))
        with pytest.raises(FileFormatError, match="verification failed: tensor 'w.2'"):
            verify(str(dst), fmt, planned, {}, spans)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(SafetensorsReader, "raw_span", lambda self, name: None)
            with pytest.raises(FileFormatError, match="verification failed: tensor 'w.2'"):
                verify(str(dst), fmt, planned, {}, spans)


# --- checking copies as they land ------------------------------------------------------


def test_landed_reports_where_each_copied_tensor_lies(st_file, tmp_path):
    src, sd = st_file
    dst = tmp_path / "o.safetensors"
    seen = {}
    with SAFETENSORS.open(src) as r:
        infos = r.infos()

        def landed(name, fd, offset, nbytes):  # the bytes are readable there, now
            seen[name] = (os.fstat(fd).st_ino, offset, os.pread(fd, nbytes, offset))

        SAFETENSORS.write(dst, infos, lambda n: r.raw_span(n) or r.read(n), landed=landed)
    assert sorted(seen) == sorted(n for n in sd if n not in ("flag", "empty"))  # copies only
    with SAFETENSORS.open(dst) as out:
        for name, (ino, offset, data) in seen.items():
            span = out.raw_span(name)
            assert (ino, offset) == (span.file_id[1], span.offset)
            assert data == out.read(name).tobytes()


def test_landed_raising_aborts_the_write(st_file, tmp_path):
    src, _ = st_file
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(b"old")

    def landed(name, fd, offset, nbytes):
        raise FileFormatError("stop here", dst)

    with SAFETENSORS.open(src) as r:
        with pytest.raises(FileFormatError, match="stop here"):
            SAFETENSORS.write(dst, r.infos(), r.raw_span, landed=landed)
    assert dst.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "o.safetensors"]


def test_landed_reaches_every_shard(pt_file, tmp_path):
    src, _ = pt_file
    files = set()
    with PT.open(src) as r:
        get_format("sharded").write(
            tmp_path / "out/",
            r.infos(),
            lambda n: r.raw_span(n) or r.read(n),
            landed=lambda name, fd, off, n: files.add(os.fstat(fd).st_ino),
            max_shard_size="600B",
        )
    assert len(files) > 2


def test_checker_records_equal_copies_and_raises_on_a_mismatch(st_file, tmp_path):
    from tensorbridge.cli.convert_cmd import _LandedChecker

    src, _ = st_file
    with SAFETENSORS.open(src) as r:
        spans = {n: r.raw_span(n) for n in ("t.0", "t.1", "t.2")}
    scratch = tmp_path / "scratch"
    data = src.read_bytes()
    scratch.write_bytes(data)
    fd = os.open(scratch, os.O_RDWR)
    try:
        checker = _LandedChecker(spans, str(scratch))
        try:
            for name in ("t.0", "t.1"):  # the very bytes, at the same offsets
                checker.landed(name, fd, spans[name].offset, spans[name].nbytes)
            checker.drain()
            st = os.fstat(fd)
            assert checker.checked == {
                n: ((st.st_dev, st.st_ino), spans[n].offset, spans[n].nbytes)
                for n in ("t.0", "t.1")
            }
            bad = spans["t.2"].offset + 5
            os.pwrite(fd, bytes([data[bad] ^ 1]), bad)
            checker.landed("t.2", fd, spans["t.2"].offset, spans["t.2"].nbytes)
            with pytest.raises(FileFormatError, match="tensor 't.2' differs.*left unchanged.*Fix:"):
                checker.drain()
            assert "t.2" not in checker.checked
        finally:
            checker.close()
    finally:
        os.close(fd)


def test_checker_aborts_when_a_check_cannot_run(st_file, tmp_path):
    from tensorbridge.cli.convert_cmd import _LandedChecker

    src, _ = st_file
    with SAFETENSORS.open(src) as r:
        span = r.raw_span("t.0")
    short = tmp_path / "short"
    short.write_bytes(b"x" * 10)  # too short to hold the tensor: the check cannot run
    fd = os.open(short, os.O_RDONLY)
    checker = _LandedChecker({"t.0": span}, str(short))
    try:
        checker.landed("t.0", fd, span.offset, span.nbytes)
        with pytest.raises(FileFormatError, match="'t.0' could not be read back.*left unchanged"):
            checker.drain()
        assert checker.checked == {}
    finally:
        checker.close()
        os.close(fd)


@pytest.mark.parametrize("how", ["comparer", "thread"])
@pytest.mark.timeout(60)
def test_checker_that_cannot_compare_raises_instead_of_waiting(how, st_file, monkeypatch):
    from tensorbridge.cli import convert_cmd

    src, _ = st_file
    with SAFETENSORS.open(src) as r:
        span = r.raw_span("t.0")
    fd = os.open(src, os.O_RDONLY)
    checker = convert_cmd._LandedChecker({"t.0": span}, str(src))
    if how == "comparer":  # its buffers cannot be made: reported, the queue still drains

        def broken():
            raise MemoryError("no buffers")

        monkeypatch.setattr(convert_cmd, "_Comparer", broken)
        want = "comparison could not start"
    else:  # the thread ends without a word: drain() notices instead of waiting forever
        checker._run = lambda: None
        want = "thread stopped"
    try:
        checker.landed("t.0", fd, span.offset, span.nbytes)
        with pytest.raises(FileFormatError, match=f"{want}.*left unchanged"):
            checker.drain()
    finally:
        checker.close()
        os.close(fd)


def test_cancelled_checks_are_skipped(st_file):
    from tensorbridge.cli.convert_cmd import _LandedChecker

    src, _ = st_file
    with SAFETENSORS.open(src) as r:
        span = r.raw_span("t.0")
    fd = os.open(src, os.O_RDONLY)
    checker = _LandedChecker({"t.0": span}, str(src))
    try:
        checker.cancel()
        checker.landed("t.0", fd, span.offset, span.nbytes)
        checker.drain()
        assert checker.checked == {} and checker.failure is None
    finally:
        checker.close()
        os.close(fd)


def test_verified_sharded_convert_holds_few_descriptors(tmp_path):
    """One shard per tensor, 120 shards, under a limit of 64 open files."""
    import subprocess
    import sys
    import textwrap

    src = tmp_path / "many.pt"
    torch.save({f"t.{i:03d}": torch.full((64,), float(i)) for i in range(120)}, src)
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        from tensorbridge.cli.convert_cmd import convert_file
        s = convert_file({str(src)!r}, {str(tmp_path / "shards")!r} + "/", max_shard_size="300B")
        assert s["verified"] == 120, s
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) == 120


def test_read_back_compares_again_where_the_checked_place_is_not_where_it_lies(pt_file, tmp_path):
    src, _ = pt_file
    dst = tmp_path / "o.safetensors"
    convert_file(str(src), str(dst), include=["w.0", "w.2"])
    with PT.open(src) as r, SAFETENSORS.open(dst) as out:
        planned = [r.info(n) for n in ("w.0", "w.2")]
        spans = {i.name: r.raw_span(i.name) for i in planned}
        places = {
            n: (out.raw_span(n).file_id, out.raw_span(n).offset, out.raw_span(n).nbytes)
            for n in ("w.0", "w.2")
        }
    where = places["w.2"][1] + 3
    data = bytearray(dst.read_bytes())
    data[where] ^= 0x01
    dst.write_bytes(bytes(data))  # same inode: write_bytes truncates and rewrites in place
    # a place that was checked is trusted; one that is stale (another offset) is read again
    assert verify(str(dst), SAFETENSORS, planned, {}, spans, places) == 2
    stale = dict(places, **{"w.2": (places["w.2"][0], places["w.2"][1] + 8, places["w.2"][2])})
    with pytest.raises(FileFormatError, match="verification failed: tensor 'w.2'"):
        verify(str(dst), SAFETENSORS, planned, {}, spans, stale)


def test_sharded_sources_copy_kernel_side(pt_file, tmp_path, monkeypatch):
    src, sd = pt_file
    convert_file(str(src), str(tmp_path / "shards") + "/", max_shard_size="600B")
    with get_format("sharded").open(tmp_path / "shards") as r:
        for name in r.keys():
            span = r.raw_span(name)
            if span is None:
                continue
            with SAFETENSORS.open(r.shard_of(name)) as shard:
                assert span == shard.raw_span(name)
    taken = _spans_taken(monkeypatch)
    out = tmp_path / "joined.safetensors"
    summary = convert_file(str(tmp_path / "shards"), str(out))
    assert len(taken) >= len(TORCH_DTYPES) and summary["verified"] == len(sd)
    _same_tensors(out, sd)
