"""Many threads at once: converting shared trees, reading one file through shared and
separate readers, saving to separate files, and registering containers while others
convert. Every result is compared as bytes with the single-threaded answer.

    pytest tests/hostile/test_concurrency.py
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest

import tensorbridge as tb
import tensorbridge.files as tbf

THREADS = 8
ROUNDS = 40


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**63, size=4096, dtype=np.uint64).view(np.uint8)
    out = {}
    for name, dt in [
        ("f32", np.float32),
        ("f64", np.float64),
        ("f16", np.float16),
        ("bf16", ml_dtypes.bfloat16),
        ("i64", np.int64),
        ("u8", np.uint8),
        ("i8", np.int8),
        ("c64", np.complex64),
    ]:
        n = bits.size // np.dtype(dt).itemsize
        out[name] = (
            bits[: n * np.dtype(dt).itemsize].view(dt).reshape(4, -1)
        )  # NaN payloads included
    out["bool"] = (bits[:512] & 1).astype(bool)
    return out


def _run(fn, n=THREADS):
    barrier = threading.Barrier(n)

    def task(i):
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(task, range(n)))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("target", ["numpy", "torch", "jax"])
def test_threads_converting_shared_trees(target):
    pytest.importorskip(target)
    src = {"layer": _inputs(), "list": [np.arange(10), np.ones((3, 3), np.float32)]}
    expected = {k: v.tobytes() for k, v in _inputs().items()}
    convert = {"numpy": tb.to_numpy, "torch": tb.to_torch, "jax": tb.to_jax}[target]

    def work(i):
        bad = []
        for r in range(ROUNDS):
            out = convert(src)
            back = tb.to_numpy(out)
            for k, v in back["layer"].items():
                if np.ascontiguousarray(v).tobytes() != expected[k]:
                    bad.append((i, r, k))
            if back["list"][0].tobytes() != np.arange(10).tobytes():
                bad.append((i, r, "list0"))
        return bad

    results = _run(work)
    assert [b for r in results for b in r] == []
    # nothing was written into the shared inputs
    assert {k: v.tobytes() for k, v in src["layer"].items()} == expected


FORMATS = {"safetensors": ".safetensors", "npz": ".npz", "pt": ".pt", "h5": ".h5"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("conc")
    tree = {k: v for k, v in _inputs().items() if k != "c64"}
    tree["c64"] = _inputs()["c64"]
    out = {}
    for fmt, suffix in FORMATS.items():
        p = d / f"m{suffix}"
        tbf.save(tree, p)
        out[fmt] = p
    sharded = d / "sharded"
    tbf.save(
        {k: v for k, v in tree.items() if k != "c64"},
        sharded,
        format="sharded",
        max_shard_size=10_000,
    )
    out["sharded"] = sharded
    return out, {k: v.tobytes() for k, v in tree.items()}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fmt", list(FORMATS) + ["sharded"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-reader", "separate-readers"])
def test_threads_reading_one_file(fmt, shared, files):
    paths, expected = files
    path = paths[fmt]
    if fmt == "sharded":
        expected = {k: v for k, v in expected.items() if k != "c64"}
    names = sorted(expected)
    reader = tbf.open(path) if shared else None
    try:

        def work(i):
            bad = []
            for r in range(ROUNDS // 4):
                ctx = reader if shared else tbf.open(path)
                try:
                    order = names[i % len(names) :] + names[: i % len(names)]
                    for name in order:
                        if ctx.read(name).tobytes() != expected[name]:
                            bad.append((i, r, name))
                finally:
                    if not shared:
                        ctx.close()
            return bad

        results = _run(work)
    finally:
        if reader is not None:
            reader.close()
    assert [b for r in results for b in r] == []


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_threads_saving_and_loading(fmt, tmp_path):
    tree = _inputs()
    expected = {k: v.tobytes() for k, v in tree.items()}

    def work(i):
        p = tmp_path / f"t{i}{FORMATS[fmt]}"
        for _ in range(5):
            tbf.save(tree, p)
            got = tbf.load(p)
            if {k: v.tobytes() for k, v in got.items()} != expected:
                return [i]
        return []

    assert [b for r in _run(work) for b in r] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"t{i}{FORMATS[fmt]}" for i in range(THREADS)
    )


@pytest.mark.timeout(240)
def test_threads_saving_to_the_same_destination(tmp_path):
    """Racing writers: the survivor is one complete file, never a mix; no temp file remains."""
    p = tmp_path / "same.safetensors"
    trees = [{"x": np.full(50_000, i, np.int32)} for i in range(THREADS)]

    def work(i):
        for _ in range(5):
            tbf.save(trees[i], p)
        return []

    _run(work)
    got = tbf.load(p)["x"]
    assert any(got.tobytes() == t["x"].tobytes() for t in trees)
    assert [q.name for q in tmp_path.iterdir()] == ["same.safetensors"]


class Pair:
    def __init__(self, a, b):
        self.a, self.b = a, b


@pytest.mark.timeout(240)
def test_register_container_while_converting():
    """Registrations (of fresh classes and re-registrations) race with conversions."""
    inputs = _inputs()
    expected = {k: v.tobytes() for k, v in inputs.items()}
    tb.register_container(Pair, lambda p: ((p.a, p.b), ("a", "b"), None), lambda aux, ch: Pair(*ch))
    stop = threading.Event()
    errors = []

    def registrar():
        n = 0
        while not stop.is_set():
            cls = type(f"Box{n}", (), {"__init__": lambda self, v: setattr(self, "v", v)})
            tb.register_container(
                cls, lambda b: ((b.v,), ("v",), None), lambda aux, ch, c=cls: c(*ch)
            )
            tb.register_container(
                Pair, lambda p: ((p.a, p.b), ("a", "b"), None), lambda aux, ch: Pair(*ch)
            )
            box = cls(inputs["f32"])
            try:
                out = tb.to_numpy(box)
                if not isinstance(out, cls) or out.v.tobytes() != expected["f32"]:
                    errors.append(("box", n))
            except Exception as exc:  # noqa: BLE001 - any error here is a failure
                errors.append(("box", n, repr(exc)))
            n += 1

    def converter(i):
        bad = []
        for r in range(ROUNDS):
            tree = {"p": Pair(inputs["f64"], [inputs["i64"], Pair(inputs["bf16"], inputs["u8"])])}
            out = tb.to_numpy(tree) if i % 2 else tb.to_torch(tree)
            if not isinstance(out["p"], Pair) or not isinstance(out["p"].b[1], Pair):
                bad.append((i, r, "type"))
                continue
            got = tb.to_numpy(out)
            if (
                got["p"].a.tobytes() != expected["f64"]
                or got["p"].b[0].tobytes() != expected["i64"]
                or got["p"].b[1].a.tobytes() != expected["bf16"]
                or got["p"].b[1].b.tobytes() != expected["u8"]
            ):
                bad.append((i, r, "bytes"))
        return bad

    pytest.importorskip("torch")
    threads = [threading.Thread(target=registrar) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        results = _run(converter, 6)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert [b for r in results for b in r] == []
