"""The shard format: one layer of a memory as a safetensors blob.

A shard holds, for one layer, I index groups of M entries each:

    keys       [I, M, Dk]    lookup keys (float32, float16, bfloat16 or float8_e4m3fn)
    key_scale  [I, M]        float32; present iff keys are float8_e4m3fn:
                             key = keys.astype(float32) * key_scale[..., None]
    out        [I, M, h, d]  attention output of each entry on the prefix
                             (float32, float16 or bfloat16)
    lse        [I, M, h]     natural-log log-sum-exp of each entry on the prefix (float32)
    ...                      extra tensors [I, M, ...] (e.g. `q_mean`, `k_bar`), kept as they
                             are (float32, float16 or bfloat16)
    whiten, whiten_mean      per-layer tensors of any shape (the worker's key whitening), not
                             one row per entry (so Lookup cannot return their rows)

A shard of fitted rows (metadata entry_state "fitted", `holds_fitted_rows`) has the same layout
with I = Hkv groups of M rows, one head each (h = 1), and names its tensors for what they hold:

    keys       [Hkv, M, d]      the rows' keys (post-RoPE; dtypes and key_scale as above)
    values     [Hkv, M, 1, d]   the rows' values (float32, float16 or bfloat16)
    bias       [Hkv, M, 1]      a bias added to each row's score (float32)

Fitted shards written before the rows had their own names store values as `out` and biases as
`lse`; they decode the same. In a decoded `Shard` the second and third tensors are the fields
`out` and `lse` whatever the format (so every shard shares one shape rule); fitted rows read
them as `Shard.values` and `Shard.bias` and are made with `Shard.of_rows`.

and string metadata in the safetensors header (`memdb.format`, `layer`, build parameters).
`memdb.format` names the format version (`FORMAT_VERSIONS`); a shard without it is format "1",
the only one there has been (encode_shard has always written "1"; shards written by other tools,
e.g. `safetensors.torch.save`, carry no memdb metadata).
Validation refuses, with InvalidArgument naming the layer and tensor: shapes past the bounds of
`memdb.bounds` (before any array is made), dtypes a tensor may not have, NaN or infinite values,
key scales outside KEY_SCALE_RANGE, and keys whose vectors (dequantized) are past
`memdb.bounds.MAX_NORM`.
bfloat16 and float8_e4m3fn are numpy dtypes through `ml_dtypes`; safetensors' own numpy
loader does not know them, so blobs are parsed with `safetensors.deserialize` and viewed here.
This module encodes, decodes and validates shards; it knows nothing of LMDB, FAISS or gRPC,
and imports no torch (the worker converts its tensors to numpy first).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy as stnp

from memdb.bounds import MAX_NORM, check_norms, check_shape
from memdb.errors import InvalidArgument

FORMAT_VERSION = "1"  # what encode_shard writes
FORMAT_VERSIONS = ("1",)  # every `memdb.format` this code reads
UNSTAMPED_FORMAT = "1"  # a shard without `memdb.format` (module doc)
ENTRY_TENSORS = ("keys", "out", "lse")  # a looked-up memory's entries
ROW_TENSORS = ("keys", "values", "bias")  # fitted rows (entry_state "fitted")
KEY_SCALE = "key_scale"
BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
# float8_e4m3fn holds |x| in 2**-9 .. 448. The worker's per-row scale (the row's largest |key|
# / 448) of a model's keys (|k| about 1e-3 .. 1e3) lies in about 2**-19 .. 2**1, and this range
# leaves about 20 binary orders of magnitude either side. Inside it a dequantized key element
# lies in 2**-49 .. 2**49, whose square (2**-98 .. 2**98) is a normal float32 number (2**-126
# .. 2**128): FAISS's norms neither flush to zero nor overflow. Scales of 0, -1, 1e-45 (every
# key 0, flipped, or subnormal) or 1e36 (448 x 1e36 is inf in float32) are refused; the keys'
# vectors are then bounded by memdb.bounds.MAX_NORM (`_check_key_norms`).
KEY_SCALE_RANGE = (2.0**-40, 2.0**40)
F32, F16 = np.dtype(np.float32), np.dtype(np.float16)
_LARGEST = {FP8: 448.0, F16: 65504.0}  # the largest |value| of the key dtypes that have one
ALLOWED_DTYPES = {
    "keys": (F32, F16, BF16, FP8),
    KEY_SCALE: (F32,),
    "out": (F32, F16, BF16),
    "lse": (F32,),
    "values": (F32, F16, BF16),
    "bias": (F32,),
}
EXTRA_DTYPES = (F32, F16, BF16)
LAYER_TENSORS = ("whiten", "whiten_mean")  # extras that belong to the layer, not to entries
# safetensors dtype names <-> numpy dtypes (what a shard may hold, and what validation names)
_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": F32,
    "F16": F16,
    "BF16": BF16,
    "F8_E4M3": FP8,
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


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
    """One layer of a memory, decoded (entries, or fitted rows: module doc)."""

    keys: np.ndarray  # [I, M, Dk]
    out: np.ndarray  # [I, M, h, d]; fitted rows' values
    lse: np.ndarray  # [I, M, h]; fitted rows' biases
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [I, M, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    key_scale: np.ndarray | None = None  # [I, M] float32, iff keys are float8_e4m3fn

    @property
    def shape(self) -> ShardShape:
        i, m, dk = self.keys.shape
        _, _, h, d = self.out.shape
        return ShardShape(i, m, dk, h, d)

    @classmethod
    def of_rows(
        cls,
        keys: np.ndarray,
        values: np.ndarray,
        bias: np.ndarray,
        metadata: dict[str, str] | None = None,
        key_scale: np.ndarray | None = None,
    ) -> Shard:
        """A layer of fitted rows: keys [Hkv, M, d], values [Hkv, M, 1, d], bias [Hkv, M, 1]
        (its metadata, once complete, says entry_state "fitted")."""
        return cls(keys, values, bias, metadata=dict(metadata or {}), key_scale=key_scale)

    @property
    def values(self) -> np.ndarray:
        """Fitted rows' values [Hkv, M, 1, d] (the `out` field)."""
        return self.out

    @property
    def bias(self) -> np.ndarray:
        """Fitted rows' biases [Hkv, M, 1] (the `lse` field)."""
        return self.lse

    @property
    def tensor_names(self) -> tuple[str, str, str]:
        """The stored names of keys, out and lse: `ROW_TENSORS` for fitted rows."""
        return tensor_names(self.metadata)

    @property
    def entry_extras(self) -> list[str]:
        """Names of the extras with one row per entry ([I, M, ...]), sorted."""
        return sorted(name for name in self.extras if name not in LAYER_TENSORS)

    def float_keys(self) -> np.ndarray:
        """The keys as float32 [I, M, Dk] (fp8 keys dequantized with `key_scale`)."""
        keys = self.keys.astype(np.float32)
        if self.key_scale is not None:
            keys *= self.key_scale[..., None]
        return keys


