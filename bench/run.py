#!/usr/bin/env python
"""tensorbridge beside the naive way (and peers, where installed), on the CPU.

    .venv/bin/python bench/run.py                      # every case
    .venv/bin/python bench/run.py --only to_numpy_small --only tree_1000
    .venv/bin/python bench/run.py --json bench-cpu.json
    .venv/bin/python bench/run.py --only file_convert --size-mib 768

Each case runs in its own Python process, so one framework's import or
allocator state never colours another case. Per-call figures are medians of
many repeats; each repeat is a loop of ``number`` calls timed with
``time.perf_counter_ns`` after a warm-up, with the garbage collector off, and
tensorbridge and the other way alternate within every repeat. The ratio is the
median of the per-repeat ratios (tensorbridge / other). Every result is
checked for bit equality with the other way's before it is timed.

Peers (eagerpy, arraybridge) are optional. They are looked for on the normal
path and in ``--peers DIR`` (default ``/tmp/tb-peers``; make it with
``pip install --target /tmp/tb-peers --no-deps eagerpy arraybridge
metaclass-registry python-introspect``); a missing peer is reported, not faked.

No timed assertion lives in the test suite: speed is measured here only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
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

HERE = Path(__file__).resolve().parent
DEFAULT_PEERS = "/tmp/tb-peers"
MiB = 1 << 20


# --------------------------------------------------------------------------- timing

# Wall time by default. On a shared, busy machine, --clock process (CPU time of this
# process, all its threads) keeps other people's load out of single-threaded figures.
CLOCK = (
    time.process_time_ns if os.environ.get("TB_BENCH_CLOCK") == "process" else time.perf_counter_ns
)


def _loop(fn: Callable[[], Any], number: int) -> int:
    it = range(number)
    clock = CLOCK
    t0 = clock()
    for _ in it:
        fn()
    return clock() - t0


def _calibrate(fn: Callable[[], Any], batch_s: float) -> int:
    number = 1
    while True:
        ns = _loop(fn, number)
        if ns >= batch_s * 1e9 or number >= 1 << 22:
            return max(1, int(number * batch_s * 1e9 / max(ns, 1)))
        number *= 4


def time_pair(
    fa: Callable[[], Any],
    fb: Callable[[], Any],
    *,
    repeats: int = 31,
    batch_s: float = 0.01,
    warmup_s: float = 0.1,
) -> dict[str, Any]:
    """Median ns per call of ``fa`` and ``fb``, and the median per-repeat ratio a/b."""
    for fn in (fa, fb):  # warm up: caches, lazy imports, allocator pools
        end = time.perf_counter() + warmup_s
        while time.perf_counter() < end:
            fn()
    number = min(_calibrate(fa, batch_s), _calibrate(fb, batch_s))
    ta: list[float] = []
    tb: list[float] = []
    ratios: list[float] = []
    was = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            if r % 2:
                b = _loop(fb, number)
                a = _loop(fa, number)
            else:
                a = _loop(fa, number)
                b = _loop(fb, number)
            ta.append(a / number)
            tb.append(b / number)
            ratios.append(a / b)
            gc.collect()  # between repeats, never inside a timed loop
    finally:
        if was:
            gc.enable()
    return {
        "a_ns": statistics.median(ta),
        "b_ns": statistics.median(tb),
        "ratio": statistics.median(ratios),
        "number": number,
        "repeats": repeats,
    }


def same_bits(x: Any, y: Any) -> bool:
    import numpy as np

    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return bool(
        np.array_equal(
            np.ascontiguousarray(x).reshape(-1).view(np.uint8),
            np.ascontiguousarray(y).reshape(-1).view(np.uint8),
        )
    )


def row(
    case: str,
    label: str,
    other: str,
    t: dict[str, Any],
    *,
    target: float | None,
    target_text: str | None = None,
    unit: str = "us",
    **extra: Any,
) -> dict[str, Any]:
    scale = {"us": 1e3, "ms": 1e6, "s": 1e9}[unit]
    ok = None if target is None else t["ratio"] <= target
    return {
        "case": case,
        "label": label,
        "other": other,
        "unit": unit,
        "tb": t["a_ns"] / scale,
        "other_time": t["b_ns"] / scale,
        "ratio": t["ratio"],
        "target": target,
        "target_text": target_text or (f"<= {target:g}x" if target else "-"),
        "pass": ok,
        **{k: v for k, v in t.items() if k not in ("a_ns", "b_ns", "ratio")},
        **extra,
    }


# --------------------------------------------------------------------------- cases
# Each returns a list of rows; it runs in a fresh process (see main()).


def case_to_numpy_small(args: argparse.Namespace) -> list[dict]:
    import torch

    import tensorbridge as tb

    t = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    ref = t.detach().cpu().numpy()
    assert same_bits(tb.to_numpy(t), ref)
    f_tb = lambda: tb.to_numpy(t)  # noqa: E731
    rows = [
        row(
            "to_numpy_small",
            "to_numpy(4x4 torch)",
            "t.detach().cpu().numpy()",
            time_pair(f_tb, lambda: t.detach().cpu().numpy()),
            target=1.5,
        ),
        row(
            "to_numpy_small",
            "to_numpy(4x4 torch)",
            "t.numpy(force=True)",
            time_pair(f_tb, lambda: t.numpy(force=True)),
            target=None,
        ),
        row(
            "to_numpy_small",
            "to_numpy(4x4 torch)",
            "t.numpy() (raw, no safety)",
            time_pair(f_tb, lambda: t.numpy()),
            target=None,
        ),
    ]
    try:
        import eagerpy as ep

        assert same_bits(ep.astensor(t).numpy(), ref)
        rows.append(
            row(
                "to_numpy_small",
                "to_numpy(4x4 torch)",
                "eagerpy astensor(t).numpy()",
                time_pair(f_tb, lambda: ep.astensor(t).numpy()),
                target=None,
            )
        )
    except ImportError as exc:
        rows.append({"case": "to_numpy_small", "label": "peer eagerpy", "skipped": str(exc)})
    try:
        from arraybridge.converters import convert_memory
        from arraybridge.devices import HOST

        assert same_bits(convert_memory(t, "torch", "numpy", HOST), ref)
        rows.append(
            row(
                "to_numpy_small",
                "to_numpy(4x4 torch)",
                "arraybridge convert_memory(t,'torch','numpy',HOST)",
                time_pair(f_tb, lambda: convert_memory(t, "torch", "numpy", HOST)),
                target=None,
            )
        )
    except ImportError as exc:
        rows.append({"case": "to_numpy_small", "label": "peer arraybridge", "skipped": str(exc)})
    return rows


def case_to_torch_small(args: argparse.Namespace) -> list[dict]:
    import numpy as np
    import torch

    import tensorbridge as tb

    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert same_bits(tb.to_torch(a).numpy(), torch.from_numpy(a).numpy())
    return [
        row(
            "to_torch_small",
            "to_torch(4x4 ndarray)",
            "torch.from_numpy(a)",
            time_pair(lambda: tb.to_torch(a), lambda: torch.from_numpy(a)),
            target=2.0,
        )
    ]


def case_mlx_small(args: argparse.Namespace) -> list[dict]:
    import mlx.core as mx
    import numpy as np

    import tensorbridge as tb

    x = mx.arange(256, dtype=mx.float32)
    mx.eval(x)
    a = np.arange(256, dtype=np.float32)
    assert same_bits(tb.to_numpy(x), np.array(x)) and same_bits(np.array(tb.to_mlx(a)), a)
    return [
        row(
            "mlx_small",
            "to_numpy(256 mlx), a read-only view",
            "np.array(x) (copies)",
            time_pair(lambda: tb.to_numpy(x), lambda: np.array(x)),
            target=1.5,
        ),
        row(
            "mlx_small",
            "to_numpy(256 mlx), a read-only view",
            "np.asarray(x) (writable view)",
            time_pair(lambda: tb.to_numpy(x), lambda: np.asarray(x)),
            target=None,
        ),
        row(
            "mlx_small",
            "to_mlx(256 ndarray)",
            "mx.array(a)",
            time_pair(lambda: tb.to_mlx(a), lambda: mx.array(a)),
            target=1.5,
        ),
    ]


def case_tree_1000(args: argparse.Namespace) -> list[dict]:
    import torch

    import tensorbridge as tb

    d = {f"layer{i}.weight": torch.full((4,), float(i)) for i in range(1000)}
    out = tb.to_numpy(d)
    assert list(out) == list(d) and all(same_bits(out[k], d[k].numpy()) for k in d)
    nd = {k: v.numpy() for k, v in d.items()}
    out_t = tb.to_torch(nd)
    assert all(same_bits(out_t[k].numpy(), nd[k]) for k in nd)
    return [
        row(
            "tree_1000",
            "to_numpy(dict of 1000 torch)",
            "{k: v.detach().cpu().numpy() for k, v in d.items()}",
            time_pair(
                lambda: tb.to_numpy(d),
                lambda: {k: v.detach().cpu().numpy() for k, v in d.items()},
                repeats=21,
                batch_s=0.05,
            ),
            target=1.5,
        ),
        row(
            "tree_1000",
            "to_torch(dict of 1000 ndarray)",
            "{k: torch.from_numpy(v) for k, v in d.items()}",
            time_pair(
                lambda: tb.to_torch(nd),
                lambda: {k: torch.from_numpy(v) for k, v in nd.items()},
                repeats=21,
                batch_s=0.05,
            ),
            target=None,
        ),
    ]


def case_zero_copy_numpy(args: argparse.Namespace) -> list[dict]:
    import numpy as np
    import torch

    import tensorbridge as tb

    big = torch.ones(512 * MiB // 4)
    small = torch.ones(MiB // 4)
    rb = tb.to_numpy(big)
    assert np.shares_memory(rb, big.numpy()), "to_numpy copied a 512 MiB tensor"
    return [
        row(
            "zero_copy_numpy",
            "to_numpy(512 MiB torch)",
            "to_numpy(1 MiB torch)",
            time_pair(lambda: tb.to_numpy(big), lambda: tb.to_numpy(small)),
            target=1.5,
            target_text="~1x (<= 1.5x)",
        )
    ]


def case_zero_copy_jax(args: argparse.Namespace) -> list[dict]:
    import jax  # noqa: F401 - imported before the timed calls, not inside them
    import torch

    import tensorbridge as tb

    big = torch.ones(512 * MiB // 4)
    small = torch.ones(MiB // 4)
    # copy=False: by default a mutable torch buffer is copied into immutable JAX (guide)
    rb = tb.to_jax(big, copy=False)
    assert tb.shares_memory(rb, big), "torch -> jax copied a 512 MiB tensor"
    plan = str(tb.explain(big, to="jax", copy=False))
    return [
        row(
            "zero_copy_jax",
            "to_jax(512 MiB torch, copy=False), DLPack",
            "to_jax(1 MiB torch, copy=False)",
            time_pair(
                lambda: tb.to_jax(big, copy=False), lambda: tb.to_jax(small, copy=False), repeats=21
            ),
            target=1.5,
            target_text="~1x (<= 1.5x)",
            plan=plan,
        )
    ]


def _cross(
    case: str, src_label: str, make_src, tb_fn, naive_fn, naive_label: str, size_mib: int
) -> list[dict]:
    import numpy as np

    x = make_src(size_mib)
    a, b = tb_fn(x), naive_fn(x)
    assert same_bits(np.asarray(a), np.asarray(b))
    t = time_pair(lambda: tb_fn(x), lambda: naive_fn(x), repeats=11, batch_s=0.05)
    return [row(case, f"{src_label} ({size_mib} MiB fp32)", naive_label, t, target=None, unit="ms")]


def case_torch_jax(args: argparse.Namespace) -> list[dict]:
    import jax.numpy as jnp
    import torch

    import tensorbridge as tb

    return _cross(
        "torch_jax",
        "to_jax(torch)",
        lambda m: torch.rand(m * MiB // 4),
        tb.to_jax,
        lambda t: jnp.asarray(t.numpy()),
        "jnp.asarray(t.numpy())",
        64,
    )


def case_torch_tf(args: argparse.Namespace) -> list[dict]:
    import tensorflow as tf
    import torch

    import tensorbridge as tb

    return _cross(
        "torch_tf",
        "to_tf(torch)",
        lambda m: torch.rand(m * MiB // 4),
        tb.to_tf,
        lambda t: tf.constant(t.numpy()),
        "tf.constant(t.numpy())",
        64,
    )


def case_jax_numpy(args: argparse.Namespace) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import tensorbridge as tb

    def make(m: int):
        return jax.random.uniform(jax.random.PRNGKey(0), (m * MiB // 4,), dtype=jnp.float32)

    return _cross("jax_numpy", "to_numpy(jax)", make, tb.to_numpy, np.asarray, "np.asarray(x)", 64)


NAIVE_FILE = (
    "import sys, torch, safetensors.torch as st; "
    "sd = torch.load(sys.argv[1], weights_only=True, mmap=True); "
    "st.save_file(sd, sys.argv[2])"
)
MAKE_PT = (
    "import sys, torch; n = int(sys.argv[2]); g = torch.Generator().manual_seed(0); "
    "per = int(sys.argv[3]) // 4 // n; "
    "torch.save({f'layers.{i}.weight': torch.randn(per, generator=g).reshape(-1, 256) "
    "for i in range(n)}, sys.argv[1])"
)


def _timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process, after ``sync``."""
    os.sync()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if p.returncode:
        raise RuntimeError(f"{cmd} exited {p.returncode}: {err[-2000:]}")
    return wall, ru.ru_maxrss * 1024  # Linux reports KiB


