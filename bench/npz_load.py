"""tb.load of a stored ``.npz`` (``np.savez``) against ``np.load``, in one process.

Rounds are interleaved (each loader once per round) and the medians printed as JSON,
``[milliseconds, ratio to np.load]``. ``--names`` picks member names: ``w{}`` (8-byte
aligned data in np.savez's layout, so ``mmap=True`` maps) or ``w{:02d}`` (misaligned:
copied). np.load reads every member (``np.load`` ignores ``mmap_mode`` for ``.npz``).

Usage::

    PYTHONPATH=src python bench/npz_load.py [--names 'w{}'] [--mib 256] [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

import tensorbridge as tb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", default="w{}")
    ap.add_argument("--mib", type=int, default=256, help="total size, in 8 members")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    per = (args.mib << 20) // 8 // 4
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "big.npz")
        rng = np.random.default_rng(0)
        np.savez(p, **{args.names.format(i): rng.random(per, np.float32) for i in range(8)})

        def npload() -> dict:
            with np.load(p) as z:
                return {k: z[k] for k in z.files}

        cases = {
            "np.load": npload,
            "tb mmap=True": lambda: tb.load(p, mmap=True),
            "tb mmap=False": lambda: tb.load(p, mmap=False),
            "tb to=torch mmap=True": lambda: tb.load(p, to="torch", mmap=True),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.repeats):
            for k, f in cases.items():
                t0 = time.perf_counter()
                out = f()
                times[k].append(time.perf_counter() - t0)
                del out
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["np.load"]
    print(json.dumps({k: [round(v * 1e3, 1), round(v / base, 2)] for k, v in med.items()}))


if __name__ == "__main__":
    main()
