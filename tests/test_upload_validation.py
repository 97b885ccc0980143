"""Uploads and Lookups that would store an unsearchable memory, crash an index build or fail
INTERNAL are refused INVALID_ARGUMENT, naming the layer, tensor and field, on one node and on
the cluster backend (a real server process over gRPC each), and leave nothing stored."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from memdb.errors import InvalidArgument, NotFound
from memdb.shards import FP8, Shard, encode_shard, save_tensors
from memdb.v1 import memdb_pb2 as pb
from memdb_client import MemdbClient
from memdb_server.cluster_process import memdb_cluster
from memdb_server.process import server_process
from tests.test_server import FP, ROOT_KEY

G, M, DK, H, D = 2, 64, 16, 2, 8
BF16 = np.dtype(ml_dtypes.bfloat16)
V1 = {"memdb.format": "1", "layer": "0"}


@pytest.fixture(scope="module", params=["single", "cluster"])
def client(request, tmp_path_factory):
    """A root client of one server process on the local backend, or of one node on the cluster
    backend (real etcd and Redis Cluster)."""
    data = tmp_path_factory.mktemp(f"validation-{request.param}")
    if request.param == "cluster":
        etcd, redis = request.getfixturevalue("cluster_planes")
        with memdb_cluster(data, etcd, redis, nodes=1, admin_key=ROOT_KEY) as (node,):
            with MemdbClient(node.address, ROOT_KEY, timeout=60) as c:
                yield c
    else:
        with server_process(data, admin_key=ROOT_KEY) as s, MemdbClient(s.address, ROOT_KEY) as c:
            yield c


def tensors(keys: np.ndarray | None = None, scale: np.ndarray | None = None) -> dict:
    rng = np.random.default_rng(0)
    t = {
        "keys": rng.standard_normal((G, M, DK)).astype(np.float32) if keys is None else keys,
        "out": rng.standard_normal((G, M, H, D)).astype(np.float32),
        "lse": rng.standard_normal((G, M, H)).astype(np.float32),
    }
    if scale is not None:
        t["key_scale"] = np.broadcast_to(np.float32(scale), (G, M)).astype(np.float32)
    return t


def fp8_keys(value: float = 448.0) -> np.ndarray:
    return np.full((G, M, DK), value, np.float32).astype(FP8)


def with_keys_header(dtype: str, shape: list[int]) -> bytes:
    """A safetensors blob of valid out and lse whose 'keys' claim `shape` with no data."""
    t = tensors()
    spec = {"keys": {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}}
    data, offset = b"", 0
    for name in ("out", "lse"):
        raw = t[name].tobytes()
        spec[name] = {"dtype": "F32", "shape": list(t[name].shape),
                      "data_offsets": [offset, offset + len(raw)]}  # fmt: skip
        data, offset = data + raw, offset + len(raw)
    spec["__metadata__"] = V1
    header = json.dumps(spec).encode()
    return struct.pack("<Q", len(header)) + header + data


# case -> (the layer's bytes, index kind, what the message must say)
BAD_UPLOADS = {
    "float8 keys x scale overflow, ivf": (
        lambda: save_tensors(tensors(fp8_keys(), 1e36), V1), "ivf",
        r"layer 0: tensor 'key_scale' holds 1e\+36 \(group 0, entry 0\); key scales must be in"),
    "float8 keys x scale overflow, flat": (
        lambda: save_tensors(tensors(fp8_keys(), 1e36), V1), "flat", r"'key_scale' holds 1e\+36"),
    "float8 keys x scale overflow, hnsw": (
        lambda: save_tensors(tensors(fp8_keys(), 1e36), V1), "hnsw", r"'key_scale' holds 1e\+36"),
    "key scale 0": (lambda: save_tensors(tensors(fp8_keys(1.0), 0.0), V1), "flat",
                    r"layer 0: tensor 'key_scale' holds 0 "),
    "key scale -1": (lambda: save_tensors(tensors(fp8_keys(1.0), -1.0), V1), "flat",
                     r"layer 0: tensor 'key_scale' holds -1 "),
    "key scale 1e-45": (lambda: save_tensors(tensors(fp8_keys(1.0), 1e-45), V1), "flat",
                        r"layer 0: tensor 'key_scale' holds 1.4e-45 "),
    "float32 keys past the norm bound, ivf": (
        lambda: save_tensors(tensors(np.full((G, M, DK), 1e20, np.float32)), V1), "ivf",
        r"layer 0: tensor 'keys' \[group, entry\]: the vector at \[0, 0\] has norm 4e\+20"),
    "bfloat16 keys whose squares overflow": (
        lambda: save_tensors(tensors(np.full((G, M, DK), 3e38, np.float32).astype(BF16)), V1),
        "hnsw", r"layer 0: tensor 'keys' \[group, entry\]: the vector at \[0, 0\] has norm 1.2e"),
    "unknown memdb.format": (lambda: save_tensors(tensors(), {**V1, "memdb.format": "9"}), "flat",
                             r"layer 0: metadata 'memdb.format' is '9'.* reads 1\)"),
    "empty memdb.format": (lambda: save_tensors(tensors(), {**V1, "memdb.format": ""}), "flat",
                           r"layer 0: metadata 'memdb.format' is ''"),
    "empty keys with a huge dimension": (
        lambda: with_keys_header("F32", [0, 2**62, 4]), "flat",
        r"layer 0: tensor 'keys': shape \[0, 4611686018427387904, 4\] has a dimension of"),
    "empty keys of more than 2**40 elements": (
        lambda: with_keys_header("F8_E4M3", [0, 2**31, 2**31]), "flat",
        r"layer 0: tensor 'keys': shape \[0, 2147483648, 2147483648\] claims more than 2\*\*40"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_an_upload_that_would_overflow_or_is_of_an_unknown_format_is_refused_naming_its_field(
    client, case
):
    make, kind, message = BAD_UPLOADS[case]
    name = "bad-" + "".join(c if c.isalnum() else "-" for c in case)[:60]
    before = client.stats().tenants["default"]
    with pytest.raises(InvalidArgument, match=message):
        client.put_prefix(name, [make()], model_fingerprint=FP, index_kind=kind, metric="ip")
    with pytest.raises(NotFound):
        client.get_prefix(name)
    assert client.stats().tenants["default"] == before  # nothing stored, usage unchanged


def raw_lookup(client: MemdbClient, name: str, queries: pb.Tensor) -> None:
    req = pb.LookupRequest(name=name, layer=0, model_fingerprint=FP, queries=queries)
    client._call(client._memory.Lookup, req)


@pytest.mark.parametrize(
    "queries, message",
    [
        (pb.Tensor(dtype="float32", shape=[0, 2**63 - 1, 2], data=b""),
         r"queries: shape \[0, 9223372036854775807, 2\] has a dimension of 9223372036854775807"),
        (pb.Tensor(dtype="float32", shape=[0, 2**31, 2**31], data=b""),
         r"queries: shape \[0, 2147483648, 2147483648\] claims more than 2\*\*40 elements"),
        (pb.Tensor(dtype="float32", shape=[1, DK], data=np.full(DK, 1e30, np.float32).tobytes()),
         r"queries \[query\]: the vector at \[0\] has norm 4e\+30"),
        (pb.Tensor(dtype="float32", shape=[1, G, DK],
                   data=np.full((G, DK), 3e38, np.float32).tobytes()),
         r"queries \[query, group\]: the vector at \[0, 0\] has norm 1.2e\+39"),
    ],
)  # fmt: skip
def test_lookup_queries_with_unbounded_shapes_or_norms_are_refused(client, queries, message):
    client.put_prefix("plain", [save_tensors(tensors(), V1)], model_fingerprint=FP, mode="upsert")
    with pytest.raises(InvalidArgument, match=message):
        raw_lookup(client, "plain", queries)


@pytest.mark.parametrize("kind", ["ivf", "flat", "hnsw"])
def test_a_valid_float8_memory_uploads_and_finds_its_own_keys(client, kind):
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((G, M, DK)).astype(np.float32) * 1e-3  # small keys: small scales
    scale = np.abs(keys).max(-1) / 448  # the worker's quantize_keys
    t = tensors()
    shard = Shard((keys / scale[..., None]).astype(FP8), t["out"], t["lse"], key_scale=scale,
                  metadata={"layer": "0"})  # fmt: skip
    name = f"fp8-{kind}"
    client.put_prefix(name, [encode_shard(shard)], model_fingerprint=FP, index_kind=kind,
                      mode="upsert")  # fmt: skip
    stored = shard.float_keys()
    rows = [3, 40]
    res = client.lookup(name, 0, stored[:, rows].transpose(1, 0, 2), model_fingerprint=FP, k=1)
    assert (res.ids[:, :, 0] == np.array(rows)[:, None]).all(), res.ids
    np.testing.assert_allclose(res.scores[:, :, 0], 1.0, atol=1e-5)  # cosine with itself


def test_a_shard_without_memdb_format_is_format_1_and_uploads(client):
    """Shards written by other tools (safetensors.torch.save) carry no memdb metadata."""
    t = tensors()
    client.put_prefix("unstamped", [save_tensors(t)], model_fingerprint=FP, mode="upsert")
    res = client.lookup("unstamped", 0, t["keys"][:, 5][None], model_fingerprint=FP, k=1)
    assert (res.ids[0, :, 0] == 5).all()
