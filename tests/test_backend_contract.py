"""The cluster backend keeps the store's contract: every behaviour tests/test_storage.py checks
through its `store` fixture runs here against a `ClusterStore` on a real 3-member etcd cluster
and a real 3-master + 3-replica Redis Cluster (the tests are imported, not copied)."""

from __future__ import annotations

import inspect
import json
import uuid

import pytest

from memdb_server.backends.cluster import ClusterStore
from memdb_server.records import KeyRecord, record_from_json
from tests import test_storage

# LMDB-only checks (map size, meta sub-database); tests/test_cluster_backend.py checks the
# cluster's own accounting
LMDB_ONLY = {"test_usage_count_records_and_info"}


def _contract_tests() -> dict:
    found = {}
    for name, fn in vars(test_storage).items():
        if name.startswith("test_") and name not in LMDB_ONLY and callable(fn):
            if "store" in inspect.signature(fn).parameters:
                found[name] = fn
    return found


globals().update(_contract_tests())


def open_cluster_store(planes, tmp_path, **kw) -> ClusterStore:
    etcd, redis = planes
    kw.setdefault("gc_interval_s", 0)
    kw.setdefault("lease_ttl_s", 3)
    return ClusterStore(
        etcd.client_urls,
        redis.urls,
        cache_dir=tmp_path / f"cache-{uuid.uuid4().hex[:6]}",
        cache_bytes=64 << 20,
        root=f"/memdb-test-{uuid.uuid4().hex}/",
        **kw,
    )


def raw_cluster_bytes(store: ClusterStore, tenant: str) -> int:
    """What `tenant` makes the cluster store, read straight from etcd and Redis (an exact count
    independent of the usage counters and of the sizes records keep): the key + value bytes of
    its current pointers, version records and API keys in etcd, and of every Redis key of the
    uploads its retained versions name."""
    scope, total, uploads = f"{tenant}\0".encode(), 0, set()
    for kind in ("prefixes", "versions"):
        for kv in store.etcd.scan(getattr(store.keys, kind) + scope):
            total += len(kv.key) + len(kv.value)
            uploads.add(json.loads(kv.value)["blobs"]["upload"])
    for kv in store.etcd.scan(store.keys.keys):
        if record_from_json(KeyRecord, kv.value).tenant == tenant:
            total += len(kv.key) + len(kv.value)
    rc = store.blobs._rc
    for upload in uploads:
        for key in store.blobs.scan(upload):
            total += len(key.encode()) + rc.strlen(key)
    return total


@pytest.fixture(autouse=True)
def cluster_raw_bytes(monkeypatch):
    """The contract's exact byte count reads the cluster, not an LMDB file."""
    monkeypatch.setattr(test_storage, "raw_tenant_bytes", raw_cluster_bytes)


@pytest.fixture
def store(cluster_planes, tmp_path):
    s = open_cluster_store(cluster_planes, tmp_path)
    yield s
    s.close()
