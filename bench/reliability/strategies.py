"""Hypothesis strategies for the server's inputs: protobuf requests from their descriptors,
wire tensors, and well- and ill-formed safetensors shards.

`message(descriptor, hints)` draws any message type field by field (scalars over their whole
range plus the `hints`' known names and blobs, repeated and map fields, oneofs, nested
messages to a bounded depth; `memdb.v1.Tensor` through `tensor()`). `shard_blob(hints)` draws
the bytes of one layer's shard: valid ones, valid safetensors with wrong contents (shapes,
dtypes including bf16 / fp8, extras, NaN), well-shaped shards whose values break the bounds
(float8 keys whose scale overflows them, scales of 0 / -1 / 1e-45, keys past the norm bound,
unknown or missing `memdb.format`: `bounded_values`), hand-made headers (shapes with a zero
and huge dimensions among them), truncations and bit flips. `INDEX_KINDS` and `METRICS` are
what an upload's header may ask for (an IVF build is where overflowing keys failed).
Knows nothing of servers; draws only.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

F = FieldDescriptor
INT_RANGES = {
    F.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    F.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    F.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1),
    F.TYPE_UINT32: (0, (1 << 32) - 1),
    F.TYPE_FIXED32: (0, (1 << 32) - 1),
    F.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    F.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1),
    F.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    F.TYPE_UINT64: (0, (1 << 64) - 1),
    F.TYPE_FIXED64: (0, (1 << 64) - 1),
}
WIRE_DTYPES = ["float32", "float16", "int64", "int32", "bfloat16", "float64", "uint8", "", "f4"]
ST_DTYPES = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "U8": 1,
    "BOOL": 1,
    "C64": 8,
    "XX": 1,
}
MAX_BLOB = 1 << 16
# dimensions that match empty data whatever the others are (with a 0), or overflow a product
HUGE_DIMS = [0, 1, 2, 1 << 31, 1 << 32, (1 << 32) + 1, 1 << 40, 1 << 62, (1 << 63) - 1]
KEY_SCALES = [1.0, 0.01, 0.0, -1.0, 1e-45, 2.0**-41, 2.0**-40, 2.0**40, 2.0**41, 1e36, 3e38]
KEY_VALUES = [0.5, 448.0, -448.0, 1e15, 1e20, 3e38]  # the last three: past the norm bound
FORMATS = [None, "1", "1", "2", "9", "", "1.0", "x" * 40]  # None: no memdb.format
INDEX_KINDS = ["", "auto", "flat", "ivf", "hnsw"]
METRICS = ["", "cosine", "ip"]


@dataclass
class Hints:
    """Known values that lead draws past the first checks: names that exist, valid blobs."""

    strings: list[str] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)


# ---------------------------------------------------------------- protobuf messages


def message(desc: Descriptor, hints: Hints, depth: int = 0) -> st.SearchStrategy:
    """Messages of type `desc` with a random subset of fields set."""
    if desc.full_name == "memdb.v1.Tensor":
        return tensor()
    cls = message_factory.GetMessageClass(desc)
    optional = {
        f.name: _field(f, hints, depth)
        for f in desc.fields
        if depth < 3 or f.type != F.TYPE_MESSAGE
    }
    return st.fixed_dictionaries({}, optional=optional).map(lambda kw: _build(cls, kw))


def one_field(desc: Descriptor, hints: Hints) -> st.SearchStrategy:
    """Messages of type `desc` with exactly one field set (to merge into a valid request)."""
    cls = message_factory.GetMessageClass(desc)
    return st.sampled_from(list(desc.fields)).flatmap(
        lambda f: _field(f, hints, 0).map(lambda v: _build(cls, {f.name: v}))
    )


def _build(cls, values: dict):
    msg = cls()
    for name, value in values.items():
        f = msg.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name) if f.is_repeated else None
        if _is_map(f):
            for k, v in value:
                if f.message_type.fields_by_name["value"].type == F.TYPE_MESSAGE:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif f.is_repeated and f.type == F.TYPE_MESSAGE:
            for v in value:
                target.add().CopyFrom(v)
        elif f.is_repeated:
            target.extend(value)
        elif f.type == F.TYPE_MESSAGE:
            getattr(msg, name).CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


def _is_map(f: FieldDescriptor) -> bool:
    return f.type == F.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _field(f: FieldDescriptor, hints: Hints, depth: int) -> st.SearchStrategy:
    if _is_map(f):
        key = _scalar(f.message_type.fields_by_name["key"], hints, depth)
        value = _scalar(f.message_type.fields_by_name["value"], hints, depth)
        return st.one_of(
            st.lists(st.tuples(key, value), max_size=4),
            st.lists(st.tuples(key, value), min_size=100, max_size=300),
        )
    one = _scalar(f, hints, depth)
    if f.is_repeated:
        return st.one_of(st.lists(one, max_size=4), st.lists(one, min_size=50, max_size=200))
    return one


def _scalar(f: FieldDescriptor, hints: Hints, depth: int) -> st.SearchStrategy:
    if f.type == F.TYPE_MESSAGE:
        return message(f.message_type, hints, depth + 1)
    if f.type == F.TYPE_STRING:
        return text(hints)
    if f.type == F.TYPE_BYTES:
        return st.one_of(st.binary(max_size=256), shard_blob(hints))
    if f.type == F.TYPE_BOOL:
        return st.booleans()
    if f.type == F.TYPE_ENUM:
        values = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(values), st.integers(-(1 << 31), (1 << 31) - 1))
    if f.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(width=64 if f.type == F.TYPE_DOUBLE else 32)
    lo, hi = INT_RANGES[f.type]
    return st.one_of(
        st.integers(max(lo, -4), min(hi, 8)),
        st.integers(lo, hi),
        st.sampled_from([v for v in (1 << 16, 1 << 31, 1 << 32, hi) if v <= hi]),
    )


def text(hints: Hints) -> st.SearchStrategy[str]:
    """Short text, known names, names at and over the limits, control characters."""
    special = [
        "",
        "a",
        "x" * 128,
        "x" * 129,
        "x" * 300,
        "y" * 10_000,
        "../etc",
        "a\0b",
        "é" * 90,
        "default",
        "-bad",
        ".",
        "a b",
    ]
    return st.one_of(st.text(max_size=24), st.sampled_from(special + hints.strings))


@st.composite
def tensor(draw) -> object:
    """A wire Tensor: any dtype name, shapes small, huge, negative or of many dimensions, and
    bytes that match the shape or not."""
    from memdb.v1 import memdb_pb2 as pb

    dtype = draw(st.sampled_from(WIRE_DTYPES))
    shape = draw(
        st.one_of(
            st.lists(st.integers(0, 6), max_size=4),
            st.lists(st.integers(-(1 << 63), (1 << 63) - 1), max_size=5),
            st.lists(st.sampled_from([1, 1 << 31, 1 << 32, 1 << 62]), min_size=1, max_size=4),
            st.lists(st.just(1), min_size=60, max_size=70),
            st.lists(st.sampled_from(HUGE_DIMS), min_size=1, max_size=4),
            st.just([0, (1 << 63) - 1, 2]),  # empty data, passed the byte count (issue 23)
        )
    )
    size = int(np.prod([max(s, 0) for s in shape], dtype=np.float64)) if shape else 1
    numeric = np.dtype(dtype if dtype in WIRE_DTYPES[:4] else "float32")  # numpy has no bf16
    item = numeric.itemsize
    if size * item <= 4096 and draw(st.booleans()):
        big = st.sampled_from([1e20, 3e38, 65504.0]).map(lambda v: _full(size, v, numeric))
        data = draw(
            st.one_of(
                st.binary(min_size=size * item, max_size=size * item),
                st.just(np.ones(size, numeric).tobytes()),
                big.map(lambda a: a.tobytes()),  # finite values whose norms overflow
            )
        )
    else:
        data = draw(st.binary(max_size=256))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def query_tensor(draw, groups: int, dk: int) -> object:
    """Lookup queries aimed at the bounds: the layer's shape ([Q, Dk] or [Q, I, Dk]) holding
    normal, huge (norms past the bound) or non-finite values, or an empty shape with huge
    dimensions and no data."""
    from memdb.v1 import memdb_pb2 as pb

    dtype = draw(st.sampled_from(["float32", "float16"]))
    if draw(st.integers(0, 3)) == 0:
        shape = draw(st.lists(st.sampled_from(HUGE_DIMS), min_size=2, max_size=4))
        shape[draw(st.integers(0, len(shape) - 1))] = 0
        return pb.Tensor(dtype=dtype, shape=shape, data=b"")
    q = draw(st.integers(1, 3))
    shape = draw(st.sampled_from([[q, dk], [q, groups, dk]]))
    values = np.random.default_rng(draw(st.integers(0, 3))).standard_normal(shape)
    big = draw(st.sampled_from([1.0, 1e15, 1e20, 3e38, 65504.0, np.inf, np.nan]))
    if draw(st.booleans()):
        values[(0,) * (len(shape) - 1)] = big  # one vector
    else:
        values *= big
    with np.errstate(over="ignore", invalid="ignore"):
        data = values.astype(dtype).tobytes()
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def _full(size: int, value: float, dtype: np.dtype) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):  # 1e20 as an integer or float16
        return np.full(size, value).astype(dtype)


# ---------------------------------------------------------------- safetensors


def shard_blob(hints: Hints) -> st.SearchStrategy[bytes]:
    """One layer's bytes: valid, wrong contents, hand-made headers, truncated or flipped."""
    valid = st.sampled_from(hints.blobs) if hints.blobs else st.just(b"")
    return st.one_of(valid, wrong_contents(), bounded_values(), crafted_header(), mutated(valid))


