"""Crafted hostile tensor files, generated at test time into a temporary directory.

Every case is a function ``build(d: Path) -> Path`` that writes one hostile file
(or directory) under ``d`` and returns the path to hand to ``tensorbridge.files.open``.
``CASES`` maps ``"format/case-name"`` to the builder; :func:`build_all` builds them all.

Payloads that would run code try to create ``d / SENTINEL_NAME``; the suite asserts
that file never appears. Files that would make a reader read another file point at
``d / SECRET_NAME``, which holds :data:`SECRET`; the suite asserts those bytes never
appear in any output or message.

Run ``python tests/hostile/make_hostile.py OUTDIR`` to write them all for manual poking.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

SENTINEL_NAME = "PWNED_SENTINEL"
SECRET_NAME = "secret.bin"
SECRET = b"SECRET-7f3a9c-DO-NOT-LEAK" * 4

CASES: dict[str, Callable[[Path], Path]] = {}


def case(name: str) -> Callable:
    def deco(fn: Callable[[Path], Path]) -> Callable[[Path], Path]:
        assert name not in CASES, name
        CASES[name] = fn
        return fn

    return deco


def _sentinel(d: Path) -> str:
    return str(d / SENTINEL_NAME)


def _secret(d: Path) -> Path:
    p = d / SECRET_NAME
    if not p.exists():
        p.write_bytes(SECRET)
    return p


class _RunsCode:
    """Pickles to a call that creates the sentinel file (never called by us)."""

    def __init__(self, target: str, how: str = "system") -> None:
        self.target, self.how = target, how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.target}",))
        if self.how == "open":
            import builtins

            return (builtins.open, (self.target, "w"))
        if self.how == "eval":
            import builtins

            return (builtins.eval, (f"open({self.target!r}, 'w')",))
        raise ValueError(self.how)


# --- safetensors ----------------------------------------------------------------


def _st_bytes(
    header: object,
    data: bytes = b"",
    *,
    raw: bytes | None = None,
    length: int | None = None,
    pad: bool = True,
) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data


def _st(d: Path, name: str, *args, **kw) -> Path:
    p = d / f"{name}.safetensors"
    p.write_bytes(_st_bytes(*args, **kw))
    return p


_F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
_8B = b"\x00" * 8


def _raw_case(name: str, suffix: str, blob: bytes) -> None:
    def build(d: Path) -> Path:
        p = d / f"{name.split('/')[1]}{suffix}"
        p.write_bytes(blob)
        return p

    case(name)(build)


_raw_case("safetensors/empty-file", ".safetensors", b"")
_raw_case("safetensors/short-length", ".safetensors", b"\x01\x00\x00")
_raw_case("safetensors/garbage", ".safetensors", bytes(range(256)) * 4)


@case("safetensors/header-length-huge")
def _(d):  # u64 max: must not allocate it
    return _st(d, "hl-huge", {"a": _F32x2}, _8B, length=2**64 - 1)


@case("safetensors/header-length-past-eof")
def _(d):
    return _st(d, "hl-eof", {"a": _F32x2}, _8B, length=10_000)


@case("safetensors/header-length-over-cap")
def _(d):
    return _st(d, "hl-cap", {"a": _F32x2}, _8B, length=100_000_001)


@case("safetensors/header-not-utf8")
def _(d):
    return _st(d, "utf8", None, raw=b'{"\xff\xfe": {}}')


@case("safetensors/header-not-json")
def _(d):
    return _st(d, "json", None, raw=b'{"a": {"dtype": "F32",')


@case("safetensors/header-json-list")
def _(d):
    return _st(d, "list", [1, 2, 3])


@case("safetensors/header-deep-nesting")
def _(d):  # RecursionError bait
    return _st(d, "deep", None, raw=b"[" * 200_000 + b"]" * 200_000)


@case("safetensors/entry-not-object")
def _(d):
    return _st(d, "entry", {"a": [0, 8]}, _8B)


@case("safetensors/entry-extra-key")
def _(d):
    return _st(d, "extra", {"a": {**_F32x2, "evil": 1}}, _8B)


@case("safetensors/unknown-dtype")
def _(d):
    return _st(d, "dtype", {"a": {**_F32x2, "dtype": "O"}}, _8B)


@case("safetensors/dtype-not-string")
def _(d):
    return _st(d, "dtype2", {"a": {**_F32x2, "dtype": 7}}, _8B)


@case("safetensors/negative-shape")
def _(d):
    return _st(d, "neg", {"a": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}}, _8B)


@case("safetensors/overflow-shape")
def _(d):  # product 2**64 wraps to 0 in int64 arithmetic
    return _st(d, "ovf", {"a": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}})


@case("safetensors/float-shape")
def _(d):
    return _st(d, "fshape", {"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, _8B)


@case("safetensors/too-many-dims")
def _(d):
    return _st(
        d, "ndim", {"a": {"dtype": "F32", "shape": [1] * 100, "data_offsets": [0, 4]}}, b"\0" * 4
    )


@case("safetensors/size-offset-mismatch")
def _(d):
    return _st(d, "mismatch", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, _8B)


@case("safetensors/offsets-reversed")
def _(d):
    return _st(d, "rev", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, _8B)


@case("safetensors/offsets-negative")
def _(d):
    return _st(d, "negoff", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, _8B)


@case("safetensors/offsets-past-eof")
def _(d):  # declares 4 GB of data in a tiny file
    n = 2**30
    return _st(d, "past", {"a": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}, _8B)


@case("safetensors/overlap")
def _(d):
    return _st(
        d,
        "overlap",
        {"a": _F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        b"\0" * 12,
    )


@case("safetensors/hole")
def _(d):
    return _st(
        d,
        "hole",
        {"a": _F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}},
        b"\0" * 24,
    )


@case("safetensors/trailing-bytes")
def _(d):
    return _st(d, "trail", {"a": _F32x2}, _8B + b"TRAILING")


@case("safetensors/truncated-data")
def _(d):
    return _st(d, "trunc", {"a": _F32x2}, b"\0" * 4)


@case("safetensors/duplicate-keys")
def _(d):
    entry = json.dumps(_F32x2)
    raw = f'{{"a": {entry}, "a": {entry}}}'.encode()
    return _st(d, "dup", None, _8B, raw=raw)


@case("safetensors/metadata-non-string")
def _(d):
    return _st(d, "meta", {"__metadata__": {"epoch": 3}, "a": _F32x2}, _8B)


@case("safetensors/metadata-not-dict")
def _(d):
    return _st(d, "meta2", {"__metadata__": ["x"], "a": _F32x2}, _8B)


@case("safetensors/name-nul")
def _(d):
    return _st(d, "nul", {"a\x00b": _F32x2}, _8B)


@case("safetensors/name-dotdot")
def _(d):
    return _st(d, "dotdot", {"../../etc/x": _F32x2}, _8B)


@case("safetensors/name-absolute")
def _(d):
    return _st(d, "abs", {"/etc/passwd": _F32x2}, _8B)


@case("safetensors/name-empty")
def _(d):
    return _st(d, "emptyname", {"": _F32x2}, _8B)


@case("safetensors/bool-not-0-1")
def _(d):
    return _st(
        d, "bool", {"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x07\x09"
    )


@case("safetensors/is-a-fifo")
def _(d):
    p = d / "fifo.safetensors"
    os.mkfifo(p)
    return p


# --- npy ----------------------------------------------------------------------------


def _npy_bytes(
    header: str,
    data: bytes = b"",
    *,
    magic: bytes = b"\x93NUMPY",
    version: tuple[int, int] = (1, 0),
    hlen: int | None = None,
) -> bytes:
    text = header.encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    code = "<H" if version == (1, 0) else "<I"
    n = len(text) if hlen is None else hlen
    return magic + bytes(version) + struct.pack(code, n) + text + data


def _npy(d: Path, name: str, *args, **kw) -> Path:
    p = d / f"{name}.npy"
    p.write_bytes(_npy_bytes(*args, **kw))
    return p


_H = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"


@case("npy/empty-file")
def _(d):
    (d / "empty.npy").write_bytes(b"")
    return d / "empty.npy"


@case("npy/bad-magic")
def _(d):
    return _npy(d, "magic", _H, _8B, magic=b"\x93NUMPZ")


@case("npy/bad-version")
def _(d):
    return _npy(d, "version", _H, _8B, version=(9, 9))


@case("npy/header-size-huge")
def _(d):
    return _npy(d, "hsize", _H, _8B, version=(2, 0), hlen=2**32 - 1)


@case("npy/header-size-past-eof")
def _(d):
    return _npy(d, "hsize2", _H, _8B, hlen=9000)


@case("npy/header-not-literal")
def _(d):  # literal_eval must never evaluate calls
    return _npy(d, "lit", f"__import__('os').system('touch {_sentinel(d)}')", _8B)


@case("npy/header-not-dict")
def _(d):
    return _npy(d, "notdict", "[1, 2, 3]", _8B)


@case("npy/header-extra-key")
def _(d):
    return _npy(
        d, "extrakey", "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", _8B
    )


@case("npy/negative-shape")
def _(d):
    return _npy(d, "neg", "{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 2), }", _8B)


@case("npy/wrapped-shape-product")
def _(d):  # 2**32 * 2**32 wraps to 0 in int64
    return _npy(
        d, "wrap", "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }"
    )


@case("npy/declared-size-larger-than-data")
def _(d):  # claims 40 GB
    return _npy(d, "big", "{'descr': '<f8', 'fortran_order': False, 'shape': (5000000000,), }", _8B)


@case("npy/object-dtype-pickle")
def _(d):
    p = d / "obj.npy"
    with open(p, "wb") as f:
        np.save(f, np.array([_RunsCode(_sentinel(d)), 1], dtype=object), allow_pickle=True)
    return p


@case("npy/structured-object-field")
def _(d):
    return _npy(
        d, "structobj", "{'descr': [('a', '|O')], 'fortran_order': False, 'shape': (1,), }", _8B
    )


@case("npy/unknown-descr")
def _(d):
    return _npy(d, "descr", "{'descr': '<q9', 'fortran_order': False, 'shape': (2,), }", _8B)


@case("npy/trailing-garbage")
def _(d):
    return _npy(d, "trail", _H, _8B + b"GARBAGE!")


@case("npy/truncated-header")
def _(d):
    p = d / "trunchdr.npy"
    p.write_bytes(_npy_bytes(_H, _8B)[:20])
    return p


@case("npy/bool-not-0-1")
def _(d):
    return _npy(d, "bool", "{'descr': '|b1', 'fortran_order': False, 'shape': (2,), }", b"\x05\x06")


# --- npz ----------------------------------------------------------------------------


def _member(a: np.ndarray | None = None) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.arange(2, dtype=np.float32) if a is None else a)
    return buf.getvalue()


def _npz(
    d: Path, name: str, members: list[tuple[str, bytes]], compression=zipfile.ZIP_STORED
) -> Path:
    p = d / f"{name}.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names
        with zipfile.ZipFile(p, "w", compression) as zf:
            for mname, data in members:
                zf.writestr(mname, data)
    return p


@case("npz/not-a-zip")
def _(d):
    (d / "garbage.npz").write_bytes(os.urandom(64) + b"PK")
    return d / "garbage.npz"


@case("npz/empty-file")
def _(d):
    (d / "empty.npz").write_bytes(b"")
    return d / "empty.npz"


@case("npz/truncated-zip")
def _(d):
    p = _npz(d, "trunc", [("a.npy", _member(np.zeros(1000, np.float32)))])
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


@case("npz/duplicate-members")
def _(d):
    return _npz(d, "dup", [("a.npy", _member()), ("a.npy", _member())])


@case("npz/absolute-member")
def _(d):
    return _npz(d, "abs", [("/tmp/evil.npy", _member())])


@case("npz/dotdot-member")
def _(d):
    return _npz(d, "dotdot", [("../../evil.npy", _member())])


@case("npz/nul-in-member-name")
def _(d):
    p = _npz(d, "nul", [("aXb.npy", _member())])
    data = p.read_bytes().replace(b"aXb.npy", b"a\x00b.npy")
    p.write_bytes(data)
    return p


@case("npz/member-not-npy")
def _(d):
    return _npz(d, "notnpy", [("readme.txt", b"hello")])


@case("npz/object-member-pickle")
def _(d):
    buf = io.BytesIO()
    np.save(buf, np.array([_RunsCode(_sentinel(d), "open")], dtype=object), allow_pickle=True)
    return _npz(d, "obj", [("a.npy", buf.getvalue())])


@case("npz/member-bad-magic")
def _(d):
    return _npz(d, "magic", [("a.npy", b"\x93NUMPZ" + _member()[6:])])


@case("npz/member-declared-larger")
def _(d):
    return _npz(
        d,
        "larger",
        [
            (
                "a.npy",
                _npy_bytes(
                    "{'descr': '<f8', 'fortran_order': False, 'shape': (5000000000,), }", _8B
                ),
            )
        ],
    )


@case("npz/member-wrapped-shape")
def _(d):
    return _npz(
        d,
        "wrap",
        [
            (
                "a.npy",
                _npy_bytes(
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }"
                ),
            )
        ],
    )


@case("npz/member-trailing-garbage")
def _(d):
    return _npz(d, "trail", [("a.npy", _member() + b"GARBAGE")])


def _patch_sizes(p: Path, member: str, file_size: int) -> None:
    """Rewrite a member's uncompressed size in its local and central headers."""
    data = bytearray(p.read_bytes())
    name = member.encode()
    # local header: sig(4) ver(2) flag(2) meth(2) time(2) date(2) crc(4) csize(4) usize(4) nlen(2) xlen(2)
    i = data.find(b"PK\x03\x04")
    while i >= 0:
        nlen = struct.unpack_from("<H", data, i + 26)[0]
        if bytes(data[i + 30 : i + 30 + nlen]) == name:
            struct.pack_into("<I", data, i + 22, file_size)
        i = data.find(b"PK\x03\x04", i + 4)
    # central header: ... usize at +24, nlen at +28, name at +46
    i = data.find(b"PK\x01\x02")
    while i >= 0:
        nlen = struct.unpack_from("<H", data, i + 28)[0]
        if bytes(data[i + 46 : i + 46 + nlen]) == name:
            struct.pack_into("<I", data, i + 24, file_size)
        i = data.find(b"PK\x01\x02", i + 4)
    p.write_bytes(bytes(data))


