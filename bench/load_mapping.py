"""tb.load against the reference loaders, for the same file, side by side in one process.

Each row is the median of REPEATS runs, the reference's and tensorbridge's alternating (the
file is in the page cache: each is read once before timing). Two measures per loader:
- ``load``: the call alone (a mapping reads nothing yet);
- ``load+touch``: the call, then one pass over every byte (``arr.sum()`` of a uint8 view),
  which is what using the weights costs: page faults for a mapping, nothing more for a copy.

Usage::

    PYTHONPATH=src python bench/load_mapping.py [--mib 256] [--tensors 64] [--repeats 7] [--clock process]

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


def once(fn, then_touch: bool, clock) -> float:
    t = clock()
    out = fn()
    if then_touch:
        touch(out)
    took = clock() - t
    del out
    return took


def paired(ref, ours, repeats: int, clock) -> list[float]:
    """Medians of [ref load, ref load+touch, ours load, ours load+touch], alternating."""
    runs: list[list[float]] = [[], [], [], []]
    for _ in range(repeats):
        runs[0].append(once(ref, False, clock))
        runs[2].append(once(ours, False, clock))
        runs[1].append(once(ref, True, clock))
        runs[3].append(once(ours, True, clock))
    return [statistics.median(r) for r in runs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="process: CPU time of this process (user + system), steadier on a shared machine",
    )
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
                "default (leased map)": lambda: tb.load(st, to="torch"),
                "mmap=True": lambda: tb.load(st, to="torch", mmap=True),
                "mmap=False (copy)": lambda: tb.load(st, to="torch", mmap=False),
            },
        ),
        (
            "safetensors -> numpy",
            lambda: safetensors.numpy.load_file(st),
            {
                "default (leased map)": lambda: tb.load(st),
                "mmap=True": lambda: tb.load(st, mmap=True),
                "mmap=False (copy)": lambda: tb.load(st, mmap=False),
            },
        ),
        (
            ".npy -> numpy (np.load mmap_mode='r')",
            lambda: np.load(npy, mmap_mode="r"),
            {
                "default (leased map)": lambda: tb.load(npy),
                "mmap=True": lambda: tb.load(npy, mmap=True),
                "mmap=False (copy)": lambda: tb.load(npy, mmap=False),
            },
        ),
        (
            ".pt -> torch (torch.load mmap=True)",
            lambda: torch.load(pt, mmap=True, weights_only=True),
            {
                "default (leased map)": lambda: tb.load(pt, to="torch"),
                "mmap=True": lambda: tb.load(pt, to="torch", mmap=True),
                "mmap=False (copy)": lambda: tb.load(pt, to="torch", mmap=False),
            },
        ),
    ]
    print(
        f"# {args.mib} MiB in {args.tensors} float32 tensors, median of {args.repeats} "
        f"alternating runs, {args.clock} clock, "
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(
        "| file -> target | reference: load / load+touch (ms) | tensorbridge | "
        "load / load+touch (ms) | ratio load | ratio load+touch |"
    )
    print("|---|---|---|---|---|---|")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for title, ref, ours in cases:
        ref()  # warm the page cache and the imports
        for label, fn in ours.items():
            fn()
            r_load, r_touch, o_load, o_touch = paired(ref, fn, args.repeats, clock)
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