@st.composite
def wrong_contents(draw) -> bytes:
    """Valid safetensors whose tensors break the shard rules (or just pass them)."""
    i, m, dk, h, d = (
        draw(st.integers(0, 3)),
        draw(st.integers(0, 9)),
        draw(st.integers(0, 5)),
        draw(st.integers(0, 2)),
        draw(st.integers(0, 3)),
    )
    dims = st.lists(st.integers(0, 4), max_size=5).map(tuple)
    shapes = {"keys": (i, m, dk), "out": (i, m, h, d), "lse": (i, m, h)}
    tensors = {}
    for name in ("keys", "out", "lse", "k_bar", "q_mean"):
        if name in shapes and draw(st.integers(0, 9)) == 0:
            continue  # a required tensor missing
        if name not in shapes and draw(st.booleans()):
            continue
        shape = draw(
            st.one_of(st.just(shapes.get(name, (i, m, h, d))), dims, st.just((i, m + 1, h, d)))
        )
        dtype = draw(st.sampled_from(["float32", "float16", "float64", "int64", "uint8"]))
        value = draw(st.sampled_from([0.5, np.nan, np.inf, -1.0]))
        with np.errstate(invalid="ignore"):  # NaN cast to an integer dtype
            tensors[name] = np.full(shape, value).astype(dtype)
    if draw(st.booleans()):
        return _typed_header(draw, tensors)
    import safetensors.numpy as stnp

    return stnp.save(
        tensors,
        metadata=draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)),
    )