@case("npz/bomb-declared-size-lie")
def _(d):  # a deflated member whose declared size is 4 GB, matching a 4 GB header
    hdr = _npy_bytes("{'descr': '|u1', 'fortran_order': False, 'shape': (4000000000,), }")
    p = _npz(d, "bomb", [("a.npy", hdr + b"\0" * 4096)], zipfile.ZIP_DEFLATED)
    _patch_sizes(p, "a.npy", len(hdr) + 4_000_000_000)
    return p


@case("npz/bomb-stored-size-lie")
def _(d):  # a stored member whose uncompressed size exceeds its stored size
    hdr = _npy_bytes("{'descr': '|u1', 'fortran_order': False, 'shape': (3000000000,), }")
    p = _npz(d, "bomb2", [("a.npy", hdr + b"\0" * 64)])
    _patch_sizes(p, "a.npy", len(hdr) + 3_000_000_000)
    return p


@case("npz/bomb-short-stream")
def _(d):  # honest-looking ratio, but the stream ends early: declared 2 MiB, holds 4 KiB
    hdr = _npy_bytes("{'descr': '|u1', 'fortran_order': False, 'shape': (2097152,), }")
    p = _npz(d, "bomb3", [("a.npy", hdr + b"\0" * 4096)], zipfile.ZIP_DEFLATED)
    _patch_sizes(p, "a.npy", len(hdr) + 2097152)
    return p