def case_file_convert(args: argparse.Namespace) -> list[dict]:

    size = args.size_mib * MiB
    ntensors = 128
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"ckpt-{args.size_mib}MiB-{ntensors}.pt"
    if not src.exists():
        subprocess.run(
            [sys.executable, "-c", MAKE_PT, str(src), str(ntensors), str(size)], check=True
        )
    fsize = src.stat().st_size
    exe = Path(sys.executable).with_name("tensorbridge")
    tbcmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tensorbridge"]
    # As an installed package is: byte-compiled (pip compiles on install; an editable
    # checkout run with PYTHONDONTWRITEBYTECODE=1 would recompile on every start).
    import tensorbridge

    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(Path(tensorbridge.__file__).parent)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    out = {
        k: work / f"out-{k}{ext}"
        for k, ext in [
            ("cp", ".pt"),
            ("cp_sync", ".pt"),
            ("copyfile", ".pt"),
            ("tb", ".safetensors"),
            ("tb_noverify", ".safetensors"),
            ("naive", ".safetensors"),
        ]
    }
    cmds = {
        "cp": ["cp", str(src), str(out["cp"])],
        # the durable floor: what an atomic write must also wait for (the data on disk)
        "cp_sync": ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", str(src), str(out["cp_sync"])],
        "copyfile": [
            sys.executable,
            "-c",
            "import shutil, sys; shutil.copyfile(*sys.argv[1:3])",
            str(src),
            str(out["copyfile"]),
        ],
        "tb": tbcmd + ["convert", "-q", str(src), str(out["tb"])],
        "tb_noverify": tbcmd + ["convert", "-q", "--no-verify", str(src), str(out["tb_noverify"])],
        "naive": [sys.executable, "-c", NAIVE_FILE, str(src), str(out["naive"])],
    }
    _timed(["cat", str(src)])  # the source in the page cache for everyone alike
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in cmds}
    for _ in range(args.file_runs):
        for k, cmd in cmds.items():
            out[k].unlink(missing_ok=True)
            runs[k].append(_timed(cmd))
    # exactness: tensorbridge's file holds the same tensors, bit for bit, as the naive one
    from safetensors import safe_open

    with safe_open(str(out["tb"]), "np") as a, safe_open(str(out["naive"]), "np") as b:
        assert sorted(a.keys()) == sorted(b.keys()) and len(a.keys()) == ntensors
        for k in a.keys():
            assert same_bits(a.get_tensor(k), b.get_tensor(k)), k
    for p in out.values():
        p.unlink(missing_ok=True)

    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v))
        for k, v in runs.items()
    }
    raw = {k: [{"wall_s": w, "maxrss_bytes": r} for w, r in v] for k, v in runs.items()}
    cp_wall = med["cp"][0]

    def wall_row(k: str, label: str, target: float | None) -> dict:
        w, r = med[k]
        return {
            "case": "file_convert",
            "label": label,
            "other": "cp (wall)",
            "unit": "s",
            "tb": w,
            "other_time": cp_wall,
            "ratio": w / cp_wall,
            "target": target,
            "target_text": f"<= {target:g}x" if target else "-",
            "pass": None if target is None else w / cp_wall <= target,
            "maxrss_mib": r / MiB,
            "runs": raw[k],
        }

    def rss_row(k: str, label: str, target: float | None) -> dict:
        w, r = med[k]
        return {
            "case": "file_convert",
            "label": label,
            "other": "file size",
            "unit": "MiB",
            "tb": r / MiB,
            "other_time": fsize / MiB,
            "ratio": r / fsize,
            "target": target,
            "target_text": f"<= {target:g}x" if target else "-",
            "pass": None if target is None else r / fsize <= target,
        }

    durable = med["cp_sync"][0]

    def durable_row(k: str, label: str) -> dict:
        w = med[k][0]
        return {
            "case": "file_convert",
            "label": label,
            "other": "cp + sync (wall)",
            "unit": "s",
            "tb": w,
            "other_time": durable,
            "ratio": w / durable,
            "target": None,
            "target_text": "-",
            "pass": None,
        }

    return [
        wall_row("tb", "tensorbridge convert .pt->.safetensors", 2.0),
        wall_row("tb_noverify", "tensorbridge convert --no-verify", 2.0),
        wall_row("naive", "naive torch.load(mmap)+save_file", None),
        wall_row("copyfile", "python shutil.copyfile", None),
        wall_row("cp_sync", "cp + sync of the copy (the durable floor)", None),
        durable_row("tb", "tensorbridge convert .pt->.safetensors"),
        durable_row("tb_noverify", "tensorbridge convert --no-verify"),
        rss_row("tb", "tensorbridge convert, peak RSS", 0.5),
        rss_row("tb_noverify", "tensorbridge convert --no-verify, peak RSS", 0.5),
        rss_row("naive", "naive torch.load(mmap)+save_file, peak RSS", None),
        rss_row("cp", "cp, peak RSS", None),
        {
            "case": "file_convert",
            "label": "checkpoint",
            "info": True,
            "file_bytes": fsize,
            "tensors": ntensors,
            "cp_wall_s": cp_wall,
            "cp_sync_wall_s": durable,
            "runs_each": args.file_runs,
        },
    ]


