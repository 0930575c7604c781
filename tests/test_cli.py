"""The command line, run as users run it: in a subprocess, output piped.

Piped output must be plain text (no ANSI escapes); exit codes follow GNU
diff for ``diff`` (0 same, 1 different, 2 trouble) and 2 for every error.
Fixture files are written by the real libraries (np.savez, safetensors,
torch.save) where those are installed.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from tensorbridge.cli.diff_cmd import compare_arrays
from tensorbridge.cli.inspect_cmd import tensor_stats
from tensorbridge.console import human_bytes, natural_key, print_table
from tensorbridge.formats import format_for_path

from .formats.samples import same as same_bytes  # a test below names its result `same`

ENV = {**os.environ, "NO_COLOR": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
ENV.pop("TENSORBRIDGE_DEBUG", None)


def tb(*args: str, cwd: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "tensorbridge", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or ENV,
        timeout=120,
    )
    assert "\x1b[" not in proc.stdout, "piped output must be plain text"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def read_all(path) -> dict[str, np.ndarray]:
    with format_for_path(str(path)).open(str(path)) as r:
        return {k: r.read(k) for k in r.keys()}


ARRAYS = {
    "layer.10.w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "layer.2.w": np.array([1.5, -0.0, np.nan, np.inf], np.float32),
    "layer.1.b": np.array([-1.0, 2.0], np.float64),
    "steps": np.arange(5, dtype=np.int64),
    "mask": np.array([True, False, True]),
    "small": np.array([1, 255], np.uint8),
    "half": np.array([0.5, -65504.0], np.float16),
    "z": np.array([1 + 2j, -3j], np.complex64),
    "scalar": np.array(7, np.int32),
}


@pytest.fixture
def npz(tmp_path):
    path = tmp_path / "model.npz"
    np.savez(path, **ARRAYS)
    return path


# --- help, version, usage ------------------------------------------------------------


@pytest.mark.parametrize("cmd", [[], ["inspect"], ["convert"], ["diff"], ["doctor"], ["demo"]])
def test_help_leads_with_examples(cmd):
    proc = tb(*cmd, "--help")
    assert proc.returncode == 0
    out = proc.stdout
    assert "examples:" in out
    assert out.index("examples:") < out.index("options:")
    assert "  tensorbridge " in out[out.index("examples:") :]


def test_version_and_usage_errors():
    proc = tb("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("tensorbridge ")
    assert tb("inspect").returncode == 2  # argparse: missing FILE
    assert tb("frobnicate").returncode == 2
    assert tb("diff", "--rtol", "x", "a", "b").returncode == 2


# --- inspect -------------------------------------------------------------------------


def test_inspect_plain_table_natural_order_and_totals(npz):
    proc = tb("inspect", npz)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.index("layer.1.b") < out.index("layer.2.w") < out.index("layer.10.w")
    line = next(ln for ln in out.splitlines() if ln.startswith("layer.10.w"))
    assert line.split()[1:3] == ["float32", "[3,"] and "48 B" in line
    total = sum(a.nbytes for a in ARRAYS.values())
    assert f"total: {len(ARRAYS)} tensors" in out and f"({total} bytes)" in out


def test_inspect_json(npz):
    proc = tb("inspect", "--json", npz)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    (f,) = doc["files"]
    assert f["format"] == "npz" and f["path"] == str(npz)
    assert f["count"] == len(ARRAYS)
    assert f["total_nbytes"] == sum(a.nbytes for a in ARRAYS.values())
    by_name = {t["name"]: t for t in f["tensors"]}
    for name, a in ARRAYS.items():
        t = by_name[name]
        assert t["dtype"] == str(a.dtype) if a.dtype != bool else t["dtype"] == "bool"
        assert t["shape"] == list(a.shape) and all(type(d) is int for d in t["shape"])
        assert t["nbytes"] == a.nbytes
    assert by_name["scalar"]["shape"] == []
    names = [t["name"] for t in f["tensors"]]
    assert names.index("layer.2.w") < names.index("layer.10.w")


def test_inspect_filter_sort_and_stats(npz):
    doc = json.loads(
        tb("inspect", "--json", "--filter", "layer.*", "--sort", "size", "--stats", npz).stdout
    )
    tensors = doc["files"][0]["tensors"]
    assert [t["name"] for t in tensors] == ["layer.10.w", "layer.1.b", "layer.2.w"]
    s = {t["name"]: t["stats"] for t in tensors}["layer.2.w"]
    assert (s["min"], s["max"], s["nan"], s["inf"], s["finite"]) == (-0.0, 1.5, 1, 1, 2)
    assert s["mean"] == pytest.approx(0.75) and s["std"] == pytest.approx(0.75)
    plain = tb("inspect", "--stats", "--filter", "steps", "--filter", "mask", npz)
    assert plain.returncode == 0
    lines = plain.stdout.splitlines()
    assert "nan" in lines[1] and "std" in lines[1]
    assert not any(ln.startswith("layer") for ln in lines)
    steps = next(ln for ln in lines if ln.startswith("steps")).split()
    assert steps[-6:] == ["0", "4", "2", "1.41421", "0", "0"]


def test_stats_stream_in_chunks_and_special_dtypes(monkeypatch):
    import tensorbridge.cli.inspect_cmd as mod

    rng = np.random.default_rng(0)
    a = rng.normal(3, 2, size=10_001)
    monkeypatch.setattr(mod, "CHUNK", 97)
    s = tensor_stats(a)
    assert s["mean"] == pytest.approx(a.mean(), rel=1e-12)
    assert s["std"] == pytest.approx(a.std(), rel=1e-12)
    assert (s["min"], s["max"]) == (a.min(), a.max())
    big = np.array([2**62 + 1, -(2**62) - 3], np.int64)
    assert (tensor_stats(big)["min"], tensor_stats(big)["max"]) == (-(2**62) - 3, 2**62 + 1)
    bf = np.array([1, 2, np.nan, -np.inf], ml_dtypes.bfloat16)
    s = tensor_stats(bf)
    assert (s["min"], s["max"], s["mean"], s["nan"], s["inf"]) == (1.0, 2.0, 1.5, 1, 1)
    assert tensor_stats(np.array([True, False, True, True]))["mean"] == 0.75
    s = tensor_stats(np.array([3 + 4j, np.nan], np.complex64))
    assert (s["max"], s["nan"], s["of"]) == (5.0, 1, "abs")
    s = tensor_stats(np.zeros((0, 3), np.float32))
    assert (s["min"], s["mean"], s["std"]) == (None, None, None)


def test_inspect_safetensors_metadata_and_several_files(npz, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    st = tmp_path / "m.safetensors"
    safetensors_numpy.save_file({"b": np.ones(3, np.float32)}, str(st), metadata={"source": "test"})
    proc = tb("inspect", st, npz)
    assert proc.returncode == 0, proc.stderr
    assert "metadata:" in proc.stdout and "source: test" in proc.stdout
    assert "all 2 files:" in proc.stdout


def test_inspect_errors_exit_2(tmp_path, npz):
    missing = tb("inspect", tmp_path / "nope.npz")
    assert missing.returncode == 2
    assert missing.stderr.startswith("tensorbridge: error:") and "nope.npz" in missing.stderr
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 100)
    assert tb("inspect", garbage).returncode == 2
    unknown = tmp_path / "x.unknown"
    unknown.write_bytes(b"")
    proc = tb("inspect", unknown)
    assert proc.returncode == 2 and ".safetensors" in proc.stderr
    both = tb("inspect", npz, tmp_path / "nope.npz")  # the good file is still shown
    assert both.returncode == 2 and "layer.10.w" in both.stdout


# --- convert -------------------------------------------------------------------------


def test_convert_round_trip_npz_safetensors_pt_npz(npz, tmp_path):
    st, pt, back = tmp_path / "a.safetensors", tmp_path / "b.pt", tmp_path / "c.npz"
    for src, dst in ((npz, st), (st, pt), (pt, back)):
        proc = tb("convert", src, dst)
        assert proc.returncode == 0, proc.stderr
        assert f"verified {len(ARRAYS)} tensors" in proc.stdout
    with np.load(back, allow_pickle=False) as f:
        assert sorted(f.files) == sorted(ARRAYS)
        for name, a in ARRAYS.items():
            assert same_bytes(f[name], a), name
    torch = pytest.importorskip("torch")
    loaded = torch.load(pt, weights_only=True)
    assert same_bytes(loaded["layer.2.w"].numpy(), ARRAYS["layer.2.w"])
    assert same_bytes(loaded["z"].numpy(), ARRAYS["z"])


def test_convert_reads_files_written_by_torch_save(tmp_path):
    torch = pytest.importorskip("torch")
    pt = tmp_path / "real.pt"
    state = {"enc.w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "n": torch.tensor(3)}
    torch.save(state, pt)
    out = tmp_path / "real.safetensors"
    proc = tb("convert", pt, out)
    assert proc.returncode == 0, proc.stderr
    got = read_all(out)
    assert got["enc.w"].dtype == ml_dtypes.bfloat16
    assert (
        got["enc.w"].view(np.uint16).tobytes() == state["enc.w"].view(torch.int16).numpy().tobytes()
    )


def test_convert_dtype_casts_floats_only(npz, tmp_path):
    dst = tmp_path / "bf16.safetensors"
    proc = tb("convert", "--dtype", "bfloat16", "--json", npz, dst)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["dtype"] == "bfloat16" and summary["verified"] == len(ARRAYS)
    assert summary["cast"] == 4  # float32 x2, float64, float16; complex is not "floating"
    got = read_all(dst)
    assert got["layer.10.w"].dtype == ml_dtypes.bfloat16
    assert same_bytes(got["layer.10.w"], ARRAYS["layer.10.w"].astype(ml_dtypes.bfloat16))
    assert same_bytes(got["steps"], ARRAYS["steps"])  # int64 untouched
    assert same_bytes(got["mask"], ARRAYS["mask"])
    assert same_bytes(got["z"], ARRAYS["z"])
    bad = tb("convert", "--dtype", "int8", npz, tmp_path / "x.npz")
    assert bad.returncode == 2 and "floating" in bad.stderr
    assert not (tmp_path / "x.npz").exists()


def test_convert_include_exclude(npz, tmp_path):
    dst = tmp_path / "sub.npz"
    proc = tb("convert", "--include", "layer.*", "--include", "steps", "--exclude", "*.b", npz, dst)
    assert proc.returncode == 0, proc.stderr
    assert sorted(read_all(dst)) == ["layer.10.w", "layer.2.w", "steps"]
    assert "left out" in proc.stdout
    none = tb("convert", "--include", "nothing*", npz, tmp_path / "none.npz")
    assert none.returncode == 2 and not (tmp_path / "none.npz").exists()


def test_convert_sharded_directory(npz, tmp_path):
    out = tmp_path / "sharded"
    proc = tb("convert", "--max-shard-size", "64B", npz, f"{out}/")
    assert proc.returncode == 0, proc.stderr
    shards = sorted(p.name for p in out.iterdir() if p.name.endswith(".safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    assert tb("diff", npz, out).returncode == 0
    wrong = tb("convert", "--max-shard-size", "1GB", npz, tmp_path / "single.safetensors")
    assert wrong.returncode == 2 and "max-shard-size" in wrong.stderr
    if importlib.util.find_spec("h5py") is not None:
        back = tmp_path / "back.h5"
        proc = tb("convert", out, back)
        assert proc.returncode == 0, proc.stderr
        assert tb("diff", back, npz).returncode == 0


def test_convert_errors(npz, tmp_path):
    assert tb("convert", tmp_path / "missing.npz", tmp_path / "o.npz").returncode == 2
    assert tb("convert", npz, npz).returncode == 0  # in place (tests/test_cli_output.py)
    assert tb("convert", npz, tmp_path / "o.weird").returncode == 2


def test_verification_catches_a_corrupt_output(npz, tmp_path):
    from tensorbridge.cli.convert_cmd import convert_file, digest, verify
    from tensorbridge.errors import FileFormatError
    from tensorbridge.formats import TensorInfo, get_format

    dst = str(tmp_path / "v.safetensors")
    summary = convert_file(str(npz), dst, include=["steps"])
    assert summary["verified"] == 1 and summary["count"] == 1
    planned = [TensorInfo("steps", "int64", (5,))]
    fmt = get_format("safetensors")
    assert verify(dst, fmt, planned, {"steps": digest(ARRAYS["steps"])}) == 1
    with pytest.raises(FileFormatError, match="verification failed"):
        verify(dst, fmt, planned, {"steps": digest(ARRAYS["steps"] + 1)})
    with pytest.raises(FileFormatError, match="verification failed"):
        verify(dst, fmt, [TensorInfo("steps", "uint64", (5,))], {"steps": digest(ARRAYS["steps"])})
    assert convert_file(str(npz), dst, check=False)["verified"] is None


def test_cli_needs_no_framework_even_for_pt(tmp_path, npz):
    """inspect/convert/diff import no framework; .pt is read without torch."""
    pt = tmp_path / "m.pt"
    assert tb("convert", npz, pt).returncode == 0
    script = textwrap.dedent(f"""
        import sys
        for name in ("torch", "tensorflow", "jax", "cupy"):
            sys.modules[name] = None  # importing it now raises ImportError
        from tensorbridge.cli import main
        codes = [main(["inspect", "--stats", {str(pt)!r}]),
                 main(["convert", "-q", {str(pt)!r}, {str(tmp_path / "n.safetensors")!r}]),
                 main(["diff", "-q", {str(pt)!r}, {str(npz)!r}])]
        assert codes == [0, 0, 0], codes
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