@case("npz/crc-mismatch")
def _(d):
    p = _npz(d, "crc", [("a.npy", _member(np.arange(64, dtype=np.float32)))])
    data = bytearray(p.read_bytes())
    i = data.find(b"\x00\x00\x80\x3f")  # float 1.0
    data[i + 3] ^= 0xFF
    p.write_bytes(bytes(data))
    return p


@case("npz/encrypted-flag")
def _(d):
    p = _npz(d, "enc", [("a.npy", _member())])
    data = bytearray(p.read_bytes())
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = data.find(sig)
        data[i + off] |= 1
    p.write_bytes(bytes(data))
    return p


@case("npz/unknown-compression")
def _(d):
    p = _npz(d, "meth", [("a.npy", _member())])
    data = bytearray(p.read_bytes())
    for sig, off in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        i = data.find(sig)
        struct.pack_into("<H", data, i + off, 99)
    p.write_bytes(bytes(data))
    return p


# --- pt -------------------------------------------------------------------------------


def _torch_save(obj: object, p: Path, **kw) -> Path:
    import torch

    torch.save(obj, p, **kw)
    return p


def _zip_replace(
    src: Path, dst: Path, replace: dict[str, bytes | None], add: dict[str, bytes] | None = None
) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for zi in zin.infolist():
            suffix = zi.filename.split("/", 1)[1]
            if suffix in replace:
                if replace[suffix] is not None:
                    zout.writestr(zi.filename, replace[suffix])
            else:
                zout.writestr(zi, zin.read(zi.filename))
        prefix = zin.infolist()[0].filename.split("/", 1)[0]
        for k, v in (add or {}).items():
            zout.writestr(f"{prefix}/{k}", v)
    return dst


