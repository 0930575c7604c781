"""The public file API (save/load/open) and the streaming Writer, through the format table."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

import tensorbridge as tb
from tensorbridge.errors import ConversionError, FileFormatError, UnsafeContentError
from tensorbridge.files import flatten_names, load, save, unflatten_names
from tensorbridge.files import open as tb_open
from tensorbridge.writer import Writer

from .formats.samples import same


def bits(dtype, shape=(3, 4), seed=0) -> np.ndarray:
    dt = np.dtype(dtype)
    raw = np.random.default_rng(seed).integers(
        0, 256, int(np.prod(shape)) * dt.itemsize, dtype=np.uint8
    )
    if dt == np.bool_:
        raw &= 1
    return raw.view(dt).reshape(shape).copy()


def tree():
    return {
        "enc": {
            "w": bits(np.float32),
            "layers": [bits(ml_dtypes.bfloat16, (2,)), bits(np.int64, ())],
        }
    }


# --- names ------------------------------------------------------------------------------


def test_flatten_and_unflatten_names():
    t = tree()
    flat = flatten_names(t)
    assert list(flat) == ["enc.w", "enc.layers.0", "enc.layers.1"]
    back = unflatten_names(flat)
    assert back["enc"]["w"] is t["enc"]["w"] and back["enc"]["layers"][1] is t["enc"]["layers"][1]
    assert flatten_names(np.zeros(1)).keys() == {"array"}
    assert unflatten_names({"a.1": 1, "a.0": 0}) == {"a": [0, 1]}
    assert unflatten_names({"a.0": 0, "a.2": 2}) == {"a": {"0": 0, "2": 2}}  # not 0..n-1


def test_unflatten_refuses_a_name_that_is_leaf_and_branch():
    with pytest.raises(ConversionError, match="'a' is also a tensor"):
        unflatten_names({"a": 1, "a.b": 2})
    with pytest.raises(ConversionError, match="other tensors are nested under"):
        unflatten_names({"a.b": 2, "a": 1})


# --- save / load ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".h5"])
def test_nested_round_trip(tmp_path, suffix):
    t = tree()
    p = tmp_path / f"m{suffix}"
    save(t, p)
    flat = load(p)
    assert sorted(flat) == ["enc.layers.0", "enc.layers.1", "enc.w"]
    back = load(p, nested=True)
    assert set(back) == {"enc"} and isinstance(back["enc"]["layers"], list)
    assert same(back["enc"]["w"], t["enc"]["w"])
    assert same(back["enc"]["layers"][0], t["enc"]["layers"][0])
    assert same(back["enc"]["layers"][1], t["enc"]["layers"][1])


def test_bare_array_to_npy_and_back(tmp_path):
    a = bits(np.float16, (5, 2))
    save(a, tmp_path / "a.npy")
    assert same(load(tmp_path / "a.npy"), a)
    assert same(np.load(tmp_path / "a.npy"), a)


def test_python_scalars_are_saved_as_0d_arrays(tmp_path):
    save({"step": 3, "lr": 0.5, "flag": True}, tmp_path / "s.npz")
    got = load(tmp_path / "s.npz")
    assert same(got["step"], np.asarray(3)) and same(got["lr"], np.asarray(0.5))
    assert same(got["flag"], np.asarray(True))


@pytest.mark.parametrize("leaf, text", [(object(), "builtins.object"), ("hello", "builtins.str")])
def test_non_tensor_leaf_is_refused_before_writing(tmp_path, leaf, text):
    p = tmp_path / "m.npz"
    with pytest.raises(ConversionError, match=rf"{text} at \['opt'\]\['x'\].*'opt.x'") as info:
        save({"w": np.zeros(2), "opt": {"x": leaf}}, p)
    assert "Fix:" in str(info.value)
    assert os.listdir(tmp_path) == []
    np.savez(p, old=np.ones(2))
    before = p.read_bytes()
    with pytest.raises(ConversionError):
        save({"w": np.zeros(2), "opt": {"x": leaf}}, p)
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["m.npz"]


def test_object_array_leaf_is_refused_with_its_path(tmp_path):
    with pytest.raises(ConversionError, match=r"at \['bad'\]"):
        save({"bad": np.array([1, "x"], dtype=object)}, tmp_path / "o.npz")
    assert os.listdir(tmp_path) == []


def test_colliding_and_unsafe_names_are_refused_before_writing(tmp_path):
    with pytest.raises(UnsafeContentError, match="'a.b' appears more than once"):
        save({"a.b": np.zeros(1), "a": {"b": np.ones(1)}}, tmp_path / "c.npz")
    with pytest.raises(UnsafeContentError, match="'..' path component"):
        save({"../evil": np.zeros(1), "y": np.zeros(1)}, tmp_path / "c.safetensors")
    assert os.listdir(tmp_path) == []


def test_options_and_metadata_are_checked_before_writing(tmp_path):
    with pytest.raises(ConversionError, match=r"\['compress'\]"):
        save({"a": np.zeros(1)}, tmp_path / "x.safetensors", compress=True)
    with pytest.raises(ConversionError, match="metadata"):
        save({"a": np.zeros(1)}, tmp_path / "x.safetensors", metadata={"k": 1})
    with pytest.raises(ConversionError, match="metadata"):
        save({"a": np.zeros(1)}, tmp_path / "x.npz", metadata={"k": "v"})
    assert os.listdir(tmp_path) == []


def test_compress_option_and_metadata_pass_through(tmp_path):
    save({"a": np.zeros(1000)}, tmp_path / "c.npz", compress=True)
    assert os.path.getsize(tmp_path / "c.npz") < 1000
    save({"a": np.zeros(3)}, tmp_path / "m.safetensors", metadata={"format": "np"})
    with tb_open(tmp_path / "m.safetensors") as r:
        assert r.metadata == {"format": "np"} and r.keys() == ["a"]


def test_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(FileFormatError, match="unknown file suffix '.xyz'"):
        save({"a": np.zeros(1)}, tmp_path / "a.xyz")


def test_torch_tensors_are_saved_and_loaded_as_torch(tmp_path):
    t = {
        "w": torch.randn(3, 4).to(torch.bfloat16),
        "b": torch.arange(3),
        "g": torch.randn(2, requires_grad=True),
    }
    save(t, tmp_path / "t.npz")
    got = load(tmp_path / "t.npz", to="torch")
    assert all(isinstance(v, torch.Tensor) for v in got.values())
    for k in t:
        assert got[k].dtype == t[k].dtype
        assert (
            got[k].contiguous().view(torch.uint8).numpy().tobytes()
            == t[k].detach().contiguous().view(torch.uint8).numpy().tobytes()
        )


def test_load_subset_and_unknown_names(tmp_path):
    save({"a": np.zeros(1), "b": np.ones(1)}, tmp_path / "s.npz")
    assert list(load(tmp_path / "s.npz", names=["b"])) == ["b"]
    with pytest.raises(FileFormatError, match="no tensor named 'c'"):
        load(tmp_path / "s.npz", names=["b", "c"])


def test_load_refuses_unknown_framework(tmp_path):
    save({"a": np.zeros(1)}, tmp_path / "s.npz")
    with pytest.raises(ConversionError, match="to='caffe'"):
        load(tmp_path / "s.npz", to="caffe")


def test_open_is_lazy_and_a_context_manager(tmp_path):
    save({"a": np.arange(6).reshape(2, 3)}, tmp_path / "s.npz")
    with tb_open(tmp_path / "s.npz") as r:
        assert r.keys() == ["a"] and r.info("a").shape == (2, 3) and "a" in r
        assert same(r["a"], np.arange(6).reshape(2, 3))


def test_numpy_only_use_imports_no_framework(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from tensorbridge.files import save, load\n"
        "from tensorbridge.writer import Writer\n"
        f"p = {str(tmp_path / 'x.npz')!r}\n"
        "save({'a': np.zeros(2)}, p); load(p)\n"
        "with Writer(p) as w: w.append(a=np.zeros(2))\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'jax') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# --- Writer --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".h5"])
def test_writer_concatenates_batches(tmp_path, suffix):
    batches = [
        {"x": bits(np.float32, (n, 3), seed=n), "y": bits(ml_dtypes.bfloat16, (n,), n)}
        for n in (2, 0, 5)
    ]
    p = tmp_path / f"out{suffix}"
    with Writer(p) as w:
        for b in batches:
            w.append(**b)
        assert any(".tb-spool-" in n for n in os.listdir(tmp_path))
    got = load(p)
    for k in ("x", "y"):
        assert same(got[k], np.concatenate([b[k] for b in batches]))
    assert os.listdir(tmp_path) == [p.name]  # spool files removed


def test_writer_npy_single_name_and_mixed_frameworks(tmp_path):
    a, b = bits(np.float64, (2, 2)), bits(np.float64, (3, 2), 1)
    with Writer(tmp_path / "o.npy") as w:
        w.append(x=a)
        w.append(x=torch.from_numpy(b))
    assert same(np.load(tmp_path / "o.npy"), np.concatenate([a, b]))


def test_writer_npy_refuses_two_names(tmp_path):
    with pytest.raises(ConversionError, match="exactly one array"):
        with Writer(tmp_path / "o.npy") as w:
            w.append(x=np.zeros(1), y=np.zeros(1))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "batch, text",
    [
        ({"x": np.zeros((1, 4), np.float64)}, "dtype float64"),
        ({"x": np.zeros((1, 5), np.float32)}, r"shape \[1, 5\].*\[N, 4\]"),
        ({"x": np.zeros((1, 4), np.float32), "z": np.zeros(1)}, "same names"),
        ({"q": np.zeros((1, 4), np.float32)}, "same names"),
        ({"x": np.zeros((), np.float32)}, "0-d tensor"),
        ({}, "empty append"),
    ],
)
def test_writer_refuses_mismatched_batches(tmp_path, batch, text):
    p = tmp_path / "m.npz"
    w = Writer(p)
    if "0-d" not in text:
        w.append(x=np.ones((2, 4), np.float32))
    with pytest.raises(ConversionError, match=text) as info:
        w.append(**batch)
    assert "Fix:" in str(info.value)
    if "0-d" not in text:
        w.append(x=np.ones((1, 4), np.float32))  # the writer is still usable
    w.close()
    assert os.listdir(tmp_path) == ["m.npz"]


def test_exception_inside_with_leaves_old_file_and_no_spool(tmp_path):
    p = tmp_path / "keep.npz"
    np.savez(p, old=np.arange(3))
    before = p.read_bytes()
    with pytest.raises(RuntimeError, match="stop"):
        with Writer(p) as w:
            w.append(x=np.ones((4, 2)))
            w.append(x=np.ones((4, 2)))
            raise RuntimeError("stop")
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.npz"]
    with pytest.raises(ConversionError, match="aborted"):
        w.append(x=np.ones((1, 2)))


def test_failing_final_write_leaves_old_file_and_no_spool(tmp_path, monkeypatch):
    from tensorbridge.formats import get_format

    p = tmp_path / "keep.safetensors"
    save({"old": np.zeros(2)}, p)
    before = p.read_bytes()

    def failing(*args, **kwargs):
        raise ConversionError("the final write failed")

    with pytest.raises(ConversionError, match="the final write failed"):
        with Writer(p) as w:
            w.append(x=np.zeros((2, 2), np.float32))
            monkeypatch.setattr(get_format("safetensors"), "write", failing)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]


@pytest.mark.parametrize(
    "suffix, dtype, example",
    [
        (".safetensors", "complex128", "complex64"),
        ("", "complex128", "complex64"),  # a sharded directory
        (".pt", "float8_e3m4", "float32"),  # PyTorch has no float8_e3m4
    ],
)
def test_writer_refuses_unwritable_dtypes_at_the_first_append(tmp_path, suffix, dtype, example):
    p = tmp_path / ("keep" + suffix)
    opts = {"format": "sharded"} if not suffix else {}
    if suffix:
        save({"old": np.zeros(2)}, p)
    before = sorted(os.listdir(tmp_path))
    w = Writer(p, **opts)
    with pytest.raises(ConversionError) as info:
        w.append(
            ok=np.zeros((2, 2), np.float32), x=np.zeros((2, 2), getattr(ml_dtypes, dtype, dtype))
        )
    text = str(info.value)
    assert f"tensor 'x' of dtype {dtype}" in text and f"files cannot hold {dtype}" in text
    assert "--dtype" not in text and f"x.astype(np.{example})" in text
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert sorted(os.listdir(tmp_path)) == before  # nothing spooled, nothing written
    w.abort()


def test_writer_holds_no_batch_in_memory(tmp_path):
    """Spooled bytes live on disk: the spool grows by each batch's size."""
    with Writer(tmp_path / "big.npz") as w:
        for i in range(3):
            w.append(x=np.full((256, 256), i, np.float32))
            spool = [n for n in os.listdir(tmp_path) if ".tb-spool-" in n]
            assert os.path.getsize(tmp_path / spool[0]) == (i + 1) * 256 * 256 * 4
    x = load(tmp_path / "big.npz")["x"]
    assert x.shape == (768, 256) and x[-1, -1] == 2


