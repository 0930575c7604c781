"""Reference matrix: every kind of tensor torch.save writes, read by tensorbridge and by
``torch.load``, compared as bytes (after torch resolves its lazy conj/neg bits); and every
dtype tensorbridge writes, read back by ``torch.load(weights_only=True)``, bytes compared.

Each file holds the whole dtype x layout grid, so one save/load per protocol covers it.
Where ``torch.load(weights_only=True)`` itself refuses a file (protocols 1, 4 and 5 with
torch 2.13: opcodes its unpickler lacks), the reference is ``weights_only=False`` on the
file this test just wrote, and the test records that torch refused it.
"""

from __future__ import annotations

import collections
import pickle
import warnings

import numpy as np
import pytest
import torch

from tensorbridge.errors import FileFormatError, UnsafeContentError
from tensorbridge.formats.pt import FORMAT, TORCH_DTYPES

from .test_pt import read_all, sample, to_torch, torch_bytes, write

DTYPES = sorted(set(TORCH_DTYPES.values()))
LEGACY_DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "float16",
    "float32",
    "float64",
    "bfloat16",
    "complex64",
    "complex128",
]
#: torch implements negation (needed to resolve a neg bit) for these only
NEGATABLE = {
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "float16",
    "float32",
    "float64",
    "bfloat16",
    "complex64",
    "complex128",
}


class _Weights(torch.nn.Parameter):
    """A Parameter subclass (its class is a global torch.load must import)."""


def grid(dtypes: list[str]) -> dict[str, torch.Tensor]:
    """Every layout torch.save records, for every dtype: views with offsets and strides,
    expanded (zero-stride) and tied storages, Parameters, requires_grad, neg/conj bits."""
    out: dict[str, torch.Tensor] = {}
    for name in dtypes:
        raw = sample(name, (4, 6), seed=len(out))
        if name.startswith("complex"):  # specials in the imaginary parts too
            half = "float32" if name == "complex64" else "float64"
            flat = raw.reshape(-1).view(lookup_dtype(half))
            flat[3::2][:3] = flat[0:6:2][:3]
        base = to_torch(raw)
        d = {
            "plain": base,
            "transposed": base.t(),
            "strided": base[1:, 1::2],
            "offset_row": base[2],
            "scalar": base[3, 5],
            "empty": base[:0],
            "expanded": base[1:2, :3].expand(5, 3),
            "tied": base,  # the same tensor under two names: one storage record
            "overlap": base.reshape(-1)[3:9],
            "size1_big_stride": torch.as_strided(base, (1, 3), (10**6, 1), 2),
        }
        if lookup_kind(name) in ("float", "complex"):
            d["param"] = torch.nn.Parameter(base[1:3].clone())
            if not name.startswith("float8"):  # torch.load cannot rebuild these (see below)
                d["requires_grad"] = base.clone().requires_grad_(True)
        if name in NEGATABLE:
            d["neg"] = torch._neg_view(base)
            d["neg_strided"] = torch._neg_view(base.t()[1:, ::2])
        if name.startswith("complex"):
            d["conj"] = base.conj()
            d["conj_strided"] = base.t()[::2].conj()
            d["conj_neg"] = torch._neg_view(base).conj()
            # a real tensor with the neg bit (of another storage: torch cannot save one
            # storage as two dtypes)
            d["conj_imag"] = base.clone().conj().imag
        out.update({f"{name}.{k}": v for k, v in d.items()})
    return out


def lookup_dtype(name: str) -> np.dtype:
    from tensorbridge.dtypes import lookup

    return lookup(name).numpy


def lookup_kind(name: str) -> str:
    from tensorbridge.dtypes import lookup

    return lookup(name).kind


