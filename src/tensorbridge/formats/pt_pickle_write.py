"""Writing ``data.pkl``: the protocol-2 pickle ``torch.save`` writes for a flat state dict.

:func:`state_dict_pickle` emits, opcode by opcode, a ``{name: tensor}`` dict whose
tensors are ``_rebuild_tensor_v2`` (legacy ``torch.<X>Storage`` dtypes) or
``_rebuild_tensor_v3`` (``UntypedStorage`` plus a ``torch.<dtype>``) calls on
C-contiguous storages ``data/0``, ``data/1``, ... in the order given. It uses only
globals that :mod:`.pt_pickle` allows, so tensorbridge reads back what it writes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ..errors import ConversionError
from .base import TensorInfo
from .pt_pickle import STORAGE_TYPES

__all__ = ["state_dict_pickle"]

_LEGACY_BY_DTYPE = {v: k for k, v in STORAGE_TYPES.items()}


def _op_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(1 << 31) <= n < (1 << 31):
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _op_str(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    if len(raw) >= 1 << 32:
        raise ConversionError(f"a tensor name is {len(raw)} bytes long. Fix: use shorter names.")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _op_tuple(items: Sequence[bytes]) -> bytes:
    body = b"".join(items)
    if len(items) == 0:
        return b")"
    if len(items) <= 3:
        return body + b"\x85\x86\x87"[len(items) - 1 : len(items)]
    return b"(" + body + b"t"


def _op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode("ascii")


def _tensor_pickle(info: TensorInfo, key: str) -> bytes:
    """``_rebuild_tensor_v2/_v3`` of a C-contiguous tensor on record ``key``, as torch writes."""
    legacy = _LEGACY_BY_DTYPE.get(info.dtype)
    count = info.size
    strides, acc = [], 1
    for d in reversed(info.shape):
        strides.append(acc)
        acc *= d
    strides.reverse()
    if legacy:
        stype, numel = _op_global("torch", legacy), count
    else:
        stype, numel = _op_global("torch.storage", "UntypedStorage"), info.nbytes
    pid = b"(" + _op_str("storage") + stype + _op_str(key) + _op_str("cpu") + _op_int(numel) + b"tQ"
    args = [
        pid,
        _op_int(0),
        _op_tuple([_op_int(d) for d in info.shape]),
        _op_tuple([_op_int(s) for s in strides]),
        b"\x89",
        _op_global("collections", "OrderedDict") + b")R",
    ]
    if not legacy:
        args.append(_op_global("torch", info.dtype))
    fn = "_rebuild_tensor_v2" if legacy else "_rebuild_tensor_v3"
    return _op_global("torch._utils", fn) + b"(" + b"".join(args) + b"tR"


def state_dict_pickle(infos: Sequence[TensorInfo]) -> bytes:
    """A protocol-2 pickle of ``{name: tensor}`` with storage keys ``0, 1, ...``."""
    parts = [b"\x80\x02}"]
    for start in range(0, len(infos), 1000):
        parts.append(b"(")
        for i in range(start, min(start + 1000, len(infos))):
            parts.append(_op_str(infos[i].name) + _tensor_pickle(infos[i], str(i)))
        parts.append(b"u")
    parts.append(b".")
    return b"".join(parts)
