"""tb.load of an ``.npz`` against ``np.load``, in one process.

Rounds are interleaved (each loader once per round, alternating which goes first) and the
medians printed as JSON, ``[milliseconds, ratio to np.load]``.

Stored (default): 8 members, ``--mib`` in all, written by ``np.savez``. ``--names`` picks
member names: ``w{}`` (8-byte aligned data in np.savez's layout, so ``mmap=True`` maps) or
``w{:02d}`` (misaligned: copied). np.load reads every member (``np.load`` ignores
``mmap_mode`` for ``.npz``).

``--compressed N``: N float32 members of ``--kib`` KiB each, written by
``np.savez_compressed`` (both sides inflate every member), timed in batches of ``--batch``
loads; ``--clock process`` times by this process's CPU time (a shared machine).

Usage::

    PYTHONPATH=src python bench/npz_load.py [--names 'w{}'] [--mib 256] [--repeats 9]
    PYTHONPATH=src python bench/npz_load.py --compressed 500 --kib 4 --clock process
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import tensorbridge as tb


def _npload(p: str) -> dict:
    with np.load(p) as z:
        return {k: z[k] for k in z.files}


def _interleaved(
    cases: dict[str, Callable[[], Any]], repeats: int, batch: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median seconds per call of each case; each round runs every case once (``batch``
    calls), the order reversed every other round."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    order = list(cases)
    for f in cases.values():  # warm up
        f()
    gc.disable()
    try:
        for r in range(repeats):
            for k in order if r % 2 == 0 else order[::-1]:
                f = cases[k]
                t0 = clock()
                for _ in range(batch):
                    f()
                times[k].append((clock() - t0) / batch)
            gc.collect()
    finally:
        gc.enable()
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", default="w{}")
    ap.add_argument("--mib", type=int, default=256, help="total size, in 8 members")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--compressed", type=int, default=0, metavar="N", help="N deflated members")
    ap.add_argument("--kib", type=int, default=4, help="size of each deflated member")
    ap.add_argument("--batch", type=int, default=5, help="loads per timed round (compressed)")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall")
    args = ap.parse_args()
    clock = time.process_time if args.clock == "process" else time.perf_counter
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "big.npz")
        if args.compressed:
            per = args.kib * 1024 // 4
            sd = {
                f"layers.{i}.bias": rng.standard_normal(per, dtype=np.float32)
                for i in range(args.compressed)
            }
            np.savez_compressed(p, **sd)
            got, ref = tb.load(p), _npload(p)
            assert list(got) == list(ref)
            assert all(got[k].tobytes() == ref[k].tobytes() for k in ref)
            cases: dict[str, Callable[[], Any]] = {
                "np.load": lambda: _npload(p),
                "tb": lambda: tb.load(p),
            }
            med = _interleaved(cases, args.repeats, args.batch, clock)
        else:
            per = (args.mib << 20) // 8 // 4
            np.savez(p, **{args.names.format(i): rng.random(per, np.float32) for i in range(8)})
            cases = {
                "np.load": lambda: _npload(p),
                "tb mmap=True": lambda: tb.load(p, mmap=True),
                "tb mmap=False": lambda: tb.load(p, mmap=False),
                "tb to=torch mmap=True": lambda: tb.load(p, to="torch", mmap=True),
            }
            med = _interleaved(cases, args.repeats, 1, clock)
    base = med["np.load"]
    print(json.dumps({k: [round(v * 1e3, 2), round(v / base, 3)] for k, v in med.items()}))


if __name__ == "__main__":
    main()