def reference(path, expect_weights_only: bool) -> dict:
    """torch.load of ``path``: weights_only=True where torch accepts it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Detected pickle protocol N" warnings
        try:
            ref = torch.load(path, weights_only=True)
            accepted = True
        except pickle.UnpicklingError:
            ref = torch.load(path, weights_only=False)
            accepted = False
    assert accepted == expect_weights_only
    return ref


def check_against(path, saved: dict, ref: dict, metadata: dict | None = None) -> None:
    arrays, meta = read_all(path)
    assert list(arrays) == list(saved) and meta == (metadata or {})
    for key, t in ref.items():
        resolved = t.detach().resolve_conj().resolve_neg()
        a = arrays[key]
        assert a.shape == tuple(t.shape), key
        assert str(resolved.dtype) == f"torch.{a.dtype.name}" or a.dtype.name in str(resolved.dtype)
        for expected in (resolved, saved[key].detach().resolve_conj().resolve_neg()):
            if t.is_neg():
                assert_same_or_both_nan(a, expected, key)
            else:
                assert a.tobytes() == torch_bytes(expected), key


def assert_same_or_both_nan(a, t: torch.Tensor, key: str) -> None:
    """Bytes equal, except NaN lanes, which must be NaN in both: torch's own resolve_neg
    quiets signalling NaNs or returns its canonical NaN depending on dtype and on whether
    its loop is vectorised; tensorbridge flips the sign bit (IEEE negate) everywhere."""
    ref = np.frombuffer(torch_bytes(t), a.dtype).reshape(a.shape)
    if a.dtype.kind not in "fcV" and lookup_kind(a.dtype.name) not in ("float", "complex"):
        assert a.tobytes() == ref.tobytes(), key
        return
    parts = (
        (lambda x: x.view(f"f{a.dtype.itemsize // 2}"))
        if a.dtype.kind == "c"
        else (lambda x: x)
        if a.dtype.kind == "f"
        else (lambda x: x.astype(np.float32))
    )
    with np.errstate(all="ignore"):
        mine, theirs = parts(a), parts(ref)
        nan = np.isnan(mine)
        assert (nan == np.isnan(theirs)).all(), key
    width = mine.dtype.itemsize if a.dtype.kind == "c" else a.dtype.itemsize
    mine_bits = a.view(f"u{width}") if a.dtype.kind != "c" else mine.view(f"u{width}")
    theirs_bits = ref.view(f"u{width}") if a.dtype.kind != "c" else theirs.view(f"u{width}")
    assert (mine_bits[~nan] == theirs_bits[~nan]).all(), key


#: protocol -> does torch.load(weights_only=True) accept a file of tensors? (torch 2.13)
PROTOCOLS = {1: False, 2: True, 3: True, 4: False, 5: False}


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_every_dtype_and_layout_matches_torch_load(tmp_path, protocol):
    saved = grid(DTYPES)
    p = tmp_path / f"grid{protocol}.pt"
    torch.save(saved, p, pickle_protocol=protocol)
    check_against(p, saved, reference(p, PROTOCOLS[protocol]))


def test_float8_requiring_grad_is_read_although_torch_load_cannot_rebuild_it(tmp_path):
    w = to_torch(sample("float8_e4m3fn", (2, 3)))
    p = tmp_path / "f8.pt"
    torch.save({"p": torch.nn.Parameter(w), "g": w.clone().requires_grad_(True)}, p)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        torch.load(p, weights_only=True)
    arrays, _ = read_all(p)
    assert arrays["p"].tobytes() == arrays["g"].tobytes() == torch_bytes(w)


def test_legacy_format_matches_torch_load(tmp_path):
    saved = grid(LEGACY_DTYPES)
    p = tmp_path / "legacy.pt"
    torch.save(saved, p, _use_new_zipfile_serialization=False)
    assert p.read_bytes()[:1] == b"\x80"  # not a zip
    check_against(p, saved, reference(p, True))


def test_legacy_format_with_trailing_bytes_or_cut_is_refused(tmp_path):
    p = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(4.0)}, p, _use_new_zipfile_serialization=False)
    raw = p.read_bytes()
    p.write_bytes(raw + b"x")
    with pytest.raises(FileFormatError, match="1 bytes after its last storage"):
        FORMAT.open(str(p))
    p.write_bytes(raw[:-1])
    with pytest.raises(FileFormatError, match="legacy .*cut off"):
        FORMAT.open(str(p))


def test_nested_containers_parameters_and_ordered_dict_state(tmp_path):
    w = to_torch(sample("float32", (3, 2)))
    sd = collections.OrderedDict(a=torch.nn.Parameter(w), b=w.t().conj())
    sd._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    p = tmp_path / "sd.pt"
    torch.save({"model": sd, "opt": {"lr": 0.1, "steps": [1, 2]}}, p)
    loaded = torch.load(p, weights_only=True)
    assert loaded["model"]._metadata == sd._metadata  # torch keeps it; tensorbridge drops it
    check_against(
        p,
        {"model.a": w, "model.b": w.t().conj()},
        {"model.a": loaded["model"]["a"], "model.b": loaded["model"]["b"]},
        {"opt.lr": "0.1", "opt.steps.0": "1", "opt.steps.1": "2"},
    )


def test_tensors_and_parameters_with_python_attributes(tmp_path):
    """torch.save writes _rebuild_from_type_v2 / _rebuild_parameter_with_state for them;
    the attributes change no value and are dropped (torch.load keeps them)."""
    t = to_torch(sample("complex64", (3,)))
    t.note = "x"
    w = torch.nn.Parameter(to_torch(sample("float32", (2,))))
    w.tag = 5
    p = tmp_path / "attrs.pt"
    torch.save({"t": t, "w": w, "c": t.conj()}, p)
    ref = reference(p, True)
    assert ref["t"].note == "x" and ref["w"].tag == 5
    check_against(p, {"t": t, "w": w, "c": t.conj()}, ref)


def test_devices_in_metadata_and_the_first_rebuild_function(tmp_path):
    from .test_pt import make_zip

    p = tmp_path / "dev.pt"
    torch.save(
        {"w": torch.ones(2), "where": torch.device("cuda", 1), "cpu": torch.device("cpu")}, p
    )
    assert torch.load(p, weights_only=True)["where"] == torch.device("cuda:1")
    arrays, meta = read_all(p)
    assert list(arrays) == ["w"] and meta == {"where": "cuda:1", "cpu": "cpu"}
    # torch._utils._rebuild_tensor (no requires_grad/hooks), which weights_only allows
    pkl = (
        b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor\n((X\x07\x00\x00\x00"
        b"storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQK\x01"
        b"K\x01\x85K\x01\x85tRs."
    )
    make_zip(p, pkl, {"0": np.array([1, 2], np.float32).tobytes()})
    assert (
        torch_bytes(torch.load(p, weights_only=True)["w"])
        == read_all(p)[0]["w"].tobytes()
        == np.array([2], np.float32).tobytes()
    )


def test_conj_checkpoint_converts_to_safetensors_with_the_right_signs(tmp_path):
    """The silent-corruption example: convert's verification used the same reader."""
    from safetensors.torch import load_file

    from tensorbridge.cli.convert_cmd import convert_file

    z = torch.tensor([1 + 2j, -3 - 4j], dtype=torch.complex64)
    src, dst = tmp_path / "c.pt", tmp_path / "c.safetensors"
    torch.save(
        {"c": z.conj(), "n": torch._neg_view(z.clone().real), "i": z.clone().conj().imag}, src
    )
    convert_file(str(src), str(dst))
    out = load_file(str(dst))
    assert torch_bytes(out["c"]) == torch_bytes(z.conj().resolve_conj())
    assert out["i"].tolist() == [-2.0, 4.0] and out["n"].tolist() == [-1.0, 3.0]