def _valid_pt(d: Path) -> Path:
    import torch

    p = d / "_valid_src.pt.tmpl"
    if not p.exists():
        torch.save({"w": torch.arange(4, dtype=torch.float32)}, p)
    return p


def _pt_with_pickle(d: Path, name: str, payload: bytes) -> Path:
    src = _valid_pt(d)
    out = _zip_replace(src, d / f"{name}.pt", {"data.pkl": payload})
    src.unlink()
    return out


@case("pt/zip-pickle-os-system")
def _(d):
    return _pt_with_pickle(d, "sys", pickle.dumps({"w": _RunsCode(_sentinel(d))}, protocol=2))


@case("pt/zip-pickle-builtins-open")
def _(d):
    return _pt_with_pickle(d, "open", pickle.dumps(_RunsCode(_sentinel(d), "open"), protocol=2))


@case("pt/zip-pickle-eval-proto4")
def _(d):
    return _pt_with_pickle(d, "eval", pickle.dumps([_RunsCode(_sentinel(d), "eval")], protocol=4))


@case("pt/zip-pickle-inst-opcode")
def _(d):  # protocol-0 INST opcode calls a class by name
    payload = f"(S'touch {_sentinel(d)}'\nios\nsystem\n.".encode()
    return _pt_with_pickle(d, "inst", payload)


