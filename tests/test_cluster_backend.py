"""The cluster backend's own behaviours, with several nodes (ClusterStores) on one real 3-member
etcd cluster and one real 3-master + 3-replica Redis Cluster: compare-and-swap between nodes,
quotas across nodes, Watch across nodes, crash safety of staging vs publishing and the blob
garbage collector, the node's LMDB read cache, node registration."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from memdb.errors import Aborted, FailedPrecondition, NotFound, ResourceExhausted
from memdb.shards import decode_shard
from memdb_server.backends.blob_cache import BlobCache
from memdb_server.backends.cluster import ClusterStore
from memdb_server.backends.etcd_gateway import WATCH_IDLE_S, EtcdClient, WatchStop
from memdb_server.records import KeyRecord, TenantRecord
from tests.test_backend_contract import raw_cluster_bytes
from tests.test_storage import T, shard_bytes, write

MiB = 1 << 20


@pytest.fixture
def root() -> str:
    return f"/memdb-test-{uuid.uuid4().hex}/"


@pytest.fixture
def nodes(cluster_planes, tmp_path, root):
    """Open `n` nodes sharing one etcd root (one memdb cluster); all closed at the end."""
    opened: list[ClusterStore] = []

    def open_nodes(n: int = 2, **kw) -> list[ClusterStore]:
        etcd, redis = cluster_planes
        kw.setdefault("gc_interval_s", 0)
        kw.setdefault("lease_ttl_s", 3)
        kw.setdefault("cache_bytes", 64 * MiB)
        for _ in range(n):
            node = ClusterStore(etcd.client_urls, redis.urls, root=root,
                                cache_dir=tmp_path / f"cache-{len(opened)}", **kw)  # fmt: skip
            opened.append(node)
        return opened[-n:]

    yield open_nodes
    for node in opened:
        node.close()


def upload_keys(node: ClusterStore, upload: str) -> list[str]:
    return list(node.blobs.scan(upload))


def upload_of(node: ClusterStore, name: str, version: int = 0) -> str:
    return upload_of_t(node, T, name, version)


def upload_of_t(node: ClusterStore, tenant: str, name: str, version: int = 0) -> str:
    return node._version_entry(tenant, name, version)[1]["upload"]


# ---------------------------------------------------------------- writes across nodes


def test_two_nodes_writing_the_same_expected_version_cannot_both_win(nodes):
    a, b = nodes(2)
    write(a, "p")
    staged = threading.Barrier(2)
    for node in (a, b):  # both have staged their blobs before either publishes
        node.stage_hook = lambda upload: staged.wait(10)
    results: list = []

    def update(node, fill):
        try:
            results.append(write(node, "p", mode="update", expected_version=1, token_count=fill))
        except FailedPrecondition as exc:
            results.append(exc)

    threads = [threading.Thread(target=update, args=(n, i)) for i, n in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, FailedPrecondition)]
    assert len(won) == 1 and len(lost) == 1, results
    assert "at version 2, not the expected 1" in str(lost[0])
    assert b.get_prefix(T, "p").version == 2
    assert a.get_prefix(T, "p").token_count == won[0].token_count


def test_a_quota_holds_across_nodes_writing_at_once(nodes):
    """The upload in flight on node a holds its reservation: node b's create is refused before
    it stages anything, and a's goes through."""
    a, b = nodes(2)
    a.put_tenant(TenantRecord("small", max_prefixes=1))
    staged, release = threading.Event(), threading.Event()
    a.stage_hook = lambda upload: (staged.set(), release.wait(10))
    results: list = []
    thread = threading.Thread(target=lambda: results.append(write(a, "x0", tenant="small")))
    thread.start()
    assert staged.wait(10)
    before = set(b.blobs.keys_by_upload())
    with pytest.raises(ResourceExhausted, match="has 1 prefixes, its quota is 1"):
        write(b, "x1", tenant="small", mode="create")
    assert set(b.blobs.keys_by_upload()) == before  # refused before any blob was staged
    release.set()
    thread.join(30)
    assert [r.name for r in results] == ["x0"]
    assert a.usage("small")[0] == b.usage("small")[0] == 1


