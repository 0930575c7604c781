"""PyTorch checkpoints: read without torch or unpickling, write what torch.load reads.

Interoperability is checked against the real torch in both directions, bit-exactly
(bytes compared, never values). Hostile and broken files must raise
FileFormatError/UnsafeContentError with a helpful message, and never run code.
"""

from __future__ import annotations

import argparse
import os
import pickle
import pickletools
import random
import signal
import struct
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch

from tensorbridge.dtypes import canonical_name, lookup
from tensorbridge.errors import ConversionError, FileFormatError, UnsafeContentError
from tensorbridge.formats import get_format
from tensorbridge.formats.base import TensorInfo
from tensorbridge.formats.pt import FORMAT, TORCH_DTYPES

DTYPES = sorted(set(TORCH_DTYPES.values()))

#: little-endian bit patterns: -0.0, the smallest subnormal, a NaN with a payload
SPECIALS = {
    "float16": (0x8000, 0x0001, 0x7C01),
    "bfloat16": (0x8000, 0x0001, 0x7F81),
    "float32": (0x8000_0000, 0x0000_0001, 0x7F80_0001),
    "float64": (1 << 63, 1, 0x7FF0_0000_0000_0001),
}


def sample(name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bit patterns of dtype ``name`` (plus -0.0, subnormal, NaN payload)."""
    dt = lookup(name).numpy
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.random.default_rng(seed).integers(0, 256, count * dt.itemsize, dtype=np.uint8)
    if name == "bool":
        raw %= 2
    base = {"complex64": "float32", "complex128": "float64"}.get(name, name)
    if base in SPECIALS and count >= 2:
        width = lookup(base).itemsize
        pats = b"".join(p.to_bytes(width, "little") for p in SPECIALS[base])
        raw[: len(pats)] = np.frombuffer(pats, np.uint8)[: raw.size]
    return raw.view(dt).reshape(shape)


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.size == 0:
        return torch.empty(a.shape, dtype=getattr(torch, canonical_name(a.dtype)))
    flat = torch.from_numpy(a.reshape(-1).view(np.uint8).copy())
    return flat.view(getattr(torch, canonical_name(a.dtype))).reshape(a.shape)


def torch_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(a: np.ndarray, t: torch.Tensor) -> None:
    assert canonical_name(a.dtype) == str(t.dtype).removeprefix("torch.")
    assert a.shape == tuple(t.shape)
    assert a.tobytes() == torch_bytes(t)
    assert a.flags.c_contiguous and a.flags.writeable


def read_all(path: object) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with FORMAT.open(str(path)) as r:
        return {k: r.read(k) for k in r.keys()}, dict(r.metadata)


def write(path: object, arrays: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    infos = [TensorInfo(k, canonical_name(a.dtype), a.shape) for k, a in arrays.items()]
    FORMAT.write(str(path), infos, arrays.__getitem__, metadata)


def make_zip(
    path: object,
    pkl: bytes,
    records: dict[str, bytes] | None = None,
    compression: int = zipfile.ZIP_STORED,
) -> None:
    """A checkpoint-shaped zip with ``pkl`` as its data.pkl."""
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, raw in (records or {}).items():
            z.writestr(f"archive/data/{key}", raw)
        z.writestr("archive/version", "3\n")


def rezip(
    src: object, dst: object, change=lambda name, raw: raw, compression: int = zipfile.ZIP_STORED
) -> None:
    """Copy a zip, passing each member's bytes through ``change`` (None drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            raw = change(info.filename, zin.read(info))
            if raw is not None:
                zout.writestr(info.filename, raw)


def tensor_pickle(
    shape: bytes,
    stride: bytes,
    offset: bytes = b"K\x00",
    numel: bytes = b"K\x01",
    storage: bytes = b"ctorch\nFloatStorage\n",
) -> bytes:
    """A hand-written protocol-2 ``{'w': _rebuild_tensor_v2(...)}`` with raw opcode args."""
    return (
        b"\x80\x02}(X\x01\x00\x00\x00w"
        + b"ctorch._utils\n_rebuild_tensor_v2\n("
        + b"(X\x07\x00\x00\x00storage"
        + storage
        + b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
        + numel
        + b"tQ"
        + offset
        + shape
        + stride
        + b"\x89ccollections\nOrderedDict\n)RtRu."
    )


# --- torch.save -> tensorbridge ------------------------------------------------------


@pytest.mark.parametrize("name", DTYPES)
def test_reads_torch_save_of_every_dtype_and_layout(tmp_path, name):
    base = to_torch(sample(name, (3, 4)))
    saved = {
        "plain": base,
        "transposed": base.t(),
        "strided": base[1:, ::2],
        "scalar": base[1, 2],  # 0-d with a storage offset
        "zero_d": to_torch(sample(name, ())),
        "empty": to_torch(sample(name, (0, 3))),
    }
    p = tmp_path / "m.pt"
    torch.save(saved, p)
    arrays, meta = read_all(p)
    assert list(arrays) == list(saved) and meta == {}
    for key, t in saved.items():
        assert_same(arrays[key], t)
    assert arrays["plain"].tobytes() == sample(name, (3, 4)).tobytes()


def test_tied_weights_share_one_storage_record(tmp_path):
    w = to_torch(sample("float32", (4, 3)))
    p = tmp_path / "tied.pt"
    torch.save({"emb": w, "head": w, "row": w[2], "col": w[:, 1]}, p)
    assert sum("/data/" in n for n in zipfile.ZipFile(p).namelist()) == 1
    arrays, _ = read_all(p)
    for key, t in {"emb": w, "head": w, "row": w[2], "col": w[:, 1]}.items():
        assert_same(arrays[key], t)
    arrays["emb"][0, 0] = 1.0  # fresh arrays: writing one does not change another
    assert arrays["head"].tobytes() == torch_bytes(w)


def test_nested_checkpoint_flattens_with_dotted_names_and_scalar_metadata(tmp_path):
    model = torch.nn.Linear(3, 2)
    t1, t2, step = torch.ones(2), torch.arange(3), torch.tensor(5.0)
    ckpt = {
        "model": model.state_dict(),  # an OrderedDict with a _metadata attribute (BUILD)
        "epoch": 3,
        "opt": {"state": {0: {"step": step}}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "layers": [t1, (t2, "x")],
        "dtype": torch.float16,
        "blob": b"\x00\xff",
        "big": 2**40,
        "none": None,
        "param": torch.nn.Parameter(torch.full((2,), -0.0)),
    }
    p = tmp_path / "ckpt.pt"
    torch.save(ckpt, p)
    arrays, meta = read_all(p)
    assert list(arrays) == [
        "model.weight",
        "model.bias",
        "opt.state.0.step",
        "layers.0",
        "layers.1.0",
        "param",
    ]
    assert_same(arrays["model.weight"], model.weight)
    assert_same(arrays["opt.state.0.step"], step)
    assert_same(arrays["layers.1.0"], t2)
    assert_same(arrays["param"], ckpt["param"])
    assert meta == {
        "epoch": "3",
        "opt.param_groups.0.lr": "0.1",
        "opt.param_groups.0.params.0": "0",
        "opt.param_groups.0.params.1": "1",
        "layers.1.1": "x",
        "dtype": "torch.float16",
        "blob": "b'\\x00\\xff'",
        "big": "1099511627776",
        "none": "None",
    }


def test_bare_tensor_is_named_tensor(tmp_path):
    t = to_torch(sample("bfloat16", (2, 2)))
    torch.save(t, tmp_path / "t.pt")
    arrays, _ = read_all(tmp_path / "t.pt")
    assert list(arrays) == ["tensor"]
    assert_same(arrays["tensor"], t)


def test_big_endian_checkpoint_is_byteswapped(tmp_path):
    saved = {n: to_torch(sample(n, (2, 3))) for n in ("float32", "complex64", "bfloat16", "int64")}
    torch.save(saved, tmp_path / "le.pt")
    keys = {}  # record key -> itemsize to swap by
    for i, n in enumerate(saved):
        keys[str(i)] = lookup(n).itemsize // (2 if n.startswith("complex") else 1)

    def to_big(name: str, raw: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        key = name.rpartition("/data/")[2]
        if "/data/" in name and key in keys:
            return np.frombuffer(raw, f"<u{keys[key]}").astype(f">u{keys[key]}").tobytes()
        return raw

    rezip(tmp_path / "le.pt", tmp_path / "be.pt", to_big)
    arrays, _ = read_all(tmp_path / "be.pt")
    for key, t in saved.items():
        assert_same(arrays[key], t)


def test_compressed_members_and_missing_byteorder_are_read(tmp_path):
    saved = {"a": to_torch(sample("float64", (5, 7))), "b": to_torch(sample("int8", (9,)))}
    torch.save(saved, tmp_path / "m.pt")
    rezip(
        tmp_path / "m.pt",
        tmp_path / "z.pt",
        lambda n, raw: None if n.endswith("/byteorder") else raw,
        zipfile.ZIP_DEFLATED,
    )
    assert all(
        i.compress_type == zipfile.ZIP_DEFLATED
        for i in zipfile.ZipFile(tmp_path / "z.pt").infolist()
    )
    arrays, _ = read_all(tmp_path / "z.pt")
    for key, t in saved.items():
        assert_same(arrays[key], t)


def test_registered_under_pt_with_torch_suffixes():
    assert get_format("pt") is FORMAT
    assert FORMAT.suffixes == (".pt", ".pth", ".bin")


def test_reading_never_imports_torch_or_unpickles(tmp_path, monkeypatch):
    p = tmp_path / "m.pt"
    write(p, {"w": sample("float8_e4m3fn", (3, 2)), "b": sample("float32", (2,))})
    code = (
        "import sys, tensorbridge.formats.pt as p; r = p.FORMAT.open(sys.argv[1]); "
        "x = r.read(r.keys()[0]); assert x.shape == (3, 2), x.shape; "
        "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr

    def boom(*args, **kwargs):
        raise AssertionError("pickle was used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, boom)
    torch.save({"x": torch.ones(2)}, tmp_path / "t.pt")
    arrays, _ = read_all(tmp_path / "t.pt")
    assert arrays["x"].tobytes() == np.ones(2, np.float32).tobytes()


# --- tensorbridge -> torch.load ------------------------------------------------------


def every_dtype_arrays() -> dict[str, np.ndarray]:
    arrays = {n: sample(n, (4, 3), seed=i) for i, n in enumerate(DTYPES)}
    arrays["zero_d"] = sample("float32", ())
    arrays["empty"] = sample("float16", (0, 3))
    arrays["unicode.名前"] = sample("int64", (2,))
    return arrays


@pytest.mark.parametrize("mmap", [False, True])
def test_written_file_loads_in_torch_weights_only_bit_exactly(tmp_path, mmap):
    arrays = every_dtype_arrays()
    p = tmp_path / "w.pt"
    write(p, arrays, {"note": "kept in an extra record"})
    loaded = torch.load(p, weights_only=True, mmap=mmap)
    assert list(loaded) == list(arrays)  # a flat dict: the metadata does not show up
    for key, a in arrays.items():
        assert_same(a, loaded[key])


def test_written_records_are_64_byte_aligned_like_torch(tmp_path):
    p = tmp_path / "w.pt"
    write(p, every_dtype_arrays())
    raw = p.read_bytes()
    with zipfile.ZipFile(p) as z:
        names = z.namelist()
        for info in z.infolist():
            h = info.header_offset
            name_len, extra_len = struct.unpack("<HH", raw[h + 26 : h + 30])
            assert (h + 30 + name_len + extra_len) % 64 == 0, info.filename
            assert info.compress_type == zipfile.ZIP_STORED
        assert z.read("archive/byteorder") == sys.byteorder.encode()
        assert z.read("archive/version") == b"3\n"
    assert names[0] == "archive/data.pkl"


def test_zip64_records_stay_aligned_and_load(tmp_path, monkeypatch):
    # Pretend the zip64 limit is tiny so that zip64 extras appear on small records.
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1000)
    arrays = {"small": sample("float32", (4,)), "large": sample("float64", (50, 20))}
    p = tmp_path / "z64.pt"
    write(p, arrays)
    monkeypatch.undo()
    raw = p.read_bytes()
    with zipfile.ZipFile(p) as z:
        info = z.getinfo("archive/data/1")
        h = info.header_offset
        name_len, extra_len = struct.unpack("<HH", raw[h + 26 : h + 30])
        assert struct.unpack("<I", raw[h + 22 : h + 26])[0] == 0xFFFFFFFF  # zip64 local header
        assert (h + 30 + name_len + extra_len) % 64 == 0
    loaded = torch.load(p, weights_only=True, mmap=True)
    for key, a in arrays.items():
        assert_same(a, loaded[key])
    back, _ = read_all(p)
    assert all(back[k].tobytes() == a.tobytes() for k, a in arrays.items())


def test_round_trip_through_tensorbridge_keeps_metadata_and_layouts(tmp_path):
    a = sample("complex128", (3, 4))
    arrays = {
        "transposed": a.T,  # not C-contiguous
        "big_endian": sample("float32", (2, 5)).astype(">f4"),
        "bf16": sample("bfloat16", (7,)),
    }
    p = tmp_path / "rt.pt"
    write(p, arrays, {"format": "pt", "ünï": "cödé"})
    back, meta = read_all(p)
    assert meta == {"format": "pt", "ünï": "cödé"}
    for key, x in arrays.items():
        want = np.ascontiguousarray(x).astype(x.dtype.newbyteorder("="))
        assert back[key].dtype == want.dtype and back[key].shape == want.shape
        assert back[key].tobytes() == want.tobytes()


def test_writer_refuses_dtype_torch_lacks_and_leaves_no_file(tmp_path):
    p = tmp_path / "x.pt"
    with pytest.raises(ConversionError, match="float8_e4m3.*PyTorch does not have"):
        write(p, {"w": sample("float8_e4m3", (2,))})
    assert os.listdir(tmp_path) == []


def test_writer_keeps_old_file_when_fetch_returns_the_wrong_array(tmp_path):
    p = tmp_path / "x.pt"
    write(p, {"w": sample("float32", (2,))})
    before = p.read_bytes()
    info = [TensorInfo("w", "float32", (3,))]
    with pytest.raises(ConversionError, match="announced as float32"):
        FORMAT.write(str(p), info, lambda name: sample("float32", (2,)))
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["x.pt"]


def test_writer_refuses_unsafe_and_duplicate_names(tmp_path):
    a = sample("float32", (2,))
    with pytest.raises(UnsafeContentError, match="'..' path component"):
        write(tmp_path / "x.pt", {"../x": a})
    infos = [TensorInfo("w", "float32", (2,))] * 2
    with pytest.raises(UnsafeContentError, match="more than once"):
        FORMAT.write(str(tmp_path / "x.pt"), infos, lambda n: a)
    assert os.listdir(tmp_path) == []


# --- refusals ------------------------------------------------------------------------


class _RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_reduce_payload_is_refused_without_running(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _RunsShell(f"touch {sentinel}")}, p)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UnsafeContentError) as err:
        FORMAT.open(str(p))
    text = str(err.value)
    assert f"{os.system.__module__}.system" in text and "no code was run" in text
    assert "safetensors" in text and str(p) in text
    assert not sentinel.exists() and sorted(os.listdir(tmp_path)) == before


def test_protocol_4_stack_global_payload_is_refused(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    p = tmp_path / "evil4.pt"
    make_zip(p, pickle.dumps({"x": _RunsShell(f"touch {sentinel}")}, protocol=4))
    with pytest.raises(UnsafeContentError, match=r"'posix\.system'|'nt\.system'"):
        FORMAT.open(str(p))
    assert not sentinel.exists()


def test_arbitrary_class_instance_is_refused_naming_it(tmp_path):
    p = tmp_path / "args.pt"
    torch.save({"w": torch.ones(1), "args": argparse.Namespace(lr=0.1)}, p)
    with pytest.raises(UnsafeContentError, match="'argparse.Namespace'"):
        FORMAT.open(str(p))


@pytest.mark.parametrize(
    "pkl, op",
    [
        (b"\x80\x02\x82\x01.", "EXT1"),  # the copyreg extension registry: a global by number
        (b"\x80\x02(ccollections\nOrderedDict\no.", "OBJ"),  # builds an instance
        (b"(i__main__\nX\n.", "INST"),
    ],
)
def test_code_building_opcodes_are_refused_naming_them(tmp_path, pkl, op):
    p = tmp_path / "op.pt"
    make_zip(p, pkl)
    with pytest.raises(UnsafeContentError, match=f"opcode '{op}'.*no code was run"):
        FORMAT.open(str(p))


def test_protocol_0_and_1_data_opcodes_are_read(tmp_path):
    """Protocols 0-1 write plain data with text opcodes (INT, DICT, PUT, ...): data, read."""
    for protocol in (0, 1):
        p = tmp_path / f"p{protocol}.pt"
        make_zip(p, pickle.dumps({"a": 1, "b": [2.5, "s", None, True], "c": 2**70}, protocol))
        with FORMAT.open(str(p)) as r:
            assert r.keys() == [] and r.metadata == {
                "a": "1",
                "b.0": "2.5",
                "b.1": "s",
                "b.2": "None",
                "b.3": "True",
                "c": str(2**70),
            }


def test_protocol_0_storage_references_are_refused_as_torch_does(tmp_path):
    p = tmp_path / "p0.pt"
    torch.save({"w": torch.ones(2)}, p, pickle_protocol=0)
    with pytest.raises(FileFormatError, match="protocol 0.*torch.load cannot read either"):
        torch.load(p, weights_only=False) if False else FORMAT.open(str(p))
    with pytest.raises(AssertionError):  # torch itself: saved_id must be a tuple
        torch.load(p, weights_only=False)


def test_torchscript_archive_is_refused(tmp_path):
    p = tmp_path / "script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(p))
    with pytest.raises(UnsafeContentError, match="TorchScript .*not a checkpoint"):
        FORMAT.open(str(p))


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty"),
        (b"hello, I am not a checkpoint", "not a zip signature"),
        (b"PK\x03\x04" + bytes(range(200)), "reading the zip directory failed"),
    ],
)
def test_empty_and_garbage_files_are_refused(tmp_path, content, match):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(FileFormatError, match=match):
        FORMAT.open(str(p))


def test_non_checkpoint_zips_are_refused(tmp_path):
    p = tmp_path / "flat.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("data.pkl", b"")
    with pytest.raises(FileFormatError, match="no top-level folder"):
        FORMAT.open(str(p))
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/other", b"")
    with pytest.raises(FileFormatError, match="no 'archive/data.pkl' entry"):
        FORMAT.open(str(p))


def test_every_truncation_of_a_real_file_is_refused_cleanly(tmp_path):
    src = tmp_path / "m.pt"
    torch.save({"a": torch.arange(40, dtype=torch.float32), "b": torch.ones(3, 3)}, src)
    raw = src.read_bytes()
    cut = tmp_path / "cut.pt"
    for n in [len(raw) // 2, *range(1, len(raw), 97), len(raw) - 1]:
        cut.write_bytes(raw[:n])
        with pytest.raises(FileFormatError):
            read_all(cut)


def test_mutated_files_fail_only_with_tensorbridge_errors(tmp_path):
    src = tmp_path / "m.pt"
    torch.save({"a": torch.arange(12, dtype=torch.int16).reshape(3, 4).t(), "e": 2}, src)
    raw = src.read_bytes()
    rng = random.Random(1234)
    bad = tmp_path / "mut.pt"
    for _ in range(300):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        bad.write_bytes(bytes(data))
        try:
            read_all(bad)
        except FileFormatError:
            pass


def test_storage_record_shorter_than_declared_is_refused(tmp_path):
    torch.save({"w": torch.ones(4, 4)}, tmp_path / "m.pt")
    rezip(
        tmp_path / "m.pt",
        tmp_path / "short.pt",
        lambda n, raw: raw[:-4] if "/data/" in n and "serialization_id" not in n else raw,
    )
    with pytest.raises(FileFormatError, match="data/0 holds 60 bytes but the pickle declares 64"):
        FORMAT.open(str(tmp_path / "short.pt"))


def test_missing_storage_record_is_refused(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "m.pt")
    rezip(
        tmp_path / "m.pt",
        tmp_path / "gone.pt",
        lambda n, raw: None if n.endswith("/data/0") else raw,
    )
    with pytest.raises(FileFormatError, match="no record data/0"):
        FORMAT.open(str(tmp_path / "gone.pt"))


def test_shape_larger_than_storage_is_refused(tmp_path):
    torch.save({"w": torch.zeros(6)}, tmp_path / "m.pt")

    def grow_shape(name: str, raw: bytes) -> bytes:
        if not name.endswith("data.pkl"):
            return raw
        sixes = [
            pos for op, arg, pos in pickletools.genops(raw) if op.name == "BININT1" and arg == 6
        ]
        assert len(sixes) == 2  # the storage numel, then the shape
        patched = bytearray(raw)
        patched[sixes[1] + 1] = 7
        return bytes(patched)

    rezip(tmp_path / "m.pt", tmp_path / "big.pt", grow_shape)
    with pytest.raises(FileFormatError, match="needs 28 bytes of storage '0', which holds only 24"):
        FORMAT.open(str(tmp_path / "big.pt"))


@pytest.mark.parametrize(
    "shape, stride, offset, match",
    [
        (b"J\xff\xff\xff\xff\x85", b"K\x01\x85", b"K\x00", "non-negative"),  # shape (-1,)
        (b"K\x02\x85", b"J\xff\xff\xff\xff\x85", b"K\x00", "non-negative"),  # stride (-1,)
        (b"K\x01\x85", b"K\x01\x85", b"K\x01", "needs 8 bytes"),  # offset past the end
        (
            b"\x8a\x06" + (2**40).to_bytes(6, "little") + b"\x85",
            b"K\x00\x85",
            b"K\x00",
            "would allocate what the file merely claims",
        ),  # stride 0, 4 TiB
        (b"K\x01K\x01\x86", b"K\x01\x85", b"K\x00", "shape \\[1, 1\\] but stride \\[1\\]"),
    ],
)
def test_bad_geometry_is_refused_before_allocating(tmp_path, shape, stride, offset, match):
    p = tmp_path / "geo.pt"
    make_zip(p, tensor_pickle(shape, stride, offset), {"0": b"\0" * 4})
    with pytest.raises(FileFormatError, match=match):
        FORMAT.open(str(p))


def test_hand_written_pickle_is_read(tmp_path):
    p = tmp_path / "ok.pt"
    make_zip(
        p,
        tensor_pickle(b"K\x02K\x02\x86", b"K\x00K\x01\x86", numel=b"K\x02"),
        {"0": np.array([1.5, -0.0], np.float32).tobytes()},
    )
    arrays, _ = read_all(p)
    assert arrays["w"].tobytes() == np.array([[1.5, -0.0], [1.5, -0.0]], np.float32).tobytes()


def test_unknown_storage_type_is_refused(tmp_path):
    p = tmp_path / "q.pt"
    make_zip(
        p, tensor_pickle(b"K\x01\x85", b"K\x01\x85", storage=b"ctorch\nFooStorage\n"), {"0": b"\0"}
    )
    with pytest.raises(UnsafeContentError, match="'torch.FooStorage'"):
        FORMAT.open(str(p))
    make_zip(
        p,
        tensor_pickle(b"K\x01\x85", b"K\x01\x85", storage=b"ctorch\nQInt8Storage\n"),
        {"0": b"\0"},
    )
    with pytest.raises(
        FileFormatError,
        match="'w' is a tensor of dtype torch.qint8, which "
        "tensorbridge does not support.*Fix: save it dequantized",
    ) as err:
        FORMAT.open(str(p))
    assert not isinstance(err.value, UnsafeContentError)


def test_path_traversal_and_colliding_names_are_refused(tmp_path):
    torch.save({"../x": torch.ones(1)}, tmp_path / "dots.pt")
    with pytest.raises(UnsafeContentError, match="'../x' is refused"):
        FORMAT.open(str(tmp_path / "dots.pt"))
    torch.save({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}}, tmp_path / "dup.pt")
    with pytest.raises(UnsafeContentError, match="'a.b' appears more than once"):
        FORMAT.open(str(tmp_path / "dup.pt"))


def test_duplicate_zip_members_are_refused(tmp_path):
    p = tmp_path / "twice.pt"
    pkl = tensor_pickle(b"K\x01\x85", b"K\x01\x85")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate we want
        make_zip(p, pkl, {"0": b"\0" * 4})
        with zipfile.ZipFile(p, "a") as z:
            z.writestr("archive/data/0", b"\1" * 4)
    with pytest.raises(UnsafeContentError, match="'archive/data/0' twice"):
        FORMAT.open(str(p))


@pytest.mark.parametrize(
    "pkl, match",
    [
        (b"\x80\x02]q\x00h\x00a.", "contains itself"),  # a list holding itself
        (b"\x80\x02" + b"]" * 150 + b"a" * 149 + b".", "nested more than"),
        (b"\x80\x02}K\x01", "before seeing STOP"),
        (b"\x80\x02h\x05.", "memo entry 5"),
        (b"\x80\x02K\x01K\x02.", "left on the stack"),
        (b"\x80\x02}](K\x01K\x02u.", "SETITEMS applies to a list"),
        (b"\x80\x02}]K\x01s.", "dict key is a list"),
        (b"\x80\x02ccollections\nOrderedDict\n.", "is a _Global"),
        (b"\x80\x02\xff", "parsing data.pkl failed"),
    ],
)
def test_malformed_pickles_are_refused(tmp_path, pkl, match):
    p = tmp_path / "bad.pt"
    make_zip(p, pkl)
    with pytest.raises(FileFormatError, match=match):
        FORMAT.open(str(p))


@pytest.mark.parametrize("protocol", [2, 4])
def test_complex_numbers_in_a_checkpoint_are_metadata_like_other_numbers(tmp_path, protocol):
    p = tmp_path / "c.pt"
    torch.save({"t": torch.ones(2), "c": 1 + 2j, "lr": 0.1}, p, pickle_protocol=protocol)
    with FORMAT.open(str(p)) as r:
        assert r.keys() == ["t"] and r.metadata == {"c": "(1+2j)", "lr": "0.1"}


def test_complex_with_anything_but_two_numbers_is_refused(tmp_path):
    p = tmp_path / "bad.pt"
    make_zip(p, b"\x80\x02c__builtin__\ncomplex\nX\x01\x00\x00\x00aK\x01\x86R.")
    with pytest.raises(FileFormatError, match="not two numbers"):
        FORMAT.open(str(p))


def test_unknown_tensor_name_says_what_exists(tmp_path):
    write(tmp_path / "m.pt", {"w": sample("float32", (1,))})
    with FORMAT.open(str(tmp_path / "m.pt")) as r:
        with pytest.raises(FileFormatError, match=r"no tensor named 'v'. Fix: use one of \['w'\]"):
            r.read("v")


def test_build_sets_no_state_on_tensors(tmp_path):
    base = tensor_pickle(b"K\x01\x85", b"K\x01\x85")
    assert base.endswith(b"tRu.")
    ok, evil = tmp_path / "ok.pt", tmp_path / "evil.pt"
    make_zip(ok, base[:-2] + b"}bu.", {"0": b"\0\0\x80\x3f"})  # empty state: harmless
    assert read_all(ok)[0]["w"].tobytes() == np.float32(1.0).tobytes()
    make_zip(evil, base[:-2] + b"}X\x01\x00\x00\x00aK\x01sbu.", {"0": b"\0" * 4})
    with pytest.raises(UnsafeContentError, match="sets state {'a': 1} on a _Tensor"):
        FORMAT.open(str(evil))


# --- review fixes: BOOL bytes, reading only the checked descriptor ---------------------


def _poke_first_record(path, value: int) -> None:
    """Overwrite the first byte of the first storage record (archive/data/0)."""
    with zipfile.ZipFile(path) as z:
        member = z.getinfo("archive/data/0")
    raw = bytearray(path.read_bytes())
    n, e = struct.unpack("<HH", raw[member.header_offset + 26 : member.header_offset + 30])
    raw[member.header_offset + 30 + n + e] = value
    path.write_bytes(bytes(raw))


def test_bool_bytes_other_than_0_and_1_are_refused(tmp_path):
    p = tmp_path / "b.pt"
    write(p, {"m": np.array([True, False, True, True])})
    _poke_first_record(p, 2)
    with FORMAT.open(str(p)) as r:
        assert r.raw_span("m") is None  # never copied unchecked
        with pytest.raises(FileFormatError, match="tensor 'm' is BOOL but holds bytes other"):
            r.read("m")


def test_valid_bool_is_read_and_not_given_a_raw_span(tmp_path):
    p = tmp_path / "b.pt"
    a = np.array([True, False, True, True])
    write(p, {"m": a})
    with FORMAT.open(str(p)) as r:
        assert r.raw_span("m") is None
        assert r.read("m").tobytes() == a.tobytes()


def test_convert_of_corrupt_bool_fails_and_leaves_destination(tmp_path):
    from tensorbridge.cli.convert_cmd import convert_file
    from tensorbridge.files import save

    p = tmp_path / "b.pt"
    write(p, {"m": np.array([True, False, True, True])})
    _poke_first_record(p, 2)
    dst = tmp_path / "out.safetensors"
    save({"old": np.zeros(3)}, dst)
    before = dst.read_bytes()
    with pytest.raises(FileFormatError, match="b.pt: tensor 'm' is BOOL"):
        convert_file(str(p), str(dst))
    assert dst.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["b.pt", "out.safetensors"]


def test_reader_reads_only_the_checked_descriptor(tmp_path, monkeypatch):
    """The path swapped for another checkpoint right after the magic check: the reader
    still reads the file it checked."""
    import tensorbridge.formats.pt as pt_mod

    p, other = tmp_path / "m.pt", tmp_path / "other.pt"
    a = np.arange(8, dtype=np.float32)
    write(p, {"w": a})
    write(other, {"evil": np.zeros(2, np.int64)})
    real = pt_mod.check_magic

    def racing(head, size, path):
        real(head, size, path)
        os.replace(other, path)

    monkeypatch.setattr(pt_mod, "check_magic", racing)
    with FORMAT.open(str(p)) as r:
        assert r.keys() == ["w"]
        assert r.read("w").tobytes() == a.tobytes()


def test_reader_does_not_hang_on_a_fifo_swapped_in(tmp_path, monkeypatch):
    import tensorbridge.formats.pt as pt_mod

    p = tmp_path / "m.pt"
    a = np.arange(8, dtype=np.float32)
    write(p, {"w": a})
    real = pt_mod.check_magic

    def racing(head, size, path):
        real(head, size, path)
        os.remove(path)
        os.mkfifo(path)

    monkeypatch.setattr(pt_mod, "check_magic", racing)

    def hung(signum, frame):
        raise TimeoutError("opening the checkpoint reopened the path (a FIFO) and blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with FORMAT.open(str(p)) as r:
            assert r.read("w").tobytes() == a.tobytes()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
