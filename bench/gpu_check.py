#!/usr/bin/env python
"""Every GPU test and GPU benchmark of tensorbridge, in one call of a few minutes.

    python bench/gpu_check.py                 # prints a table; JSON to $OUT/gpu.json if $OUT is set
    python bench/gpu_check.py --no-tests      # benchmarks only
    python bench/gpu_check.py --budget-s 150  # stop starting new benchmarks after this (default 200)

Meant for one H100/H200 with torch+CUDA, jax+CUDA and cupy, no TensorFlow, no
network. Each figure compares tensorbridge with the naive way in the same run
on the same card: torch.cuda.synchronize() before every clock read, a warm-up
first, fresh inputs every repeat (random bit patterns, NaN payloads included),
and every result checked bit for bit. The card's name is printed and recorded.
Without a CUDA device it prints "no CUDA device: skipped" and exits 0. The JSON
is rewritten after the tests and after every benchmark, so a run killed by a
timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # jax must leave room for torch
os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")

GiB = 1 << 30  # shrunk by --dry-run-cpu
DEV = "cuda"  # "cpu" under --dry-run-cpu
MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent

# Targets from ../shared/notes/PERF.md and issue 4 (ratios against the naive way, same card).
TARGETS = {
    "tensor_1gib_to_numpy": ">= 10 GB/s (fresh memory, staging ring)",
    "tensor_1gib_pinned": ">= 45 GB/s (to_numpy(pinned=True))",
    "state_dict_to_numpy": ">= 40 GB/s (~7x naive)",
    "state_dict_pinned": ">= 40 GB/s (to_numpy(pinned=True))",
    "many_small_to_numpy": ">= 3x naive",
    "torch_to_cupy": "O(1), < 1 ms for 1 GiB",
    "torch_to_jax": "O(1), < 1 ms for 1 GiB",
    "jax_to_numpy": ">= 10 GB/s",
    "cupy_to_numpy": ">= 10 GB/s",
    "tree_to_cuda": ">= 2x naive per-tensor .to('cuda')",
    "pinned_soak": "20 s of to_numpy(state dict) in a loop: pinned bytes, RSS, fds flat",
}


def emit(result: dict[str, Any], *, quiet: bool = False) -> None:
    """Write the result so far to $OUT/gpu.json (atomically: a kill never leaves half a file)."""
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        tmp = Path(out, "gpu.json.tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp, Path(out, "gpu.json"))
        if not quiet:
            print(f"JSON: {Path(out, 'gpu.json')}")


def machine(torch: Any | None) -> dict[str, Any]:
    from importlib import metadata

    def ver(d: str) -> str | None:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            return None

    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {
            d: v
            for d in (
                "tensorbridge",
                "numpy",
                "torch",
                "jax",
                "jaxlib",
                "cupy",
                "cupy-cuda12x",
                "cupy-cuda13x",
                "ml_dtypes",
            )
            if (v := ver(d))
        },
    }
    if torch is not None and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            card=torch.cuda.get_device_name(0),
            card_memory_gib=round(p.total_memory / (1 << 30), 1),
            cuda=torch.version.cuda,
            device_count=torch.cuda.device_count(),
        )
    return info


# --------------------------------------------------------------------------- helpers


def same_bits_np(a: Any, b: Any) -> bool:
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype.itemsize != b.dtype.itemsize or a.dtype.str != b.dtype.str:
        return False
    return bool(
        np.array_equal(
            np.ascontiguousarray(a).reshape(-1).view(np.uint8),
            np.ascontiguousarray(b).reshape(-1).view(np.uint8),
        )
    )


def same_bits_torch(a: Any, b: Any) -> bool:
    import torch

    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def fresh_cuda(torch: Any, n_floats: int) -> Any:
    """Random fp32 bit patterns on the GPU (NaN payloads and -0.0 included)."""
    return torch.randint(-(2**31), 2**31 - 1, (n_floats,), dtype=torch.int32, device=DEV).view(
        torch.float32
    )


def measure(
    torch: Any,
    make: Callable[[], Any],
    tb_fn: Callable[[Any], Any],
    naive_fn: Callable[[Any], Any],
    check: Callable[[Any, Any], bool],
    *,
    repeats: int,
    nbytes: int,
    sync_after: Callable[[], None] | None = None,
) -> dict:
    """Median seconds of tb_fn and naive_fn on fresh inputs, alternating, with checks."""

    def sync() -> None:
        if DEV == "cuda":
            torch.cuda.synchronize()

    def once(fn: Callable[[Any], Any], x: Any) -> tuple[float, Any]:
        sync()
        t0 = time.perf_counter()
        r = fn(x)
        if sync_after is not None:
            sync_after()
        sync()
        return time.perf_counter() - t0, r

    x = make()
    once(tb_fn, x)  # warm-up: allocators, pinned pools, cuBLAS/handles, lazy imports
    once(naive_fn, x)
    del x
    t_tb: list[float] = []
    t_nv: list[float] = []
    ok = True
    for i in range(repeats):
        x = make()  # fresh input: nothing cached from the last repeat
        order = [("tb", tb_fn), ("naive", naive_fn)][:: (1 if i % 2 == 0 else -1)]
        got = {}
        for name, fn in order:
            dt, got[name] = once(fn, x)
            (t_tb if name == "tb" else t_nv).append(dt)
        ok = ok and check(got["tb"], got["naive"])
        del x, got
    a, b = statistics.median(t_tb), statistics.median(t_nv)
    return {
        "tb_s": a,
        "naive_s": b,
        "speedup": b / a,
        "tb_GBps": nbytes / a / 1e9,
        "naive_GBps": nbytes / b / 1e9,
        "bit_exact": ok,
        "repeats": repeats,
        "nbytes": nbytes,
        "tb_all_s": t_tb,
        "naive_all_s": t_nv,
    }


# --------------------------------------------------------------------------- benchmarks


def staging_stats() -> dict:
    """The staging ring's counters (host waits, chunks, fallbacks), to diff around a benchmark."""
    try:
        from tensorbridge.frameworks.torch_staging import stats
    except ImportError:
        return {}
    return stats()


