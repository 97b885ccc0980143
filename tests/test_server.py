"""The memdb server end to end: the same calls in-process (run_server) and over a real
server process, with real LMDB files in tmp dirs and real FAISS indices."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memdb.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from memdb.shards import Shard, encode_shard
from memdb.v1 import memdb_pb2 as pb
from memdb_client import MemdbClient, output
from memdb_server.cluster_process import memdb_cluster
from memdb_server.config import ServerConfig
from memdb_server.process import server_process
from memdb_server.server import run_server

FP = "fp-test-model"
ROOT_KEY = "test-root-key"


def make_shards(layers=3, groups=2, m=64, dk=16, h=2, d=8, seed=0, fill=None) -> list[Shard]:
    rng = np.random.default_rng(seed)
    shards = []
    for layer in range(layers):
        out = rng.standard_normal((groups, m, h, d)).astype(np.float32)
        if fill is not None:
            out[:] = fill
        shards.append(
            Shard(
                keys=rng.standard_normal((groups, m, dk)).astype(np.float32),
                out=out,
                lse=rng.standard_normal((groups, m, h)).astype(np.float32),
                metadata={"layer": str(layer)},
            )
        )
    return shards


@pytest.fixture(scope="module", params=["inprocess", "process", "cluster"])
def server(request, tmp_path_factory):
    """(address, metrics address, how): the same tests run against one node in-process, one
    node as a process, and three cluster-backend nodes (address `a,b,c`: round robin)."""
    data = tmp_path_factory.mktemp(f"data-{request.param}")
    if request.param == "cluster":
        etcd, redis = request.getfixturevalue("cluster_planes")
        with memdb_cluster(data, etcd, redis, nodes=3, admin_key=ROOT_KEY,
                           max_upload_bytes=8 << 20) as nodes:  # fmt: skip
            yield ",".join(n.address for n in nodes), nodes[0].metrics_address, request.param
    elif request.param == "inprocess":
        cfg = ServerConfig(data_dir=data, listen="127.0.0.1:0", metrics_listen="127.0.0.1:0",
                           admin_key=ROOT_KEY, max_upload_bytes=8 << 20)  # fmt: skip
        with run_server(cfg) as s:
            yield s.address, s.metrics_address, request.param
    else:
        with server_process(data, admin_key=ROOT_KEY, max_upload_bytes=8 << 20) as s:
            yield s.address, s.metrics_address, request.param


@pytest.fixture
def root(server):
    with MemdbClient(server[0], ROOT_KEY, timeout=30) as c:
        yield c


def _tenant_client(root: MemdbClient, tenant: str, role: str = "writer") -> MemdbClient:
    if tenant not in {t.name for t in root.list_tenants()}:
        root.create_tenant(tenant)
    key, _ = root.create_api_key(role, tenant=tenant)
    return MemdbClient(root.address, key)


def test_put_get_lookup_fetch_delete_round_trip_is_exact(root):
    shards = make_shards(seed=1)
    info = root.put_prefix("rt", shards, model_fingerprint=FP, token_count=123,
                           build_params={"key_mode": "pre_rope"})  # fmt: skip
    assert (info.version, info.num_layers, info.num_groups, info.budget) == (1, 3, 2, 64)
    assert (info.key_dim, info.heads_per_group, info.head_dim) == (16, 2, 8)
    got = root.get_prefix("rt")
    assert got.token_count == 123 and got.build_params == {"key_mode": "pre_rope"}
    assert got.model_fingerprint == FP and got.bytes > 0

    layer = 2
    q = shards[layer].keys[:, [5, 17], :].transpose(1, 0, 2)  # [Q=2, I, Dk]: stored keys
    res = root.lookup("rt", layer, q, model_fingerprint=FP, k=3)
    assert res.version == 1
    assert res.ids.shape == (2, 2, 3) and res.out.shape == (2, 2, 3, 2, 8)
    np.testing.assert_array_equal(res.ids[:, :, 0], [[5, 5], [17, 17]])
    np.testing.assert_allclose(res.scores[:, :, 0], 1.0, atol=1e-5)
    for qi, entry in enumerate([5, 17]):
        for g in range(2):
            np.testing.assert_array_equal(res.out[qi, g, 0], shards[layer].out[g, entry])
            np.testing.assert_array_equal(res.lse[qi, g, 0], shards[layer].lse[g, entry])

    mem = root.fetch_memory("rt", model_fingerprint=FP)
    assert mem.info.version == 1 and len(mem.shards) == 3
    for a, b in zip(mem.shards, shards, strict=True):
        for t in ("keys", "out", "lse"):
            np.testing.assert_array_equal(getattr(a, t), getattr(b, t))

    assert root.delete_prefix("rt") == 1
    with pytest.raises(NotFound):
        root.get_prefix("rt")
    with pytest.raises(NotFound):
        root.lookup("rt", 0, q, model_fingerprint=FP)


def with_extras(shards: list[Shard], seed: int = 0) -> list[Shard]:
    """The shards with the extras a default worker build stores: q_mean, k_bar [I, M, h, d]."""
    rng = np.random.default_rng(seed)
    for s in shards:
        s.extras = {
            "q_mean": rng.standard_normal(s.out.shape).astype(np.float32),
            "k_bar": rng.standard_normal(s.out.shape).astype(np.float16),
        }
    return shards


def test_lookup_returns_the_requested_extras_of_the_hits_as_stored(root):
    shards = with_extras(make_shards(seed=2))
    root.put_prefix("ext", shards, model_fingerprint=FP)
    assert root.get_prefix("ext").extra_tensors == ["k_bar", "q_mean"]
    layer, rows = 1, [3, 40, 63]
    q = shards[layer].keys[:, rows, :].transpose(1, 0, 2)  # [Q=3, I, Dk]: stored keys
    res = root.lookup("ext", layer, q, model_fingerprint=FP, k=2, extras=["k_bar", "q_mean"])
    np.testing.assert_array_equal(res.ids[:, :, 0], np.array([rows, rows]).T)
    assert list(res.extras) == ["k_bar", "q_mean"]  # in request order
    for name, dtype in (("q_mean", np.float32), ("k_bar", np.float16)):
        got = res.extras[name]
        assert got.shape == (3, 2, 2, 2, 8) and got.dtype == dtype  # [Q, I, k, h, d], as stored
        groups = np.arange(2)[None, :, None]
        np.testing.assert_array_equal(got, shards[layer].extras[name][groups, res.ids])
    # extras need no states, and a Lookup that asks for none gets none
    only = root.lookup("ext", layer, q[:1], model_fingerprint=FP, include_states=False,
                       extras=["q_mean"])  # fmt: skip
    assert only.out is None and list(only.extras) == ["q_mean"]
    np.testing.assert_array_equal(only.extras["q_mean"], res.extras["q_mean"][:1, :, :1])
    assert root.lookup("ext", layer, q, model_fingerprint=FP).extras == {}
    root.delete_prefix("ext")


def test_lookup_of_fitted_rows_is_refused_and_fetch_serves_them(root):
    shards = make_shards(groups=2, m=8, dk=8, h=1, d=8, seed=3)
    for s in shards:
        s.metadata["entry_state"] = "fitted"
    root.put_prefix("fitted", shards, model_fingerprint=FP)
    q = np.ones((1, 2, 8), np.float32)
    with pytest.raises(FailedPrecondition, match=r"fitted rows.*FetchMemory"):
        root.lookup("fitted", 1, q, model_fingerprint=FP)
    fetched = root.fetch_memory("fitted", model_fingerprint=FP).shards
    np.testing.assert_array_equal(fetched[1].out, shards[1].out)
    root.delete_prefix("fitted")


def test_lookup_of_an_unknown_extra_is_invalid_argument(root):
    root.put_prefix("ext-bad", with_extras(make_shards()), model_fingerprint=FP)
    root.put_prefix("ext-none", make_shards(), model_fingerprint=FP)
    q = np.zeros((1, 16), np.float32) + 1
    with pytest.raises(InvalidArgument, match=r"no extra tensor 'whiten'.*'k_bar', 'q_mean'"):
        root.lookup("ext-bad", 0, q, model_fingerprint=FP, extras=["q_mean", "whiten"])
    with pytest.raises(InvalidArgument, match=r"no extra tensor 'k_bar'; its extra tensors: none"):
        root.lookup("ext-none", 0, q, model_fingerprint=FP, extras=["k_bar"])
    assert root.lookup("ext-bad", 0, q, model_fingerprint=FP, extras=["k_bar"]).extras
    root.delete_prefix("ext-bad")
    root.delete_prefix("ext-none")


def test_update_makes_a_new_version_and_lookup_reads_it(root):
    root.put_prefix("upd", make_shards(fill=1.0), model_fingerprint=FP)
    with pytest.raises(AlreadyExists):
        root.put_prefix("upd", make_shards(fill=2.0), model_fingerprint=FP)
    info = root.put_prefix("upd", make_shards(fill=2.0), model_fingerprint=FP, mode="update")
    assert info.version == 2
    with pytest.raises(FailedPrecondition):
        root.put_prefix("upd", make_shards(), model_fingerprint=FP, mode="update",
                        expected_version=1)  # fmt: skip
    res = root.lookup("upd", 0, np.ones((1, 16), np.float32), model_fingerprint=FP)
    assert res.version == 2 and np.all(res.out == 2.0)
    with pytest.raises(NotFound):
        root.put_prefix("nope", make_shards(), model_fingerprint=FP, mode="update")
    root.delete_prefix("upd")


def test_concurrent_lookups_during_updates_each_read_one_version(root):
    root.put_prefix("conc", make_shards(fill=1.0, m=256), model_fingerprint=FP)
    errors: list[str] = []
    stop = threading.Event()
    seen: set[int] = set()

    def reader():
        q = np.random.default_rng(0).standard_normal((8, 2, 16)).astype(np.float32)
        while not stop.is_set():
            for layer in range(3):
                r = root.lookup("conc", layer, q, model_fingerprint=FP, k=4)
                seen.add(r.version)
                if not np.all(r.out == float(r.version)):
                    errors.append(f"version {r.version} layer {layer} has mixed states")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for v in range(2, 6):
        root.put_prefix("conc", make_shards(fill=float(v), m=256, seed=v),
                        model_fingerprint=FP, mode="update")  # fmt: skip
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(seen) >= 2  # the readers really ran across updates
    root.delete_prefix("conc")


def test_model_fingerprint_mismatch_is_refused(root):
    root.put_prefix("fp", make_shards(), model_fingerprint=FP)
    q = np.zeros((1, 16), np.float32)
    with pytest.raises(FailedPrecondition, match="rebuild the memory"):
        root.lookup("fp", 0, q, model_fingerprint="other-model")
    with pytest.raises(FailedPrecondition):
        root.fetch_memory("fp", model_fingerprint="other-model")
    with pytest.raises(InvalidArgument, match="model_fingerprint is required"):
        root.lookup("fp", 0, q, model_fingerprint="")
    root.delete_prefix("fp")


BAD_SHARDS = {
    "not safetensors": (lambda s: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......", "layer 1"),
    "missing tensor": (
        lambda s: encode_partial({"keys": s.keys, "out": s.out}), "'lse' is missing"),
    "nan": (lambda s: encode_partial({"keys": s.keys * np.nan, "out": s.out, "lse": s.lse}),
            "'keys' holds NaN"),
    "wrong dtype": (lambda s: encode_partial({"keys": s.keys, "out": s.out,
                                              "lse": s.lse.astype(np.float16)}), "'lse' has dtype"),
    "inconsistent": (lambda s: encode_shard(make_shards(layers=1, m=32)[0]), "layer 1 has shape"),
}  # fmt: skip


def encode_partial(tensors: dict) -> bytes:
    import safetensors.numpy as stnp

    return stnp.save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_bad_shard_is_invalid_argument_and_nothing_is_stored(root, case):
    make_bad, message = BAD_SHARDS[case]
    shards = make_shards()
    blobs = [encode_shard(s) for s in shards]
    blobs[1] = make_bad(shards[1])
    with pytest.raises(InvalidArgument, match=message):
        root.put_prefix(f"bad-{case.replace(' ', '-')}", blobs, model_fingerprint=FP)
    with pytest.raises(NotFound):
        root.get_prefix(f"bad-{case.replace(' ', '-')}")
    assert root.health() == "SERVING"


def test_bad_requests_get_their_status_and_the_server_keeps_serving(root):
    root.put_prefix("ok", make_shards(), model_fingerprint=FP)
    q = np.zeros((2, 2, 16), np.float32)
    cases = [
        (InvalidArgument, lambda: root.put_prefix("bad name!", make_shards(),
                                                  model_fingerprint=FP)),
        (InvalidArgument, lambda: root.put_prefix("x", make_shards(), model_fingerprint="")),
        (InvalidArgument, lambda: root.lookup("ok", 9, q, model_fingerprint=FP)),
        (InvalidArgument, lambda: root.lookup("ok", 0, np.zeros((2, 3, 16), np.float32),
                                              model_fingerprint=FP)),
        (InvalidArgument, lambda: root.lookup("ok", 0, q * np.nan, model_fingerprint=FP)),
        (InvalidArgument, lambda: root.lookup("ok", 0, q, model_fingerprint=FP, k=10_000)),
        (NotFound, lambda: root.lookup("missing", 0, q, model_fingerprint=FP)),
        (NotFound, lambda: root.delete_prefix("missing")),
        (NotFound, lambda: root.lookup("ok", 0, q, model_fingerprint=FP, version=99)),
        (ResourceExhausted, lambda: root.put_prefix("huge", make_shards(m=20_000, dk=64),
                                                    model_fingerprint=FP)),
    ]  # fmt: skip
    for exc, call in cases:
        with pytest.raises(exc):
            call()
    assert root.lookup("ok", 0, q, model_fingerprint=FP).ids.shape == (2, 2, 1)
    root.delete_prefix("ok")


def test_chunks_out_of_order_are_invalid(root):
    blob = encode_shard(make_shards(layers=1)[0])
    header = pb.PutPrefixHeader(name="order", model_fingerprint=FP, num_layers=2)
    msgs = [pb.PutPrefixRequest(header=header),
            pb.PutPrefixRequest(chunk=pb.ShardChunk(layer=1, data=blob, last=True))]  # fmt: skip
    with pytest.raises(InvalidArgument, match="expecting layer 0"):
        root._call(root._admin.PutPrefix, iter(msgs))
    msgs = [pb.PutPrefixRequest(header=header),
            pb.PutPrefixRequest(chunk=pb.ShardChunk(layer=0, data=blob, last=True))]  # fmt: skip
    with pytest.raises(InvalidArgument, match="after 1 of 2 layers"):
        root._call(root._admin.PutPrefix, iter(msgs))


def test_upload_cancelled_after_its_last_chunk_stores_nothing(tmp_path, monkeypatch):
    """The client cancels once the server has the whole upload, just before it commits: the
    in-transaction `still_wanted` check (context.is_active) must abort the write."""
    cfg = ServerConfig(data_dir=tmp_path, listen="127.0.0.1:0", metrics_listen="",
                       admin_key=ROOT_KEY)  # fmt: skip
    with run_server(cfg) as srv, MemdbClient(srv.address, ROOT_KEY) as c:
        store, call = srv.runtime.store, {}
        write_version, made, written = store.write_version, threading.Event(), threading.Event()
        seen: list = []

        def cancel_then_write(*args, still_wanted, **kw):
            seen.append(still_wanted())  # every layer arrived and the call is still live
            try:
                assert made.wait(10)
                call["future"].cancel()
                deadline = time.monotonic() + 10
                while still_wanted() and time.monotonic() < deadline:
                    time.sleep(0.01)
                return write_version(*args, still_wanted=still_wanted, **kw)
            except Exception as exc:
                seen.append(exc)
                raise
            finally:
                written.set()

        monkeypatch.setattr(store, "write_version", cancel_then_write)
        shards = make_shards()
        header = pb.PutPrefixHeader(name="cancelled", model_fingerprint=FP, num_layers=3)
        stream = c._upload_stream(header, shards)  # header, then every chunk of every layer
        call["future"] = c._admin.PutPrefix.future(stream, metadata=c._metadata, timeout=30)
        made.set()
        with pytest.raises(grpc.FutureCancelledError):
            call["future"].result()
        assert written.wait(10)  # the server's attempt to commit is over
        monkeypatch.undo()
        with pytest.raises(NotFound):
            c.get_prefix("cancelled")
        assert c.list_prefixes() == []
        with pytest.raises(NotFound):
            store.read_version("default", "cancelled", 1)
        assert c.stats().tenants.get("default", (0, 0)) == (0, 0)  # no prefix, no bytes
        assert seen[0] is True and isinstance(seen[-1], Cancelled), seen  # aborted at commit
        # no record was left behind: a create of the same name starts again at version 1
        assert c.put_prefix("cancelled", shards, model_fingerprint=FP).version == 1


def test_auth_missing_or_wrong_key_is_unauthenticated(server):
    for key in ("", "garbage", "mdb_abc_def"):
        with MemdbClient(server[0], key) as c, pytest.raises(Unauthenticated):
            c.list_prefixes()


def test_roles_are_enforced(root):
    reader = _tenant_client(root, "roles", "reader")
    writer = _tenant_client(root, "roles", "writer")
    with pytest.raises(PermissionDenied, match="'writer' role"):
        reader.put_prefix("r", make_shards(), model_fingerprint=FP)
    writer.put_prefix("r", make_shards(), model_fingerprint=FP)
    assert [p.name for p in reader.list_prefixes()] == ["r"]
    with pytest.raises(PermissionDenied):
        writer.create_api_key("reader")
    with pytest.raises(PermissionDenied):
        writer.create_tenant("sneaky")
    admin_key, info = root.create_api_key("admin", tenant="roles")
    with MemdbClient(root.address, admin_key) as admin:
        key, _ = admin.create_api_key("reader")
        assert {k.key_id for k in admin.list_api_keys()} >= {info.key_id}
        with pytest.raises(PermissionDenied):
            admin.list_api_keys(tenant="default")
        admin.revoke_api_key(key.split("_")[1])
    with MemdbClient(root.address, key) as revoked, pytest.raises(Unauthenticated):
        revoked.list_prefixes()
    writer.delete_prefix("r")


def test_tenant_cannot_see_another_tenants_prefixes(root):
    a = _tenant_client(root, "tenant-a")
    b = _tenant_client(root, "tenant-b")
    shards = make_shards()
    b.put_prefix("secret", shards, model_fingerprint=FP)
    q = shards[0].keys[:, :1].transpose(1, 0, 2)
    assert [p.name for p in a.list_prefixes()] == []
    for call in (
        lambda: a.get_prefix("secret"),
        lambda: a.lookup("secret", 0, q, model_fingerprint=FP),
        lambda: a.fetch_memory("secret", model_fingerprint=FP),
        lambda: a.delete_prefix("secret"),
    ):
        with pytest.raises(NotFound):
            call()
    a.put_prefix("secret", make_shards(fill=3.0), model_fingerprint=FP)  # same name, own space
    assert b.lookup("secret", 0, q, model_fingerprint=FP).ids[0, 0, 0] == 0
    assert np.all(a.lookup("secret", 0, q, model_fingerprint=FP).out == 3.0)
    b.delete_prefix("secret")
    a.delete_prefix("secret")


def test_list_prefixes_pages_through_everything(root):
    names = [f"page-{i:02d}" for i in range(7)]
    for n in names:
        root.put_prefix(n, make_shards(layers=1, m=8), model_fingerprint=FP)
    page, token = root.list_prefixes_page(name_prefix="page-", page_size=3)
    assert [p.name for p in page] == names[:3] and token
    assert [p.name for p in root.list_prefixes(name_prefix="page-", page_size=3)] == names
    for n in names:
        root.delete_prefix(n)


def test_watch_streams_puts_and_deletes(root):
    watch = root.watch(["watched"])
    events = []

    def consume():
        for ev in watch:
            events.append(ev)
            if ev.type == "delete":
                return

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.3)
    root.put_prefix("watched", make_shards(), model_fingerprint=FP)
    root.put_prefix("unwatched", make_shards(), model_fingerprint=FP)
    root.put_prefix("watched", make_shards(), model_fingerprint=FP, mode="update")
    root.delete_prefix("watched")
    t.join(10)
    watch.cancel()
    assert [(e.type, e.name, e.version) for e in events] == [
        ("put", "watched", 1), ("put", "watched", 2), ("delete", "watched", 2)]  # fmt: skip
    root.delete_prefix("unwatched")


def test_quota_is_resource_exhausted(root):
    root.create_tenant("small", max_prefixes=1)
    key, _ = root.create_api_key("writer", tenant="small")
    with MemdbClient(root.address, key) as c:
        c.put_prefix("one", make_shards(layers=1), model_fingerprint=FP)
        with pytest.raises(ResourceExhausted):
            c.put_prefix("two", make_shards(layers=1), model_fingerprint=FP)
    root.delete_tenant("small", force=True)


def test_health_reflection_and_metrics_are_served(server, root):
    address, metrics, _ = server
    address = address.split(",")[0]  # a cluster: the node whose metrics are read
    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="memdb.v1.MemoryService"), timeout=5
        )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = stub.ServerReflectionInfo(iter([req]), timeout=5,
                                            metadata=(("x-api-key", ROOT_KEY),))  # fmt: skip
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"memdb.v1.MemoryService", "memdb.v1.AdminService"} <= names
    with MemdbClient(address, ROOT_KEY) as node:
        node.stats()
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
    assert 'memdb_requests_total{code="OK",method="Stats"}' in text
    assert "memdb_request_seconds_bucket" in text and "memdb_store_bytes" in text


def test_stats_counts_tenants_and_prefixes(root):
    root.put_prefix("st", make_shards(), model_fingerprint=FP)
    s = root.stats()
    assert s.num_prefixes >= 1 and s.store_bytes > 0 and "default" in s.tenants
    root.delete_prefix("st")


def test_stats_list_the_cluster_nodes_by_address_and_a_single_node_none(server, root):
    address, _, how = server
    stats = root.stats()
    if how == "cluster":
        assert sorted(a for _, a in stats.nodes) == sorted(address.split(","))
        assert len({n for n, _ in stats.nodes}) == 3
        text = output.status_text(address, "SERVING", stats)
        assert all(a in text.split("NODE")[1] for a in address.split(","))
    else:
        assert stats.nodes == ()


def test_a_memory_deleted_and_created_again_is_not_answered_from_a_stale_index(server):
    """Through another node too (cluster): version 1 of a re-created prefix is a new memory."""
    addresses = server[0].split(",")
    with MemdbClient(addresses[0], ROOT_KEY) as a, MemdbClient(addresses[-1], ROOT_KEY) as b:
        for seed in (1, 2):
            shards = make_shards(seed=seed)
            a.put_prefix("again", shards, model_fingerprint=FP, mode="create")
            q = shards[0].keys[:, [7], :].transpose(1, 0, 2)  # [Q=1, I, Dk]: a stored key
            res = b.lookup("again", 0, q, model_fingerprint=FP, k=1)
            assert res.version == 1
            np.testing.assert_array_equal(res.out[0, :, 0], shards[0].out[:, 7])
            a.delete_prefix("again")


def test_revoking_a_key_through_one_node_ends_its_watch_stream_on_another(server, root):
    from tests.test_server_limits import _Stream

    addresses = server[0].split(",")
    if "revoke-w" not in {t.name for t in root.list_tenants()}:
        root.create_tenant("revoke-w")
    key, info = root.create_api_key("reader", tenant="revoke-w")
    with MemdbClient(addresses[-1], key) as b, MemdbClient(addresses[0], ROOT_KEY) as a:
        stream = _Stream(b)
        try:
            time.sleep(0.5)  # the stream is open on b
            a.revoke_api_key(info.key_id)
            assert stream.ended.wait(10), "the revoked key's stream is still open"
            assert isinstance(stream.error, Unauthenticated) and "revoked" in str(stream.error)
        finally:
            stream.watch.cancel()
