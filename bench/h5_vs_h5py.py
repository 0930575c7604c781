"""tensorbridge's .h5 reader and writer beside h5py doing the same work, in one process.

    PYTHONPATH=src python bench/h5_vs_h5py.py [--repeat 7]

Times are CPU time of the process (--wall for wall-clock). Cases: 300 small tensors (64x64 float32) and one 64 MiB tensor. "Read" is open + every
tensor into a fresh array; "write" is create + every dataset + close. tensorbridge's write
also fsyncs and renames atomically; the h5py+fsync column adds the fsync to h5py's side, so
the cost of durability shows on its own. Prints medians and ratios (tensorbridge / h5py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import h5py
import numpy as np

from tensorbridge.formats.base import TensorInfo
from tensorbridge.formats.h5 import FORMAT


def h5py_write(path, arrays, fsync=False):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
    if fsync:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def tb_write(path, arrays):
    infos = [TensorInfo(k, str(v.dtype), v.shape) for k, v in arrays.items()]
    FORMAT.write(path, infos, arrays.__getitem__)


def h5py_read(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


def tb_read(path):
    with FORMAT.open(path) as r:
        return {k: r.read(k) for k in r.keys()}


#: the clock: CPU time of this process by default (stable on a shared machine; it leaves out
#: waiting for the disk, so fsync shows only in --wall runs)
CLOCK = time.process_time


def median(fn, repeat):
    times = []
    for _ in range(repeat):
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--wall", action="store_true", help="wall-clock time instead of CPU time")
    args = ap.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    rng = np.random.default_rng(0)
    cases = {
        "300 x 64x64 f32": {f"t{i}": rng.random((64, 64), np.float32) for i in range(300)},
        "1 x 64 MiB f32": {"big": rng.random((4096, 4096), np.float32)},
    }
    d = tempfile.mkdtemp()
    a, b = os.path.join(d, "a.h5"), os.path.join(d, "b.h5")
    print(
        f"{'case':18} {'op':6} {'h5py ms':>9} {'+fsync':>9} {'tb ms':>9} {'tb/h5py':>8} "
        f"{'tb/(h5py+fsync)':>16}"
    )
    for name, arrays in cases.items():
        hw = median(lambda arrays=arrays: h5py_write(a, arrays), args.repeat)
        hwf = median(lambda arrays=arrays: h5py_write(a, arrays, fsync=True), args.repeat)
        tw = median(lambda arrays=arrays: tb_write(b, arrays), args.repeat)
        print(
            f"{name:18} {'write':6} {hw * 1e3:9.1f} {hwf * 1e3:9.1f} {tw * 1e3:9.1f} "
            f"{tw / hw:8.2f} {tw / hwf:16.2f}"
        )
        h5py_read(a), tb_read(a)  # warm the page cache
        hr = median(lambda: h5py_read(a), args.repeat)
        tr = median(lambda: tb_read(a), args.repeat)
        print(f"{name:18} {'read':6} {hr * 1e3:9.1f} {'':>9} {tr * 1e3:9.1f} {tr / hr:8.2f}")


if __name__ == "__main__":
    main()