def holds_fitted_rows(metadata: dict[str, str]) -> bool:
    """Whether a shard's metadata marks fitted rows (entry_state "fitted", written by the
    worker's builder): rows attended as a whole by a worker, never looked up (no Lookup)."""
    return metadata.get("entry_state") == "fitted"


def tensor_names(metadata: dict[str, str]) -> tuple[str, str, str]:
    """The names a shard of this metadata stores its three tensors under: keys/values/bias for
    fitted rows, keys/out/lse for entries."""
    return ROW_TENSORS if holds_fitted_rows(metadata) else ENTRY_TENSORS


def encode_shard(shard: Shard) -> bytes:
    """Serialize a shard to safetensors bytes (validates it first)."""
    names = shard.tensor_names
    clash = sorted(set(names) & set(shard.extras))
    if clash:
        raise InvalidArgument(f"shard: extra tensor '{clash[0]}' has the name of a main tensor")
    tensors = {**dict(zip(names, (shard.keys, shard.out, shard.lse), strict=True)), **shard.extras}
    if shard.key_scale is not None:
        tensors[KEY_SCALE] = shard.key_scale
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    metadata = {"memdb.format": FORMAT_VERSION, **shard.metadata}
    _validate_tensors(tensors, names, where="shard")
    return save_tensors(tensors, metadata)