def test_new_writer_removes_spools_of_dead_processes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = int(proc.stdout)  # that process has exited
    stale = tmp_path / f".out.npz.tb-spool-{dead}-abc123"
    mine = tmp_path / f".out.npz.tb-spool-{os.getpid()}-live"
    other = tmp_path / f".other.npz.tb-spool-{dead}-abc123"
    for p in (stale, mine, other):
        p.write_bytes(b"x")
    with Writer(tmp_path / "out.npz") as w:
        w.append(x=np.zeros(2))
    assert sorted(os.listdir(tmp_path)) == sorted(["out.npz", mine.name, other.name])


def test_keys_that_cannot_round_trip_are_refused_before_writing(tmp_path):
    import tensorbridge as tb

    for key in (2.5, (1, 2)):
        with pytest.raises(tb.ConversionError, match="key"):
            tb.save({key: np.ones(1)}, tmp_path / "k.npz")
    assert not list(tmp_path.iterdir())
    tb.save({"a": [np.ones(1)], 3: np.ones(1)}, tmp_path / "k.npz")
    assert sorted(tb.load(tmp_path / "k.npz")) == ["3", "a.0"]


def test_writer_keeps_a_bounded_number_of_spool_files_open(tmp_path):
    """1100 names under an open-file limit of 256: spool files are closed and reopened."""
    code = (
        "import os, resource, numpy as np\n"
        "from tensorbridge.writer import Writer, MAX_OPEN_SPOOLS\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n"
        f"p = {str(tmp_path / 'many.safetensors')!r}\n"
        "with Writer(p) as w:\n"
        "    for i in range(2):\n"
        "        w.append(**{f't{k}': np.full((1, 2), k + i, np.float32) for k in range(1100)})\n"
        "        assert len(w._files) <= MAX_OPEN_SPOOLS == 64\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = load(tmp_path / "many.safetensors")
    assert len(got) == 1100
    for k in (0, 63, 64, 1099):
        want = np.array([[k, k], [k + 1, k + 1]], np.float32)
        assert got[f"t{k}"].tobytes() == want.tobytes()
    assert os.listdir(tmp_path) == ["many.safetensors"]


def test_writer_says_too_many_open_files(tmp_path):
    code = (
        "import os, resource, numpy as np\n"
        "from tensorbridge.writer import Writer\n"
        f"with Writer({str(tmp_path / 'warm.npz')!r}) as w: w.append(x=np.zeros((1, 2)))\n"
        f"os.remove({str(tmp_path / 'warm.npz')!r})\n"  # every module is imported now
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        f"w = Writer({str(tmp_path / 'o.npz')!r})\n"
        "held = []\n"
        "try:\n"
        "    while True: held.append(os.open(os.devnull, os.O_RDONLY))\n"
        "except OSError: pass\n"
        "try: w.append(x=np.zeros((1, 2)))\n"
        "except Exception as e: print(type(e).__name__, e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("FileFormatError")
    assert "too many open files" in proc.stdout and "ulimit -n" in proc.stdout
    assert "writable" not in proc.stdout
    assert os.listdir(tmp_path) == []


def test_load_refuses_a_string_or_repeated_names(tmp_path):
    p = tmp_path / "s.npz"
    save({"a.b": np.ones(2), "a": np.zeros(1)}, p)
    with pytest.raises(ConversionError, match=r"Fix: pass a list, e.g. names=\['a.b'\]"):
        load(p, names="a.b")
    with pytest.raises(ConversionError, match=r"names with \['a'\] given more than once"):
        load(p, names=["a", "a.b", "a"])
    assert load(p, names=["a.b"])["a.b"].tobytes() == np.ones(2).tobytes()


@pytest.mark.parametrize(
    "dest, kwargs, names, match",
    [
        ("f.npz", {"compresss": True}, ["x"], "unknown option"),
        ("f.npz", {"metadata": {"k": "v"}}, ["x"], "no place for it"),
        ("s/", {"max_shard_size": "lots"}, ["x"], "lots"),
        ("f.h5", {}, ["feat/x"], "feat/x"),
        ("f.npy", {}, ["a", "b"], "exactly one array"),
        ("f.safetensors", {}, ["__metadata__"], "reserved"),
    ],
)
def test_writer_refuses_what_the_format_cannot_write_before_spooling(
    tmp_path, dest, kwargs, names, match
):
    """Refused when the Writer is made, or at its first append: never after a long export."""
    path = str(tmp_path / dest) + ("/" if dest.endswith("/") else "")
    with pytest.raises(
        tb.ConversionError if dest != "f.safetensors" else tb.TensorBridgeError, match=match
    ):
        w = tb.Writer(path, **kwargs)
        w.append(**{n: np.ones((3, 2), np.float32) for n in names})
    assert not [n for n in os.listdir(tmp_path) if "tb-spool" in n]


def test_masked_arrays_are_refused_by_save_and_by_the_writer_without_losing_earlier_batches(
    tmp_path,
):
    masked = np.ma.masked_array(np.ones((2, 3)), mask=[[0, 1, 0], [0, 0, 0]])
    with pytest.raises(tb.ConversionError, match="mask.*Fix: fill the gaps"):
        tb.save({"x": masked}, tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()
    w = tb.Writer(tmp_path / "w.npz")
    w.append(x=np.zeros((2, 3)))
    with pytest.raises(tb.ConversionError, match="mask"):
        w.append(x=masked)
    w.append(x=np.ones((1, 3)))  # the Writer is still usable: the bad batch was refused whole
    w.close()
    assert tb.load(tmp_path / "w.npz")["x"].shape == (3, 3)


def test_a_path_ending_in_a_slash_with_a_single_file_format_is_refused(tmp_path):
    with pytest.raises(tb.ConversionError, match="names a directory.*Fix: name the file"):
        tb.save({"x": np.ones(2)}, str(tmp_path / "y") + "/", format="npz")
    assert os.listdir(tmp_path) == []


def test_a_verified_convert_of_many_shards_fits_a_small_open_file_limit(tmp_path):
    src = tmp_path / "src"
    tb.save(
        {f"t.{i:03d}": np.full(16, i, np.float32) for i in range(150)},
        str(src) + "/",
        max_shard_size="100B",
    )
    assert len(list(src.glob("*.safetensors"))) == 150
    code = f"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
from tensorbridge.cli.convert_cmd import convert_file
for check in (True, False):
    s = convert_file({str(src)!r}, {str(tmp_path / "out.safetensors")!r}, check=check)
    assert s["verified"] == (150 if check else None), s
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
