"""PutPrefix as bytes arrive: refused as soon as they pass the tenant's quota or the server's
max upload (or the declared total), and stored only after the client's commit message."""

from __future__ import annotations

import numpy as np
import pytest

from memdb.errors import InvalidArgument, NotFound, ResourceExhausted
from memdb.shards import Shard, encode_shard
from memdb.v1 import memdb_pb2 as pb
from memdb_client import MemdbClient
from memdb_server.config import ServerConfig
from memdb_server.server import run_server
from tests.test_server import FP, ROOT_KEY, make_shards

MiB = 1 << 20


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    cfg = ServerConfig(data_dir=tmp_path_factory.mktemp("upload"), listen="127.0.0.1:0",
                       metrics_listen="", admin_key=ROOT_KEY, sync=False,
                       max_upload_bytes=48 * MiB)  # fmt: skip
    with run_server(cfg) as s:
        yield s


@pytest.fixture
def root(srv):
    with MemdbClient(srv.address, ROOT_KEY, chunk_bytes=256 * 1024) as c:
        yield c


def big_shard(mib: int) -> bytes:
    """A valid shard of about `mib` MiB (float32 out)."""
    m = mib * MiB // (4 * 64 * 4)
    return encode_shard(Shard(keys=np.ones((1, m, 4), np.float32),
                              out=np.ones((1, m, 4, 64), np.float32),
                              lse=np.zeros((1, m, 4), np.float32)))  # fmt: skip


def counted(messages):
    """The messages, counting the chunk bytes gRPC actually took from us."""
    sent = [0]

    def gen():
        for msg in messages:
            if msg.WhichOneof("kind") == "chunk":
                sent[0] += len(msg.chunk.data)
            yield msg

    return gen(), sent


def raw_upload(client: MemdbClient, name: str, blobs: list[bytes], *, declare: bool):
    total = sum(len(b) for b in blobs) if declare else 0
    header = pb.PutPrefixHeader(name=name, model_fingerprint=FP, num_layers=len(blobs),
                                total_bytes=total)  # fmt: skip
    stream, sent = counted(client._upload_stream(header, blobs))
    with pytest.raises(ResourceExhausted) as err:
        client._call(client._admin.PutPrefix, stream, timeout=60)
    return str(err.value), sent[0]


def test_an_upload_over_the_tenant_quota_is_refused_as_its_bytes_arrive(root):
    root.create_tenant("small", max_bytes=MiB)
    key, _ = root.create_api_key("writer", tenant="small")
    with MemdbClient(root.address, key, chunk_bytes=256 * 1024) as c:
        blobs = [big_shard(8), big_shard(8)]
        message, sent = raw_upload(c, "big", blobs, declare=False)
        assert "tenant 'small' has left of its byte quota" in message
        assert sent < 8 * MiB, sent  # refused long before the 16 MiB were all sent
        with pytest.raises(NotFound):
            c.get_prefix("big")
        with pytest.raises(ResourceExhausted, match="declares"):
            c.put_prefix("big", blobs, model_fingerprint=FP)  # declared: refused at the header
    root.delete_tenant("small", force=True)


def test_an_upload_over_max_upload_bytes_is_refused_as_its_bytes_arrive(root):
    blobs = [big_shard(32), big_shard(32)]
    message, sent = raw_upload(root, "huge", blobs, declare=False)
    assert "max_upload_bytes" in message and sent < 60 * MiB, sent
    message, sent = raw_upload(root, "huge", blobs, declare=True)
    assert "declares" in message and sent < 60 * MiB, sent
    with pytest.raises(NotFound):
        root.get_prefix("huge")


def test_an_upload_that_sends_more_or_less_than_it_declared_is_invalid(root):
    blobs = [encode_shard(s) for s in make_shards(layers=2)]
    for total in (10, sum(map(len, blobs)) + 10):
        header = pb.PutPrefixHeader(name="liar", model_fingerprint=FP, num_layers=2,
                                    total_bytes=total)  # fmt: skip
        with pytest.raises(InvalidArgument, match="declared total_bytes"):
            root._call(root._admin.PutPrefix, root._upload_stream(header, blobs))
    with pytest.raises(NotFound):
        root.get_prefix("liar")


def test_an_upload_cut_off_before_its_commit_message_stores_nothing(root):
    """The client is interrupted once every chunk was sent, before the commit message: the
    stream ends (half-closes) there, and the server must not store the version."""
    blobs = [encode_shard(s) for s in make_shards(layers=2)]
    header = pb.PutPrefixHeader(name="cut", model_fingerprint=FP, num_layers=2)
    without_commit = [m for m in root._upload_stream(header, blobs) if not m.HasField("commit")]
    assert len(without_commit) == 3  # header and both layers' chunks
    with pytest.raises(InvalidArgument, match="without its commit message; nothing was stored"):
        root._call(root._admin.PutPrefix, iter(without_commit))
    with pytest.raises(NotFound):
        root.get_prefix("cut")
    assert root.put_prefix("cut", blobs, model_fingerprint=FP).version == 1  # with commit


def test_a_commit_before_the_last_layer_or_a_message_after_it_is_invalid(root):
    blobs = [encode_shard(s) for s in make_shards(layers=2)]
    header = pb.PutPrefixHeader(name="early", model_fingerprint=FP, num_layers=2)
    msgs = list(root._upload_stream(header, blobs))
    commit = msgs[-1]
    with pytest.raises(InvalidArgument, match="commit message after 1 of 2 layers"):
        root._call(root._admin.PutPrefix, iter([*msgs[:2], commit, msgs[2]]))
    with pytest.raises(NotFound):
        root.get_prefix("early")


def test_the_quota_counts_real_indices_and_retained_versions(root):
    shards = make_shards(layers=2, m=64)
    blobs = [encode_shard(s) for s in shards]
    shard_bytes = sum(map(len, blobs))
    root.create_tenant("q", max_bytes=int(shard_bytes * 1.6))
    key, _ = root.create_api_key("writer", tenant="q")
    with MemdbClient(root.address, key) as c:
        # an HNSW index holds its vectors and links: more bytes than the shards themselves
        with pytest.raises(ResourceExhausted, match="over its .*-byte quota"):
            c.put_prefix("h", blobs, model_fingerprint=FP, index_kind="hnsw")
        info = c.put_prefix("f", blobs, model_fingerprint=FP, index_kind="flat")
        tenant = next(t for t in root.list_tenants() if t.name == "q")
        assert shard_bytes < tenant.bytes <= tenant.max_bytes  # indices and records count
        with pytest.raises(ResourceExhausted, match="quota"):  # a second retained version
            c.put_prefix("f", blobs, model_fingerprint=FP, index_kind="flat", mode="update")
        assert c.get_prefix("f").version == info.version
    root.delete_tenant("q", force=True)