CASES: dict[str, Callable[[argparse.Namespace], list[dict]]] = {
    "to_numpy_small": case_to_numpy_small,
    "to_torch_small": case_to_torch_small,
    "tree_1000": case_tree_1000,
    "mlx_small": case_mlx_small,
    "zero_copy_numpy": case_zero_copy_numpy,
    "zero_copy_jax": case_zero_copy_jax,
    "torch_jax": case_torch_jax,
    "torch_tf": case_torch_tf,
    "jax_numpy": case_jax_numpy,
    "file_convert": case_file_convert,
}
from routes import CASES as _ROUTE_CASES  # noqa: E402  (every route beside its plain call)

CASES.update(_ROUTE_CASES)
from formats_io import CASES as _FORMAT_CASES  # noqa: E402  (npz, sharded, gguf, zarr I/O)

CASES.update(_FORMAT_CASES)


# --------------------------------------------------------------------------- machine


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(peers: str | None) -> dict[str, Any]:
    if peers and os.path.isdir(peers) and peers not in sys.path:
        sys.path.append(peers)
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {
        d: _version(d)
        for d in (
            "tensorbridge",
            "numpy",
            "torch",
            "tensorflow",
            "tensorflow-cpu",
            "jax",
            "jaxlib",
            "ml_dtypes",
            "safetensors",
            "h5py",
            "mlx",
            "gguf",
            "zarr",
            "huggingface_hub",
            "eagerpy",
            "arraybridge",
        )
    }
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {k: v for k, v in versions.items() if v},
    }


