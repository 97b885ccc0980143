"""The cluster node's two caches on the read side, on a real 3-member etcd and a real Redis
Cluster: deleted data leaves every node's LMDB blob cache *file* (its bytes, not only its index),
and Lookup's metadata comes from a watch-fed copy (no etcd round trip in steady state,
read-your-writes on a node, etcd for what the copy cannot answer, monotonic reads per client)."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from memdb.errors import NotFound
from memdb.shards import Shard, encode_shard
from memdb_client import MemdbClient
from memdb_server.backends.blob_cache import BlobCache
from memdb_server.backends.cluster import ClusterStore
from memdb_server.backends.etcd_gateway import WatchProgress
from memdb_server.cluster_process import memdb_cluster
from memdb_server.config import ServerConfig
from memdb_server.records import KeyRecord
from memdb_server.server import run_server
from memdb_server.storage import DEFAULT_TENANT
from tests.test_server import make_shards
from tests.test_storage import T, write

ROOT_KEY = "cache-test-root-key"
FP = "fp-cache-test"
SCRUB_DEADLINE_S = 10.0  # the bound: deleted bytes gone from every node's disk
MiB = 1 << 20
RANGE = "/v3/kv/range"


def pattern(shards: list[Shard]) -> bytes:
    """64 bytes from the middle of the first shard's encoding: random floats, so found in a
    cache file only if that shard is stored there."""
    blob = encode_shard(shards[0])
    return blob[len(blob) // 2 : len(blob) // 2 + 64]


def on_disk(cache_dir: Path) -> bytes:
    """Every byte of every file under a node's cache directory (the LMDB files)."""
    return b"".join(p.read_bytes() for p in sorted(cache_dir.rglob("*")) if p.is_file())


def wait_until_absent(dirs: list[Path], needles: list[bytes]) -> float:
    """Seconds until no needle is in any directory's files (fails past the deadline)."""
    start = time.monotonic()
    while True:
        left = [d for d in dirs if any(n in on_disk(d) for n in needles)]
        took = time.monotonic() - start
        if not left:
            return took
        assert took < SCRUB_DEADLINE_S, f"deleted bytes still on disk in {left}"
        time.sleep(0.05)


# ---------------------------------------------------------------- deleted data leaves the disk


@pytest.fixture(scope="module")
def cluster(cluster_planes, tmp_path_factory):
    etcd, redis = cluster_planes
    data = tmp_path_factory.mktemp("cache-cluster")
    with memdb_cluster(data, etcd, redis, nodes=3, admin_key=ROOT_KEY) as nodes:
        yield nodes


def cache_dirs(nodes) -> list[Path]:
    return [n.data_dir / "cache" for n in nodes]


def fetch_through_every_node(nodes, key: str, name: str) -> None:
    for node in nodes:
        with MemdbClient(node.address, key) as c:
            c.fetch_memory(name, model_fingerprint=FP)


def test_deleting_a_tenant_scrubs_its_shards_from_every_nodes_cache_files(cluster):
    dirs = cache_dirs(cluster)
    with MemdbClient(cluster[0].address, ROOT_KEY) as root:
        for tenant in ("doomed", "kept"):
            root.create_tenant(tenant)
        keys = {t: root.create_api_key("writer", tenant=t)[0] for t in ("doomed", "kept")}
        shards = {t: make_shards(layers=2, seed=seed) for seed, t in enumerate(("doomed", "kept"))}
        for tenant, key in keys.items():
            with MemdbClient(cluster[0].address, key) as c:
                c.put_prefix("m", shards[tenant], model_fingerprint=FP)
            fetch_through_every_node(cluster, key, "m")  # each node caches the shards
        doomed, kept = pattern(shards["doomed"]), pattern(shards["kept"])
        for d in dirs:
            assert doomed in on_disk(d) and kept in on_disk(d)
        root.delete_tenant("doomed", force=True)
        took = wait_until_absent(dirs, [doomed])
    print(f"\ndeleted tenant's shards gone from 3 nodes' cache files {took:.2f} s after the delete")
    for d in dirs:
        assert kept in on_disk(d)  # another tenant's cached shards stay


