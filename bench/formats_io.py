"""tb.save / tb.load of the formats ``files_io`` leaves out (issue 10): ``.npz``, sharded
Hugging Face checkpoints, GGUF and zarr, each beside its reference writer and reader.

Registered in ``bench/run.py`` as ``formats_io`` (``--only formats_io``); it runs in its
own process like the other cases. Two state dicts, the same data for both sides:

- ``64 MiB``: 16 float32 tensors of 1024 x 1024 (4 MiB each);
- ``500 x 4 KiB``: 500 float32 tensors of 1024 values, the many-small-tensors case.

Every write is checked first: the file tensorbridge wrote, read by the reference reader,
holds the same bits as the data, and so does the reference's own file. Every load is
checked bit for bit against the reference reader's result before it is timed.

Writes: one call of each per repeat, alternating which goes first, each started with the
disk idle (``os.sync()`` before it, untimed), wall clock, as ``files_io`` times them.
tensorbridge's writes are durable (fsync of every file and the directory, atomic rename or
exchange); the references leave their bytes in the page cache. For each tensorbridge write
a row gives the time spent inside ``os.fsync`` (the union of the intervals, since a store's
files are flushed from several threads at once) against the whole save, and one the save
less that time against the reference.

Loads: ``run.time_pair`` (alternating loops, medians; ``--clock process`` times them by
CPU time), page cache warm. Each row says whether each side maps the file or copies it.
Where one side maps and the other copies, a ``load+touch`` row adds reading one byte per
4 KiB page of every tensor, so the mapping's first use is paid as the copy paid it; and a
``mmap=False`` row compares copy with copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

MiB = 1 << 20
CASE = "formats_io"


def _touch(tree: dict[str, Any]) -> int:
    """Read one byte of every 4 KiB page of every tensor (NumPy arrays or CPU tensors)."""
    import numpy as np

    total = 0
    for v in tree.values():
        a = v if isinstance(v, np.ndarray) else v.numpy()
        total += int(a.reshape(-1).view(np.uint8)[::4096].sum())
    return total


def _covered(spans: list[tuple[int, int]]) -> int:
    """Nanoseconds covered by the union of ``(start, end)`` intervals."""
    total, end = 0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def _same(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    import numpy as np
    from run import same_bits

    if list(got) != list(want) and sorted(got) != sorted(want):
        raise AssertionError(f"{what}: names differ ({sorted(got)[:3]} vs {sorted(want)[:3]})")
    for k, v in want.items():
        g = got[k]
        g = g if isinstance(g, np.ndarray) else np.asarray(g)
        if not same_bits(g, np.asarray(v)):
            raise AssertionError(f"{what}: tensor {k!r} differs")


def case_formats_io(args: argparse.Namespace) -> list[dict]:
    import gguf
    import numpy as np
    import safetensors.torch as stt
    import torch
    import zarr
    from huggingface_hub import save_torch_state_dict
    from run import row, time_pair

    import tensorbridge as tb
    from tensorbridge.formats.base import TensorInfo
    from tensorbridge.formats.zarr import _row_chunks

    rng = np.random.default_rng(0)
    sets = {
        "64 MiB": {
            f"layers.{i}.weight": rng.standard_normal((1024, 1024), dtype=np.float32)
            for i in range(16)
        },
        "500 x 4 KiB": {
            f"layers.{i}.bias": rng.standard_normal(1024, dtype=np.float32) for i in range(500)
        },
    }
    work = tempfile.mkdtemp(
        prefix="tb-bench-fmt-", dir=args.workdir if os.path.isdir(args.workdir) else None
    )
    rows: list[dict] = []
    only = set(filter(None, os.environ.get("TB_FORMATS_ONLY", "").split(",")))

    def p(name: str) -> str:
        return os.path.join(work, name)

    def error(label: str, exc: BaseException) -> None:
        rows.append({"case": CASE, "label": label, "error": f"{type(exc).__name__}: {exc}"[:300]})

    def write_pair(
        label: str,
        ftb: Callable[[], Any],
        text: str,
        fplain: Callable[[], Any],
        target: float | None,
        repeats: int,
    ) -> None:
        """One call of each per repeat, alternating which goes first, each after an
        untimed ``os.sync()``. The time tensorbridge's call spends inside ``os.fsync`` is
        recorded in the same calls: a second row gives its share of the save, a third the
        save less that time against the reference (what the write costs apart from
        durability)."""
        real = os.fsync
        spent: list[tuple[int, int]] = []  # (start, end): flushes may overlap (threads)

        def timed_fsync(fd: int) -> None:
            t0 = time.perf_counter_ns()
            try:
                real(fd)
            finally:
                spent.append((t0, time.perf_counter_ns()))

        ta: list[int] = []
        tp: list[int] = []
        fs: list[int] = []
        try:
            for r in range(repeats):
                for fn, out in ((ftb, ta), (fplain, tp)) if r % 2 else ((fplain, tp), (ftb, ta)):
                    os.sync()
                    spent.clear()
                    os.fsync = timed_fsync
                    try:
                        t0 = time.perf_counter_ns()
                        fn()
                        out.append(time.perf_counter_ns() - t0)
                    finally:
                        os.fsync = real
                    if fn is ftb:
                        fs.append(_covered(spent))
        except Exception as exc:
            error(label, exc)
            return
        t = {
            "a_ns": statistics.median(ta),
            "b_ns": statistics.median(tp),
            "ratio": statistics.median(a / b for a, b in zip(ta, tp, strict=True)),
            "number": 1,
            "repeats": repeats,
        }
        rows.append(row(CASE, label, text, t, target=target, unit="ms", io="write"))
        share = {
            "a_ns": statistics.median(fs),
            "b_ns": t["a_ns"],
            "ratio": statistics.median(f / a for f, a in zip(fs, ta, strict=True)),
            "number": 1,
            "repeats": repeats,
        }
        rows.append(row(CASE, f"fsync inside {label}", label, share, target=None, unit="ms"))
        rest = {
            "a_ns": statistics.median(a - f for a, f in zip(ta, fs, strict=True)),
            "b_ns": t["b_ns"],
            "ratio": statistics.median((a - f) / b for a, f, b in zip(ta, fs, tp, strict=True)),
            "number": 1,
            "repeats": repeats,
        }
        rows.append(row(CASE, f"{label} less its fsync time", text, rest, target=None, unit="ms"))

    def made_durable(write: Callable[[str], Any], path: str) -> Callable[[], None]:
        """The reference writer of one file given what a durable, atomic save does: write
        a temporary file, fsync it, rename it over ``path``, fsync the directory."""
        stem, ext = os.path.splitext(path)
        tmp = f"{stem}.tmp{ext}"

        def run() -> None:
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

        return run

    def fsynced(write: Callable[[], Any], root: str) -> Callable[[], None]:
        """The reference writer made durable the plain way: after it writes, fsync every
        file under ``root``, then every directory, deepest first (tensorbridge's saves
        are durable before they return; the references only fill the page cache)."""

        def run() -> None:
            write()
            dirs = []
            for here, _, files in os.walk(root):
                dirs.append(here)
                for name in files:
                    fd = os.open(os.path.join(here, name), os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            for here in reversed(dirs):
                fd = os.open(here, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

        return run

    def read_pair(
        label: str,
        ftb: Callable[[], Any],
        text: str,
        fplain: Callable[[], Any],
        target: float | None,
        sides: str,
        repeats: int = 7,
    ) -> None:
        try:
            got, ref = ftb(), fplain()
            if isinstance(ref, dict):
                _same(got, ref, label)
            elif got != ref:
                raise AssertionError(f"{label}: touched bytes sum to {got}, not {ref}")
            t = time_pair(ftb, fplain, repeats=repeats, batch_s=0.05, warmup_s=0.1)
        except Exception as exc:
            error(label, exc)
            return
        rows.append(row(CASE, label, text, t, target=target, unit="ms", io="read", sides=sides))

    def want(name: str) -> bool:
        return not only or name in only

    def one_set(tag: str, sd: dict[str, Any]) -> None:
        tsd = {k: torch.from_numpy(v) for k, v in sd.items()}
        small = tag != "64 MiB"
        wreps = 9
        sfx = tag.replace(" ", "")

        # ------------------------------------------------------------------ npz
        if want("npz"):
            a, b = p(f"a{sfx}.npz"), p(f"b{sfx}.npz")
            ac, bc = p(f"ac{sfx}.npz"), p(f"bc{sfx}.npz")
            try:
                tb.save(sd, a)
                np.savez(b, **sd)
                tb.save(sd, ac, compress=True)
                np.savez_compressed(bc, **sd)
                for f in (a, b, ac, bc):
                    with np.load(f) as z:
                        _same({k: z[k] for k in z.files}, sd, f"npz written {f}")
            except Exception as exc:
                error(f"npz {tag} setup", exc)
            else:
                lbl = f"tb.save .npz {tag}"
                write_pair(
                    lbl, lambda: tb.save(sd, a), "np.savez", lambda: np.savez(b, **sd), 1.3, wreps
                )
                write_pair(
                    f"{lbl} against a durable reference",
                    lambda: tb.save(sd, a),
                    "np.savez to a temporary file + fsync, rename, directory fsync",
                    made_durable(lambda q: np.savez(q, **sd), p(f"d{sfx}.npz")),
                    1.3,
                    wreps,
                )
                lbl = f"tb.save .npz compress=True {tag}"
                write_pair(
                    lbl,
                    lambda: tb.save(sd, ac, compress=True),
                    "np.savez_compressed",
                    lambda: np.savez_compressed(bc, **sd),
                    1.3,
                    3 if not small else 5,
                )

                def npz_ref(f: str) -> dict:
                    with np.load(f) as z:
                        return {k: z[k] for k in z.files}

                ref_text = "{k: z[k] for k in np.load(p)}"
                read_pair(
                    f"tb.load .npz {tag}",
                    lambda: tb.load(a),
                    ref_text,
                    lambda: npz_ref(a),
                    1.2,
                    "tb: default (maps stored members under a lease where >= 1 MiB); ref: copies",
                )
                read_pair(
                    f"tb.load .npz {tag}, load+touch",
                    lambda: _touch(tb.load(a)),
                    ref_text + " + touch",
                    lambda: _touch(npz_ref(a)),
                    1.2,
                    "tb: default (maps); ref: copies; one byte per page read on both sides",
                )
                read_pair(
                    f"tb.load .npz {tag}, mmap=False",
                    lambda: tb.load(a, mmap=False),
                    ref_text,
                    lambda: npz_ref(a),
                    1.2,
                    "both copy",
                )
                read_pair(
                    f"tb.load .npz (np.savez's file) {tag}",
                    lambda: tb.load(b),
                    ref_text,
                    lambda: npz_ref(b),
                    1.2,
                    "tb: default (maps members that are aligned; np.savez's are not); ref: copies",
                )
                read_pair(
                    f"tb.load .npz compressed {tag}",
                    lambda: tb.load(ac),
                    ref_text,
                    lambda: npz_ref(ac),
                    1.2,
                    "both inflate (copies)",
                    repeats=5,
                )

        # ------------------------------------------------------------------ sharded
        if want("sharded"):
            shard = 16 * MiB if not small else 512 * 1024
            da, db = p(f"sa{sfx}") + "/", p(f"sb{sfx}")
            try:
                os.makedirs(db, exist_ok=True)
                tb.save(tsd, da, max_shard_size=shard)
                save_torch_state_dict(tsd, db, max_shard_size=shard)
                n_a = len([f for f in os.listdir(da) if f.endswith(".safetensors")])
                n_b = len([f for f in os.listdir(db) if f.endswith(".safetensors")])
                if n_a != n_b:
                    raise AssertionError(f"tensorbridge wrote {n_a} shards, huggingface_hub {n_b}")
            except Exception as exc:
                error(f"sharded {tag} setup", exc)
            else:

                def sharded_ref(d: str) -> dict:
                    with open(os.path.join(d, "model.safetensors.index.json")) as f:
                        files = sorted(set(json.load(f)["weight_map"].values()))
                    out: dict = {}
                    for name in files:
                        out.update(stt.load_file(os.path.join(d, name)))
                    return out

                for d in (da, db):
                    _same({k: v.numpy() for k, v in sharded_ref(d).items()}, sd, f"sharded {d}")
                lbl = f"tb.save sharded {tag} ({n_a} shards)"
                write_pair(
                    lbl,
                    lambda: tb.save(tsd, da, max_shard_size=shard),
                    "huggingface_hub.save_torch_state_dict",
                    lambda: save_torch_state_dict(tsd, db, max_shard_size=shard),
                    1.3,
                    wreps,
                )
                write_pair(
                    f"{lbl} against a durable reference",
                    lambda: tb.save(tsd, da, max_shard_size=shard),
                    "save_torch_state_dict + fsync of every file and the directory",
                    fsynced(lambda: save_torch_state_dict(tsd, db, max_shard_size=shard), db),
                    1.3,
                    wreps,
                )
                ref_text = "safetensors.torch.load_file per shard"
                read_pair(
                    f"tb.load sharded {tag} to=torch",
                    lambda: tb.load(da, to="torch"),
                    ref_text,
                    lambda: sharded_ref(da),
                    1.2,
                    "both map (tb under a lease where the shard is >= 1 MiB)",
                )
                read_pair(
                    f"tb.load sharded {tag} to=torch, load+touch",
                    lambda: _touch(tb.load(da, to="torch")),
                    ref_text + " + touch",
                    lambda: _touch(sharded_ref(da)),
                    1.2,
                    "both map; one byte per page read on both sides",
                )

        # ------------------------------------------------------------------ gguf
        if want("gguf"):
            for dt in ("float32", "float16"):
                d16 = {k: v.astype(dt) for k, v in sd.items()}
                a, b = p(f"a{sfx}{dt}.gguf"), p(f"b{sfx}{dt}.gguf")

                def gguf_write(path: str, d: dict = d16) -> None:
                    w = gguf.GGUFWriter(path, "llama")
                    for k, v in d.items():
                        w.add_tensor(k, v)
                    w.write_header_to_file()
                    w.write_kv_data_to_file()
                    w.write_tensors_to_file()
                    w.close()

                def gguf_ref(path: str, copy: bool = True) -> dict:
                    r = gguf.GGUFReader(path)
                    return {t.name: (np.array(t.data) if copy else t.data) for t in r.tensors}

                try:
                    tb.save(d16, a)
                    gguf_write(b)
                    _same(gguf_ref(a), d16, "gguf written by tensorbridge")
                    _same(gguf_ref(b), d16, "gguf written by gguf-py")
                except Exception as exc:
                    error(f"gguf {dt} {tag} setup", exc)
                    continue  # next dtype
                lbl = f"tb.save .gguf {dt} {tag}"
                write_pair(
                    lbl,
                    lambda d=d16, a=a: tb.save(d, a),
                    "gguf.GGUFWriter (add_tensor per tensor)",
                    lambda b=b, f=gguf_write: f(b),
                    1.3,
                    wreps,
                )
                write_pair(
                    f"{lbl} against a durable reference",
                    lambda d=d16, a=a: tb.save(d, a),
                    "GGUFWriter to a temporary file + fsync, rename, directory fsync",
                    made_durable(gguf_write, p(f"d{sfx}{dt}.gguf")),
                    1.3,
                    wreps,
                )
                read_pair(
                    f"tb.load .gguf {dt} {tag}",
                    lambda a=a: tb.load(a),
                    "GGUFReader + np.array(t.data) per tensor",
                    lambda a=a, f=gguf_ref: f(a),
                    1.2,
                    "tb: default (maps under a lease where >= 1 MiB); ref: copies",
                )
                read_pair(
                    f"tb.load .gguf {dt} {tag}, load+touch",
                    lambda a=a: _touch(tb.load(a)),
                    "GGUFReader + t.data (memmap views) + touch",
                    lambda a=a, f=gguf_ref: _touch(f(a, False)),
                    1.2,
                    "both map; one byte per page read on both sides",
                )
                read_pair(
                    f"tb.load .gguf {dt} {tag}, mmap=False",
                    lambda a=a: tb.load(a, mmap=False),
                    "GGUFReader + np.array(t.data) per tensor",
                    lambda a=a, f=gguf_ref: f(a),
                    1.2,
                    "both copy",
                )

        # ------------------------------------------------------------------ zarr
        if want("zarr"):
            za, zb = p(f"a{sfx}.zarr"), p(f"b{sfx}.zarr")

            def zarr_write(path: str, d: dict = sd) -> None:
                shutil.rmtree(path, ignore_errors=True)
                g = zarr.open_group(path, mode="w")
                for k, v in d.items():
                    arr = g.create_array(
                        k,
                        shape=v.shape,
                        dtype=v.dtype,
                        chunks=_row_chunks(TensorInfo(k, "float32", v.shape), v.itemsize),
                    )
                    arr[...] = v

            def zarr_ref(path: str) -> dict:
                g = zarr.open_group(path, mode="r")
                return {k: g[k][:] for k in g.array_keys()}

            try:
                tb.save(sd, za)
                zarr_write(zb)
                _same(zarr_ref(za), sd, "zarr written by tensorbridge")
                _same(zarr_ref(zb), sd, "zarr written by zarr")
            except Exception as exc:
                error(f"zarr {tag} setup", exc)
            else:
                lbl = f"tb.save .zarr {tag}"
                zreps = 9  # (a zarr save varies by ±30% from call to call here)
                write_pair(
                    lbl,
                    lambda: tb.save(sd, za),
                    "zarr.open_group + create_array + arr[...] = v (same chunks, zstd)",
                    lambda: zarr_write(zb),
                    1.3,
                    zreps,
                )
                write_pair(
                    f"{lbl} against a durable reference",
                    lambda: tb.save(sd, za),
                    "the same zarr writes + fsync of every file and directory",
                    fsynced(lambda: zarr_write(zb), zb),
                    1.3,
                    zreps,
                )
                read_pair(
                    f"tb.load .zarr {tag}",
                    lambda: tb.load(za),
                    "{k: g[k][:] for k in g.array_keys()}",
                    lambda: zarr_ref(za),
                    1.2,
                    "both decode (copies)",
                    repeats=5,
                )

    for tag, sd in sets.items():
        one_set(tag, sd)

    shutil.rmtree(work, ignore_errors=True)
    return rows


CASES = {CASE: case_formats_io}
