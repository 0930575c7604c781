"""Who aliases whom, and what a copy costs: the evidence behind the rule for immutable
frameworks (docs/guide.md, "Immutable frameworks"). For each call: does a write to the
source after the call show in the result, and its time for a small (1 KiB) and a large
(16 MiB) float32 input. Run: PYTHONPATH=src python bench/aliasing.py
"""

from __future__ import annotations

import timeit

import numpy as np


def aligned(n: int) -> np.ndarray:
    buf = np.empty(n + 16, np.float32)
    off = (-buf.ctypes.data % 64) // 4
    a = buf[off : off + n]
    a[:] = 1.0
    return a


def per_call(fn, n: int) -> float:
    number = 200 if n < 10_000 else 5
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    import jax
    import jax.numpy as jnp
    import tensorflow as tf
    import torch

    import tensorbridge as tb

    rows = []

    def case(name, make_src, call, write, read):
        shares = None
        times = []
        for n in (256, 4 << 20):
            src = make_src(n)
            out = call(src)
            if shares is None:
                write(src)
                shares = float(read(out)) == 5.0
            times.append(per_call(lambda src=src: call(src), n))
        rows.append((name, shares, *times))

    np_w = lambda a: a.__setitem__(0, 5.0)  # noqa: E731
    t_w = lambda t: t.__setitem__(0, 5.0)  # noqa: E731
    first = lambda r: np.asarray(r).reshape(-1)[0]  # noqa: E731
    tfirst = lambda r: r.numpy().reshape(-1)[0]  # noqa: E731
    torch_src = lambda n: torch.from_numpy(aligned(n))  # noqa: E731
    case("jnp.asarray(np)", aligned, jnp.asarray, np_w, first)
    case("jax.dlpack.from_dlpack(np)", aligned, jax.dlpack.from_dlpack, np_w, first)
    case("tf.convert_to_tensor(np)", aligned, tf.convert_to_tensor, np_w, tfirst)
    case("tb.to_jax(np) copy=None", aligned, tb.to_jax, np_w, first)
    case("tb.to_jax(np, copy=False)", aligned, lambda a: tb.to_jax(a, copy=False), np_w, first)
    case("tb.to_tf(np) copy=None", aligned, tb.to_tf, np_w, tfirst)
    case("tb.to_tf(np, copy=False)", aligned, lambda a: tb.to_tf(a, copy=False), np_w, tfirst)
    case("jax.dlpack.from_dlpack(torch)", torch_src, jax.dlpack.from_dlpack, t_w, first)
    case("jnp.asarray(torch)", torch_src, jnp.asarray, t_w, first)
    case("tf.convert_to_tensor(torch)", torch_src, tf.convert_to_tensor, t_w, tfirst)
    case("tb.to_jax(torch) copy=None", torch_src, tb.to_jax, t_w, first)
    case("tb.to_jax(torch, copy=False)", torch_src, lambda t: tb.to_jax(t, copy=False), t_w, first)
    # the other way: does a write through the torch result change the JAX/TF value?
    jsrc = lambda n: jnp.asarray(aligned(n))  # noqa: E731
    tsrc = lambda n: tf.constant(aligned(n))  # noqa: E731
    write_out = lambda r: r.__setitem__(0, 5.0)  # noqa: E731

    def case_back(name, make_src, call, read_src):
        times = []
        shares = None
        for n in (256, 4 << 20):
            src = make_src(n)
            out = call(src)
            if shares is None:
                write_out(out)
                shares = float(read_src(src)) == 5.0
            times.append(per_call(lambda src=src: call(src), n))
        rows.append((name + " (write via result)", shares, *times))

    case_back("torch.from_dlpack(jax)", jsrc, torch.from_dlpack, first)
    case_back(
        "torch.from_dlpack(tf)",
        tsrc,
        lambda t: torch.from_dlpack(tf.experimental.dlpack.to_dlpack(t)),
        tfirst,
    )
    case_back("tb.to_torch(jax) copy=None", jsrc, tb.to_torch, first)
    case_back("tb.to_torch(tf) copy=None", tsrc, tb.to_torch, tfirst)
    print(f"{'call':48} {'shares':>6} {'1 KiB µs':>10} {'16 MiB µs':>10}")
    for name, shares, small, large in rows:
        print(f"{name:48} {str(shares):>6} {small:10.1f} {large:10.1f}")


if __name__ == "__main__":
    main()
