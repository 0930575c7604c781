"""``tensorbridge diff A B``: compare two tensor files by name, across formats.

With ``--rtol 0 --atol 0`` (the default) tensors of the same dtype are
compared bit-exactly, as bytes: NaN payloads and the sign of zero count.
Otherwise an element matches when ``|a - b| <= atol + rtol * |b|`` (NumPy's
``isclose``, NaN equal to NaN). Tensors whose dtype changed are compared by
value after widening both to float64 (complex128), and the dtype change is
reported. Exit status as GNU diff: 0 same, 1 different, 2 trouble.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from ..console import clip, echo, format_number, natural_key, print_table
from ..dtypes import canonical_name, lookup
from ..errors import ConversionError
from ..formats import get_format
from .common import CHUNK, emit_json, open_file, select

__all__ = ["compare_arrays", "diff_files", "run"]

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bits(c: np.ndarray) -> np.ndarray:
    """One unsigned integer per element (two for 16-byte complex) for byte comparison."""
    c = np.ascontiguousarray(c)
    if c.dtype.byteorder not in "=|":
        c = c.astype(c.dtype.newbyteorder("="))
    size = c.dtype.itemsize
    if size in _UINT:
        return c.view(_UINT[size])
    return c.view(np.uint64).reshape(c.size, size // 8)


def _widen(c: np.ndarray, wide: type) -> np.ndarray:
    kind = lookup(canonical_name(c.dtype)).kind
    if kind == "bool":
        c = c.astype(np.uint8)
    elif kind == "float" and c.dtype.type.__module__ != "numpy":
        c = c.astype(np.float32)  # bfloat16 / float8 (ml_dtypes) via float32
    return c.astype(wide)


def _same_value(wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """Equal values with the same sign of zero, or both NaN (per element)."""
    if np.iscomplexobj(wa):
        return _same_value(wa.real, wb.real) & _same_value(wa.imag, wb.imag)
    both_nan = np.isnan(wa) & np.isnan(wb)
    return both_nan | ((wa == wb) & (np.signbit(wa) == np.signbit(wb)))


def _int_abs_diff(ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Exact ``|a - b|`` of two integer (or bool) chunks: uint64, or Python ints for
    int64 against uint64 (no 64-bit type holds that difference)."""
    common = np.result_type(ca.dtype, cb.dtype)
    if common.kind == "b":
        common = np.dtype(np.uint8)
    if common.kind not in "iu":  # int64 with uint64: NumPy would go through float64
        oa, ob = ca.astype(object), cb.astype(object)
        return np.abs(oa - ob)
    xa, xb = ca.astype(common), cb.astype(common)
    hi, lo = np.maximum(xa, xb), np.minimum(xa, xb)
    # modulo 2**64 the difference is exact: it is below 2**64 for same-width integers
    return hi.astype(np.uint64) - lo.astype(np.uint64)


def _huge_int_diffs(ca: np.ndarray, cb: np.ndarray) -> dict[int, float]:
    """``{position: exact |a - b|}`` where one side is an integer of magnitude 2**53 or
    more and the other a float: float64 cannot hold such integers, so ``2**53 + 1`` would
    compare equal to ``2.0**53``. Empty in every other case (the usual one)."""
    kinds = [lookup(canonical_name(c.dtype)).kind for c in (ca, cb)]
    exact, inexact = ("int", "uint"), ("float", "complex")
    if not (kinds[0] in exact and kinds[1] in inexact or kinds[0] in inexact and kinds[1] in exact):
        return {}
    ints, floats = (ca, cb) if kinds[0] in exact else (cb, ca)
    if floats.dtype.type.__module__ != "numpy":  # bfloat16 / float8: exact in float32
        floats = floats.astype(np.float32)
    big = np.nonzero(np.abs(ints.astype(np.float64)) >= 2.0**53)[0]
    out: dict[int, float] = {}
    for k in big:  # rare: only integers beyond float64's exact range
        f = complex(floats[k]) if floats.dtype.kind == "c" else float(floats[k])
        if isinstance(f, complex):
            f = f.real if f.imag == 0 else float("inf")
        out[int(k)] = abs(int(ints[k]) - int(f)) if np.isfinite(f) else float("inf")
    return out