# --- what torch.save writes that tensorbridge refuses, with the reason and a fix ----------


def _f4() -> torch.Tensor:
    return torch.zeros(2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)


REFUSED = {
    "complex32": (
        lambda: torch.ones(2, dtype=torch.complex32),
        (
            r"a tensor of dtype torch.complex32, which tensorbridge does not support.*"
            r"t.to\(torch.complex64\), which keeps both parts"
        ),
    ),
    "float4": (_f4, r"a tensor of dtype torch.float4_e2m1fn_x2.*t.view\(torch.uint8\)"),
    "bits8": (
        lambda: torch.zeros(2, dtype=torch.uint8).view(torch.bits8),
        r"a tensor of dtype torch.bits8.*t.view\(torch.uint8\)",
    ),
    "quantized": (
        lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8),
        r"a quantized tensor.*t.dequantize\(\)",
    ),
    "sparse_coo": (lambda: torch.eye(3).to_sparse(), r"a sparse tensor.*t.to_dense\(\)"),
    "sparse_csr": (lambda: torch.eye(3).to_sparse_csr(), r"a sparse tensor.*t.to_dense\(\)"),
    "nested": (
        lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
        r"a nested tensor.*unbind",
    ),
    "meta": (
        lambda: torch.empty(2, device="meta"),
        r"a meta tensor, which has a shape but no data.*to_empty",
    ),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_tensors_tensorbridge_does_not_read_are_named_with_a_fix(tmp_path, kind):
    make, match = REFUSED[kind]
    p = tmp_path / f"{kind}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "experimental", "deprecated"
        torch.save({"ok": torch.ones(1), "x": make()}, p)
        torch.load(p, weights_only=True)  # torch itself accepts the file
    with pytest.raises(FileFormatError, match=f"the entry 'x' is {match}") as err:
        FORMAT.open(str(p))
    text = str(err.value)
    assert not isinstance(err.value, UnsafeContentError) and "could run" not in text


class Mine(torch.Tensor):
    """A tensor subclass: torch.save records its class, which loading must import."""


