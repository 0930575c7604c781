"""tb.load of a GGUF of K-quants and Q8_0 beside gguf-py's whole path (GGUFReader, then
gguf.quants.dequantize per tensor), in one process, alternating; prints medians, the ratio,
and tb.load's peak traced memory against its output. Every result is checked bit-exact.

    PYTHONPATH=src python bench/gguf_load.py [--rows 1024] [--cols 4096] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import tracemalloc

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType as Q

import tensorbridge as tb
from tensorbridge.formats.gguf_types import TYPES_BY_NAME

#: byte offsets of the float16 scales in each type's block (set to sane values, so the
#: random blocks decode to ordinary floats, not NaN, inf or subnormals)
SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def make(path: str, rows: int, cols: int, n_tokens: int) -> int:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(n_tokens)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(n_tokens)])
    w.add_array("tokenizer.ggml.token_type", [1] * n_tokens)
    for name, offsets in SCALES.items():
        t = TYPES_BY_NAME[name]
        raw = rng.integers(0, 256, (rows, cols // t.block_size, t.type_size), dtype=np.uint8)
        for off in offsets:
            raw[:, :, off : off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        w.add_tensor(f"{name}.weight", raw.reshape(rows, -1), raw_dtype=Q[name])
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    w.add_tensor("Q8_0.weight", gguf.quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return (len(SCALES) + 1) * rows * cols


def reference(path: str) -> dict[str, np.ndarray]:
    r = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in r.tensors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.gguf")
        n = make(path, a.rows, a.cols, a.tokens)
        size = os.path.getsize(path)
        ref = reference(path)
        got = tb.load(path)
        assert all(ref[k].tobytes() == got[k].tobytes() for k in ref), "not bit-exact"
        del ref, got
        times: dict[str, list[float]] = {"gguf-py": [], "tb.load": []}
        for _ in range(a.rounds):
            for name, f in (("gguf-py", reference), ("tb.load", tb.load)):
                t0 = time.perf_counter()
                out = f(path)
                times[name].append(time.perf_counter() - t0)
                del out
        tracemalloc.start()
        out = tb.load(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out_bytes = sum(v.nbytes for v in out.values())
        largest = max(v.nbytes for v in out.values())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"file {size / 2**20:.1f} MiB, {n / 1e6:.1f} M weights (Q2_K..Q6_K, Q8_0), "
        f"{a.tokens} tokens; median of {a.rounds}"
    )
    for k, v in med.items():
        print(f"  {k:8s} {v * 1e3:8.1f} ms  {n / v / 1e6:8.1f} M weights/s")
    print(f"  ratio    {med['gguf-py'] / med['tb.load']:.2f}x faster")
    print(
        f"  tb.load peak traced memory {peak / 2**20:.1f} MiB = output {out_bytes / 2**20:.1f} "
        f"MiB + {(peak - out_bytes) / 2**20:.1f} MiB (largest tensor {largest / 2**20:.1f} MiB)"
    )


if __name__ == "__main__":
    main()
