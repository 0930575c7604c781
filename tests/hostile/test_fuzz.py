"""Hypothesis-driven byte-mutation fuzzing of every reader.

Valid seed files (written by the real libraries and by tensorbridge) are mutated
(bytes flipped, inserted, deleted, the file truncated or extended) and, for each
format, also mutated *structurally* so the mutation reaches past the outer checks:
safetensors header fields re-encoded with a correct length, ``.npy`` header dicts,
npz members and ``data.pkl`` re-zipped with valid CRCs, index JSON values. Each
mutant is opened through :func:`tensorbridge.files.open` and every tensor is read.
Any exception that is not a :class:`TensorBridgeError` is a bug.

CI runs a bounded number of examples (the whole file in about a minute on 2 cores).
A longer run::

    TB_FUZZ_EXAMPLES=5000 TB_FUZZ_REPORT=fuzz.json pytest tests/hostile/test_fuzz.py

``TB_FUZZ_REPORT`` writes executions and seconds per fuzz target as JSON.
Inputs that once crashed a reader live in ``tests/hostile/regressions/`` and are
replayed by :func:`test_regressions`.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import struct
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorbridge.files as tbf
from tensorbridge.errors import TensorBridgeError

EXAMPLES = int(os.environ.get("TB_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=EXAMPLES <= 200,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
REGRESSIONS = Path(__file__).resolve().parent / "regressions"

_WORK = Path(tempfile.mkdtemp(prefix="tb-fuzz-"))
atexit.register(shutil.rmtree, _WORK, True)
_STATS: dict[str, list[float]] = {}  # target -> [executions, seconds]


def _report() -> None:
    path = os.environ.get("TB_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(
                {
                    k: {"executions": int(v[0]), "seconds": round(v[1], 1)}
                    for k, v in sorted(_STATS.items())
                },
                f,
                indent=1,
            )


atexit.register(_report)


# --- seeds ------------------------------------------------------------------------


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _file_bytes(write, suffix: str) -> bytes:
    p = _WORK / f"seed{suffix}"
    write(p)
    data = p.read_bytes()
    p.unlink()
    return data


def _tb_bytes(tree, suffix: str) -> bytes:
    return _file_bytes(lambda p: tbf.save(tree, p), suffix)


def _bf16():
    import ml_dtypes

    return np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)


def _gguf_seeds() -> list[bytes]:
    from tensorbridge.formats.gguf import value

    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    tree = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "i": np.arange(3, dtype=np.int64),
        "h": _bf16(),
        "q": x,
    }
    meta = {
        "general.name": "seed",
        "n": value(7, "uint32"),
        "toks": value(["a", "bc"], "array", "string"),
        "f": value([0.5], "array", "float32"),
    }
    return [
        _file_bytes(lambda p, q=q: tbf.save(tree, p, metadata=meta, quantize=q), ".gguf")
        for q in ("q8_0", "q4_0")
    ]


def _seeds() -> dict[str, list[bytes]]:
    import torch

    tree = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([True, False]),
        "i": np.arange(3, dtype=np.int64),
        "h": _bf16(),
        "s": np.float64(2.5),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tsave = {
            "model": {"w": torch.arange(6.0).reshape(2, 3), "v": torch.arange(8)[2:6]},
            "step": 3,
        }
        seeds = {
            "npy": [
                _npy_bytes(np.arange(6, dtype="<f4").reshape(2, 3)),
                _npy_bytes(np.asfortranarray(np.arange(6, dtype=">i2").reshape(2, 3))),
                _tb_bytes(_bf16(), ".npy"),
                _npy_bytes(np.array(True)),
            ],
            "npz": [
                _tb_bytes(tree, ".npz"),
                _file_bytes(
                    lambda p: np.savez_compressed(p, a=np.arange(100), b=np.ones(3)), ".npz"
                ),
                _file_bytes(lambda p: np.savez(p, a=np.arange(10, dtype=np.uint8)), ".npz"),
            ],
            "safetensors": [
                _tb_bytes(tree, ".safetensors"),
                _file_bytes(
                    lambda p: tbf.save({"a": np.ones((2, 2), np.float16)}, p, metadata={"k": "v"}),
                    ".safetensors",
                ),
            ],
            "pt": [_file_bytes(lambda p: torch.save(tsave, p), ".pt"), _tb_bytes(tree, ".pt")],
            "h5": [_tb_bytes(tree, ".h5")],
            "gguf": _gguf_seeds(),
        }
    return seeds


SEEDS = _seeds()


# --- mutations ------------------------------------------------------------------------

_OP = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(
        st.just("int"),
        st.integers(0, 1 << 20),
        st.sampled_from(
            [0, 1, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1, 2**32, 8, 64]
        ),
    ),
)
MUTATIONS = st.lists(_OP, min_size=1, max_size=6)


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for kind, pos, arg in ops:
        if not b and kind != "insert":
            continue
        i = pos % (len(b) + 1) if kind == "insert" else pos % len(b)
        if kind == "flip":
            b[i] ^= 1 << arg
        elif kind == "set":
            b[i] = arg
        elif kind == "insert":
            b[i:i] = arg
        elif kind == "delete":
            del b[i : i + arg]
        elif kind == "truncate":
            del b[i:]
        elif kind == "int":
            width = 8 if arg >= 2**32 else 4
            b[i : i + width] = arg.to_bytes(width, "little")
    return bytes(b)


_JSON_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(["F32", "BF16", "BOOL", "I64", "U8", "F8_E4M3", "O", ".."]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)


def _rezip(data: bytes, member_suffix: str, ops) -> bytes:
    """Mutate the first member ending in ``member_suffix``, re-zipped with valid CRCs."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    done = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(out, "w") as z:
            for zi in src.infolist():
                payload = src.read(zi)
                if not done and zi.filename.endswith(member_suffix):
                    payload, done = mutate(payload, ops), True
                z.writestr(zi, payload)
    return out.getvalue()


