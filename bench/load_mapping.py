"""tb.load against the reference loaders, for the same file, side by side in one process.

Each row is the median of REPEATS runs (the file is in the page cache: each is read once
before timing). Two measures per loader:
- ``load``: the call alone (a mapping reads nothing yet);
- ``load+touch``: the call, then one pass over every byte (``arr.sum()`` of a uint8 view),
  which is what using the weights costs: page faults for a mapping, nothing more for a copy.

Usage::

    PYTHONPATH=src python bench/load_mapping.py [--mib 256] [--tensors 64] [--repeats 7]

Prints a table of medians and of ratios tensorbridge / reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def touch(tree) -> int:
    total = 0
    for v in tree.values() if isinstance(tree, dict) else [tree]:
        a = v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else v
        total += int(a.reshape(-1).view(np.uint8)[::4096].sum())  # one byte per page
    return total


def median_time(fn, repeats: int, then_touch: bool) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        if then_touch:
            touch(out)
        times.append(time.perf_counter() - t)
        del out
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import safetensors.numpy
    import safetensors.torch
    import torch

    import tensorbridge as tb

    d = tempfile.mkdtemp(prefix="tb-bench-load-")
    per = args.mib * 2**20 // args.tensors // 4
    rng = np.random.default_rng(0)
    tree = {f"layer.{i}.w": rng.standard_normal(per, dtype=np.float32) for i in range(args.tensors)}
    st = os.path.join(d, "m.safetensors")
    safetensors.numpy.save_file(tree, st)
    npy = os.path.join(d, "a.npy")
    np.save(npy, np.concatenate(list(tree.values())))
    pt = os.path.join(d, "m.pt")
    torch.save({k: torch.from_numpy(v) for k, v in tree.items()}, pt)
    del tree

    cases = [
        (
            "safetensors -> torch",
            lambda: safetensors.torch.load_file(st),
            {
                "mmap=True": lambda: tb.load(st, to="torch", mmap=True),
                "default (copy)": lambda: tb.load(st, to="torch"),
            },
        ),
        (
            "safetensors -> numpy",
            lambda: safetensors.numpy.load_file(st),
            {"mmap=True": lambda: tb.load(st, mmap=True), "default (copy)": lambda: tb.load(st)},
        ),
        (
            ".npy -> numpy (np.load mmap_mode='r')",
            lambda: np.load(npy, mmap_mode="r"),
            {"mmap=True": lambda: tb.load(npy, mmap=True), "default (copy)": lambda: tb.load(npy)},
        ),
        (
            ".pt -> torch (torch.load mmap=True)",
            lambda: torch.load(pt, mmap=True, weights_only=True),
            {
                "mmap=True": lambda: tb.load(pt, to="torch", mmap=True),
                "default (copy)": lambda: tb.load(pt, to="torch"),
            },
        ),
    ]
    print(
        f"# {args.mib} MiB in {args.tensors} float32 tensors, median of {args.repeats}, "
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(
        "| file -> target | reference: load / load+touch (ms) | tensorbridge | "
        "load / load+touch (ms) | ratio load | ratio load+touch |"
    )
    print("|---|---|---|---|---|---|")
    for title, ref, ours in cases:
        ref()  # warm the page cache and the imports
        r_load = median_time(ref, args.repeats, False)
        r_touch = median_time(ref, args.repeats, True)
        for label, fn in ours.items():
            fn()
            o_load = median_time(fn, args.repeats, False)
            o_touch = median_time(fn, args.repeats, True)
            print(
                f"| {title} | {r_load * 1e3:.2f} / {r_touch * 1e3:.1f} | {label} | "
                f"{o_load * 1e3:.2f} / {o_touch * 1e3:.1f} | {o_load / r_load:.2f} | "
                f"{o_touch / r_touch:.2f} |"
            )
    for f in (st, npy, pt):
        os.unlink(f)
    os.rmdir(d)


if __name__ == "__main__":
    main()