def compare_arrays(
    a: np.ndarray, b: np.ndarray, *, rtol: float = 0.0, atol: float = 0.0
) -> dict[str, Any]:
    """Max abs/rel difference and mismatch count of two same-shape arrays.

    Streams in chunks. ``max_abs_diff`` treats NaN vs NaN and equal infinities
    as 0 and a NaN vs a number as inf; ``max_rel_diff`` is relative to ``|b|``.
    Integer (and bool) arrays are compared with exact integer arithmetic, never
    through float64 (which cannot tell ``2**53 + 1`` from ``2**53``);
    ``max_abs_diff`` is then an int.

    >>> r = compare_arrays(np.array([1.0, 2.0]), np.array([1.0, 2.5]))
    >>> r["mismatches"], r["max_abs_diff"], r["max_rel_diff"]
    (1, 0.5, 0.2)
    """
    exact = rtol == 0 and atol == 0
    same_dtype = canonical_name(a.dtype) == canonical_name(b.dtype)
    wide = np.complex128 if (np.iscomplexobj(a) or np.iscomplexobj(b)) else np.float64
    fa, fb = a.reshape(-1), b.reshape(-1)
    ints = a.dtype.kind in "iub" and b.dtype.kind in "iub"
    mismatches, max_abs, max_rel = 0, (0 if ints else 0.0), 0.0
    with np.errstate(all="ignore"):
        for start in range(0, fa.size, CHUNK):
            ca, cb = fa[start : start + CHUNK], fb[start : start + CHUNK]
            if ints:
                exact_d = _int_abs_diff(ca, cb)
                fd = exact_d.astype(np.float64)
                scale = np.abs(cb.astype(np.float64))
                rel = np.where(fd == 0, 0.0, np.where(scale == 0, np.inf, fd / scale))
                if exact_d.size:
                    max_abs = max(max_abs, int(exact_d.max()))
                    max_rel = max(max_rel, float(rel.max()))
                bad = exact_d != 0 if exact else fd > atol + rtol * scale
                mismatches += int(np.count_nonzero(bad))
                continue
            wa, wb = _widen(ca, wide), _widen(cb, wide)
            d = np.abs(wa - wb)
            equal = (wa == wb) | (np.isnan(wa) & np.isnan(wb))
            d[equal] = 0.0
            d[np.isnan(d)] = np.inf
            huge = _huge_int_diffs(ca, cb)  # integers float64 cannot hold exactly
            for k, big in huge.items():
                d[k] = float(big)
            scale = np.abs(wb)
            rel = np.where(d == 0, 0.0, np.where(scale == 0, np.inf, d / scale))
            if d.size:
                max_abs = max(max_abs, float(d.max()))
                max_rel = max(max_rel, float(rel.max()))
            if exact and same_dtype:
                bad = _bits(ca) != _bits(cb)
                if bad.ndim == 2:
                    bad = bad.any(axis=1)
            elif exact:
                bad = ~_same_value(wa, wb)
            else:
                bad = ~np.isclose(wa, wb, rtol=rtol, atol=atol, equal_nan=True)
            for k, big in huge.items():
                bad[k] = big != 0 if exact else big > atol + rtol * abs(float(cb[k]))
            mismatches += int(np.count_nonzero(bad))
    return {"mismatches": mismatches, "max_abs_diff": max_abs, "max_rel_diff": max_rel}


def _stored(info: Any) -> str | None:
    """The stored type of a tensor kept in blocks (GGUF's ``"Q4_K"``); None otherwise."""
    doc = info.to_json()
    stored = doc.get("stored_type")
    return stored if doc.get("stored_nbytes", info.nbytes) != info.nbytes else None


