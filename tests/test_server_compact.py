"""Compact memories over a real server: torch-written bf16 / fp8 shards are uploaded, looked up
(states in their stored dtype) and fetched back byte-equal; undecodable query shapes are
INVALID_ARGUMENT."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch

from memdb.errors import InvalidArgument
from memdb.shards import decode_shard
from memdb.v1 import memdb_pb2 as pb
from memdb_client import MemdbClient
from memdb_server.config import ServerConfig
from memdb_server.server import run_server
from tests.test_shards import DK, torch_tensors

FP = "fp-compact"
ROOT_KEY = "test-root-key"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    cfg = ServerConfig(data_dir=tmp_path_factory.mktemp("compact"), listen="127.0.0.1:0",
                       metrics_listen="", admin_key=ROOT_KEY)  # fmt: skip
    with run_server(cfg) as srv, MemdbClient(srv.address, ROOT_KEY) as c:
        yield c


def torch_shard(keys: torch.dtype, out: torch.dtype, seed: int) -> bytes:
    tensors = torch_tensors(keys=keys, out=out, seed=seed)
    return safetensors.torch.save(tensors, metadata={"layer": str(seed)})


@pytest.mark.parametrize(
    "keys, out", [(torch.bfloat16, torch.bfloat16), (torch.float8_e4m3fn, torch.float16)]
)
def test_torch_written_compact_memory_round_trips_through_the_server(client, keys, out):
    name = f"compact-{str(keys)[6:]}"
    blobs = [torch_shard(keys, out, seed) for seed in range(2)]
    info = client.put_prefix(name, blobs, model_fingerprint=FP, metric="ip", index_kind="flat")
    assert info.dtype == str(out).removeprefix("torch.")
    assert info.extra_tensors == ["q_mean"]
    shard = decode_shard(blobs[1])
    keys32 = shard.float_keys()  # fp8: dequantized with key_scale
    q = keys32[:, 3] * 2  # [G, Dk]: query group g with entry 3's key of group g
    res = client.lookup(name, 1, q[None], model_fingerprint=FP, k=1, extras=["q_mean"])
    exact = np.einsum("gd,gmd->gm", q, keys32)  # inner products with every stored key
    assert (res.ids[0, :, 0] == exact.argmax(1)).all()
    np.testing.assert_allclose(res.scores[0, :, 0], exact.max(1), rtol=1e-5)
    rows = res.ids[0, :, 0]
    assert res.out.dtype == shard.out.dtype and res.extras["q_mean"].dtype.name == "bfloat16"
    assert res.out[0, :, 0].tobytes() == shard.out[[0, 1], rows].tobytes()
    assert res.extras["q_mean"][0, :, 0].tobytes() == shard.extras["q_mean"][[0, 1], rows].tobytes()
    _, fetched = client.fetch_memory_raw(name, model_fingerprint=FP)
    assert fetched == blobs  # byte-equal
    memory = client.fetch_memory(name, model_fingerprint=FP)
    assert memory.shards[0].keys.dtype.name == str(keys).removeprefix("torch.")


@pytest.mark.parametrize(
    "shape, data", [([2**62, 4], b""), ([1] * 65, b"\0" * 4), ([2**31, 2**31, 2**31, 8], b"")]
)
def test_query_shapes_that_overflow_or_have_too_many_dims_are_invalid_argument(client, shape, data):
    client.put_prefix("plain", [torch_shard(torch.float32, torch.float32, 0)],
                      model_fingerprint=FP, mode="upsert")  # fmt: skip
    req = pb.LookupRequest(name="plain", layer=0, model_fingerprint=FP,
                           queries=pb.Tensor(dtype="float32", shape=shape, data=data))  # fmt: skip
    with pytest.raises(InvalidArgument, match="queries"):
        client._call(client._memory.Lookup, req)


def test_per_layer_tensors_are_stored_but_not_lookup_extras(client):
    t = torch_tensors(keys=torch.float16, out=torch.float16)
    t["whiten"] = torch.eye(8).expand(3, 8, 8).contiguous()
    blob = safetensors.torch.save(t)
    info = client.put_prefix("whitened", [blob], model_fingerprint=FP)
    assert info.extra_tensors == ["q_mean"]
    q = np.zeros((1, DK), np.float32)
    assert client.lookup("whitened", 0, q, model_fingerprint=FP).ids.shape == (1, 2, 1)
    with pytest.raises(InvalidArgument, match="no extra tensor 'whiten'"):
        client.lookup("whitened", 0, q, model_fingerprint=FP, extras=["whiten"])
    assert client.fetch_memory_raw("whitened", model_fingerprint=FP)[1] == [blob]
