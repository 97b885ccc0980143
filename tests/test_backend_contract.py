"""The cluster backend keeps the store's contract: every behaviour tests/test_storage.py checks
through its `store` fixture runs here against a `ClusterStore` on a real 3-member etcd cluster
and a real 3-master + 3-replica Redis Cluster (the tests are imported, not copied)."""

from __future__ import annotations

import inspect
import uuid

import pytest

from memdb.backends.cluster import ClusterStore
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


@pytest.fixture
def store(cluster_planes, tmp_path):
    s = open_cluster_store(cluster_planes, tmp_path)
    yield s
    s.close()