def _same_blocks(a: tuple[Any, str, Any], b: tuple[Any, str, Any]) -> bool | None:
    """Whether two tensors stored in the same quantised type have identical blocks; None
    when they are not both such tensors."""
    (reader_a, fmt_a, ia), (reader_b, fmt_b, ib) = a, b
    if not _stored(ia) or _stored(ia) != _stored(ib):
        return None
    format_a, format_b = get_format(fmt_a), get_format(fmt_b)
    if format_a.stored_blocks(ia) is None or format_b.stored_blocks(ib) is None:
        return None
    blocks_a = format_a.read_blocks(reader_a, ia.name)
    blocks_b = format_b.read_blocks(reader_b, ib.name)
    return bool(blocks_a.shape == blocks_b.shape and np.array_equal(blocks_a, blocks_b))


def _dequantizable(reader: Any, name: str) -> bool:
    """Whether reading ``name`` gives values (not "no known dequantisation")."""
    try:
        reader.read_slice(name, slice(0, 0))
    except ConversionError:
        return False
    return True


def diff_files(
    path_a: str,
    path_b: str,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    ignore_dtype: bool = False,
    format_a: str | None = None,
    format_b: str | None = None,
) -> dict[str, Any]:
    """The document ``diff --json`` prints; ``"same"`` decides the exit status.

    ``ignore_dtype``: a tensor whose dtype changed counts as the same when its
    values match (e.g. a bfloat16 export checked against float32 with a tolerance);
    its entry still says ``"dtype_a"``/``"dtype_b"``."""
    reader_a, fmt_a = open_file(path_a, format_a, flag="--format-a")
    with reader_a:
        reader_b, fmt_b = open_file(path_b, format_b, flag="--format-b")
        with reader_b:
            # an .npy file's one array has no name of its own: filters pick the other side's
            def named(reader: Any, fmt: str) -> list[str]:
                keys = reader.keys()
                return keys if fmt == "npy" else select(keys, include, exclude)

            names_a, names_b = named(reader_a, fmt_a), named(reader_b, fmt_b)
            if "npy" in (fmt_a, fmt_b) and len(names_a) == len(names_b) == 1:
                renamed = {names_a[0]: names_b[0]}  # B's one array, as filtered
                names_b = names_a
            else:
                renamed = {}
            set_a, set_b = set(names_a), set(names_b)
            only_a = sorted(set_a - set_b, key=natural_key)
            only_b = sorted(set_b - set_a, key=natural_key)
            tensors = []
            for name in sorted(set_a & set_b, key=natural_key):
                name_b = renamed.get(name, name)
                ia, ib = reader_a.info(name), reader_b.info(name_b)
                entry: dict[str, Any] = {
                    "name": name,
                    "dtype_a": ia.dtype,
                    "dtype_b": ib.dtype,
                    "shape_a": list(ia.shape),
                    "shape_b": list(ib.shape),
                }
                stored_a, stored_b = _stored(ia), _stored(ib)
                if stored_a or stored_b:  # GGUF blocks: say what each side stores
                    entry["stored_type_a"], entry["stored_type_b"] = stored_a, stored_b
                if ia.shape != ib.shape:
                    entry["status"] = "shape changed"
                elif (blocks := _same_blocks((reader_a, fmt_a, ia), (reader_b, fmt_b, ib))) or (
                    blocks is False and not _dequantizable(reader_a, name)
                ):
                    # the same quantised blocks are the same values, found without
                    # dequantising; for a type nothing dequantises, blocks are all there is
                    none = {"max_abs_diff": None, "max_rel_diff": None}
                    zero = {"max_abs_diff": 0.0, "max_rel_diff": 0.0}
                    entry.update(
                        mismatches=0 if blocks else None,
                        status="same" if blocks else "different",
                        **(zero if blocks else none),
                    )
                else:
                    a, b = reader_a.read(name), reader_b.read(name_b)
                    entry.update(compare_arrays(a, b, rtol=rtol, atol=atol))
                    del a, b
                    if ia.dtype != ib.dtype and not (ignore_dtype and not entry["mismatches"]):
                        entry["status"] = "dtype changed"
                    else:
                        entry["status"] = "different" if entry["mismatches"] else "same"
                tensors.append(entry)
            meta_a, meta_b = dict(reader_a.metadata or {}), dict(reader_b.metadata or {})
            # entries that are not tensors (strings, records, links...): never compared
            skipped_a, skipped_b = dict(reader_a.skipped), dict(reader_b.skipped)
    changed = [t for t in tensors if t["status"] != "same"]
    return {
        "a": path_a,
        "b": path_b,
        "format_a": fmt_a,
        "format_b": fmt_b,
        "rtol": rtol,
        "atol": atol,
        "exact": rtol == 0 and atol == 0,
        "only_in_a": only_a,
        "only_in_b": only_b,
        "tensors": tensors,
        "compared": len(tensors),
        "different": len(changed),
        "metadata_differs": meta_a != meta_b,
        "not_tensors_a": skipped_a,
        "not_tensors_b": skipped_b,
        "same": not (only_a or only_b or changed),
    }


