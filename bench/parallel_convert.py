"""Parallel convert: --workers 1 against --workers N on a CPU-bound conversion, whole processes.

    python bench/parallel_convert.py [--shards 8] [--mib 64] [--runs 3] [--workers 2]

Makes a sharded float32 checkpoint (SHARDS shards of MIB MiB), then times
``tensorbridge convert SRC/ OUT/ --dtype bfloat16 --workers W`` for W = 1 and N, alternating,
and prints the medians, the speedup, the peak RSS of the command and of its largest worker,
and whether the outputs are byte-identical. Also times a lazy read of a few rows (to_dask)
of the first tensor. The cast (float32 -> bfloat16, rounding) is what the workers share.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def digest(path: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            h.update(name.encode())
            h.update(f.read())
    return h.hexdigest()


def run(args: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of the largest process of the command."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tensorbridge", *args], capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default=None)
    opts = ap.parse_args()
    import tensorbridge as tb

    root = opts.dir or tempfile.mkdtemp(prefix="tb-par-")
    src = os.path.join(root, "src") + "/"
    rng = np.random.default_rng(0)
    rows = opts.mib * (1 << 20) // (4 * 1024)
    if not os.path.exists(src):
        tree = {
            f"layer.{i}.weight": rng.standard_normal((rows, 1024)).astype(np.float32)
            for i in range(opts.shards)
        }
        tb.save(tree, src, max_shard_size=f"{opts.mib + 1}MiB")
        del tree
    times: dict[int, list[float]] = {1: [], opts.workers: []}
    peaks: dict[int, int] = {}
    outs = {}
    for _ in range(opts.runs):
        for w in times:
            out = os.path.join(root, f"out-{w}") + "/"
            shutil.rmtree(out, ignore_errors=True)
            wall, peak = run(
                ["convert", src, out, "--dtype", "bfloat16", "--workers", str(w), "--quiet"]
            )
            times[w].append(wall)
            peaks[w] = peak
            outs[w] = out
    identical = digest(outs[1]) == digest(outs[opts.workers])
    t0 = time.perf_counter()
    rows_read = tb.to_dask(src)["layer.0.weight"][100:104].compute()
    lazy = time.perf_counter() - t0
    if opts.dir is None:  # a checkpoint made here is not left behind in /tmp
        shutil.rmtree(root, ignore_errors=True)
    med = {w: statistics.median(t) for w, t in times.items()}
    result = {
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "checkpoint": f"{opts.shards} shards x {opts.mib} MiB float32 -> bfloat16",
        "median_s": med,
        "speedup": med[1] / med[opts.workers],
        "peak_rss_mib_upto": {w: round(p / (1 << 20)) for w, p in peaks.items()},
        "byte_identical": identical,
        "to_dask_4_rows_s": round(lazy, 4),
        "rows_shape": list(rows_read.shape),
        "runs": times,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