# --------------------------------------------------------------------------- driver


def _fmt_time(v: float, unit: str) -> str:
    return f"{v:.3g} {'µs' if unit == 'us' else unit}" if unit != "MiB" else f"{v:.0f} MiB"


def print_table(rows: list[dict]) -> None:
    head = ["case", "tensorbridge", "vs", "other", "ratio", "target", "result"]
    lines = []
    for r in rows:
        if r.get("info"):
            continue
        if "skipped" in r:
            lines.append(
                [r["case"], r["label"], "-", "-", "-", "-", "skipped: " + r["skipped"][:60]]
            )
            continue
        if "error" in r:
            lines.append([r["case"], "-", "-", "-", "-", "-", "ERROR: " + r["error"][-80:]])
            continue
        res = "-" if r["pass"] is None else ("pass" if r["pass"] else "MISS")
        lines.append(
            [
                r["case"],
                f"{r['label']}: {_fmt_time(r['tb'], r['unit'])}",
                r["other"],
                _fmt_time(r["other_time"], r["unit"]),
                f"{r['ratio']:.2f}x",
                r["target_text"],
                res,
            ]
        )
    widths = (
        [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)] if lines else []
    )
    for ln in [head] + lines:
        print("  ".join(str(x).ljust(w) for x, w in zip(ln, widths, strict=True)).rstrip())