# --- diff ----------------------------------------------------------------------------


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_diff_exit_codes(tmp_path, npz):
    same = tb("diff", npz, _npz(tmp_path / "copy.npz", **ARRAYS))
    assert same.returncode == 0, same.stderr + same.stdout
    assert "same:" in same.stdout
    changed = dict(ARRAYS, **{"layer.1.b": np.array([-1.0, 2.5])})
    diff = tb("diff", npz, _npz(tmp_path / "changed.npz", **changed))
    assert diff.returncode == 1
    assert "layer.1.b" in diff.stdout and "different" in diff.stdout
    renamed = {("renamed" if k == "steps" else k): v for k, v in ARRAYS.items()}
    names = tb("diff", npz, _npz(tmp_path / "renamed.npz", **renamed))
    assert names.returncode == 1 and "only in" in names.stdout
    assert tb("diff", npz, tmp_path / "missing.npz").returncode == 2
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    proc = tb("diff", npz, garbage)
    assert proc.returncode == 2 and proc.stderr.startswith("tensorbridge: error:")


def test_diff_json_tolerance_and_exactness(tmp_path):
    a = _npz(tmp_path / "a.npz", x=np.array([1.0, 2.0, 0.0, np.nan]), y=np.arange(3))
    b = _npz(tmp_path / "b.npz", x=np.array([1.0, 2.001, -0.0, np.nan]), y=np.arange(3))
    proc = tb("diff", "--json", a, b)
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    x = {t["name"]: t for t in doc["tensors"]}["x"]
    assert x["mismatches"] == 2  # 2.0 vs 2.001 and 0.0 vs -0.0; NaN == NaN (same bytes)
    assert x["max_abs_diff"] == pytest.approx(0.001)
    assert x["max_rel_diff"] == pytest.approx(0.001 / 2.001)
    assert doc["same"] is False and doc["exact"] is True
    assert tb("diff", "--atol", "0.01", a, b).returncode == 0
    assert tb("diff", "--rtol", "1e-3", a, b).returncode == 0
    assert tb("diff", "--rtol", "1e-5", a, b).returncode == 1