def with_stats(fn: Callable[..., dict]) -> Callable[..., dict]:
    def run(*a: Any) -> dict:
        before = staging_stats()
        r = fn(*a)
        after = staging_stats()
        r["staging"] = {k: after[k] - before.get(k, 0) for k in after}
        return r

    run.__name__ = fn.__name__
    return run


def is_pinned_np(torch: Any, a: Any) -> bool:
    """True when a NumPy array's memory is page-locked (asked through torch)."""
    if DEV != "cuda":
        return False
    import numpy as np

    flat = np.ascontiguousarray(a).reshape(-1)
    return bool(torch.from_numpy(flat.view(np.uint8)).is_pinned())


def bench_tensor_1gib(torch: Any, tb: Any, np: Any) -> dict:
    n = GiB // 4
    return measure(
        torch,
        lambda: fresh_cuda(torch, n),
        tb.to_numpy,
        lambda t: t.detach().cpu().numpy(),
        same_bits_np,
        repeats=3,
        nbytes=GiB,
    )


def bench_tensor_1gib_pinned(torch: Any, tb: Any, np: Any) -> dict:
    n = GiB // 4
    r = measure(
        torch,
        lambda: fresh_cuda(torch, n),
        lambda t: tb.to_numpy(t, pinned=True),
        lambda t: t.detach().cpu().numpy(),
        same_bits_np,
        repeats=3,
        nbytes=GiB,
    )
    a = tb.to_numpy(fresh_cuda(torch, 1 << 20), pinned=True)
    r["result_is_pinned"] = is_pinned_np(torch, a) if DEV == "cuda" else None
    if DEV == "cuda":
        r["bit_exact"] = r["bit_exact"] and r["result_is_pinned"]
    return r


def _state_dict(torch: Any) -> dict:
    sd = {}
    for i in range(
        144 if DEV == "cuda" else 4
    ):  # 144 x 8 MiB weights + 144 x 8 KiB biases: 288 tensors, ~1.13 GiB
        sd[f"layers.{i}.weight"] = fresh_cuda(torch, 1024 * 2048).view(1024, 2048)
        sd[f"layers.{i}.bias"] = fresh_cuda(torch, 2048)
    return sd