@case("pt/zip-pickle-rebuild-with-evil-storage")
def _(d):  # an allowed rebuild global whose storage argument is an os.system call
    cmd = f"touch {_sentinel(d)}".encode()
    payload = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(cposix\nsystem\nX"
        + struct.pack("<I", len(cmd))
        + cmd
        + b"\x85RK\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR."
    )
    return _pt_with_pickle(d, "rebuild", payload)


@case("pt/legacy-raw-pickle-payload")
def _(d):
    p = d / "legacy.pt"
    p.write_bytes(pickle.dumps(_RunsCode(_sentinel(d)), protocol=2))
    return p


@case("pt/legacy-torch-format-trailing-bytes")
def _(d):  # the legacy format is read; bytes after its last storage are not
    import torch

    p = _torch_save({"w": torch.ones(2)}, d / "legacy2.pt", _use_new_zipfile_serialization=False)
    with open(p, "ab") as f:
        f.write(b"\0" * 8)
    return p


@case("pt/garbage")
def _(d):
    (d / "garbage.pt").write_bytes(os.urandom(256))
    return d / "garbage.pt"


@case("pt/empty")
def _(d):
    (d / "empty.pt").write_bytes(b"")
    return d / "empty.pt"


@case("pt/truncated-zip")
def _(d):
    import torch

    p = _torch_save({"w": torch.arange(10_000, dtype=torch.float32)}, d / "trunc.pt")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    return p