# --- the harness ------------------------------------------------------------------------


def _open_all(path: Path) -> None:
    with tbf.open(path) as r:
        for name in r.keys():
            r.info(name)
            r.read(name)


def check(target: str, path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, read it all; only a TensorBridgeError may escape."""
    path.write_bytes(data)
    t0 = time.perf_counter()
    try:
        _open_all(path)
    except TensorBridgeError:
        pass
    except BaseException as exc:  # a bug: keep the input for the regression suite
        keep = _WORK / f"crash-{target}-{abs(hash(data)) & 0xFFFFFF:06x}{path.suffix}"
        keep.write_bytes(data)
        raise AssertionError(
            f"{target}: {type(exc).__name__} escaped (input saved to {keep})"
        ) from exc
    finally:
        s = _STATS.setdefault(target, [0, 0.0])
        s[0] += 1
        s[1] += time.perf_counter() - t0


def _path(target: str, suffix: str) -> Path:
    d = _WORK / target
    d.mkdir(exist_ok=True)
    return d / f"fuzz{suffix}"


@pytest.mark.parametrize("fmt", ["npy", "npz", "safetensors", "pt", "h5", "gguf"])
@FUZZ
@given(seed=st.integers(0, 10), ops=MUTATIONS)
def test_fuzz_bytes(fmt, seed, ops):
    seeds = SEEDS[fmt]
    suffix = ".safetensors" if fmt == "safetensors" else f".{fmt}"
    check(f"{fmt}-bytes", _path(f"{fmt}-bytes", suffix), mutate(seeds[seed % len(seeds)], ops))


@FUZZ
@given(seed=st.integers(0, 10), ops=MUTATIONS)
def test_fuzz_npy_in_npz(seed, ops):
    """Mutate a member's .npy bytes inside a valid zip (CRCs recomputed)."""
    seeds = SEEDS["npz"]
    check("npz-member", _path("npz-member", ".npz"), _rezip(seeds[seed % len(seeds)], ".npy", ops))


@FUZZ
@given(
    seed=st.integers(0, 10),
    ops=MUTATIONS,
    member=st.sampled_from(["data.pkl", "/0", "byteorder", ".json"]),
)
def test_fuzz_pt_records(seed, ops, member):
    """Mutate data.pkl (the pickle opcodes) or a storage record inside a valid zip."""
    seeds = SEEDS["pt"]
    check("pt-records", _path("pt-records", ".pt"), _rezip(seeds[seed % len(seeds)], member, ops))


def _st_header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


@FUZZ
@given(
    seed=st.integers(0, 10),
    path=st.lists(st.integers(0, 10), min_size=1, max_size=3),
    value=_JSON_VALUE,
    body_ops=st.lists(_OP, max_size=2),
)
def test_fuzz_safetensors_header(seed, path, value, body_ops):
    """Replace one field of the JSON header with an arbitrary JSON value; keep the length right."""
    seeds = SEEDS["safetensors"]
    header, body = _st_header(seeds[seed % len(seeds)])
    node = header
    for i in path[:-1]:
        if not isinstance(node, (dict, list)) or not node:
            break
        key = list(node)[i % len(node)] if isinstance(node, dict) else i % len(node)
        if not isinstance(node[key], (dict, list)):
            break
        node = node[key]
    if isinstance(node, dict) and node:
        node[list(node)[path[-1] % len(node)]] = value
    elif isinstance(node, list) and node:
        node[path[-1] % len(node)] = value
    text = json.dumps(header).encode()
    data = (
        struct.pack("<Q", len(text)) + text + mutate(body, body_ops)
        if body_ops
        else struct.pack("<Q", len(text)) + text + body
    )
    check("safetensors-header", _path("safetensors-header", ".safetensors"), data)


_NPY_FIELD = st.one_of(
    st.sampled_from(
        [
            "'<f4'",
            "'>f8'",
            "'|b1'",
            "'|O'",
            "'<U3'",
            "'V8'",
            "[('bfloat16', '<u2')]",
            "[('a', '<f4'), ('b', '<i4')]",
            "'<f2'",
            "'<c8'",
            "'<M8[s]'",
            "'|S4'",
            "'u1'",
        ]
    ),
    st.builds(lambda t: repr(tuple(t)), st.lists(st.integers(-(2**65), 2**65), max_size=4)),
    st.sampled_from(["True", "False", "None", "0", "()", "(3,)", "(2, 3)", "[2, 3]", "'x'", "{}"]),
)


@FUZZ
@given(
    seed=st.integers(0, 10),
    key=st.sampled_from(["descr", "fortran_order", "shape"]),
    value=_NPY_FIELD,
    extra=st.integers(-16, 16),
)
def test_fuzz_npy_header(seed, key, value, extra):
    """Rewrite one .npy header field; pad/truncate the data by ``extra`` bytes."""
    import ast

    seeds = SEEDS["npy"]
    data = seeds[seed % len(seeds)]
    hlen = struct.unpack("<H", data[8:10])[0]
    d = ast.literal_eval(data[10 : 10 + hlen].decode("latin1"))
    body = data[10 + hlen :]
    fields = {k: repr(v) for k, v in d.items()}
    fields[key] = value
    text = "{" + ", ".join(f"'{k}': {v}" for k, v in fields.items()) + "}"
    text += " " * (-(len(text) + 11) % 64) + "\n"
    body = body[: len(body) + extra] if extra < 0 else body + b"\0" * extra
    out = data[:8] + struct.pack("<H", len(text)) + text.encode("latin1") + body
    check("npy-header", _path("npy-header", ".npy"), out)


def _sharded_dir() -> Path:
    d = _WORK / "sharded"
    if not d.exists():
        d.mkdir()
        tbf.save(
            {"a": np.arange(4, dtype=np.float32), "b": np.ones(3), "c": np.zeros(2, np.int8)},
            d / "ckpt",
            max_shard_size=40,
            format="sharded",
        )
    return d


@FUZZ
@given(ops=MUTATIONS, value=_JSON_VALUE, where=st.integers(0, 20), structural=st.booleans())
def test_fuzz_sharded_index(ops, value, where, structural):
    root = _sharded_dir()
    ckpt = root / "ckpt"
    index = next(ckpt.glob("*.index.json"))
    original = root / "index.orig"
    if not original.exists():
        shutil.copy(index, original)
    data = original.read_bytes()
    if structural:
        doc = json.loads(data)
        wm = doc["weight_map"]
        keys = list(wm)
        target = [doc, wm, doc.get("metadata", {})][where % 3]
        if isinstance(target, dict) and target:
            target[list(target)[where % len(target)] if where % 2 else keys[where % len(keys)]] = (
                value
            )
        data = json.dumps(doc).encode()
    else:
        data = mutate(data, ops)
    try:
        check("sharded-index", index, data)
    finally:
        shutil.copy(original, index)


def _regression_params():
    for p in sorted(REGRESSIONS.glob("*")):
        if p.is_file() and p.suffix != ".md":
            yield pytest.param(p.name, id=p.name)


@pytest.mark.parametrize("name", list(_regression_params()))
def test_regressions(name):
    """Inputs that once crashed a reader (tests/hostile/regressions/) now give TensorBridgeError."""
    with pytest.raises(TensorBridgeError):
        _open_all(REGRESSIONS / name)
