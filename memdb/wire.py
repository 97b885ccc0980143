"""Tensors on the wire: numpy arrays <-> `memdb.v1.Tensor` (dtype + shape + raw LE bytes).

Owns only the encoding. It does not know what a tensor means; callers check shapes. A shape is
bounded (`memdb.bounds.check_shape`) before any array is made of it.
bfloat16 and float8_e4m3fn travel as such (numpy dtypes through `ml_dtypes`, as in shards).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from memdb.bounds import check_shape
from memdb.errors import InvalidArgument
from memdb.v1 import memdb_pb2 as pb

WIRE_DTYPES = {
    name: np.dtype(t)
    for name, t in [
        ("float32", np.float32),
        ("float16", np.float16),
        ("bfloat16", ml_dtypes.bfloat16),
        ("float8_e4m3fn", ml_dtypes.float8_e4m3fn),
        ("int64", np.int64),
        ("int32", np.int32),
    ]
}


def encode_tensor(array: np.ndarray) -> pb.Tensor:
    """A numpy array as a wire Tensor (little-endian, C order)."""
    a = np.asarray(array)
    if a.dtype.name not in WIRE_DTYPES:
        raise InvalidArgument(f"dtype {a.dtype} cannot travel; use one of {', '.join(WIRE_DTYPES)}")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return pb.Tensor(dtype=a.dtype.name, shape=list(a.shape), data=a.tobytes())


def decode_tensor(t: pb.Tensor, *, name: str = "tensor") -> np.ndarray:
    """A wire Tensor as a numpy array; InvalidArgument if dtype, shape and bytes disagree."""
    if t.dtype not in WIRE_DTYPES:
        raise InvalidArgument(
            f"{name}: dtype '{t.dtype[:32]}' is not supported; use one of {', '.join(WIRE_DTYPES)}"
        )
    dtype = WIRE_DTYPES[t.dtype].newbyteorder("<")
    shape = check_shape(name, t.shape, WIRE_DTYPES[t.dtype], len(t.data))
    return np.frombuffer(t.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def prefix_info(rec) -> pb.PrefixInfo:
    """A storage PrefixRecord as the wire PrefixInfo."""
    s = rec.shape
    return pb.PrefixInfo(
        tenant=rec.tenant,
        name=rec.name,
        version=rec.version,
        model_fingerprint=rec.model_fingerprint,
        num_layers=rec.num_layers,
        num_groups=s.num_groups,
        budget=s.budget,
        key_dim=s.key_dim,
        heads_per_group=s.heads_per_group,
        head_dim=s.head_dim,
        dtype=rec.dtype,
        token_count=rec.token_count,
        build_params=rec.build_params,
        extra_tensors=rec.extra_tensors,
        bytes=rec.bytes,
        index_kind=rec.index_kind,
        metric=rec.metric,
        created_at=timestamp(rec.created_at),
        updated_at=timestamp(rec.updated_at),
    )
