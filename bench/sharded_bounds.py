"""Time and peak RSS of hostile and large-but-valid JSON in safetensors headers and sharded
indexes, each opened in a fresh subprocess (tests/hostile/bounded.py) under a 2 GiB
address-space limit. Prints a markdown table (docs/reliability.md, section 6).

Usage::

    PYTHONPATH=src:. python bench/sharded_bounds.py
"""

from __future__ import annotations

import json
import os
import struct
import tempfile

from tests.hostile.bounded import MIB, run_bounded

OPEN = "import tensorbridge as tb\nwith tb.open(ARGS[0]) as r:\n    RESULT = len(r.keys())"


def st_file(path: str, header: bytes, data: bytes = b"") -> str:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
    return path


def index_dir(
    path: str,
    index: bytes,
    shard_header: bytes = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}    ',
    data: bytes = b"\0" * 4,
) -> str:
    os.mkdir(path)
    st_file(os.path.join(path, "s1.safetensors"), shard_header, data)
    with open(os.path.join(path, "model.safetensors.index.json"), "wb") as f:
        f.write(index)
    return path


def main() -> None:
    d = tempfile.mkdtemp(prefix="tb-bounds-")
    amplifiers = {
        "32 MiB of `[],` (empty lists)": b'{"a":[' + b"[]," * ((32 * MIB) // 3) + b"[]]}",
        "32 MiB of nesting `[[[...]]]`": b'{"a":' + b"[" * (16 * MIB) + b"]" * (16 * MIB) + b"}",
        "32 MiB of `{},` (empty objects)": b'{"a":[' + b"{}," * ((32 * MIB) // 3) + b"{}]}",
    }
    n = 100_000
    names = [f"layers.{i}.w" for i in range(n)]
    dense = {
        k: {"dtype": "U8", "shape": [], "data_offsets": [i, i + 1]} for i, k in enumerate(names)
    }
    dense_header = json.dumps(dense, separators=(",", ":")).encode()
    dense_header += b" " * (-len(dense_header) % 8)
    rows = []
    for i, (label, raw) in enumerate(amplifiers.items()):
        rows.append((f"safetensors header: {label}", st_file(f"{d}/h{i}.safetensors", raw)))
        rows.append((f"sharded index: {label}", index_dir(f"{d}/i{i}", raw)))
    rows.append(
        (
            f"valid safetensors header of {n} 0-d tensors ({len(dense_header) >> 20} MiB)",
            st_file(f"{d}/dense.safetensors", dense_header, bytes(n)),
        )
    )
    rows.append(
        (
            f"valid index of {n} names in one shard",
            index_dir(
                f"{d}/big",
                json.dumps({"weight_map": {k: "s1.safetensors" for k in names}}).encode(),
                dense_header,
                bytes(n),
            ),
        )
    )
    print("| input | outcome | wall | peak RSS |")
    print("|---|---|---:|---:|")
    for label, path in rows:
        r = run_bounded(OPEN, [path], timeout=120, mem_limit=2 << 30)
        what = (
            r.outcome
            if r.outcome != "refused"
            else f"refused ({r.detail.split(': ', 1)[1][:48]}...)"
        )
        print(f"| {label} | {what} | {r.wall:.2f} s | {r.peak_rss / MIB:.0f} MiB |")


if __name__ == "__main__":
    main()