def test_diff_across_formats_and_dtype_change(npz, tmp_path):
    st = tmp_path / "m.safetensors"
    assert tb("convert", npz, st).returncode == 0
    assert tb("diff", npz, st).returncode == 0
    bf = tmp_path / "bf.safetensors"
    assert tb("convert", "--dtype", "bfloat16", npz, bf).returncode == 0
    proc = tb("diff", "--json", npz, bf)
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    w = {t["name"]: t for t in doc["tensors"]}["layer.10.w"]
    assert (w["status"], w["dtype_a"], w["dtype_b"]) == ("dtype changed", "float32", "bfloat16")
    assert w["mismatches"] == 0  # 0..11 are exact in bfloat16
    plain = tb("diff", npz, bf)
    assert "dtype changed" in plain.stdout


def test_compare_arrays_units():
    r = compare_arrays(np.array([np.nan, np.inf, 1.0]), np.array([np.nan, np.inf, np.nan]))
    assert r["mismatches"] == 1 and r["max_abs_diff"] == float("inf")
    nan1 = np.array([0x7FC00000, 0x7FC00001], np.uint32).view(np.float32)
    nan2 = np.array([0x7FC00000, 0x7FC00000], np.uint32).view(np.float32)
    assert compare_arrays(nan1, nan2)["mismatches"] == 1  # payloads differ: bytes differ
    assert compare_arrays(nan1, nan2, atol=1e-9)["mismatches"] == 0
    c = compare_arrays(np.array([1 + 1j], np.complex128), np.array([1 + 2j], np.complex128))
    assert c["mismatches"] == 1 and c["max_abs_diff"] == 1.0