@st.composite
def bounded_values(draw) -> bytes:
    """A well-shaped shard whose keys or key scales may break the bounds (float8 keys times a
    scale that overflows, scales of 0 / -1 / 1e-45, float32 or bfloat16 keys past the norm
    bound), under a `memdb.format` that may be unknown or missing."""
    from memdb.shards import save_tensors

    i, m, dk, h, d = (draw(st.integers(1, n)) for n in (2, 40, 6, 2, 3))
    dtype = draw(st.sampled_from(["float8_e4m3fn", "float32", "bfloat16", "float16"]))
    value = draw(st.sampled_from(KEY_VALUES))
    keys = np.random.default_rng(draw(st.integers(0, 3))).standard_normal((i, m, dk))
    if draw(st.booleans()):
        keys[draw(st.integers(0, i - 1)), draw(st.integers(0, m - 1))] = value  # one row
    else:
        keys = np.full((i, m, dk), value)
    with np.errstate(over="ignore"):  # float16 / float8 of 1e20: inf or NaN, refused too
        tensors = {"keys": keys.astype(np.float32).astype(_np_dtype(dtype))}
    if dtype == "float8_e4m3fn" or draw(st.integers(0, 9)) == 0:
        scale = np.full((i, m), draw(st.sampled_from(KEY_SCALES)), np.float32)
        if draw(st.booleans()):
            scale[draw(st.integers(0, i - 1)), draw(st.integers(0, m - 1))] = draw(
                st.sampled_from(KEY_SCALES)
            )
        tensors["key_scale"] = scale
    tensors["out"] = np.ones((i, m, h, d), np.float32)
    tensors["lse"] = np.zeros((i, m, h), np.float32)
    fmt = draw(st.sampled_from(FORMATS))
    return save_tensors(tensors, {"layer": "0"} | ({} if fmt is None else {"memdb.format": fmt}))


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name, None) or name)