def _dict_check(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(same_bits_np(a[k], b[k]) for k in a)


def bench_state_dict(torch: Any, tb: Any, np: Any) -> dict:
    nbytes = sum(t.nbytes for t in _state_dict(torch).values())
    r = measure(
        torch,
        lambda: _state_dict(torch),
        tb.to_numpy,
        lambda sd: {k: v.detach().cpu().numpy() for k, v in sd.items()},
        _dict_check,
        repeats=3,
        nbytes=nbytes,
    )
    r["tensors"] = 288 if DEV == "cuda" else 8
    return r


def bench_state_dict_pinned(torch: Any, tb: Any, np: Any) -> dict:
    nbytes = sum(t.nbytes for t in _state_dict(torch).values())
    r = measure(
        torch,
        lambda: _state_dict(torch),
        lambda sd: tb.to_numpy(sd, pinned=True),
        lambda sd: {k: v.detach().cpu().numpy() for k, v in sd.items()},
        _dict_check,
        repeats=3,
        nbytes=nbytes,
    )
    out = tb.to_numpy(_state_dict(torch), pinned=True)
    r["result_is_pinned"] = (
        all(is_pinned_np(torch, a) for a in out.values()) if DEV == "cuda" else None
    )
    if DEV == "cuda":
        r["bit_exact"] = r["bit_exact"] and r["result_is_pinned"]
    r["tensors"] = 288 if DEV == "cuda" else 8
    return r


def bench_many_small(torch: Any, tb: Any, np: Any) -> dict:
    def make() -> list:
        flat = fresh_cuda(torch, 10_000 * 256)
        return [flat[i * 256 : (i + 1) * 256].clone() for i in range(10_000)]  # 10,000 x 1 KiB

    def check(a: list, b: list) -> bool:
        return len(a) == len(b) and all(same_bits_np(x, y) for x, y in zip(a, b, strict=True))

    return measure(
        torch,
        make,
        tb.to_numpy,
        lambda ts: [t.detach().cpu().numpy() for t in ts],
        check,
        repeats=5,
        nbytes=10_000 * 1024,
    )


def bench_torch_to_cupy(torch: Any, tb: Any, np: Any) -> dict:
    import cupy as cp

    def check(a: Any, b: Any) -> bool:
        return bool(cp.array_equal(a.view(cp.uint8), b.view(cp.uint8)))

    r = measure(
        torch,
        lambda: fresh_cuda(torch, GiB // 4),
        tb.to_cupy,
        lambda t: cp.asarray(t.detach().cpu().numpy()),
        check,
        repeats=3,
        nbytes=GiB,
        sync_after=lambda: cp.cuda.Device().synchronize(),
    )
    x = fresh_cuda(torch, GiB // 4)
    r["zero_copy"] = bool(tb.shares_memory(tb.to_cupy(x), x))
    r["under_1ms"] = r["tb_s"] < 1e-3
    return r


def bench_torch_to_jax(torch: Any, tb: Any, np: Any) -> dict:
    import jax
    import jax.numpy as jnp

    def check(a: Any, b: Any) -> bool:
        return same_bits_np(np.asarray(a), np.asarray(b))

    def block(x: Any) -> Any:
        return jax.block_until_ready(x)

    # copy=False: by default a mutable torch buffer is copied into immutable JAX (guide)
    r = measure(
        torch,
        lambda: fresh_cuda(torch, GiB // 4),
        lambda t: block(tb.to_jax(t, copy=False)),
        lambda t: block(jnp.asarray(t.detach().cpu().numpy())),
        check,
        repeats=3,
        nbytes=GiB,
    )
    x = fresh_cuda(torch, GiB // 4)
    r["zero_copy"] = bool(tb.shares_memory(tb.to_jax(x, copy=False), x))
    r["under_1ms"] = r["tb_s"] < 1e-3
    return r


def bench_jax_to_numpy(torch: Any, tb: Any, np: Any) -> dict:
    import jax
    import jax.numpy as jnp

    key = [jax.random.PRNGKey(0)]

    def make() -> Any:  # a fresh device array each time: jax caches np.asarray's result
        key[0], sub = jax.random.split(key[0])
        bits = jax.random.bits(sub, (GiB // 4,), dtype=jnp.uint32)
        return jax.block_until_ready(jax.lax.bitcast_convert_type(bits, jnp.float32))

    return measure(torch, make, tb.to_numpy, np.asarray, same_bits_np, repeats=3, nbytes=GiB)


def bench_cupy_to_numpy(torch: Any, tb: Any, np: Any) -> dict:
    import cupy as cp

    def make() -> Any:
        x = cp.random.randint(0, 2**32, size=GiB // 4, dtype=cp.uint64).astype(cp.uint32)
        return x.view(cp.float32)

    return measure(
        torch,
        make,
        tb.to_numpy,
        cp.asnumpy,
        same_bits_np,
        repeats=3,
        nbytes=GiB,
        sync_after=lambda: cp.cuda.Device().synchronize(),
    )


def _pinned_bytes(torch: Any) -> int | None:
    """Bytes of page-locked memory torch's host allocator holds (active + cached)."""
    if DEV != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    try:
        return torch.cuda.host_memory_stats().get("allocated_bytes.current")
    except Exception:
        return None


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_pinned_soak(torch: Any, tb: Any, np: Any) -> dict:
    """A state dict to NumPy in a loop, pinned and not, alternating: the pinned
    memory torch holds, the process's RSS and its open descriptors stay flat."""
    import gc

    seconds = 20.0 if DEV == "cuda" else 1.0
    tree = {f"layer.{i}.weight": fresh_cuda(torch, (4 * GiB // 1024) // 4) for i in range(16)}
    tree.update({f"layer.{i}.bias": fresh_cuda(torch, 1024 + i) for i in range(64)})
    want = {k: v.cpu().numpy() for k, v in tree.items()}
    nbytes = sum(v.numel() * 4 for v in tree.values())
    fd_dir = "/proc/self/fd"

    def one(pinned: bool) -> bool:
        out = tb.to_numpy(tree, pinned=pinned)
        return all(same_bits_np(out[k], want[k]) for k in tree)

    ok = one(True) and one(False) and one(True) and one(False)  # warm: ring and pinned cache
    gc.collect()
    start = {"pinned": _pinned_bytes(torch), "rss": _rss_bytes(), "fds": len(os.listdir(fd_dir))}
    n, t0 = 0, time.perf_counter()
    samples = []
    while time.perf_counter() - t0 < seconds:
        ok = one(n % 2 == 0) and ok
        n += 1
        if n % 10 == 0:
            samples.append((_pinned_bytes(torch), _rss_bytes()))
    gc.collect()
    end = {"pinned": _pinned_bytes(torch), "rss": _rss_bytes(), "fds": len(os.listdir(fd_dir))}
    pinned_flat = start["pinned"] is None or end["pinned"] <= start["pinned"]
    rss_flat = end["rss"] - start["rss"] < 64 * MiB
    return {
        "iterations": n,
        "seconds": time.perf_counter() - t0,
        "nbytes_each": nbytes,
        "start": start,
        "end": end,
        "samples": samples[-20:],
        "bit_exact": ok,
        "pinned_flat": pinned_flat,
        "rss_flat": rss_flat,
        "fds_flat": end["fds"] <= start["fds"],
        "tb_GBps": nbytes * n / (time.perf_counter() - t0) / 1e9,
    }


def bench_tree_to_cuda(torch: Any, tb: Any, np: Any) -> dict:
    rng = np.random.default_rng(0)

    def make() -> dict:  # 288 arrays, ~1.13 GiB, fresh host memory each repeat
        d = {}
        for i in range(n_layers):
            d[f"layers.{i}.weight"] = (
                rng.integers(0, 2**32, 1024 * 2048, dtype=np.uint32)
                .view(np.float32)
                .reshape(1024, 2048)
            )
            d[f"layers.{i}.bias"] = rng.integers(0, 2**32, 2048, dtype=np.uint32).view(np.float32)
        return d

    def check(a: dict, b: dict) -> bool:  # same device, dtype, shape and bits as the naive way
        return list(a) == list(b) and all(same_bits_torch(a[k], b[k]) for k in a)

    n_layers = 144 if DEV == "cuda" else 4
    nbytes = n_layers * (1024 * 2048 + 2048) * 4  # what make() builds, without building it
    return measure(
        torch,
        make,
        lambda d: tb.to_torch(d, device=DEV),
        lambda d: {k: torch.from_numpy(v).to(DEV) for k, v in d.items()},
        check,
        repeats=3,
        nbytes=nbytes,
    )


BENCHES: list[tuple[str, Callable, str | None]] = [
    ("tensor_1gib_to_numpy", with_stats(bench_tensor_1gib), None),
    ("tensor_1gib_pinned", with_stats(bench_tensor_1gib_pinned), None),
    ("state_dict_to_numpy", with_stats(bench_state_dict), None),
    ("state_dict_pinned", with_stats(bench_state_dict_pinned), None),
    ("many_small_to_numpy", with_stats(bench_many_small), None),
    ("torch_to_cupy", bench_torch_to_cupy, "cupy"),
    ("torch_to_jax", bench_torch_to_jax, "jax"),
    ("jax_to_numpy", with_stats(bench_jax_to_numpy), "jax"),
    ("cupy_to_numpy", with_stats(bench_cupy_to_numpy), "cupy"),
    ("tree_to_cuda", with_stats(bench_tree_to_cuda), None),
    ("pinned_soak", with_stats(bench_pinned_soak), None),
]


def verdict(name: str, r: dict) -> str:
    if not r.get("bit_exact", False):
        return "WRONG (not bit-exact)"
    if name == "tensor_1gib_to_numpy":
        ok = r["tb_GBps"] >= 10
    elif name == "tensor_1gib_pinned":
        ok = r["tb_GBps"] >= 45
    elif name in ("state_dict_to_numpy", "state_dict_pinned"):
        ok = r["tb_GBps"] >= 40
    elif name == "many_small_to_numpy":
        ok = r["speedup"] >= 3
    elif name in ("torch_to_cupy", "torch_to_jax"):
        ok = r["tb_s"] < 1e-3 and r.get("zero_copy", False)
    elif name in ("jax_to_numpy", "cupy_to_numpy"):
        ok = r["tb_GBps"] >= 10
    elif name == "tree_to_cuda":
        ok = r["speedup"] >= 2
    elif name == "pinned_soak":
        ok = r["pinned_flat"] and r["rss_flat"] and r["fds_flat"]
    else:
        return "-"
    return "pass" if ok else "MISS"


def run_tests(budget_s: float) -> dict:
    if importlib.util.find_spec("pytest") is None:
        print("pytest not installed: GPU tests not run")
        return {"ran": False, "reason": "pytest not installed"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests"),
    ]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget_s)
    except subprocess.TimeoutExpired as exc:

        def text(b: Any) -> str:  # TimeoutExpired carries bytes even with text=True
            if b is None:
                return ""
            return b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)

        tail = (text(exc.stdout) + text(exc.stderr))[-3000:]
        print(tail + f"\nGPU tests: TIMED OUT after {budget_s:.0f} s")
        return {"ran": True, "timed_out": True, "status": "FAILED (timed out)", "tail": tail}
    tail = (p.stdout + p.stderr)[-4000:]
    print(tail.rstrip())
    # Only called with a CUDA device: no GPU test collected (exit 5) means they were lost.
    status = {0: "passed", 5: "FAILED (no GPU tests collected)"}.get(p.returncode, "FAILED")
    print(
        f"GPU tests: {status} (exit {p.returncode}, {time.perf_counter() - t0:.1f} s)", flush=True
    )
    return {
        "ran": True,
        "returncode": p.returncode,
        "status": status,
        "seconds": time.perf_counter() - t0,
        "tail": tail,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
    ap.add_argument("--tests-budget-s", type=float, default=120)
    ap.add_argument(
        "--budget-s",
        type=float,
        default=200,
        help="start no new benchmark after this many seconds in all",
    )
    ap.add_argument("--only", action="append", help="run only these benchmarks")
    ap.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="exercise the script's logic on the CPU with small sizes (no figures)",
    )
    args = ap.parse_args(argv)
    start = time.perf_counter()
    global GiB, DEV
    if args.dry_run_cpu:
        GiB, DEV = 16 * MiB, "cpu"
        args.no_tests = True

    try:
        import torch
    except ImportError:
        torch = None
    if not args.dry_run_cpu and (torch is None or not torch.cuda.is_available()):
        why = "torch not installed" if torch is None else "torch.cuda.is_available() is False"
        print(f"no CUDA device: skipped ({why})")
        emit({"skipped": f"no CUDA device ({why})", "machine": machine(torch)})
        return 0

    import numpy as np

    import tensorbridge as tb

    info = machine(torch)
    if args.dry_run_cpu:
        info.update(
            card="none (--dry-run-cpu: logic check only, figures meaningless)",
            card_memory_gib=0,
            cuda=None,
        )
    print(
        f"card: {info['card']} ({info['card_memory_gib']} GiB), CUDA {info['cuda']}, "
        f"{info['cpu_model']} x{info['cores']}, {info['date']}"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()), flush=True)
    result: dict[str, Any] = {"machine": info, "targets": TARGETS, "benchmarks": {}}
    emit(result, quiet=True)
    result["tests"] = (
        {"ran": False, "reason": "--no-tests"} if args.no_tests else run_tests(args.tests_budget_s)
    )
    emit(result, quiet=True)  # a later timeout keeps the test results

    failures = 0
    for name, fn, needs in BENCHES:
        if args.only and name not in args.only:
            continue
        if needs and importlib.util.find_spec(needs) is None:
            result["benchmarks"][name] = {"skipped": f"{needs} not installed"}
            print(f"{name}: skipped ({needs} not installed)")
            continue
        if time.perf_counter() - start > args.budget_s:
            result["benchmarks"][name] = {"skipped": "time budget spent"}
            print(f"{name}: skipped (time budget of {args.budget_s:.0f} s spent)")
            continue
        t0 = time.perf_counter()
        try:
            r = fn(torch, tb, np)
            r["verdict"] = verdict(name, r)
            failures += r["verdict"].startswith("WRONG")
        except Exception as exc:  # report and go on: one failure must not hide the rest
            import traceback

            r = {
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-3000:],
            }
            failures += 1
        r["bench_wall_s"] = time.perf_counter() - t0
        result["benchmarks"][name] = r
        result["wall_s"] = time.perf_counter() - start
        emit(result, quiet=True)  # after every benchmark: a timeout keeps what was measured
        if "error" in r:
            print(f"{name}: ERROR {r['error']}", flush=True)
        elif "tb_s" not in r:  # the soak
            print(
                f"{name}: {r['iterations']} conversions in {r['seconds']:.1f} s "
                f"({r['tb_GBps']:.2f} GB/s); pinned bytes {r['start']['pinned']} -> "
                f"{r['end']['pinned']}, RSS {r['start']['rss'] >> 20} -> "
                f"{r['end']['rss'] >> 20} MiB, fds {r['start']['fds']} -> {r['end']['fds']}, "
                f"bit-exact {r['bit_exact']}: {r['verdict']}",
                flush=True,
            )
        else:
            print(
                f"{name}: tensorbridge {r['tb_s'] * 1e3:.3f} ms ({r['tb_GBps']:.2f} GB/s), "
                f"naive {r['naive_s'] * 1e3:.3f} ms ({r['naive_GBps']:.2f} GB/s), "
                f"{r['speedup']:.2f}x, bit-exact {r['bit_exact']}; target {TARGETS[name]}: "
                f"{r['verdict']}",
                flush=True,
            )
        if DEV == "cuda":
            torch.cuda.empty_cache()

    print()
    print(
        f"{'benchmark':<22} {'tensorbridge':>14} {'naive':>14} {'speedup':>8}  {'target':<45} result"
    )
    for name, r in result["benchmarks"].items():
        if "tb_s" in r:
            print(
                f"{name:<22} {r['tb_GBps']:>9.2f} GB/s {r['naive_GBps']:>9.2f} GB/s "
                f"{r['speedup']:>7.2f}x  {TARGETS[name]:<45} {r['verdict']}"
            )
        else:
            print(
                f"{name:<22} {'-':>14} {'-':>14} {'-':>8}  {TARGETS[name]:<45} "
                f"{r.get('verdict') or r.get('skipped') or r.get('error')}"
            )
    result["wall_s"] = time.perf_counter() - start
    print(f"\ncard: {info['card']}; total {result['wall_s']:.0f} s")
    emit(result)
    tests_failed = str(result["tests"].get("status", "")).startswith("FAILED") or result[
        "tests"
    ].get("timed_out")
    return 1 if failures or tests_failed else 0


if __name__ == "__main__":
    sys.exit(main())
