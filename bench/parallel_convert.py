"""Parallel convert: --workers 1 against --workers N on a CPU-bound conversion, whole processes.

    python bench/parallel_convert.py [--shards 8] [--mib 128] [--runs 5] [--workers 2] [--single]

Makes a sharded float32 checkpoint (SHARDS shards of MIB MiB), then times
``tensorbridge convert SRC/ OUT/ --dtype bfloat16 --workers W`` (a fresh process each time,
interpreter start included) for W = 1 and N, alternating, and prints the medians and the
speedup, with the load average before each run (``--single``: one ``.safetensors`` output
file, which every worker writes into, instead of shards). Each run also reports CPU seconds: the
command's own process and its workers apart, and the peak RSS of each, so the serial part
(what the command does itself) can be read off whatever the load.

The machine is shared, so each round also times a calibration: a pure-Python loop of
fixed work in 1 process, then in N processes at once. Its speedup is the parallelism the
machine gave this benchmark at that moment (N on an idle machine): a convert speedup can
only be judged against it. Checks that the outputs are byte-identical, and times a lazy
read of a few rows (to_dask) of the first tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

#: Runs the command in this child and prints its own CPU and peak RSS, and its workers'.
_CHILD = """
import json, resource, sys
from tensorbridge.cli import main
rc = main(sys.argv[1:])
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "main_cpu": me.ru_utime + me.ru_stime, "main_rss": me.ru_maxrss,
                  "workers_cpu": kids.ru_utime + kids.ru_stime, "worker_rss": kids.ru_maxrss}))
"""


_MAKE = """
import sys, numpy as np, tensorbridge as tb
src, shards, rows, mib = sys.argv[1], *map(int, sys.argv[2:])
rng = np.random.default_rng(0)
tree = {f"layer.{i}.weight": rng.standard_normal((rows, 1024), np.float32) for i in range(shards)}
tb.save(tree, src, max_shard_size=f"{mib}MiB")
"""


def digest(path: str) -> str:
    h = hashlib.sha256()
    if not os.path.isdir(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            h.update(name.encode())
            h.update(f.read())
    return h.hexdigest()


def convert(src: str, out: str, workers: int) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out)
    args = ["convert", src, out, "--dtype", "bfloat16", "--workers", str(workers), "--quiet"]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr)
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "wall_s": round(wall, 3),
        "load": round(load, 2),
        "main_cpu_s": round(stats["main_cpu"], 3),
        "workers_cpu_s": round(stats["workers_cpu"], 3),
        "main_rss_mib": round(stats["main_rss"] / 1024),
        "worker_rss_mib": round(stats["worker_rss"] / 1024),
    }


def _spin(n: int) -> None:
    x = 0
    for i in range(n):
        x += i


def calibrate(workers: int, n: int = 3_000_000) -> float:
    """Speedup of ``workers`` processes each spinning ``n`` steps over one doing it."""
    ctx = multiprocessing.get_context("fork")

    def run(k: int) -> float:
        ps = [ctx.Process(target=_spin, args=(n,)) for _ in range(k)]
        t0 = time.perf_counter()
        for p in ps:
            p.start()
        for p in ps:
            p.join()
        return time.perf_counter() - t0

    return round(run(1) * workers / run(workers), 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--single", action="store_true", help="write one .safetensors file")
    opts = ap.parse_args()
    import tensorbridge as tb

    root = opts.dir or tempfile.mkdtemp(prefix="tb-par-")
    src = os.path.join(root, "src") + "/"
    rows = opts.mib * (1 << 20) // (4 * 1024)
    if not os.path.exists(src):  # in a child: this process stays small, and so do its
        # children's peak RSS figures (a forked child starts with its parent's high-water mark)
        subprocess.run(
            [sys.executable, "-c", _MAKE, src, str(opts.shards), str(rows), str(opts.mib + 1)],
            check=True,
        )
    n = opts.workers

    def out_path(w: int) -> str:
        return os.path.join(root, f"out-{w}" + (".safetensors" if opts.single else "/"))

    runs: dict[int, list[dict[str, float]]] = {1: [], n: []}
    calibration = []
    try:
        for _ in range(opts.runs):
            calibration.append(calibrate(n))
            for w in runs:
                runs[w].append(convert(src, out_path(w), w))
        identical = digest(out_path(1)) == digest(out_path(n))
        t0 = time.perf_counter()
        rows_read = tb.to_dask(src)["layer.0.weight"][100:104].compute()
        lazy = time.perf_counter() - t0
    finally:
        if opts.dir is None:  # a checkpoint made here is not left behind in /tmp
            shutil.rmtree(root, ignore_errors=True)

    def med(w: int, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[w]), 3)

    speedups = [round(a["wall_s"] / b["wall_s"], 2) for a, b in zip(runs[1], runs[n], strict=True)]
    result = {
        "machine": f"{os.cpu_count()} cores",
        "checkpoint": f"{opts.shards} shards x {opts.mib} MiB float32 -> bfloat16"
        + (", one .safetensors out" if opts.single else ", sharded out"),
        "median_wall_s": {w: med(w, "wall_s") for w in runs},
        "speedup_of_medians": round(med(1, "wall_s") / med(n, "wall_s"), 2),
        "speedup_per_round": speedups,
        "calibration_speedup_per_round": calibration,
        # what the medians of CPU seconds would give with N free cores: the command's own
        # part serial, its workers' part spread over N (an estimate, not a measurement)
        "speedup_from_cpu_if_cores_were_free": round(
            med(1, "main_cpu_s") / (med(n, "main_cpu_s") + med(n, "workers_cpu_s") / n), 2
        ),
        "median_cpu_s": {
            w: {"command": med(w, "main_cpu_s"), "workers": med(w, "workers_cpu_s")} for w in runs
        },
        "peak_rss_mib": {
            w: {"command": med(w, "main_rss_mib"), "largest_worker": med(w, "worker_rss_mib")}
            for w in runs
        },
        "byte_identical": identical,
        "to_dask_4_rows_s": round(lazy, 4),
        "rows_shape": list(rows_read.shape),
        "runs": runs,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