def test_deleting_a_prefix_and_dropping_a_version_scrub_their_shards_from_every_node(cluster):
    dirs = cache_dirs(cluster)
    versions = [make_shards(layers=2, seed=10 + v) for v in range(3)]
    with MemdbClient(cluster[1].address, ROOT_KEY) as c:
        for shards in versions:
            c.put_prefix("p", shards, model_fingerprint=FP, mode="upsert")
            fetch_through_every_node(cluster, ROOT_KEY, "p")
            for d in dirs:
                assert pattern(shards) in on_disk(d)
        # version 3 made the third: retention (2 versions) dropped version 1
        took = wait_until_absent(dirs, [pattern(versions[0])])
        print(f"\nversion dropped by retention gone from every node in {took:.2f} s")
        for d in dirs:
            assert pattern(versions[1]) in on_disk(d) and pattern(versions[2]) in on_disk(d)
        c.delete_prefix("p")
        took = wait_until_absent(dirs, [pattern(versions[1]), pattern(versions[2])])
    print(f"deleted prefix's shards gone from every node in {took:.2f} s")


def test_a_forgotten_upload_is_no_longer_served_or_cached_and_leaves_the_file(tmp_path):
    cache = BlobCache(tmp_path / "c", max_bytes=8 * MiB, scrub_delay_s=0.05)
    rng = np.random.default_rng(0)
    blobs = {f"{u}:{d}": rng.bytes(100_000) for u in ("up1", "up2") for d in ("a", "b")}
    for key, blob in blobs.items():
        cache.put(key, blob)
    assert all(blob[5000:5064] in on_disk(tmp_path / "c") for blob in blobs.values())
    cache.forget("up1")
    assert cache.get("up1:a") is None and cache.get_range("up1:b", 0, 10) is None
    cache.put("up1:a", blobs["up1:a"])  # a read that began before the delete: not cached
    gone = [blobs["up1:a"][5000:5064], blobs["up1:b"][5000:5064]]
    wait_until_absent([tmp_path / "c"], gone)
    assert cache.scrubs == 1 and len(cache) == 2 and cache.nbytes == 200_000
    assert cache.get("up2:a") == blobs["up2:a"]
    cache.close()
    reopened = BlobCache(tmp_path / "c", max_bytes=8 * MiB)
    assert reopened.get("up2:b") == blobs["up2:b"] and reopened.get("up1:a") is None
    reopened.close()


def test_blobs_cached_and_read_while_the_file_is_rewritten_are_kept(tmp_path):
    cache = BlobCache(tmp_path / "c", max_bytes=96 * MiB, scrub_delay_s=3600)
    rng = np.random.default_rng(1)
    old = {f"{'up0' if i % 4 == 0 else 'up1'}:{i}": rng.bytes(MiB) for i in range(64)}
    for key, blob in old.items():
        cache.put(key, blob)
    cache.forget("up0")
    new: dict[str, bytes] = {}
    wrong: list[str] = []
    stop = threading.Event()

    def readers_and_writers():  # go on while the copy runs outside the lock
        while not stop.is_set():
            key = f"new:{len(new)}"
            new[key] = rng.bytes(4096)
            cache.put(key, new[key])
            wrong.extend(k for k in ("up1:1", "up1:2") if cache.get(k) != old[k])

    worker = threading.Thread(target=readers_and_writers)
    worker.start()
    try:
        assert cache.scrub() == 16
    finally:
        stop.set()
        worker.join()
    assert not wrong and cache.scrubs >= 1
    files = on_disk(tmp_path / "c")
    assert not any(blob[9000:9064] in files for k, blob in old.items() if k.startswith("up0:"))
    cache.close()
    reopened = BlobCache(tmp_path / "c", max_bytes=96 * MiB)
    assert all(reopened.get(k) == blob for k, blob in new.items())
    assert len(reopened) == 48 + len(new)
    reopened.close()


