"""tb.load of a GGUF of K-quants and Q8_0 beside gguf-py's whole path (GGUFReader, then
gguf.quants.dequantize per tensor), in one process, alternating; prints medians, the ratio,
tb.load's peak traced memory against its output, and per type the ratio of reading one
tensor (gguf-py: dequantize of GGUFReader's tensor; tensorbridge: reader.read). Every result
is checked bit-exact. NumPy only: nothing here imports torch.

    PYTHONPATH=src python bench/gguf_load.py [--rows 1024] [--cols 4096] [--rounds 5]
        [--tokens 32000]
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


def per_tensor(path: str, rounds: int) -> dict[str, tuple[float, float]]:
    """Median seconds per tensor: gguf-py's dequantize of an open GGUFReader's tensor, and
    tensorbridge's read of an open reader, alternating."""
    ref = gguf.GGUFReader(path)
    times: dict[str, tuple[list[float], list[float]]] = {}
    with tb.open(path) as r:
        for _ in range(rounds):
            for t in ref.tensors:
                a, b = times.setdefault(t.name, ([], []))
                t0 = time.perf_counter()
                x = gguf.quants.dequantize(t.data, t.tensor_type)
                a.append(time.perf_counter() - t0)
                del x
                t0 = time.perf_counter()
                x = r.read(t.name)
                b.append(time.perf_counter() - t0)
                del x
    return {k: (statistics.median(a), statistics.median(b)) for k, (a, b) in times.items()}


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
        cpu: dict[str, list[float]] = {"gguf-py": [], "tb.load": []}
        for _ in range(a.rounds):
            for name, f in (("gguf-py", reference), ("tb.load", tb.load)):
                c0, t0 = time.process_time(), time.perf_counter()
                out = f(path)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                del out
        tracemalloc.start()
        out = tb.load(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out_bytes = sum(v.nbytes for v in out.values())
        largest = max(v.nbytes for v in out.values())
        del out
        per_type = per_tensor(path, a.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(
        f"file {size / 2**20:.1f} MiB, {n / 1e6:.1f} M weights (Q2_K..Q6_K, Q8_0), "
        f"{a.tokens} tokens; median of {a.rounds}"
    )
    for k, v in med.items():
        print(f"  {k:8s} {v * 1e3:8.1f} ms  {n / v / 1e6:8.1f} M weights/s")
    print(f"  ratio    {med['gguf-py'] / med['tb.load']:.2f}x faster")
    print(
        f"  CPU time (process, median): gguf-py {med_cpu['gguf-py'] * 1e3:.1f} ms, tb.load "
        f"{med_cpu['tb.load'] * 1e3:.1f} ms, ratio {med_cpu['gguf-py'] / med_cpu['tb.load']:.2f}x"
    )
    print(
        f"  tb.load peak traced memory {peak / 2**20:.1f} MiB = output {out_bytes / 2**20:.1f} "
        f"MiB + {(peak - out_bytes) / 2**20:.1f} MiB (largest tensor {largest / 2**20:.1f} MiB)"
    )
    print("  per tensor (median ms, gguf-py / tensorbridge):")
    for k, (ref_s, tb_s) in per_type.items():
        print(f"    {k:12s} {ref_s * 1e3:7.2f} {tb_s * 1e3:7.2f}  {ref_s / tb_s:5.2f}x")
    print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