def _typed_header(draw, tensors: dict[str, np.ndarray]) -> bytes:
    """The same tensors with some re-labelled to dtypes numpy lacks (bf16, fp8)."""
    spec, data = {}, b""
    for name, t in tensors.items():
        dtype = draw(st.sampled_from(["F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"]))
        raw = np.zeros(int(np.prod(t.shape)) * ST_DTYPES[dtype], np.uint8).tobytes()
        spec[name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return _pack(spec, data)


@st.composite
def crafted_header(draw) -> bytes:
    """A hand-made header: any dtype name, shapes and offsets that may not add up."""
    spec, offset = {}, 0
    for name in draw(
        st.lists(st.sampled_from(["keys", "out", "lse", "k_bar", "x", ""]), unique=True, max_size=4)
    ):
        dtype = draw(st.sampled_from(list(ST_DTYPES)))
        shape = draw(
            st.one_of(
                st.lists(st.one_of(st.integers(0, 4), st.integers(-1, 1 << 62)), max_size=4),
                st.lists(st.sampled_from(HUGE_DIMS), min_size=1, max_size=4),
            )
        )
        size = draw(
            st.one_of(
                st.just(int(np.prod(shape or [1], dtype=np.float64)) * ST_DTYPES[dtype]),
                st.integers(0, 64),
            )
        )
        size = min(max(size, 0), MAX_BLOB)
        spec[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        spec["__metadata__"] = draw(
            st.sampled_from([{"a": 1}, "x", [], *({"memdb.format": f} for f in FORMATS if f)])
        )
    data = draw(st.binary(min_size=min(offset, 4096), max_size=min(offset, 4096)))
    blob = _pack(spec, data)
    if draw(st.integers(0, 4)) == 0:  # a header length that lies
        blob = struct.pack("<Q", draw(st.integers(0, (1 << 64) - 1))) + blob[8:]
    return blob


@st.composite
def mutated(draw, base: st.SearchStrategy[bytes]) -> bytes:
    blob = bytearray(draw(base))
    if not blob:
        return b""
    if draw(st.booleans()):
        return bytes(blob[: draw(st.integers(0, len(blob) - 1))])  # truncated
    for _ in range(draw(st.integers(1, 8))):
        blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
    return bytes(blob)


def _pack(spec: dict, data: bytes) -> bytes:
    header = json.dumps(spec).encode()
    return struct.pack("<Q", len(header)) + header + data