def test_tensor_subclass_is_refused_naming_its_class(tmp_path):
    p = tmp_path / "sub.pt"
    torch.save({"x": torch.ones(2).as_subclass(Mine), "y": _Weights(torch.ones(1))}, p)
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(p, weights_only=True)
    with pytest.raises(
        UnsafeContentError,
        match=r"tensor subclass '.*Mine'.*"
        r"t.as_subclass\(torch.Tensor\)",
    ):
        FORMAT.open(str(p))


def test_unknown_math_state_and_backward_hooks_are_refused(tmp_path):
    from .test_pt import make_zip, tensor_pickle

    base = tensor_pickle(b"K\x01\x85", b"K\x01\x85")
    hooks = base.replace(b"ccollections\nOrderedDict\n)R", b"}X\x01\x00\x00\x00hK\x01s")
    p = tmp_path / "h.pt"
    make_zip(p, hooks, {"0": b"\0" * 4})
    with pytest.raises(UnsafeContentError, match="backward hooks"):
        FORMAT.open(str(p))
    meta = base.replace(b")RtR", b")R}X\x04\x00\x00\x00zero\x88stR")
    make_zip(p, meta, {"0": b"\0" * 4})
    with pytest.raises(FileFormatError, match=r"state \['zero'\].*may change its values"):
        FORMAT.open(str(p))
    conj_real = base.replace(b")RtR", b")R}X\x04\x00\x00\x00conj\x88stR")
    make_zip(p, conj_real, {"0": b"\0" * 4})
    with pytest.raises(FileFormatError, match="float32 tensor has the conjugate bit"):
        FORMAT.open(str(p))


# --- tensorbridge writes, torch.load(weights_only=True) reads --------------------------


@pytest.mark.parametrize("mmap", [False, True])
def test_tensorbridge_files_of_every_dtype_load_in_torch_bit_exactly(tmp_path, mmap):
    arrays = {}
    for i, name in enumerate(DTYPES):
        arrays[f"{name}.m"] = sample(name, (3, 5), seed=i)
        arrays[f"{name}.s"] = sample(name, (), seed=i)
        arrays[f"{name}.e"] = sample(name, (0, 2), seed=i)
    p = tmp_path / "tb.pt"
    write(p, arrays)
    loaded = torch.load(p, weights_only=True, mmap=mmap)
    assert list(loaded) == list(arrays)
    for key, a in arrays.items():
        t = loaded[key]
        assert tuple(t.shape) == a.shape and str(t.dtype) == f"torch.{key.split('.')[0]}"
        assert torch_bytes(t) == a.tobytes(), key
    # and tensorbridge reads its own file back unchanged
    back, _ = read_all(p)
    assert all(back[k].tobytes() == a.tobytes() for k, a in arrays.items())


def test_the_matrix_covers_every_dtype_torch_can_save_or_refuses_it():
    """A dtype torch gains later must be added to the tables (read or refused)."""
    from tensorbridge.formats.pt_pickle import OPAQUE_DTYPES

    known = set(TORCH_DTYPES) | set(OPAQUE_DTYPES)
    torch_dtypes = {n for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)}
    assert torch_dtypes - known == set(), sorted(torch_dtypes - known)


# --- load(mmap=True): which .pt tensors are mapped, and that the others stay right ---------


def _mapped(a) -> bool:
    import mmap

    base = a
    while getattr(base, "base", None) is not None:
        base = base.base
    return isinstance(getattr(base, "obj", base), mmap.mmap)  # a memoryview of the map


@pytest.mark.parametrize("legacy", [False, True])
def test_mmap_maps_plain_views_and_copies_what_read_must_change(tmp_path, legacy):
    """Contiguous runs of stored records (offset views included) are mapped; conj/neg,
    transposed and byteswapped tensors are copied with their values resolved."""
    import tensorbridge as tb

    base = to_torch(sample("float32", (4, 6)))
    z = to_torch(sample("complex64", (5,), seed=3))
    saved = {"w": base, "row": base[2], "t": base.t(), "c": z.conj(), "n": torch._neg_view(z)}
    p = tmp_path / "m.pt"
    torch.save(saved, p, _use_new_zipfile_serialization=not legacy)
    got = tb.load(p, mmap=True)
    ref = torch.load(p, weights_only=True)
    for key, t in ref.items():
        assert got[key].tobytes() == torch_bytes(t.resolve_conj().resolve_neg()), key
    # legacy records start at any offset: only the aligned ones can be mapped
    if not legacy:
        assert _mapped(got["w"]) and _mapped(got["row"])
    assert not any(_mapped(got[k]) for k in ("t", "c", "n"))