def _render(doc: dict[str, Any]) -> None:
    out = sys.stdout
    a, b = doc["a"], doc["b"]
    echo(f"--- {a} ({doc['format_a']})", out)
    echo(f"+++ {b} ({doc['format_b']})", out)
    for label, names in ((a, doc["only_in_a"]), (b, doc["only_in_b"])):
        if names:
            echo(f"only in {label}: {len(names)}", out)
            for n in names:
                echo(f"  {n}", out)
    changed = [t for t in doc["tensors"] if t["status"] != "same"]
    if changed:
        rows = []
        for t in changed:
            da = f"{t.get('stored_type_a') or t['dtype_a']}{t['shape_a']}".replace(" ", "")
            db = f"{t.get('stored_type_b') or t['dtype_b']}{t['shape_b']}".replace(" ", "")
            rows.append(
                [
                    t["name"],
                    t["status"],
                    da,
                    db,
                    format_number(t.get("max_abs_diff")),
                    format_number(t.get("max_rel_diff")),
                    format_number(t.get("mismatches")),
                ]
            )
        out.flush()
        print_table(
            ["name", "status", "a", "b", "max abs", "max rel", "mismatches"],
            rows,
            out,
            align="llllrrr",
        )
    if doc["metadata_differs"]:
        echo("note: the files' metadata differ (not counted as a difference)", out)
    for label, skipped in (("A", doc["not_tensors_a"]), ("B", doc["not_tensors_b"])):
        if skipped:
            names = list(skipped)
            one = len(names) == 1
            echo(
                f"note: {label} holds {len(names)} entr{'y' if one else 'ies'} that "
                f"{'is not a tensor' if one else 'are not tensors'}, not compared: "
                + ", ".join(clip(repr(n), 60) for n in names[:10])
                + (" ..." if len(names) > 10 else ""),
                out,
            )
    mode = "bit-exact" if doc["exact"] else f"rtol={doc['rtol']:g}, atol={doc['atol']:g}"
    if doc["same"]:
        word = "tensor matches" if doc["compared"] == 1 else "tensors match"
        echo(f"same: {doc['compared']} {word} ({mode})", out)
    else:
        echo(
            f"different: {doc['different']} of {doc['compared']} common tensors differ "
            f"({mode}), {len(doc['only_in_a'])} only in A, "
            f"{len(doc['only_in_b'])} only in B",
            out,
        )


def run(args: argparse.Namespace) -> int:
    if not (
        args.rtol >= 0 and args.atol >= 0 and np.isfinite(args.rtol) and np.isfinite(args.atol)
    ):  # NaN fails every comparison: refuse it too
        echo(
            f"tensorbridge: error: --rtol {args.rtol:g} --atol {args.atol:g}: tolerances must "
            "be finite numbers >= 0. Fix: pass e.g. --atol 1e-6 --rtol 1e-5, or leave them "
            "out for a bit-exact comparison.",
            sys.stderr,
        )
        return 2
    doc = diff_files(
        args.a,
        args.b,
        rtol=args.rtol,
        atol=args.atol,
        ignore_dtype=args.ignore_dtype,
        include=args.include,
        exclude=args.exclude,
        format_a=args.format_a,
        format_b=args.format_b,
    )
    if args.json:
        emit_json(doc)
    elif not args.quiet:
        _render(doc)
    return 0 if doc["same"] else 1
