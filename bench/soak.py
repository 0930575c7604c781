"""Soak test: convert, save and load in a loop for minutes; memory must stay flat and no
file descriptor may leak.

    python bench/soak.py --seconds 120            # the recorded run (docs/reliability.md)
    python bench/soak.py --seconds 10 --json      # quick check, one JSON document

Each iteration converts a tree of mixed dtypes (bfloat16 included) NumPy -> torch ->
NumPy (and -> JAX when installed), saves it to every file format in turn (safetensors,
npz, pt, h5, npy, a sharded checkpoint), streams it through ``tensorbridge.Writer``,
opens every file lazily, loads it back, and compares the bytes. RSS (``/proc/self/status``
VmRSS) and the open descriptor count (``/proc/self/fd``) are sampled every
``--interval`` seconds.

The verdict: descriptors at the end equal those after warm-up, and RSS after warm-up
grows by less than ``--max-growth-mb`` (default 32 MiB) to the end. Exit status 0 when
both hold, 1 otherwise. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # minus the listdir's own descriptor


def make_tree(rng: np.random.Generator) -> dict:
    import ml_dtypes

    bits = rng.integers(0, 2**63, size=1 << 17, dtype=np.uint64).view(np.uint8)  # 1 MiB
    return {
        "enc": {
            "w": bits[: 1 << 19].view(np.float32).reshape(256, -1),
            "b": bits[:4096].view(ml_dtypes.bfloat16),
        },
        "layers": [bits[: 1 << 18].view(np.float16), bits[:8192].view(np.int64)],
        "mask": (bits[:1000] & 1).astype(bool),
        "step": np.array(7, np.int32),
    }


def flat_bytes(flat: dict) -> dict[str, bytes]:
    return {k: np.ascontiguousarray(v).tobytes() for k, v in flat.items()}


def iteration(
    tb,
    tbf,
    Writer,
    tree: dict,
    expected: dict[str, bytes],
    work: Path,
    i: int,
    have_torch: bool,
    have_jax: bool,
) -> None:
    out = tb.to_numpy(tb.to_torch(tree)) if have_torch else tb.to_numpy(tree)
    if have_jax:
        out = tb.to_numpy(tb.to_jax(out))
    assert flat_bytes(tbf.flatten_names(out)) == expected, "conversion changed bytes"
    for suffix in (".safetensors", ".npz", ".pt", ".h5"):
        p = work / f"soak{suffix}"
        tbf.save(out, p, metadata={"iteration": str(i)} if suffix != ".npz" else None)
        with tbf.open(p) as r:
            for name in r.keys():
                r.info(name)
        got = tbf.load(p)
        assert flat_bytes(got) == expected, f"{suffix} round trip changed bytes"
    tbf.save(out["enc"]["w"], work / "soak.npy")
    assert tbf.load(work / "soak.npy").tobytes() == expected["enc.w"]
    tbf.save(out, work / "sharded", format="sharded", max_shard_size=1 << 19)
    assert flat_bytes(tbf.load(work / "sharded")) == expected, "sharded round trip changed bytes"
    with Writer(work / "stream.npz") as w:
        for _ in range(4):
            w.append(x=out["enc"]["w"][:64], y=out["layers"][1][:16])
    with tbf.open(work / "stream.npz") as r:
        assert r.info("x").shape[0] == 256


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument(
        "--warmup",
        type=float,
        default=0.15,
        help="fraction of the run before the baseline sample (allocator warm-up)",
    )
    ap.add_argument("--max-growth-mb", type=float, default=32.0)
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)

    import importlib.util

    import tensorbridge as tb
    import tensorbridge.files as tbf
    from tensorbridge.writer import Writer

    have_torch = importlib.util.find_spec("torch") is not None
    have_jax = importlib.util.find_spec("jax") is not None
    if have_jax:
        import jax

        jax.config.update("jax_enable_x64", True)

    rng = np.random.default_rng(0)
    tree = make_tree(rng)
    expected = flat_bytes(tbf.flatten_names(tree))
    samples: list[dict] = []
    start = time.monotonic()
    iterations = 0
    with tempfile.TemporaryDirectory(prefix="tb-soak-") as tmp:
        work = Path(tmp)
        # one iteration first, so imports and caches are in the start figures
        iteration(tb, tbf, Writer, tree, expected, work, 0, have_torch, have_jax)
        gc.collect()
        samples.append({"t": 0.0, "iterations": 0, "rss_mb": rss_mb(), "fds": open_fds()})
        next_sample = time.monotonic() + args.interval
        while time.monotonic() - start < args.seconds:
            iterations += 1
            iteration(tb, tbf, Writer, tree, expected, work, iterations, have_torch, have_jax)
            if time.monotonic() >= next_sample:
                samples.append(
                    {
                        "t": round(time.monotonic() - start, 1),
                        "iterations": iterations,
                        "rss_mb": round(rss_mb(), 1),
                        "fds": open_fds(),
                    }
                )
                if not args.json:
                    print(
                        f"t={samples[-1]['t']:7.1f}s  iterations={iterations:6d}  "
                        f"rss={samples[-1]['rss_mb']:8.1f} MiB  fds={samples[-1]['fds']}",
                        flush=True,
                    )
                next_sample += args.interval
        leftovers = sorted(os.listdir(work))
    gc.collect()
    end = {
        "t": round(time.monotonic() - start, 1),
        "iterations": iterations,
        "rss_mb": round(rss_mb(), 1),
        "fds": open_fds(),
    }
    samples.append(end)
    base = next((s for s in samples if s["t"] >= args.warmup * args.seconds), samples[0])
    growth = end["rss_mb"] - base["rss_mb"]
    report = {
        "seconds": end["t"],
        "iterations": iterations,
        "iterations_per_s": round(iterations / max(end["t"], 1e-9), 2),
        "rss_mb": {
            "start": round(samples[0]["rss_mb"], 1),
            "after_warmup": base["rss_mb"],
            "end": end["rss_mb"],
            "max": max(s["rss_mb"] for s in samples),
        },
        "rss_growth_after_warmup_mb": round(growth, 1),
        "fds": {
            "start": samples[0]["fds"],
            "after_warmup": base["fds"],
            "end": end["fds"],
            "max": max(s["fds"] for s in samples),
        },
        "work_dir_files_at_end": leftovers,
        "frameworks": {"torch": have_torch, "jax": have_jax},
        "samples": samples,
    }
    ok = end["fds"] <= base["fds"] and growth < args.max_growth_mb
    report["verdict"] = "flat" if ok else "LEAK"
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        r = report
        print(f"\n{r['iterations']} iterations in {r['seconds']} s ({r['iterations_per_s']}/s)")
        print(
            f"RSS MiB: start {r['rss_mb']['start']}, after warm-up {r['rss_mb']['after_warmup']}, "
            f"end {r['rss_mb']['end']}, max {r['rss_mb']['max']} "
            f"(growth after warm-up {r['rss_growth_after_warmup_mb']})"
        )
        print(
            f"FDs: start {r['fds']['start']}, after warm-up {r['fds']['after_warmup']}, "
            f"end {r['fds']['end']}, max {r['fds']['max']}"
        )
        print(f"files left in the work dir: {leftovers}")
        print(f"verdict: {r['verdict']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