def run_case_here(name: str, args: argparse.Namespace) -> None:
    if args.peers and os.path.isdir(args.peers):
        sys.path.append(args.peers)
    rows = CASES[name](args)
    print("@@ROWS@@" + json.dumps(rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this case (repeatable, or comma-separated): " + ", ".join(CASES),
    )
    ap.add_argument("--json", metavar="PATH", help="write raw figures and machine info here")
    ap.add_argument("--size-mib", type=int, default=768, help="checkpoint size for file_convert")
    ap.add_argument("--file-runs", type=int, default=3, help="runs of each file command (median)")
    ap.add_argument(
        "--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "tensorbridge-bench")
    )
    ap.add_argument(
        "--peers", default=DEFAULT_PEERS, help="extra path where eagerpy/arraybridge live"
    )
    ap.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="time per-call loops by wall clock (default) or by this process's CPU "
        "time (steadier on a shared, loaded machine; counts every thread)",
    )
    ap.add_argument("--list", action="store_true", help="list the cases")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    if args.case:
        run_case_here(args.case, args)
        return 0
    names = [n for o in (args.only or list(CASES)) for n in o.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    os.environ["TB_BENCH_CLOCK"] = args.clock  # the case processes inherit it
    info = machine_info(args.peers)
    info["clock"] = args.clock
    print(
        f"# {info['cpu_model']}, {info['cores']} cores, Python {info['python']}, {info['date']}, "
        f"{args.clock} clock"
    )
    print("# " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    rows: list[dict] = []
    for name in names:
        child = [
            sys.executable,
            os.path.abspath(__file__),
            "--case",
            name,
            "--size-mib",
            str(args.size_mib),
            "--file-runs",
            str(args.file_runs),
            "--workdir",
            args.workdir,
            "--peers",
            args.peers or "",
        ]
        t0 = time.perf_counter()
        p = subprocess.run(child, capture_output=True, text=True)
        got = [ln for ln in p.stdout.splitlines() if ln.startswith("@@ROWS@@")]
        if p.returncode or not got:
            rows.append({"case": name, "error": (p.stderr or p.stdout).strip()[-1500:]})
            print(f"[{name}] failed:\n{(p.stderr or p.stdout)[-1500:]}", file=sys.stderr)
        else:
            rows.extend(json.loads(got[-1][len("@@ROWS@@") :]))
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print()
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
        print(f"\nraw figures: {args.json}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