@case("pt/storage-smaller-than-tensor")
def _(d):
    src = _valid_pt(d)
    out = _zip_replace(src, d / "short.pt", {"data/0": b"\0" * 4})
    src.unlink()
    return out


@case("pt/storage-record-missing")
def _(d):
    src = _valid_pt(d)
    out = _zip_replace(src, d / "missing.pt", {"data/0": None})
    src.unlink()
    return out


@case("pt/tensor-view-past-storage")
def _(d):  # stride/offset point past the storage (numel patched in the pickle)
    import torch

    t = torch.arange(4, dtype=torch.float32)
    p = _torch_save({"w": t[1:]}, d / "view.pt")
    src = d / "view.pt"
    with zipfile.ZipFile(src) as z:
        pkl_name = [n for n in z.namelist() if n.endswith("data.pkl")][0]
        pkl = z.read(pkl_name)
    # the view's storage offset 1 is "K\x01"; make it 1_000_000 (BININT)
    i = pkl.find(b"K\x01K\x03\x85")
    assert i >= 0, pkl
    pkl2 = pkl[:i] + b"J" + struct.pack("<i", 1_000_000) + pkl[i + 2 :]
    out = _zip_replace(src, d / "view2.pt", {"data.pkl": pkl2})
    p.unlink()
    return out


@case("pt/torchscript-archive")
def _(d):
    import torch

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.w

    p = d / "script.pt"
    torch.jit.save(torch.jit.script(M()), str(p))
    return p


@case("pt/non-tensor-object")
def _(d):
    import argparse

    return _torch_save(
        {"w": __import__("torch").ones(2), "args": argparse.Namespace(lr=0.1)}, d / "obj.pt"
    )


@case("pt/numpy-array-inside")
def _(d):
    return _torch_save({"w": np.ones(3)}, d / "np.pt")


@case("pt/data-pkl-missing")
def _(d):
    src = _valid_pt(d)
    out = _zip_replace(src, d / "nopkl.pt", {"data.pkl": None})
    src.unlink()
    return out


@case("pt/pickle-getattr-gadget")
def _(d):  # builtins.getattr(os, "system") -- a classic gadget chain
    cmd = f"touch {_sentinel(d)}".encode()
    payload = (
        b"\x80\x02cbuiltins\ngetattr\n(cbuiltins\n__import__\n(X\x02\x00\x00\x00ostRX"
        b"\x06\x00\x00\x00systemtR(X" + struct.pack("<I", len(cmd)) + cmd + b"tR."
    )
    return _pt_with_pickle(d, "getattr", payload)