def test_a_node_that_starts_scrubs_cached_blobs_of_versions_deleted_while_it_was_down(
    cluster_planes, tmp_path
):
    etcd, redis = cluster_planes
    root = f"/memdb-cache-{uuid.uuid4().hex}/"

    def node(cache: str) -> ClusterStore:
        return ClusterStore(etcd.client_urls, redis.urls, root=root, cache_dir=tmp_path / cache,
                            gc_interval_s=0, lease_ttl_s=3, cache_bytes=64 * MiB)  # fmt: skip

    a, b = node("a"), node("b")
    try:
        shards = [encode_shard(s) for s in make_shards(layers=2, seed=7)]
        write(a, "p", shards=shards)
        b.read_version(T, "p")
        b.close()
        needle = shards[0][len(shards[0]) // 2 :][:64]
        assert needle in on_disk(tmp_path / "b")
        a.delete_prefix(T, "p")
        b = node("b")  # its watch starts after the delete: the copy of versions tells it
        wait_until_absent([tmp_path / "b"], [needle])
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------- Lookup's metadata


@pytest.fixture
def pair(cluster_planes, tmp_path):
    etcd, redis = cluster_planes
    root = f"/memdb-cache-{uuid.uuid4().hex}/"
    nodes = [ClusterStore(etcd.client_urls, redis.urls, root=root, cache_dir=tmp_path / f"c{i}",
                          gc_interval_s=0, lease_ttl_s=3, cache_bytes=64 * MiB)
             for i in range(2)]  # fmt: skip
    yield nodes
    for n in nodes:
        n.close()


def current(node: ClusterStore, name: str = "p", version: int = 0) -> int:
    """The version a Lookup of `name` resolves on `node` (as Lookup calls the store)."""
    rec, _ = node.read_current_layer(T, name, 0, version, open_layer=lambda rec, read: None)
    return rec.version


def caught_up(node: ClusterStore, writer: ClusterStore) -> None:
    deadline = time.monotonic() + 10
    while node.metadata.revision < writer.metadata.required:
        assert time.monotonic() < deadline, "the watch never brought the write"
        time.sleep(0.01)


def test_steady_state_lookups_and_key_checks_make_no_etcd_request(pair):
    a, b = pair
    write(a, "p")
    a.put_key(KeyRecord("k1", T, "reader", "h" * 64))
    caught_up(b, a)
    for node in (a, b):
        reads = node.etcd.requests[RANGE]
        for _ in range(200):
            assert current(node) == 1
            assert node.get_key("k1").tenant == T
        assert node.etcd.requests[RANGE] == reads  # every read served by the copy
    assert b.metadata.hits >= 400


def test_a_write_is_read_back_through_the_same_nodes_copy_at_once(pair):
    a, _ = pair
    for version in range(1, 8):
        write(a, "p", mode="upsert")
        reads = a.etcd.requests[RANGE]
        assert current(a) == version  # no stale read after this node's own write
        assert a.etcd.requests[RANGE] == reads
    a.put_key(KeyRecord("k2", T, "reader", "h" * 64))
    assert a.get_key("k2") is not None
    a.delete_key("k2")
    assert a.get_key("k2") is None


def test_a_lagging_copy_answers_an_explicit_version_it_lacks_from_etcd(pair):
    a, b = pair
    write(a, "p")
    caught_up(b, a)
    held = threading.Event()
    apply = b.metadata.apply

    def lagging(events, progress):  # the watch's events wait: b's copy lags behind etcd
        held.wait(20)
        apply(events, progress)

    b.metadata.apply = lagging
    try:
        write(a, "p", mode="update")
        assert current(b) == 1  # the lagging copy: the older version
        reads = b.etcd.requests[RANGE]
        assert current(b, version=2) == 2  # a version the copy does not hold: from etcd
        assert b.etcd.requests[RANGE] > reads
        assert b.get_prefix(T, "p").version == 2  # admin reads stay linearizable
    finally:
        held.set()
    caught_up(b, a)
    assert current(b) == 2


def test_reads_go_to_etcd_while_the_watch_is_broken_and_return_once_it_is_live(pair):
    a, b = pair
    write(a, "p")
    caught_up(b, a)
    b.metadata.apply([], WatchProgress(b.metadata.revision, live=False))  # as a broken stream
    reads = b.etcd.requests[RANGE]
    assert current(b) == 1 and b.etcd.requests[RANGE] == reads + 1
    write(a, "q")  # the live stream's next response makes the copy serve again
    caught_up(b, a)
    reads = b.etcd.requests[RANGE]
    assert current(b, "q") == 1 and b.etcd.requests[RANGE] == reads
    with pytest.raises(NotFound):
        current(b, "absent")  # a miss is checked with etcd: never a false NotFound


@contextlib.contextmanager
def two_servers(cluster_planes, tmp_path):
    """Servers a and b (cluster backend, one root) and a writer client of a, a reader of b."""
    etcd, redis = cluster_planes
    root = f"/memdb-cache-{uuid.uuid4().hex}/"

    def config(name: str) -> ServerConfig:
        return ServerConfig(data_dir=tmp_path / name, listen="127.0.0.1:0", metrics_listen="",
                            admin_key=ROOT_KEY, backend="cluster", etcd=",".join(etcd.client_urls),
                            redis=",".join(redis.urls), etcd_root=root)  # fmt: skip

    with run_server(config("a")) as a, run_server(config("b")) as b:
        with MemdbClient(a.address, ROOT_KEY) as writer, MemdbClient(b.address, ROOT_KEY) as reader:
            yield a, b, writer, reader


@contextlib.contextmanager
def held_back(copy):
    """The copy's watch events wait until the block ends: the copy lags behind etcd."""
    held, apply = threading.Event(), copy.apply
    copy.apply = lambda events, progress: (held.wait(20), apply(events, progress))
    try:
        yield
    finally:
        held.set()


def test_a_client_never_reads_a_version_older_than_one_it_saw_from_a_lagging_node(
    cluster_planes, tmp_path
):
    with two_servers(cluster_planes, tmp_path) as (a, b, writer, reader):
        q = np.ones((2, 16), np.float32)
        writer.put_prefix("m", make_shards(layers=2, seed=1, fill=1.0), model_fingerprint=FP)
        caught_up(b.runtime.store, a.runtime.store)
        assert reader.lookup("m", 1, q, model_fingerprint=FP).version == 1
        with held_back(b.runtime.store.metadata):
            update = make_shards(layers=2, seed=2, fill=2.0)
            writer.put_prefix("m", update, model_fingerprint=FP, mode="update")
            with MemdbClient(b.address, ROOT_KEY) as fresh:  # has seen nothing: b lags
                assert fresh.lookup("m", 1, q, model_fingerprint=FP).version == 1
            assert reader.get_prefix("m").version == 2  # the reader has now seen version 2
            res = reader.lookup("m", 1, q, model_fingerprint=FP)
            assert res.version == 2 and np.all(res.out == 2.0)
            assert reader.seen_version("m") == 2
        reader.delete_prefix("m")  # versions start over: nothing seen of "m" any more
        assert reader.seen_version("m") == 0


def test_a_version_seen_and_replaced_twice_since_never_lets_a_lagging_node_answer_older(
    cluster_planes, tmp_path
):
    """The version the client saw is gone when it asks again: its next read of the current
    version is etcd's (the node holds its copy back), not the lagging copy's (the campaign's
    two stale Lookups)."""
    with two_servers(cluster_planes, tmp_path) as (a, b, writer, reader):
        q = np.ones((2, 16), np.float32)
        writer.put_prefix("m", make_shards(layers=2, seed=1, fill=1.0), model_fingerprint=FP)
        caught_up(b.runtime.store, a.runtime.store)
        with held_back(b.runtime.store.metadata):
            for v in (2, 3, 4, 5):
                writer.put_prefix("m", make_shards(layers=2, seed=v, fill=float(v)),
                                  model_fingerprint=FP, mode="update")  # fmt: skip
                if v == 2:
                    assert reader.get_prefix("m").version == 2  # seen, then replaced 3 times
            with pytest.raises(NotFound):
                a.runtime.store.get_prefix(DEFAULT_TENANT, "m", 2)  # no longer retained
            res = reader.lookup("m", 1, q, model_fingerprint=FP)
            assert res.version == 5 and np.all(res.out == 5.0)
