"""Hostile h5/npz files read by tensorbridge and by the plain library, each in a subprocess
under a wall-clock and memory limit: outcome, seconds, peak RSS (MiB).

    PYTHONPATH=src:. python bench/hostile_h5_npz.py
"""

from __future__ import annotations

import sys
import tempfile
import zlib
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.hostile.bounded import MIB, run_bounded  # noqa: E402
from tests.hostile.test_h5_bounded import corrupt_heap  # noqa: E402
from tests.hostile.zipcraft import nested_npz, payload  # noqa: E402

TB = """
import tensorbridge.files as tbf
with tbf.open(ARGS[0]) as r:
    RESULT = sum(r.read(k).nbytes for k in r.keys())
"""
H5PY = """
import h5py
with h5py.File(ARGS[0], "r") as f:
    n = []
    f.visititems(lambda k, v: n.append(v[()].nbytes) if isinstance(v, h5py.Dataset) else None)
    n += [len(str(v)) for v in f.attrs.values()]
    RESULT = sum(n)
"""
NPLOAD = """
import numpy as np
with np.load(ARGS[0]) as z:
    RESULT = sum(z[k].nbytes for k in z.files)
"""


def build(d: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    p = d / "hang.h5"
    corrupt_heap(p)
    out["h5 corrupt global heap (2 bytes)"] = (p, H5PY)
    p = d / "links.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("w", data=np.ones(1 << 20, np.float32))
        for i in range(255):
            f[f"a{i}"] = f["w"]
    out["h5 4 MiB dataset under 256 names"] = (p, H5PY)
    p = d / "unalloc.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("real", data=np.arange(10.0))
        for i in range(2000):
            f.create_dataset(f"u{i}", shape=(500_000,), dtype="u1")
    out["h5 2000 unallocated datasets"] = (p, H5PY)
    z = zlib.compressobj(9)
    stream = b"".join(z.compress(bytes(16 * MIB)) for _ in range(16)) + z.flush()
    p = d / "inflate.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset(
            "x", shape=(1024,), chunks=(1024,), dtype="f4", compression="gzip"
        ).id.write_direct_chunk((0,), stream)
    out["h5 4 KiB dataset, 256 MiB deflate chunk"] = (p, H5PY)
    p = d / "groups.h5"
    with h5py.File(p, "w") as f:
        for i in range(4000):
            f.create_group(f"g{i}").create_dataset("b", data=np.float32(i))
    out["h5 4000 groups"] = (p, H5PY)
    p = d / "nested.npz"
    p.write_bytes(nested_npz(300, payload(MIB)))
    out["npz 300 nested overlapping members"] = (p, NPLOAD)
    p = d / "many.npz"
    np.savez(p, **{f"m{i}": np.arange(i % 7, dtype=np.float32) for i in range(50_000)})
    out["npz 50k members"] = (p, NPLOAD)
    return out


def main() -> None:
    d = Path(tempfile.mkdtemp())
    print("| file | size | plain library | tensorbridge |\n|---|---:|---|---|")
    for name, (path, plain) in build(d).items():
        cells = []
        for code in (plain, TB):
            r = run_bounded(code, [str(path)], timeout=20, mem_limit=4 << 30)
            cells.append(
                f"{r.outcome} {r.wall:.2f} s {r.peak_rss / MIB:.0f} MiB"
                if r.outcome != "timeout"
                else "hangs (killed at 20 s)"
            )
        print(f"| {name} | {path.stat().st_size / 1024:.0f} KB | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