def test_integers_are_compared_exactly_never_through_float64():
    big = compare_arrays(np.array([2**53 + 1], np.int64), np.array([2**53], np.int64), atol=0.5)
    assert big["mismatches"] == 1 and big["max_abs_diff"] == 1
    assert isinstance(big["max_abs_diff"], int)
    top = np.array([2**64 - 1, 7], np.uint64)
    assert compare_arrays(top, np.array([2**64 - 2, 7], np.uint64), atol=0.5)["mismatches"] == 1
    assert compare_arrays(top, np.array([2**64 - 2, 7], np.uint64), atol=1)["mismatches"] == 0
    assert compare_arrays(top, np.array([2**64 - 2, 7], np.uint64))["max_abs_diff"] == 1
    extremes = compare_arrays(
        np.array([-(2**63), 2**63 - 1], np.int64), np.array([2**63 - 1, -(2**63)], np.int64)
    )
    assert extremes["max_abs_diff"] == 2**64 - 1 and extremes["mismatches"] == 2
    mixed = compare_arrays(np.array([-1, 5], np.int64), np.array([2**64 - 1, 5], np.uint64))
    assert mixed["max_abs_diff"] == 2**64 and mixed["mismatches"] == 1  # dtype changed
    assert (
        compare_arrays(np.array([10, 20], np.int8), np.array([12, 20], np.uint16), atol=2)[
            "mismatches"
        ]
        == 0
    )
    assert compare_arrays(np.array([True, False]), np.array([1, 1], np.uint8))["mismatches"] == 1