def decode_shard(blob: bytes, *, where: str = "shard") -> Shard:
    """Parse and validate safetensors bytes into a Shard; InvalidArgument if anything is off.
    Fitted rows stored under the entries' names (older shards, module doc) decode the same."""
    tensors = _load_tensors(blob, where)
    metadata = read_metadata(blob)
    check_format(metadata, where)
    names = tensor_names(metadata)
    if names == ROW_TENSORS and "values" not in tensors and "out" in tensors:
        names = ENTRY_TENSORS  # fitted rows written as out/lse
    _validate_tensors(tensors, names, where=where)
    keys, out, lse = (tensors[n] for n in names)
    extras = {k: v for k, v in tensors.items() if k not in (*names, KEY_SCALE)}
    return Shard(keys, out, lse, extras=extras, metadata=metadata, key_scale=tensors.get(KEY_SCALE))


def save_tensors(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes of numpy arrays, bfloat16 and float8 included (the inverse of
    `_load_tensors`)."""
    for name, t in tensors.items():
        if t.dtype not in _ST_NAMES:
            raise InvalidArgument(f"tensor '{name}' has dtype {t.dtype}, which a shard cannot hold")
    return stnp.save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)


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


def check_format(metadata: dict[str, str], where: str = "shard") -> str:
    """The shard's format version (`memdb.format`, UNSTAMPED_FORMAT if absent); InvalidArgument
    if this code does not read it."""
    version = metadata.get("memdb.format", UNSTAMPED_FORMAT)
    if version not in FORMAT_VERSIONS:
        raise InvalidArgument(
            f"{where}: metadata 'memdb.format' is '{version[:32]}', a shard format this server "
            f"does not read (it reads {', '.join(FORMAT_VERSIONS)}); write the shard with "
            "memdb.shards.encode_shard of this version, or leave 'memdb.format' out for format 1"
        )
    return version


def check_consistent(shards: list[Shard]) -> ShardShape:
    """Every layer must share I, M, Dk, h, d, dtypes and extra tensors (names, shapes and
    dtypes); returns the common shape."""
    if not shards:
        raise InvalidArgument("a memory needs at least one layer shard")
    first = shards[0]
    for layer, s in enumerate(shards[1:], start=1):
        if s.shape != first.shape:
            raise InvalidArgument(
                f"layer {layer} has shape {s.shape} but layer 0 has {first.shape}; "
                "every layer of a memory must have the same I, M, Dk, h, d"
            )
        for name, field_name in zip(first.tensor_names, ENTRY_TENSORS, strict=True):
            a, b = getattr(s, field_name).dtype, getattr(first, field_name).dtype
            if a != b:
                raise InvalidArgument(f"layer {layer}: tensor '{name}' is {a}, layer 0 has {b}")
        if sorted(s.extras) != sorted(first.extras):
            raise InvalidArgument(
                f"layer {layer} has extra tensors {sorted(s.extras)}, "
                f"layer 0 has {sorted(first.extras)}"
            )
        for name, t in s.extras.items():
            t0 = first.extras[name]
            if t.shape != t0.shape or t.dtype != t0.dtype:
                raise InvalidArgument(
                    f"layer {layer}: extra tensor '{name}' is {t.dtype} {list(t.shape)}, "
                    f"layer 0 has {t0.dtype} {list(t0.shape)}"
                )
    return first.shape


def _load_tensors(blob: bytes, where: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors blob as numpy arrays (bfloat16 and float8 included)."""
    try:
        specs = safetensors.deserialize(bytes(blob))
    except (safetensors.SafetensorError, ValueError, TypeError) as exc:
        raise InvalidArgument(f"{where}: not a valid safetensors blob ({exc})") from None
    tensors = {}
    for name, spec in specs:
        dtype = _ST_DTYPES.get(spec["dtype"])
        if dtype is None:
            raise InvalidArgument(
                f"{where}: tensor '{name[:64]}' has safetensors dtype {spec['dtype'][:16]}, "
                "which a shard cannot hold"
            )
        shape = check_shape(f"{where}: tensor '{name[:64]}'", spec["shape"], dtype,
                            len(spec["data"]))  # fmt: skip
        a = np.frombuffer(spec["data"], dtype=dtype.newbyteorder("<"))
        tensors[name] = a.astype(dtype, copy=False).reshape(shape)
    return tensors


def _validate_tensors(
    tensors: dict[str, np.ndarray], names: tuple[str, str, str], where: str
) -> None:
    """Check the tensors of a shard whose keys, out and lse are stored under `names`."""
    for name in names:
        if name not in tensors:
            raise InvalidArgument(
                f"{where}: required tensor '{name}' is missing (a shard needs {', '.join(names)})"
            )
    for name, t in tensors.items():
        allowed = ALLOWED_DTYPES.get(name, EXTRA_DTYPES)
        if t.dtype not in allowed:
            names = ", ".join(a.name for a in allowed)
            raise InvalidArgument(f"{where}: tensor '{name[:64]}' has dtype {t.dtype}; use {names}")
        if not np.isfinite(t).all():
            raise InvalidArgument(f"{where}: tensor '{name[:64]}' holds NaN or infinite values")
    _, out_name, lse_name = names
    keys, out, lse = (tensors[n] for n in names)
    if keys.ndim != 3 or out.ndim != 4 or lse.ndim != 3:
        raise InvalidArgument(
            f"{where}: expected keys [I, M, Dk], {out_name} [I, M, h, d], {lse_name} [I, M, h]; "
            f"got keys {list(keys.shape)}, {out_name} {list(out.shape)}, "
            f"{lse_name} {list(lse.shape)}"
        )
    i, m, dk = keys.shape
    if min(i, m, dk) == 0:
        raise InvalidArgument(f"{where}: tensor 'keys' has an empty dimension {list(keys.shape)}")
    if out.shape[:2] != (i, m) or min(out.shape) == 0:
        raise InvalidArgument(
            f"{where}: tensor '{out_name}' has shape {list(out.shape)}, expected [{i}, {m}, h, d]"
        )
    if lse.shape != (i, m, out.shape[2]):
        raise InvalidArgument(
            f"{where}: tensor '{lse_name}' has shape {list(lse.shape)}, "
            f"expected [{i}, {m}, {out.shape[2]}]"
        )
    _check_key_scale(tensors, where)
    _check_key_norms(keys, tensors.get(KEY_SCALE), where)
    for name, t in tensors.items():
        if name in (*names, KEY_SCALE, *LAYER_TENSORS):
            continue
        if t.ndim < 2 or t.shape[:2] != (i, m):
            raise InvalidArgument(
                f"{where}: extra tensor '{name[:64]}' has shape {list(t.shape)[:8]}, "
                f"expected [{i}, {m}, ...] (one row per entry)"
            )


def _check_key_scale(tensors: dict[str, np.ndarray], where: str) -> None:
    """`key_scale` [I, M] is there iff the keys are float8_e4m3fn."""
    keys, scale = tensors["keys"], tensors.get(KEY_SCALE)
    if (keys.dtype == FP8) != (scale is not None):
        raise InvalidArgument(
            f"{where}: float8_e4m3fn keys need a float32 '{KEY_SCALE}' [I, M] tensor, and only "
            f"they have one (keys are {keys.dtype}, '{KEY_SCALE}' is "
            f"{'absent' if scale is None else 'present'})"
        )
    if scale is not None and scale.shape != keys.shape[:2]:
        raise InvalidArgument(
            f"{where}: tensor '{KEY_SCALE}' has shape {list(scale.shape)}, "
            f"expected {list(keys.shape[:2])}"
        )
    lo, hi = KEY_SCALE_RANGE
    if scale is not None and not ((scale >= lo) & (scale <= hi)).all():
        g, m = (int(i) for i in np.argwhere(~((scale >= lo) & (scale <= hi)))[0])
        raise InvalidArgument(
            f"{where}: tensor '{KEY_SCALE}' holds {float(scale[g, m]):.3g} (group {g}, entry "
            f"{m}); key scales must be in 2**-40..2**40: write float8 keys as keys / scale with "
            "scale = the row's largest |key| / 448 (1 for a row of zeros), or store the keys as "
            "bfloat16 or float32"
        )


def _check_key_norms(keys: np.ndarray, scale: np.ndarray | None, where: str) -> None:
    """Every key (float8 keys times their scale) finite with a norm of at most MAX_NORM.
    Float8 and float16 keys hold at most 448 / 65504 an element: where that bound (times the
    largest scale) over every element cannot reach MAX_NORM, no key can, and none is read."""
    largest = _LARGEST.get(keys.dtype)
    if largest is not None:
        largest *= 1.0 if scale is None else float(scale.max())
        if largest * math.sqrt(keys.shape[-1]) <= MAX_NORM:
            return
    floats = keys.astype(np.float32, copy=False)
    if scale is not None:
        floats = floats * scale[..., None]
    what = " times 'key_scale'" if scale is not None else ""
    check_norms(
        f"{where}: tensor 'keys'{what} [group, entry]",
        floats,
        "scale the keys down (a cosine score depends only on their direction)",
    )
