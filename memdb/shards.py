"""The shard format: one layer of a memory as a safetensors blob.

A shard holds, for one layer, I index groups of M entries each:

    keys       [I, M, Dk]    lookup keys (float32, float16, bfloat16 or float8_e4m3fn)
    key_scale  [I, M]        float32, present iff keys are float8: key = keys * key_scale
    out        [I, M, h, d]  attention output of each entry on the prefix (float32, float16
                             or bfloat16)
    lse        [I, M, h]     natural-log log-sum-exp of each entry on the prefix (float32)
    ...                      extra tensors (e.g. `k_bar`), kept as they are (float32, float16
                             or bfloat16)

and string metadata in the safetensors header (`memdb.format`, `layer`, build parameters).
This module encodes, decodes and validates shards; it knows nothing of LMDB, FAISS or gRPC,
and imports no torch (the worker converts its tensors to numpy first).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy as stnp

from memdb.errors import InvalidArgument

FORMAT_VERSION = "1"
REQUIRED = ("keys", "out", "lse")
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT8 = np.dtype(ml_dtypes.float8_e4m3fn)
ALLOWED_DTYPES = {
    "keys": (np.float32, np.float16, BFLOAT16, FLOAT8),
    "key_scale": (np.float32,),
    "out": (np.float32, np.float16, BFLOAT16),
    "lse": (np.float32,),
}
EXTRA_DTYPES = (np.float32, np.float16, BFLOAT16)
# safetensors dtype codes read (safetensors.numpy knows no bfloat16 / float8); the validation
# then names what a shard may hold
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": BFLOAT16, "F8_E4M3": FLOAT8,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
}  # fmt: skip


@dataclass(frozen=True)
class ShardShape:
    """The dimensions every shard of one memory shares."""

    num_groups: int  # I
    budget: int  # M
    key_dim: int  # Dk
    heads_per_group: int  # h
    head_dim: int  # d


@dataclass
class Shard:
    """One layer of a memory, decoded."""

    keys: np.ndarray  # [I, M, Dk]
    out: np.ndarray  # [I, M, h, d]
    lse: np.ndarray  # [I, M, h]
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def shape(self) -> ShardShape:
        i, m, dk = self.keys.shape
        _, _, h, d = self.out.shape
        return ShardShape(i, m, dk, h, d)


def encode_shard(shard: Shard) -> bytes:
    """Serialize a shard to safetensors bytes (validates it first)."""
    tensors = {"keys": shard.keys, "out": shard.out, "lse": shard.lse, **shard.extras}
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    metadata = {"memdb.format": FORMAT_VERSION, **shard.metadata}
    _validate_tensors(tensors, where="shard")
    return stnp.save(tensors, metadata=metadata)


def decode_shard(blob: bytes, *, where: str = "shard") -> Shard:
    """Parse and validate safetensors bytes into a Shard; InvalidArgument if anything is off."""
    tensors = _load_tensors(blob, where)
    _validate_tensors(tensors, where=where)
    extras = {k: v for k, v in tensors.items() if k not in REQUIRED}
    return Shard(
        keys=tensors["keys"],
        out=tensors["out"],
        lse=tensors["lse"],
        extras=extras,
        metadata=read_metadata(blob),
    )


def read_metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (its header is 8 bytes of length + JSON)."""
    if len(blob) < 8:
        raise InvalidArgument("shard is shorter than a safetensors header (8 bytes)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise InvalidArgument(f"safetensors header claims {n} bytes but the blob is shorter")
    try:
        header = json.loads(bytes(blob[8 : 8 + n]))
    except ValueError as exc:
        raise InvalidArgument(f"safetensors header is not valid JSON: {exc}") from None
    meta = header.get("__metadata__") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InvalidArgument("safetensors metadata must map strings to strings")
    return dict(meta)


def check_consistent(shards: list[Shard]) -> ShardShape:
    """Every layer must share I, M, Dk, h, d and dtypes; returns the common shape."""
    if not shards:
        raise InvalidArgument("a memory needs at least one layer shard")
    first = shards[0]
    for layer, s in enumerate(shards[1:], start=1):
        if s.shape != first.shape:
            raise InvalidArgument(
                f"layer {layer} has shape {s.shape} but layer 0 has {first.shape}; "
                "every layer of a memory must have the same I, M, Dk, h, d"
            )
        for name in REQUIRED:
            a, b = getattr(s, name).dtype, getattr(first, name).dtype
            if a != b:
                raise InvalidArgument(f"layer {layer}: tensor '{name}' is {a}, layer 0 has {b}")
        if sorted(s.extras) != sorted(first.extras):
            raise InvalidArgument(
                f"layer {layer} has extra tensors {sorted(s.extras)}, "
                f"layer 0 has {sorted(first.extras)}"
            )
    return first.shape


def _load_tensors(blob: bytes, where: str) -> dict[str, np.ndarray]:
    try:
        flat = safetensors.deserialize(bytes(blob))
    except (safetensors.SafetensorError, ValueError, TypeError) as exc:
        raise InvalidArgument(f"{where}: not a valid safetensors blob ({exc})") from None
    tensors = {}
    for name, view in flat:
        dtype = _SAFETENSORS_DTYPES.get(view["dtype"])
        if dtype is None:
            raise InvalidArgument(f"{where}: tensor '{name}' has unsupported dtype {view['dtype']}")
        tensors[name] = np.frombuffer(view["data"], dtype=dtype).reshape(view["shape"])
    return tensors


def _validate_tensors(tensors: dict[str, np.ndarray], where: str) -> None:
    for name in REQUIRED:
        if name not in tensors:
            raise InvalidArgument(
                f"{where}: required tensor '{name}' is missing (a shard needs keys, out, lse)"
            )
    for name, t in tensors.items():
        allowed = ALLOWED_DTYPES.get(name, EXTRA_DTYPES)
        if t.dtype not in allowed:
            names = ", ".join(np.dtype(a).name for a in allowed)
            raise InvalidArgument(f"{where}: tensor '{name}' has dtype {t.dtype}; use {names}")
        if not np.isfinite(t).all():
            raise InvalidArgument(f"{where}: tensor '{name}' holds NaN or infinite values")
    keys, out, lse = tensors["keys"], tensors["out"], tensors["lse"]
    if keys.ndim != 3 or out.ndim != 4 or lse.ndim != 3:
        raise InvalidArgument(
            f"{where}: expected keys [I, M, Dk], out [I, M, h, d], lse [I, M, h]; got "
            f"keys {list(keys.shape)}, out {list(out.shape)}, lse {list(lse.shape)}"
        )
    i, m, dk = keys.shape
    if min(i, m, dk) == 0:
        raise InvalidArgument(f"{where}: tensor 'keys' has an empty dimension {list(keys.shape)}")
    if out.shape[:2] != (i, m) or min(out.shape) == 0:
        raise InvalidArgument(
            f"{where}: tensor 'out' has shape {list(out.shape)}, expected [{i}, {m}, h, d]"
        )
    if lse.shape != (i, m, out.shape[2]):
        raise InvalidArgument(
            f"{where}: tensor 'lse' has shape {list(lse.shape)}, "
            f"expected [{i}, {m}, {out.shape[2]}]"
        )
    scale = tensors.get("key_scale")
    if (keys.dtype == FLOAT8) != (scale is not None):
        raise InvalidArgument(f"{where}: float8 keys need a 'key_scale' [I, M], other keys none")
    if scale is not None and scale.shape != (i, m):
        raise InvalidArgument(
            f"{where}: tensor 'key_scale' has shape {list(scale.shape)}, expected [{i}, {m}]"
        )
