"""Reference matrices for the Hugging Face formats, compared as bytes.

- transformers: tiny models built from a config (no download) are saved with
  ``save_pretrained`` (one file, sharded, variants; ``safe_serialization`` True and False)
  and read by tensorbridge; checkpoints tensorbridge writes are loaded by ``from_pretrained``.
- safetensors: files of ``safetensors.torch``/``safetensors.numpy`` ``save_file`` (every
  dtype they have, 0-d and empty shapes) read by ``tb.load``; ``tb.save``'s files read by
  ``safe_open``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch

import tensorbridge as tb
from tensorbridge.dtypes import DTYPES

from .samples import sample

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def tbytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tiny(kind: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    if kind == "gpt2":  # tied lm_head: save_pretrained stores one of the two names
        config = transformers.GPT2Config(
            n_layer=2,
            n_embd=16,
            n_head=2,
            vocab_size=64,
            n_positions=8,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "llama":
        config = transformers.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            vocab_size=64,
            max_position_embeddings=16,
            tie_word_embeddings=False,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.BertConfig(
            num_hidden_layers=1,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=64,
            max_position_embeddings=16,
        )
        model = transformers.BertModel(config)
    return model.to(dtype).eval()


def check_against_state_dict(loaded: dict, model) -> None:
    """Every stored tensor is the state_dict's, as bytes; what is not stored is tied."""
    sd = model.state_dict()
    assert loaded and set(loaded) <= set(sd)
    for name, arr in loaded.items():
        assert arr.tobytes() == tbytes(sd[name]), name
        assert arr.dtype.name == str(sd[name].dtype).replace("torch.", ""), name
        assert tuple(arr.shape) == tuple(sd[name].shape), name
    stored = {sd[n].data_ptr() for n in loaded}
    assert all(sd[n].data_ptr() in stored for n in set(sd) - set(loaded)), "untied name missing"


SAVES = [
    ("gpt2", torch.float32, {}),
    ("gpt2", torch.float32, {"max_shard_size": "20KB"}),
    ("llama", torch.bfloat16, {"max_shard_size": "10KB", "variant": "bf16"}),
    ("llama", torch.float16, {"variant": "fp16"}),
    ("bert", torch.float32, {"max_shard_size": "8KB", "safe_serialization": False}),
    ("bert", torch.float16, {"safe_serialization": False, "variant": "fp16"}),
]


@pytest.mark.parametrize("kind, dtype, kwargs", SAVES, ids=lambda x: str(x))
def test_save_pretrained_checkpoints_read_exactly(tmp_path, kind, dtype, kwargs):
    model = tiny(kind, dtype)
    try:
        model.save_pretrained(tmp_path, **kwargs)
    except TypeError:  # a transformers without safe_serialization= (it always writes safetensors)
        kwargs = {k: v for k, v in kwargs.items() if k != "safe_serialization"}
        model.save_pretrained(tmp_path, **kwargs)
    variant = kwargs.get("variant")
    if "max_shard_size" in kwargs:
        assert len([n for n in os.listdir(tmp_path) if "-of-" in n]) > 1  # really sharded
    check_against_state_dict(tb.load(tmp_path, variant=variant), model)
    with tb.open(tmp_path, variant=variant) as r:
        assert "total_size" not in r.metadata


def test_variant_beside_plain_files_is_chosen_by_name(tmp_path):
    plain, half = tiny("llama"), tiny("llama", torch.float16)
    plain.save_pretrained(tmp_path, max_shard_size="20KB")
    half.save_pretrained(tmp_path, max_shard_size="20KB", variant="fp16")
    check_against_state_dict(tb.load(tmp_path), plain)
    check_against_state_dict(tb.load(tmp_path, variant="fp16"), half)


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_from_pretrained_loads_what_tensorbridge_writes(tmp_path, variant):
    model = tiny("llama", torch.float16 if variant else torch.float32)
    sd = model.state_dict()
    target = tmp_path if variant is None else tmp_path / "model.safetensors.index.fp16.json"
    tb.save(dict(sd), str(target) + ("/" if variant is None else ""), max_shard_size="10KB")
    model.config.save_pretrained(tmp_path)
    index = (
        "model.safetensors.index.json" if variant is None else "model.safetensors.index.fp16.json"
    )
    assert len(set(json.loads((tmp_path / index).read_text())["weight_map"].values())) > 1
    again = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, variant=variant, torch_dtype=model.dtype
    )
    got = again.state_dict()
    assert set(got) == set(sd)
    for name, t in sd.items():
        assert tbytes(got[name]) == tbytes(t), name