def test_diff_of_large_integers_with_a_tolerance(tmp_path):
    a = _npz(tmp_path / "a.npz", step=np.array([2**53 + 1], np.int64))
    b = _npz(tmp_path / "b.npz", step=np.array([2**53], np.int64))
    proc = tb("diff", "--json", "--atol", "0.5", a, b)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["tensors"][0]["max_abs_diff"] == 1


def test_diff_npy_against_a_filtered_archive_pairs_the_filtered_array(tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, np.arange(4.0))
    m = _npz(tmp_path / "m.npz", a=np.zeros(4), b=np.arange(4.0))
    assert tb("diff", x, m, "--exclude", "a").returncode == 0
    assert tb("diff", m, x, "--include", "b").returncode == 0
    assert tb("diff", x, m, "--include", "a").returncode == 1


@pytest.mark.parametrize("flag", [["--atol", "nan"], ["--rtol", "-1"], ["--atol", "inf"]])
def test_diff_refuses_tolerances_that_are_not_finite_and_non_negative(tmp_path, npz, flag):
    proc = tb("diff", *flag, npz, npz)
    assert proc.returncode == 2
    assert "finite numbers >= 0" in proc.stderr and "Fix:" in proc.stderr


def test_main_maps_interrupts_and_bugs_to_exit_codes(monkeypatch, capsys):
    import tensorbridge.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    def buggy(args):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert cli.main(["diff", "a.npz", "b.npz"]) == 130
    monkeypatch.setattr(cli, "_dispatch", buggy)
    assert cli.main(["diff", "a.npz", "b.npz"]) == 2
    err = capsys.readouterr().err
    assert "interrupted" in err and "unexpected KeyError" in err and "Traceback" not in err


# --- doctor, console -----------------------------------------------------------------


