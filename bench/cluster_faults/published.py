"""What the cluster holds after the campaign, read with every fault healed through an
in-process `ClusterStore` on the same etcd and Redis (its collector off): every published
version (current or retained, every version record in etcd) fetched layer by layer, and each
tenant's kept usage counters against a recount from its records.

Yields `published` records for bench.cluster_faults.checker and the usage comparison. Knows
nothing of the faults or of what the clients saw.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from bench.cluster_faults.load import fingerprint
from memdb.errors import MemdbError
from memdb_server.backends.cluster import ClusterStore

log = logging.getLogger(__name__)


def audit(etcd: list[str], redis: list[str], root: str, tenants: list[str], cache_dir: Path):
    """(published records, usage mismatches as text) of the cluster under etcd `root`."""
    store = ClusterStore(
        etcd, redis, cache_dir=cache_dir, root=root, gc_interval_s=0, lease_ttl_s=10
    )
    records, usage = [], []
    try:
        for tenant in tenants:
            current = {}
            for kv in store.etcd.scan(store.keys.prefixes + f"{tenant}\0".encode()):
                entry = json.loads(kv.value)
                current[entry["name"]] = entry["version"]
            for kv in store.etcd.scan(store.keys.versions + f"{tenant}\0".encode()):
                entry = json.loads(kv.value)
                name, version = entry["name"], entry["version"]
                rec = {
                    "kind": "published",
                    "tenant": tenant,
                    "name": name,
                    "version": version,
                    "current": current.get(name) == version,
                    "tag": int(entry.get("build_params", {}).get("tag", "0")),
                    "fp": None,
                    "error": "",
                }
                try:
                    snap = store.read_version(tenant, name, version)
                    rec["fp"] = fingerprint([snap.shards[i] for i in range(snap.record.num_layers)])
                except (MemdbError, KeyError) as exc:
                    rec["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                records.append(rec)
            kept, counted = store.tenant_usage(tenant), store.recount_usage(tenant)
            if kept != counted:
                usage.append(f"tenant {tenant}: kept {kept}, recounted {counted}")
    finally:
        store.close()
    return records, usage