# --- safetensors ---------------------------------------------------------------------


def _torch_dtype(name: str):
    return getattr(torch, name, None)


ST = [d.name for d in DTYPES.values() if d.safetensors and _torch_dtype(d.name) is not None]
SHAPES = [(), (0,), (2, 0), (3, 4)]


def _tensor(name: str, shape, seed: int) -> torch.Tensor:
    a = sample(name, shape, seed)
    if a.dtype.isbuiltin == 2:  # ml_dtypes: through same-width unsigned ints
        return torch.from_numpy(a.view(f"u{a.itemsize}").copy()).view(_torch_dtype(name))
    return torch.from_numpy(a.copy())


def test_safetensors_torch_files_read_exactly_every_dtype_and_shape(tmp_path):
    tensors = {f"{n}.{i}": _tensor(n, s, i) for n in ST for i, s in enumerate(SHAPES)}
    p = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, str(p), metadata={"who": "reference"})
    got = tb.load(p)
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        assert got[k].tobytes() == tbytes(t) and got[k].shape == tuple(t.shape), k
        assert got[k].dtype == DTYPES[k.split(".")[0]].numpy, k
    with tb.open(p) as r:
        assert r.metadata == {"who": "reference"}


def test_safe_open_reads_tensorbridge_files_every_dtype_and_shape(tmp_path):
    arrays = {f"{n}.{i}": sample(n, s, i) for n in ST for i, s in enumerate(SHAPES)}
    p = tmp_path / "ours.safetensors"
    tb.save(arrays, p, metadata={"who": "tensorbridge"})
    with safetensors.safe_open(str(p), framework="pt") as f:
        assert f.metadata() == {"who": "tensorbridge"}
        assert set(f.keys()) == set(arrays)
        for k, a in arrays.items():
            t = f.get_tensor(k)
            assert t.dtype == _torch_dtype(k.split(".")[0]), k
            assert tuple(t.shape) == a.shape and tbytes(t) == a.tobytes(), k
    numpy_names = {k: a for k, a in arrays.items() if a.dtype.isbuiltin != 2}
    tb.save(numpy_names, tmp_path / "np.safetensors")
    loaded = safetensors.numpy.load_file(str(tmp_path / "np.safetensors"))
    for k, a in numpy_names.items():
        assert loaded[k].dtype == a.dtype and loaded[k].tobytes() == a.tobytes(), k


def test_safetensors_numpy_files_read_exactly(tmp_path):
    arrays = {
        f"{d.name}.{i}": sample(d.name, s, i)
        for d in DTYPES.values()
        if d.safetensors and d.numpy.isbuiltin != 2
        for i, s in enumerate(SHAPES)
    }
    p = tmp_path / "np.safetensors"
    safetensors.numpy.save_file(arrays, str(p))
    got = tb.load(p)
    for k, a in arrays.items():
        assert (
            got[k].dtype == a.dtype and got[k].tobytes() == a.tobytes() and got[k].shape == a.shape
        ), k


def test_sharded_tensorbridge_checkpoint_shards_are_plain_safetensors(tmp_path):
    arrays = {f"{n}.{i}": sample(n, (5, 7), i) for i, n in enumerate(ST)}
    tb.save(arrays, str(tmp_path) + "/", max_shard_size="100B")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    for name, shard in index["weight_map"].items():
        with safetensors.safe_open(str(tmp_path / shard), framework="pt") as f:
            assert tbytes(f.get_tensor(name)) == arrays[name].tobytes(), name
            assert f.metadata()["format"] == "pt"
    assert np.int64(index["metadata"]["total_size"]) == sum(a.nbytes for a in arrays.values())