@case("pt/duplicate-zip-members")
def _(d):
    src = _valid_pt(d)
    out = _zip_replace(src, d / "dupmem.pt", {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(out, "a") as z:
            prefix = z.namelist()[0].split("/")[0]
            z.writestr(f"{prefix}/data/0", b"\xff" * 16)
    src.unlink()
    return out


@case("pt/deep-nesting")
def _(d):  # lists nested 5000 deep, far past MAX_DEPTH (flattening recurses)
    payload = b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b"."
    return _pt_with_pickle(d, "deep", payload)


# --- h5 ---------------------------------------------------------------------------------


def _h5py():
    import h5py

    return h5py


@case("h5/external-storage")
def _(d):
    h5py = _h5py()
    secret = _secret(d)
    p = d / "ext.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset(
            "leak", shape=(len(SECRET),), dtype="u1", external=[(str(secret), 0, len(SECRET))]
        )
    return p


@case("h5/external-link")
def _(d):
    h5py = _h5py()
    other = d / "other_secret.h5"
    with h5py.File(other, "w") as f:
        f["s"] = np.frombuffer(SECRET, np.uint8)
    p = d / "extlink.h5"
    with h5py.File(p, "w") as f:  # nothing else: skipped entries beside tensors are read
        f["leak"] = h5py.ExternalLink(str(other), "/s")
    return p


@case("h5/soft-link")
def _(d):
    h5py = _h5py()
    p = d / "soft.h5"
    with h5py.File(p, "w") as f:
        f["alias"] = h5py.SoftLink("/a")
    return p


@case("h5/dangling-soft-link")
def _(d):
    h5py = _h5py()
    p = d / "dangling.h5"
    with h5py.File(p, "w") as f:
        f["gone"] = h5py.SoftLink("/does/not/exist")
    return p


@case("h5/virtual-dataset-other-file")
def _(d):
    h5py = _h5py()
    other = d / "vsrc_secret.h5"
    with h5py.File(other, "w") as f:
        f["s"] = np.frombuffer(SECRET, np.uint8)
    layout = h5py.VirtualLayout(shape=(len(SECRET),), dtype="u1")
    layout[:] = h5py.VirtualSource(str(other), "s", shape=(len(SECRET),))
    p = d / "vds.h5"
    with h5py.File(p, "w") as f:
        f.create_virtual_dataset("leak", layout)
    return p


@case("h5/object-dtype")
def _(d):
    h5py = _h5py()
    p = d / "strings.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("s", data=np.array([b"a", b"bc"], dtype=object), dtype=h5py.string_dtype())
    return p


@case("h5/compressed-claims-huge")
def _(d):  # a chunked, compressed, never-written dataset claiming 8 TB
    h5py = _h5py()
    p = d / "huge.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("huge", shape=(2**40,), dtype="f8", chunks=(2**20,), compression="gzip")
    return p


@case("h5/contiguous-claims-huge")
def _(d):  # a contiguous dataset whose space was never allocated
    h5py = _h5py()
    p = d / "huge2.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("huge", shape=(2**33,), dtype="f8")
    return p


@case("h5/garbage")
def _(d):
    (d / "garbage.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(500))
    return d / "garbage.h5"


@case("h5/truncated")
def _(d):
    h5py = _h5py()
    p = d / "trunc.h5"
    with h5py.File(p, "w") as f:
        f["w"] = np.arange(10_000, dtype=np.float64)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


@case("h5/name-collision")
def _(d):  # /a.b and /a/b both map to tensor name 'a.b'
    h5py = _h5py()
    p = d / "collide.h5"
    with h5py.File(p, "w") as f:
        f["a.b"] = np.ones(2)
        f["a/b"] = np.zeros(2)
    return p


# --- sharded -------------------------------------------------------------------------------


def _shard(path: Path) -> None:
    path.write_bytes(_st_bytes({"w": _F32x2}, _8B))


def _index(d: Path, name: str, weight_map: object, *, raw: bytes | None = None) -> Path:
    root = d / name
    root.mkdir()
    _shard(root / "model-00001-of-00001.safetensors")
    p = root / "model.safetensors.index.json"
    p.write_bytes(
        raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    )
    return p


@case("sharded/index-dotdot")
def _(d):
    _shard(d / "outside.safetensors")
    return _index(d, "dotdot", {"w": "../outside.safetensors"})


@case("sharded/index-absolute")
def _(d):
    _shard(d / "outside2.safetensors")
    return _index(d, "abs", {"w": str(d / "outside2.safetensors")})


@case("sharded/index-etc-passwd")
def _(d):
    return _index(d, "passwd", {"w": "/etc/passwd"})


@case("sharded/symlink-shard-outside")
def _(d):
    _shard(d / "outside3.safetensors")
    p = _index(d, "symlink", {"w": "link.safetensors"})
    os.symlink(d / "outside3.safetensors", p.parent / "link.safetensors")
    return p


@case("sharded/missing-shard")
def _(d):
    return _index(d, "missing", {"w": "model-00002-of-00002.safetensors"})


@case("sharded/shard-nul")
def _(d):
    return _index(d, "nul", {"w": "model\x00.safetensors"})


@case("sharded/shard-not-string")
def _(d):
    return _index(d, "notstr", {"w": 7})


@case("sharded/weight-map-not-dict")
def _(d):
    return _index(d, "wmlist", ["model-00001-of-00001.safetensors"])


@case("sharded/index-not-json")
def _(d):
    return _index(d, "notjson", None, raw=b"{not json")


@case("sharded/index-duplicate-keys")
def _(d):
    s = "model-00001-of-00001.safetensors"
    raw = f'{{"weight_map": {{"w": "{s}", "w": "{s}"}}}}'.encode()
    return _index(d, "dupkey", None, raw=raw)


@case("sharded/name-not-in-shard")
def _(d):
    return _index(
        d,
        "notinshard",
        {"w": "model-00001-of-00001.safetensors", "ghost": "model-00001-of-00001.safetensors"},
    )


@case("sharded/nested-index")
def _(d):
    p = _index(d, "nested", {"w": "inner.index.json"})
    (p.parent / "inner.index.json").write_text(json.dumps({"weight_map": {"w": "x.safetensors"}}))
    return p


@case("sharded/shard-is-hostile")
def _(d):
    p = _index(d, "hostileshard", {"w": "model-00001-of-00001.safetensors"})
    (p.parent / "model-00001-of-00001.safetensors").write_bytes(_st_bytes({"w": _F32x2}, b"\0" * 4))
    return p


@case("sharded/pt-shard-with-payload")
def _(d):
    root = d / "ptshard"
    root.mkdir()
    src = _valid_pt(d)
    _zip_replace(
        src,
        root / "pytorch_model-00001-of-00001.bin",
        {"data.pkl": pickle.dumps({"w": _RunsCode(_sentinel(d))}, protocol=2)},
    )
    src.unlink()
    p = root / "pytorch_model.bin.index.json"
    p.write_text(json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}))
    return p


@case("sharded/dir-with-two-indexes")
def _(d):
    p = _index(d, "twoidx", {"w": "model-00001-of-00001.safetensors"})
    (p.parent / "other.safetensors.index.json").write_bytes(p.read_bytes())
    return p.parent


def format_of(name: str) -> str:
    return name.split("/", 1)[0]


def build_all(root: Path) -> dict[str, Path]:
    """Build every case in its own subdirectory of ``root``; return name -> path."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit / legacy-save deprecation warnings
        for name, build in CASES.items():
            d = root / name.replace("/", "__")
            d.mkdir(parents=True)
            out[name] = build(d)
    return out


if __name__ == "__main__":
    paths = build_all(Path(sys.argv[1]))
    for k, v in paths.items():
        print(k, v)
