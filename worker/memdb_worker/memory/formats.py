"""The stored formats of a memory's tensors: dtypes, fp8 keys with a scale, and their bytes.

A shard stores (see `memdb.shards`):

    keys       [I, M, Dk]    float32 | float16 | bfloat16 | float8_e4m3fn
    key_scale  [I, M]        float32, iff keys are float8: key = keys.float() * key_scale
    out        [I, M, h, d]  float32 | float16 | bfloat16
    lse        [I, M, h]     float32
    q_mean, k_bar [I, M, h, d] in the out dtype (the lse correction's extras; q_mean may be left
               out when it equals the entry key, see `builder.BuildOptions.store_q_mean`)
    whiten     [H, d, d], whiten_mean [H, d] float32 (whitened key modes)

fp8 keys are scaled per entry: scale = amax / 448 (the largest float8_e4m3fn value), so every
key uses the format's whole range. Cosine lookup is blind to the scale (one positive factor per
entry); it matters only where the key's length does (q_mean recovered from the key).

This module converts between torch tensors and the numpy arrays of shards (bfloat16 and float8
through `ml_dtypes`, bit for bit), quantizes keys, and counts a memory's stored bytes. It knows
nothing of models, building or lookup.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from memdb.build_options import KEY_DTYPES

FP8_MAX = 448.0  # largest finite float8_e4m3fn

_NUMPY = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
}
_TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
_BITS = {2: (np.int16, torch.int16), 1: (np.uint8, torch.uint8)}  # same-size integer views


def dtype_bytes(name: str) -> int:
    """Bytes per element of a stored dtype name."""
    return _NUMPY[name].itemsize


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy of t in the same dtype (bfloat16 and float8 as ml_dtypes, bit-exact)."""
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name in ("float32", "float16"):
        return t.numpy().copy()
    if name not in _NUMPY:
        raise ValueError(f"dtype {t.dtype} has no stored format")
    np_int, torch_int = _BITS[t.element_size()]
    return t.view(torch_int).numpy().view(np_int).view(_NUMPY[name]).copy()


def to_torch(a: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """A private torch copy of a shard array on `device`, same dtype (inverse of `to_numpy`)."""
    name = a.dtype.name
    if name in ("float32", "float16", "int64", "int32"):
        return torch.from_numpy(np.array(a, copy=True)).to(device)
    if name not in _TORCH:
        raise ValueError(f"dtype {a.dtype} has no torch counterpart here")
    np_int, _ = _BITS[a.dtype.itemsize]
    bits = torch.from_numpy(np.array(a, copy=True).view(np_int))
    return bits.view(_TORCH[name]).to(device)


def quantize_keys(
    keys: torch.Tensor, dtype: str | torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keys [I, M, Dk] in a stored dtype, on their device: (keys, None), or for float8 (keys,
    key_scale [I, M] float32) with key ~ keys.float() * key_scale[..., None]."""
    name = str(dtype).removeprefix("torch.")
    if name not in KEY_DTYPES:
        raise ValueError(f"key dtype must be one of {KEY_DTYPES}, not {name!r}")
    if name != "float8_e4m3fn":
        return keys.to(_TORCH[name]), None
    amax = keys.float().abs().amax(dim=-1)  # [I, M]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (keys.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_keys(keys: torch.Tensor, key_scale: torch.Tensor | None) -> torch.Tensor:
    """Stored keys [I, M, Dk] (and their float8 key_scale [I, M]) as float32: the inverse of
    `quantize_keys` up to its rounding."""
    if key_scale is None:
        return keys.float()
    return keys.float() * key_scale.float()[..., None]


def keys_as_stored(keys: torch.Tensor, dtype: str | torch.dtype) -> torch.Tensor:
    """Keys [..., Dk] as they read back once stored in `dtype` (float32, rounding included)."""
    flat = keys.reshape(1, -1, keys.shape[-1])
    return dequantize_keys(*quantize_keys(flat, dtype)).reshape(keys.shape)


def memory_bytes(
    *,
    num_layers: int,
    num_groups: int,
    heads_per_group: int,
    key_dim: int,
    head_dim: int,
    budget: int,
    key_dtype: str = "float32",
    out_dtype: str = "float32",
    q_mean: bool = False,
    k_bar: bool = False,
    whiten: bool = False,
) -> int:
    """Bytes of a memory as stored (every shard's tensors, headers aside)."""
    i, m, h, d = num_groups, budget, heads_per_group, head_dim
    per_layer = i * m * key_dim * dtype_bytes(key_dtype)
    if key_dtype == "float8_e4m3fn":
        per_layer += i * m * 4  # key_scale
    per_layer += i * m * h * d * dtype_bytes(out_dtype) * (1 + int(q_mean) + int(k_bar))
    per_layer += i * m * h * 4  # lse
    if whiten:
        heads = i * h
        per_layer += heads * d * d * 4 + heads * d * 4
    return num_layers * per_layer


def kv_bytes(*, num_layers: int, num_kv_heads: int, head_dim: int, tokens: int) -> int:
    """Bytes of the KV cache of `tokens` tokens in bfloat16, as a GPU server keeps it."""
    return num_layers * num_kv_heads * 2 * head_dim * tokens * 2