def test_a_write_through_one_node_is_read_exactly_through_another(nodes):
    a, b = nodes(2)
    shards = [shard_bytes(seed=layer, m=64) for layer in range(3)]
    rec = write(a, "p", shards=shards, tag="x")
    snap = b.read_version(T, "p")
    assert snap.record == rec and [snap.shards[i] for i in range(3)] == shards
    assert snap.indices[2] == [b"index x 2 0", b"index x 2 1"]
    rec_b, layer = b.read_current_layer(T, "p", 1, open_layer=lambda r, read: read())
    assert rec_b == rec and layer.version == 1 and layer.shard(1) == shards[1]
    assert list(layer.shards) == [1]
    chunk, size = b.read_shard_chunk(T, "p", 1, 2, 10, 100)
    assert (chunk, size) == (shards[2][10:110], len(shards[2]))
    write(a, "p")
    write(a, "p")  # version 1 is no longer retained
    with pytest.raises(Aborted, match="version 1 of prefix 'p' was replaced or deleted"):
        b.read_shard_chunk(T, "p", 1, 2, 0, 100)


def test_usage_counters_stay_exact_with_two_nodes_writing_one_tenant_at_once(nodes):
    a, b = nodes(2)
    a.put_tenant(TenantRecord("acme", max_bytes=1 << 30))

    def writes(node, tag):
        for i in range(4):
            write(node, f"{tag}{i % 2}", tenant="acme", tag=tag * (i + 1))
            node.put_key(KeyRecord(f"{tag}-k{i}", "acme", "reader", "h" * 64))
        node.delete_prefix("acme", f"{tag}0")

    threads = [threading.Thread(target=writes, args=(n, t)) for n, t in ((a, "x"), (b, "y"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    usage = b.tenant_usage("acme")
    assert usage == a.recount_usage("acme") and (usage.prefixes, usage.keys) == (2, 8)
    assert usage.bytes == raw_cluster_bytes(a, "acme")


def test_api_keys_count_against_a_per_tenant_limit_and_the_byte_quota_on_the_cluster(nodes):
    a, b = nodes(2, max_keys_per_tenant=3)
    a.put_tenant(TenantRecord("acme"))
    for i, node in enumerate((a, b, a)):
        node.put_key(KeyRecord(f"k{i}", "acme", "reader", "h"))
    with pytest.raises(ResourceExhausted, match="has 3 API keys.*revoke"):
        b.put_key(KeyRecord("k3", "acme", "reader", "h"))
    b.delete_key("k0")
    a.put_key(KeyRecord("k3", "acme", "reader", "h"))
    assert b.tenant_usage("acme").keys == 3
    a.put_tenant(TenantRecord("tiny", max_bytes=400))
    a.put_key(KeyRecord("t0", "tiny", "reader", "h", "x" * 100))
    with pytest.raises(ResourceExhausted, match="API key 't1' would bring tenant 'tiny'"):
        b.put_key(KeyRecord("t1", "tiny", "reader", "h", "x" * 100))
    assert b.tenant_usage("tiny").bytes == raw_cluster_bytes(b, "tiny")


def test_upload_allowance_is_the_quota_left_plus_what_the_write_drops(nodes):
    (node,) = nodes(1)
    node.put_tenant(TenantRecord("q", max_bytes=1 << 20))
    assert node.upload_allowance(T, "p") is None  # no quota
    assert node.upload_allowance("q", "p") == (1 << 20)
    write(node, "p", tenant="q")
    left = (1 << 20) - node.tenant_usage("q").bytes
    pointer = node.etcd.get(node._pointer("q", "p"))
    assert node.upload_allowance("q", "p") == left + len(pointer.key) + len(pointer.value)
    write(node, "p", tenant="q")  # retain 2: the next write also drops version 1
    left = (1 << 20) - node.tenant_usage("q").bytes
    pointer = node.etcd.get(node._pointer("q", "p"))
    v1 = node.etcd.get(node._version_key("q", "p", 1))
    v1_blobs = [
        (k, node.blobs._rc.strlen(k)) for k in upload_keys(node, upload_of_t(node, "q", "p", 1))
    ]
    freed = len(pointer.key) + len(pointer.value) + len(v1.key) + len(v1.value)
    expected = left + freed + sum(len(k) + n for k, n in v1_blobs)
    assert node.upload_allowance("q", "p") == expected


# ---------------------------------------------------------------- watch across nodes


def test_watch_on_one_node_sees_puts_and_deletes_made_through_another(nodes):
    a, b = nodes(2)

    def changes() -> None:
        a.event_bus.publish(object())  # local publishes are ignored: events come from etcd
        write(a, "w")
        write(a, "other")
        write(a, "w", mode="update")
        a.delete_prefix(T, "w")

    async def watch() -> list:  # as the Watch RPC: an asyncio subscription on b's loop
        sub = b.event_bus.subscribe(T, "key", ["w"])
        await asyncio.to_thread(changes)
        async with asyncio.timeout(10):
            return [await sub.next() for _ in range(3)]

    got = asyncio.run(watch())
    assert [(e.kind, e.name, e.version) for e in got] == [
        ("put", "w", 1), ("put", "w", 2), ("delete", "w", 2)]  # fmt: skip
    assert got[0].model_fingerprint == "model-a"


# ---------------------------------------------------------------- crash safety and GC


CRASH = """
import os, signal, sys
sys.path[:0] = {path!r}
from memdb_server.backends.cluster import ClusterStore
from memdb_server.backends.etcd_gateway import WATCH_IDLE_S, EtcdClient, WatchStop
from tests.test_storage import write
store = ClusterStore({etcd!r}, {redis!r}, root={root!r}, cache_dir={cache!r},
                     gc_interval_s=0, lease_ttl_s=2)
def crash(upload):
    print(upload, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # a node dies between staging and publishing
store.stage_hook = crash
write(store, "torn")
"""


def test_a_node_killed_between_staging_and_publishing_leaves_no_version_and_gc_cleans_up(
    nodes, cluster_planes, root, tmp_path
):
    (survivor,) = nodes(1, gc_grace_s=0)
    write(survivor, "kept")
    kept_keys = upload_keys(survivor, upload_of(survivor, "kept"))
    etcd, redis = cluster_planes
    code = CRASH.format(path=sys.path, etcd=etcd.client_urls, redis=redis.urls, root=root,
                        cache=str(tmp_path / "crash-cache"))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    upload = proc.stdout.strip()
    assert len(upload_keys(survivor, upload)) == 3 + 6  # staged: 3 shards, 3 x 2 indices
    with pytest.raises(NotFound):
        survivor.get_prefix(T, "torn")
    assert [r.name for r in survivor.list_prefixes(T)] == ["kept"]
    survivor.gc.collect()  # the staging record lives until the dead node's lease expires
    assert len(upload_keys(survivor, upload)) == 9
    deadline = time.monotonic() + 15
    while upload in survivor.gc.live_uploads() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert survivor.gc.collect() == 9
    assert upload_keys(survivor, upload) == []
    assert sorted(upload_keys(survivor, upload_of(survivor, "kept"))) == sorted(kept_keys)
    assert survivor.read_version(T, "kept").record.version == 1


def test_gc_removes_replaced_and_deleted_versions_after_the_grace_period(nodes):
    (node,) = nodes(1, gc_grace_s=0.5, retain_versions=2)
    uploads = [upload_of(node, "p", write(node, "p").version) for _ in range(3)]
    write(node, "gone")
    gone = upload_of(node, "gone")
    node.delete_prefix(T, "gone")
    assert node.gc.collect() == 0  # first seen unreferenced: kept for the grace period
    time.sleep(0.6)
    assert node.gc.collect() == 9 + 9  # version 1 of p (no longer retained) and all of "gone"
    assert upload_keys(node, uploads[0]) == [] and upload_keys(node, gone) == []
    for upload in uploads[1:]:
        assert len(upload_keys(node, upload)) == 9
    assert node.read_version(T, "p", 2).record.version == 2


def test_one_node_holds_the_collectors_lease(nodes):
    a, b = nodes(2)
    assert [a.gc.is_leader(), b.gc.is_leader()] == [True, False]
    a.close(crash=True)  # its lease expires; then b may collect
    deadline = time.monotonic() + 15
    while not b.gc.is_leader() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b.gc.is_leader()


# ---------------------------------------------------------------- the node's read cache


def test_a_hot_memory_is_served_from_the_nodes_cache_without_redis(nodes):
    a, b = nodes(2)
    shards = [shard_bytes(seed=layer) for layer in range(3)]
    write(a, "hot", shards=shards)
    first = a.read_version(T, "hot")
    hits = a.cache.hits
    node_upload = upload_of(a, "hot")
    a.blobs.delete_upload(node_upload)  # Redis no longer has the blobs
    again = a.read_version(T, "hot")
    assert again.shards == first.shards and again.indices == first.indices
    assert a.cache.hits == hits + 9
    with pytest.raises(NotFound, match="gone from the Redis Cluster"):
        b.read_version(T, "hot")  # a node with a cold cache must go to Redis


def test_blob_cache_is_bounded_and_evicts_the_least_recently_used(tmp_path):
    cache = BlobCache(tmp_path / "c", max_bytes=3000)
    for i in range(3):
        cache.put(f"k{i}", bytes([i]) * 1000)
    assert cache.get("k0") == b"\0" * 1000  # k0 is now the most recent
    cache.put("k3", b"\3" * 1000)
    assert cache.get("k1") is None and cache.get("k0") is not None and len(cache) == 3
    assert cache.nbytes == 3000
    cache.put("big", b"x" * 5000)  # larger than the whole cache: not cached
    assert cache.get("big") is None
    cache.close()
    reopened = BlobCache(tmp_path / "c", max_bytes=3000)
    assert reopened.get("k3") == b"\3" * 1000 and reopened.nbytes == 3000
    reopened.close()


def test_concurrent_readers_on_one_node_see_whole_versions_written_by_another(nodes):
    reader_node, writer_node = nodes(2)
    write(writer_node, shards=[shard_bytes(value=1.0, seed=i) for i in range(3)], tag="1",
          token_count=1)  # fmt: skip
    errors: list[str] = []
    reads = [0]
    done = threading.Event()

    def reader():
        while not done.is_set():
            snap = reader_node.read_version(T, "p")
            v = snap.record.version
            for layer, blob in snap.shards.items():
                if not (decode_shard(blob).lse == v).all():
                    errors.append(f"version {v} layer {layer} has another version's shard")
                if snap.indices[layer][0] != f"index {v} {layer} 0".encode():
                    errors.append(f"version {v} layer {layer} has another version's index")
            reads[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for v in range(2, 7):
            shards = [shard_bytes(m=64, value=float(v), seed=i) for i in range(3)]
            write(writer_node, shards=shards, tag=str(v), token_count=v)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert reads[0] > 0 and reader_node.get_prefix(T, "p").version == 6


# ---------------------------------------------------------------- nodes and accounting


def test_nodes_register_with_a_lease_and_leave(nodes):
    a, b, c = nodes(3)
    assert {n["node"] for n in a.list_nodes()} == {a.node_id, b.node_id, c.node_id}
    b.close()  # a graceful stop withdraws at once
    assert {n["node"] for n in a.list_nodes()} == {a.node_id, c.node_id}
    c.close(crash=True)  # a crash: gone once its lease expires
    deadline = time.monotonic() + 15
    while len(a.list_nodes()) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [n["node"] for n in a.list_nodes()] == [a.node_id]
    assert a.healthy()


def test_usage_count_records_and_info_of_the_cluster(nodes):
    (node,) = nodes(1)
    first = write(node, "a")
    second = write(node, "b")
    assert node.usage(T) == (2, raw_cluster_bytes(node, T))
    assert node.usage(T)[1] > first.bytes + second.bytes  # indices and records count too
    info = node.info()
    assert (info["num_tenants"], info["num_prefixes"], info["nodes"]) == (1, 2, 1)
    assert info["used_bytes"] > first.bytes + second.bytes
    counts = node.count_records()
    assert (counts["versions"], counts["shards"], counts["indices"]) == (2, 6, 12)


def test_setting_a_watch_stop_ends_a_watch_blocked_on_an_idle_stream():
    """`WatchStop.set` shuts the socket the watch reads, so a node closes without waiting for
    the idle timeout (WATCH_IDLE_S) of its etcd watch (with a plain Event it would wait)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = threading.Event()

    def stalled_gateway() -> None:  # answers a watch, then sends nothing, like an idle etcd
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        accepted.set()
        time.sleep(3 * WATCH_IDLE_S)
        conn.close()

    threading.Thread(target=stalled_gateway, daemon=True).start()
    etcd = EtcdClient([f"http://127.0.0.1:{listener.getsockname()[1]}"])
    stop = WatchStop()
    watcher = threading.Thread(target=etcd.watch, args=(b"/x/", lambda e: None, stop))
    watcher.start()
    assert accepted.wait(10)
    stop.set()
    watcher.join(WATCH_IDLE_S / 4)
    assert not watcher.is_alive()
    etcd.close()
    listener.close()