def test_doctor_json():
    proc = tb("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    # TensorFlow's C++ start-up banners are held back (they print to fd 2 on import)
    assert "oneDNN" not in proc.stderr and "absl::InitializeLog" not in proc.stderr, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["numpy"] == np.__version__
    torch_installed = doc["frameworks"]["torch"]["installed"]
    assert torch_installed == (importlib.util.find_spec("torch") is not None)
    routes = {r["route"]: r for r in doc["routes"]}
    assert set(r["status"] for r in doc["routes"]) <= {"ok", "failed", "skipped"}
    if torch_installed:
        assert doc["frameworks"]["torch"]["version"]
        assert routes["numpy -> torch"]["status"] == "ok"
        assert "zero-copy" in routes["numpy -> torch"]["detail"]
    listed = doc["frameworks"]["mlx"]
    assert listed["installed"] == (importlib.util.find_spec("mlx") is not None)
    if listed["installed"]:  # MLX listed with its version and devices, and what it can do
        from importlib.metadata import version

        assert listed["version"] == version("mlx") and "cpu" in listed["devices"]
        assert routes["mlx -> numpy"]["status"] == "ok"
        assert "zero-copy" in routes["mlx -> numpy"]["detail"]
        assert routes["numpy -> mlx"]["status"] == "ok"
        assert "copies" in routes["numpy -> mlx"]["detail"]


def test_console_helpers(monkeypatch):
    assert sorted(["b.10", "b.9", "a", "b.1"], key=natural_key) == ["a", "b.1", "b.9", "b.10"]
    assert natural_key("x10y") > natural_key("x9z")
    assert human_bytes(0) == "0 B" and human_bytes(1023) == "1023 B"
    assert human_bytes(1024) == "1.0 KiB" and human_bytes(3 * 2**30) == "3.0 GiB"
    buf = io.StringIO()
    print_table(["name", "size"], [["a", "1 B"], ["long.name", "10 B"]], buf, align="lr")
    assert buf.getvalue() == "name       size\na           1 B\nlong.name  10 B\n"

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("NO_COLOR", "1")
    tty = Tty()
    print_table(["name"], [["x"]], tty)
    assert "x" in tty.getvalue() and "\x1b[3" not in tty.getvalue()  # no colour codes


def test_convert_drops_metadata_the_destination_cannot_hold(tmp_path):
    """Hugging Face files carry {"format": "pt"}; .npz has no place for it."""
    import safetensors.numpy

    src = tmp_path / "hf.safetensors"
    safetensors.numpy.save_file(
        {"w": np.arange(4, dtype=np.float32)}, str(src), metadata={"format": "pt"}
    )
    r = subprocess.run(
        [sys.executable, "-m", "tensorbridge", "convert", str(src), str(tmp_path / "hf.npz")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "left out: format" in r.stderr
    with np.load(tmp_path / "hf.npz", allow_pickle=False) as z:
        assert z["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


# --- review fixes: sharded destinations, verification, metadata ---------------------------


def _tree(directory) -> dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))}


def test_convert_refuses_a_sharded_destination_holding_the_source(tmp_path):
    from tensorbridge.cli.convert_cmd import convert_file
    from tensorbridge.errors import FileFormatError
    from tensorbridge.files import save

    d = tmp_path / "ck"
    d.mkdir()
    src = d / "model-00001-of-00001.safetensors"  # the very shard the writer would write
    save({"w": np.arange(10, dtype=np.float32)}, src)
    before = _tree(d)
    with pytest.raises(
        FileFormatError, match="lies in the destination directory.*Fix: write to a new directory"
    ):
        convert_file(str(src), str(d) + "/")
    assert _tree(d) == before

    # a shard of a sharded source: the new shard count would delete it
    d2 = tmp_path / "ck2"
    save(
        {"a": np.zeros(100, np.float32), "b": np.ones(100, np.float32)},
        d2,
        format="sharded",
        max_shard_size=400,
    )
    before = _tree(d2)
    for src, dst in [
        (d2 / "model-00002-of-00002.safetensors", str(d2) + "/"),
        (d2, str(d2 / "model.safetensors.index.json")),  # the sharded source itself
        (d2 / "model.safetensors.index.json", str(d2 / "other.safetensors.index.json")),
    ]:
        with pytest.raises(FileFormatError, match="lies in the destination directory"):
            convert_file(str(src), dst)
        assert _tree(d2) == before
    # a source elsewhere is fine
    assert convert_file(str(d2), str(tmp_path / "new") + "/")["verified"] == 2


def test_convert_verifies_the_index_it_wrote_and_refuses_another_index(tmp_path):
    from tensorbridge.cli.convert_cmd import convert_file
    from tensorbridge.errors import FileFormatError
    from tensorbridge.files import load, save

    src = tmp_path / "s.safetensors"
    save({"w": np.ones(4, np.float32)}, src)
    d = tmp_path / "d"
    d.mkdir()
    (d / "pytorch_model.bin.index.json").write_text('{"metadata": {}, "weight_map": {}}')
    before = _tree(d)
    with pytest.raises(
        FileFormatError,
        match=r"already holds another index "
        r"\['pytorch_model.bin.index.json'\].*nothing was "
        r"written.*write to a new directory",
    ):
        convert_file(str(src), str(d) + "/")
    assert _tree(d) == before

    # rewriting a directory that holds only the index the writer writes is fine, and the
    # check opens that exact index
    out = tmp_path / "out"
    assert convert_file(str(src), str(out) + "/")["verified"] == 1
    assert convert_file(str(src), str(out / "model.safetensors.index.json"))["verified"] == 1
    # a second index name in the same directory is refused
    with pytest.raises(FileFormatError, match="already holds another index"):
        convert_file(str(src), str(out / "x.safetensors.index.json"))
    assert load(out)["w"].tobytes() == np.ones(4, np.float32).tobytes()


def test_a_corrupt_copy_is_caught_as_it_lands_and_nothing_is_replaced(tmp_path, monkeypatch):
    from tensorbridge.cli.convert_cmd import convert_file
    from tensorbridge.errors import FileFormatError
    from tensorbridge.files import save
    from tensorbridge.formats import safetensors as st

    src = tmp_path / "s.safetensors"
    a = np.arange(1 << 12, dtype=np.float32)
    save({"w": a, "z": a[:10].copy()}, src)
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(b"the old destination")
    real = st.copy_span

    def corrupting(src_fd, span, dst_fd, off):
        real(src_fd, span, dst_fd, off)
        os.pwrite(dst_fd, b"\xff", off + span.nbytes - 1)

    monkeypatch.setattr(st, "copy_span", corrupting)
    with pytest.raises(FileFormatError) as info:
        convert_file(str(src), str(dst))
    text = str(info.value)
    assert "verification failed: tensor 'w'" in text
    assert "the destination was left unchanged" in text and "Fix:" in text
    assert dst.read_bytes() == b"the old destination"
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors", "s.safetensors"]


def test_a_corrupt_write_found_on_read_back_says_the_destination_was_replaced(
    tmp_path, monkeypatch
):
    from tensorbridge.cli.convert_cmd import convert_file
    from tensorbridge.errors import FileFormatError
    from tensorbridge.files import save
    from tensorbridge.formats import safetensors as st

    src = tmp_path / "s.npz"  # deflated: no byte ranges to copy, tensors pass through arrays
    a = np.arange(1 << 12, dtype=np.float32)
    save({"w": a, "z": a[:10].copy()}, src, compress=True)
    real = st.iter_le_bytes

    def corrupting(arr, *args):
        for piece in real(arr, *args):
            bad = bytearray(piece)
            bad[-1] ^= 0xFF
            yield memoryview(bad)

    monkeypatch.setattr(st, "iter_le_bytes", corrupting)
    with pytest.raises(FileFormatError) as info:
        convert_file(str(src), str(tmp_path / "o.safetensors"))
    text = str(info.value)
    assert "verification failed" in text
    assert "The destination was written and does not read back equal" in text
    assert "delete the destination" in text and "--no-verify" in text


def test_verification_pairs_a_single_tensor_by_name_unless_npy(tmp_path, monkeypatch):
    from tensorbridge.cli.convert_cmd import convert_file
    from tensorbridge.errors import FileFormatError
    from tensorbridge.files import save
    from tensorbridge.formats import get_format
    from tensorbridge.formats.base import TensorInfo

    src = tmp_path / "one.safetensors"
    a = np.arange(4, dtype=np.float32)
    save({"w": a}, src)
    assert convert_file(str(src), str(tmp_path / "one.npy"))["verified"] == 1  # "array"
    fmt = get_format("safetensors")
    real = fmt.write

    def renaming(path, infos, fetch, metadata=None, **kw):
        return real(
            path,
            [TensorInfo("WRONG", i.dtype, i.shape) for i in infos],
            lambda n: fetch(infos[0].name),
            metadata,
        )

    monkeypatch.setattr(fmt, "write", renaming)
    with pytest.raises(FileFormatError, match=r"lacks \['w'\] and has extra \['WRONG'\]"):
        convert_file(str(src), str(tmp_path / "o.safetensors"))


def test_convert_to_h5_drops_metadata_hdf5_cannot_hold(tmp_path):
    from tensorbridge.files import open as tb_open
    from tensorbridge.files import save

    src = tmp_path / "s.safetensors"
    save(
        {"w": np.arange(4, dtype=np.float32)},
        src,
        metadata={"": "e", "k\x00": "n", "v": "a\x00b", "ok": "yes"},
    )
    r = tb("convert", src, tmp_path / "o.h5")
    assert r.returncode == 0, r.stderr
    assert "note: h5 files cannot hold metadata" in r.stderr
    assert "left out: '', 'k\\x00', 'v'" in r.stderr
    with tb_open(tmp_path / "o.h5") as out:
        assert out.metadata == {"ok": "yes"}
        assert out.read("w").tobytes() == np.arange(4, dtype=np.float32).tobytes()


def test_native_stderr_is_held_back_and_replayed_on_failure():
    code = textwrap.dedent("""
        import os, sys
        from tensorbridge.native_stderr import held
        with held():
            os.write(2, b"banner from C\\n")
        print("after", file=sys.stderr, flush=True)
        try:
            with held():
                os.write(2, b"why it failed\\n")
                raise RuntimeError("import failed")
        except RuntimeError:
            pass
        os.write(2, b"fd 2 restored\\n")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "after\nwhy it failed\nfd 2 restored\n"


@pytest.mark.parametrize("columns", ["120", "80", "60"])
def test_tables_on_a_narrow_terminal_keep_names_and_every_digit(monkeypatch, columns):
    import tensorbridge.console as console

    if not console.rich_available():
        pytest.skip("rich is not installed")
    monkeypatch.setattr(console, "is_tty", lambda stream: True)
    monkeypatch.setenv("COLUMNS", columns)
    buf = io.StringIO()
    headers = ["name", "dtype", "shape", "size", "min", "max", "mean", "std", "nan", "inf"]
    rows = [
        [
            "encoder.weight",
            "uint64",
            "[2]",
            "16 B",
            "1",
            "18446744073709551615",
            "9.22337e+18",
            "9.22337e+18",
            "0",
            "0",
        ]
    ]
    print_table(headers, rows, buf, align="lllrrrrrrr")
    text = buf.getvalue()
    assert "encoder.weight" in text and "…" not in text
    tokens = text.replace("│", " ").split()
    for value in rows[0][1:]:
        assert value in " ".join(tokens), value  # whole, never folded or cut
    assert ("│" in text) == (columns == "120")  # the table when it fits, else a block


def test_errors_with_json_still_print_one_json_document(tmp_path, npz):
    missing = tmp_path / "missing.npz"
    for args in (
        ["diff", "--json", npz, missing],
        ["convert", "--json", missing, tmp_path / "o.npz"],
    ):
        proc = tb(*args)
        assert proc.returncode == 2
        doc = json.loads(proc.stdout)
        assert doc["exit_code"] == 2 and "missing.npz" in doc["error"] and "Fix:" in doc["error"]
        assert proc.stderr.startswith("tensorbridge: error:")
    proc = tb("inspect", "--json", npz, missing)
    assert proc.returncode == 2
    doc = json.loads(proc.stdout)
    assert len(doc["files"]) == 1 and doc["errors"][0]["path"] == str(missing)


def test_save_to_a_path_ending_in_a_slash_writes_a_sharded_checkpoint(tmp_path):
    import tensorbridge as tbm

    out = str(tmp_path / "new") + "/"
    tbm.save({"w": np.arange(4.0)}, out)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert tbm.load(out)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_diff_ignore_dtype_checks_values_of_an_export(tmp_path, npz):
    bf = tmp_path / "bf.safetensors"
    assert tb("convert", "--dtype", "bfloat16", npz, bf).returncode == 0
    assert tb("diff", npz, bf).returncode == 1  # the dtype changed
    proc = tb("diff", "--ignore-dtype", "--json", "--include", "layer.*", npz, bf)
    assert proc.returncode == 0, proc.stdout  # these values are exact in bfloat16
    w = {t["name"]: t for t in json.loads(proc.stdout)["tensors"]}["layer.10.w"]
    assert (w["dtype_a"], w["dtype_b"], w["status"]) == ("float32", "bfloat16", "same")
    off = _npz(tmp_path / "off.npz", **dict(ARRAYS, **{"layer.10.w": ARRAYS["layer.10.w"] + 0.5}))
    assert tb("convert", "--dtype", "bfloat16", off, tmp_path / "off.safetensors").returncode == 0
    assert (
        tb(
            "diff", "--ignore-dtype", "--include", "layer.*", npz, tmp_path / "off.safetensors"
        ).returncode
        == 1
    )
    assert tb("diff", "--ignore-dtype", npz, bf).returncode == 1  # float16 -65504 is not in bf16


def test_inspect_says_when_a_filter_matches_nothing(npz):
    proc = tb("inspect", "--filter", "no.such.*", npz)
    assert proc.returncode == 0 and "no tensor in" in proc.stderr and "no.such.*" in proc.stderr
    assert "no tensor" not in tb("inspect", "--filter", "layer.*", npz).stderr


def test_integers_beyond_float64_are_exact_against_floats_too():
    import ml_dtypes

    i = np.array([2**53 + 1, 3, -(2**60) - 1], np.int64)
    for f in (
        np.array([2.0**53, 3.0, -(2.0**60)]),
        np.array([2.0**53, 3.0, -(2.0**60)], np.float32),
    ):
        for a, b in ((i, f), (f, i)):
            r = compare_arrays(a, b)
            assert r["mismatches"] == 2 and r["max_abs_diff"] == 1.0
            assert compare_arrays(a, b, atol=1)["mismatches"] == 0
    bf = np.array([2.0**53], ml_dtypes.bfloat16)
    assert compare_arrays(np.array([2**53 + 1], np.uint64), bf)["mismatches"] == 1


def test_diff_ignore_dtype_never_calls_a_rounded_integer_the_same(tmp_path):
    a = _npz(tmp_path / "int.npz", x=np.array([2**53 + 1], np.int64))
    b = _npz(tmp_path / "float.npz", x=np.array([2.0**53]))
    assert tb("diff", "--ignore-dtype", a, b).returncode == 1


def test_inspect_lists_what_an_h5_file_holds_but_does_not_read(tmp_path):
    import h5py

    p = tmp_path / "mixed.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("w", data=np.arange(3.0))
        f.create_dataset("labels", data=["a", "b"], dtype=h5py.string_dtype())
    why = "it holds object (strings, objects, references or records), not numbers"
    proc = tb("inspect", p)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped: labels: {why}" in proc.stdout
    proc = tb("inspect", "--json", p)
    assert json.loads(proc.stdout)["files"][0]["skipped"] == {"labels": why}


def test_inspect_escapes_the_names_and_reasons_of_skipped_entries(tmp_path):
    import h5py

    p = tmp_path / "esc.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("w", data=np.arange(3.0))
        f["s\x1b[31m\nfake"] = h5py.SoftLink("/\x1b]0;title\x07")
    proc = tb("inspect", p)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    assert "skipped: s\\x1b[31m\\nfake: a soft link to '/\\x1b]0;title\\x07'" in proc.stdout


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize("cmd", ["inspect", "diff", "convert"])
def test_a_fifo_named_like_a_tensor_file_is_refused_not_waited_on(tmp_path, cmd):
    """The reader refuses a FIFO at once; the hint the CLI adds to that error must not
    open it blocking (it would wait for a writer forever)."""
    fifo = tmp_path / "pipe.npy"
    os.mkfifo(fifo)
    args = {
        "inspect": [fifo],
        "diff": [fifo, fifo],
        "convert": [fifo, tmp_path / "out.safetensors"],
    }[cmd]
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tensorbridge", cmd, *map(str, args)],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"tensorbridge {cmd} waited on a FIFO")
    assert proc.returncode == 2
    assert "not a regular file" in proc.stderr and "Fix:" in proc.stderr
