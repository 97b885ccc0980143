"""The cluster backend: the store's records in etcd, its blobs in a Redis Cluster.

`ClusterStore` has the public methods of `memdb_server.storage.Store` with the same semantics and
errors, so the services cannot tell them apart; the checks of what a write may carry, the
draft of a new version and the quota arithmetic are the store's own (memdb_server.records,
memdb_server.usage):

- etcd holds tenants, hashed API keys, the current-version pointer of each prefix, the record
  of each retained version, per-prefix usage records and the reservations of uploads in flight
  (see `Keys`). Every change is one etcd transaction guarded by compare-and-swap on what it read
  (the tenant, the current pointer, the usage record it changes), retried from a fresh read when
  another node changed them first: two writers of one version cannot both win, and a quota
  holds across nodes (memdb_server.backends.cluster_usage).
- A tenant's bytes are what it makes the cluster store: the etcd key + value bytes of its API
  keys, current pointers and retained version records, and the Redis key + value bytes of every
  retained version's shards and indices (`PrefixRecord.stored_bytes`).
- A new version reserves its quota, stages its blobs in Redis under a fresh upload id and is
  published by a transaction fenced on its reservation (memdb_server.backends.cluster_publish).
  A crash in between leaves blobs that the garbage collector removes.
- A write whose etcd reply is lost is settled by reading back what it writes, never sent again
  blind (`EtcdClient.txn(..., applied=)`): the client is told OK exactly when it happened.
- A steady-state Lookup reads no etcd: the API key, the current pointer and the version record
  come from the node's `MetadataCache` (a copy kept by its etcd watch; this node's writes are
  read back through it at once, a miss or a lagging watch goes to etcd).
- Blob reads go through the node's LMDB `BlobCache` (LRU, bounded), then Redis.

Knows nothing of gRPC or FAISS.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from memdb.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    Unavailable,
)
from memdb_server.backends.blob_cache import BlobCache
from memdb_server.backends.cluster_entries import decode_entry, entry_bytes
from memdb_server.backends.cluster_jobs import EtcdJobTable
from memdb_server.backends.cluster_node import ClusterEventBus, GarbageCollector, Keys, NodeLease
from memdb_server.backends.cluster_publish import MAX_ATTEMPTS, Publisher, contended
from memdb_server.backends.cluster_usage import ClusterUsage, usage_json
from memdb_server.backends.etcd_gateway import (
    KV,
    EtcdClient,
    cmp_mod,
    op_delete,
    op_put,
    range_end,
)
from memdb_server.backends.metadata_cache import MetadataCache
from memdb_server.backends.redis_blobs import BlobRef, BlobStore
from memdb_server.events import WatchLimits
from memdb_server.records import (
    KeyRecord,
    PrefixRecord,
    TenantRecord,
    Usage,
    VersionReads,
    VersionSnapshot,
    VersionWriter,
    check_expected,
    check_key,
    check_layer,
    check_tenant,
    dropped_by_next,
    item_key,
    prefix_key,
    record_from_json,
    record_to_json,
    version_gone,
)
from memdb_server.storage import DEFAULT_MAX_KEYS, DEFAULT_TENANT
from memdb_server.usage import charge_key, check_key_count

log = logging.getLogger(__name__)

T = TypeVar("T")
REGISTER_ATTEMPTS = 5  # a node registration whose reply was lost is sent again this often


class ClusterStore(VersionWriter, VersionReads):
    """The store of one server node of a cluster. Thread-safe."""

    def __init__(
        self,
        etcd: list[str],
        redis: list[str],
        *,
        cache_dir: Path | str,
        cache_bytes: int = 1 << 30,
        retain_versions: int = 2,
        root: str = "/memdb/",
        lease_ttl_s: int = 10,
        gc_interval_s: float = 30.0,
        gc_grace_s: float = 60.0,
        node_address: str = "",
        redis_min_replicas: int = 1,
        max_keys_per_tenant: int = DEFAULT_MAX_KEYS,
        watch_limits: WatchLimits | None = None,
    ) -> None:
        if retain_versions < 1:
            raise InvalidArgument(f"retain_versions must be at least 1, got {retain_versions}")
        self._retain = retain_versions
        self._max_keys = max_keys_per_tenant
        self.keys = Keys(root)
        self.etcd = EtcdClient(etcd)
        namespace = root.strip("/").replace("/", ":") or "memdb"
        self.blobs = BlobStore(redis, namespace=namespace, min_replicas=redis_min_replicas)
        self.cache = BlobCache(cache_dir, cache_bytes)
        self.path = Path(cache_dir)
        self.node_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._node_address = node_address
        self._closed = False
        self.usage_records = ClusterUsage(self.etcd, self.keys)
        self.metadata = MetadataCache(self.etcd, [self.keys.prefixes, self.keys.versions,
                                                  self.keys.keys])  # fmt: skip
        revision = self.metadata.load()  # the watch starts after it
        self._create_tenant(TenantRecord(DEFAULT_TENANT, created_at=time.time()))
        self.lease = NodeLease(self.etcd, lease_ttl_s)
        self.lease.on_regrant(self._register)
        self._register()
        self.publisher = Publisher(self.etcd, self.blobs, self.keys, self.usage_records,
                                   self.lease, node_id=self.node_id, retain=self._retain,
                                   on_staged=lambda upload: self.stage_hook(upload))  # fmt: skip
        self._store_version = self.publisher.write  # VersionWriter.write_version's store step
        self.event_bus = ClusterEventBus(self.etcd, self.keys, revision + 1, watch_limits,
                                         metadata=self.metadata, blob_cache=self.cache)  # fmt: skip
        self.etcd.on_write(self.metadata.committed)  # read-your-writes through the copy
        self.gc = GarbageCollector(self.etcd, self.blobs, self.keys, node_id=self.node_id,
                                   lease=self.lease, grace_s=gc_grace_s)  # fmt: skip
        if gc_interval_s > 0:
            self.gc.start(gc_interval_s)
        log.info("cluster node %s: etcd %s, redis %s", self.node_id, etcd, redis)

    def _register(self) -> None:
        """Put the node's registration on its lease. The put only ever writes this node's own
        key with the same value, so one whose reply was lost is sent again (idempotent)."""
        info = {"node": self.node_id, "address": self._node_address, "started_at": time.time()}
        key, value = self.keys.nodes + self.node_id.encode(), json.dumps(info).encode()
        for attempt in range(REGISTER_ATTEMPTS):
            try:
                self.etcd.put(key, value, lease=self.lease.id)
                return
            except OutcomeUnknown:
                if attempt + 1 == REGISTER_ATTEMPTS:
                    raise
                log.warning("node registration: reply lost; sending it again")

    def set_address(self, address: str) -> None:
        """Publish the node's serving address in its registration (once it is known)."""
        self._node_address = address
        self._register()

    def job_table(self) -> EtcdJobTable:
        """Build jobs' records, shared by every node (backends.cluster_jobs)."""
        return EtcdJobTable(self.etcd, self.keys.tenants.removesuffix(b"tenants/"))

    def list_nodes(self) -> list[dict]:
        """The live nodes' registrations ({node, address, started_at}), by node id."""
        return [json.loads(kv.value) for kv in self.etcd.scan(self.keys.nodes)]

    def healthy(self) -> bool:
        """etcd answers a linearizable read (a quorum is up) and Redis answers a ping."""
        try:
            self.etcd.range(self.keys.tenants, limit=1)
        except Unavailable:
            return False
        return self.blobs.ping()

    def close(self, *, crash: bool = False) -> None:
        """Stop the node's threads, withdraw its registration (unless simulating a crash)."""
        if self._closed:
            return
        self._closed = True
        self.gc.close()
        self.event_bus.close()
        self.metadata.close()
        self.lease.close(revoke=not crash)
        self.cache.close()
        self.blobs.close()
        self.etcd.close()

    def __enter__(self) -> ClusterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ tenants

    def put_tenant(self, rec: TenantRecord) -> None:
        check_tenant(rec)
        rec = dataclasses.replace(rec, created_at=rec.created_at or time.time())
        if not self._create_tenant(rec):
            raise AlreadyExists(f"tenant '{rec.name}' already exists")

    def _create_tenant(self, rec: TenantRecord) -> bool:
        key, value = self.keys.tenants + rec.name.encode(), record_to_json(rec)
        ops = [op_put(key, value), op_put(self.usage_records.key(rec.name), usage_json())]
        return self.etcd.txn(
            [cmp_mod(key, 0)], ops, applied=lambda: _holds(self.etcd.get(key), value)
        )

    def get_tenant(self, name: str) -> TenantRecord:
        return record_from_json(TenantRecord, self._tenant_kv(name).value)

    def _tenant_kv(self, name: str) -> KV:
        kv = self.etcd.get(self.keys.tenants + name.encode())
        if kv is None:
            raise NotFound(f"tenant '{name}' not found")
        return kv

    def list_tenants(self) -> list[TenantRecord]:
        return [
            record_from_json(TenantRecord, kv.value) for kv in self.etcd.scan(self.keys.tenants)
        ]

    def delete_tenant(self, name: str, *, force: bool = False) -> None:
        scope = self.keys.prefixes + f"{name}\0".encode()
        for _ in range(MAX_ATTEMPTS):
            tenant = self._tenant_kv(name)
            prefixes, revision = self.etcd.range(scope, range_end(scope))
            if prefixes and not force:
                raise FailedPrecondition(
                    f"tenant '{name}' still has {len(prefixes)} prefix(es); delete them first "
                    "or delete the tenant with force"
                )
            keys = [kv for kv in self.etcd.scan(self.keys.keys)
                    if record_from_json(KeyRecord, kv.value).tenant == name]  # fmt: skip
            versions = self.keys.versions + f"{name}\0".encode()
            compare = [cmp_mod(tenant.key, tenant.mod_revision),
                       _unchanged_since(scope, revision),
                       _unchanged_since(self.keys.keys, revision)]  # fmt: skip
            ops = [op_delete(scope, range_end(scope)), op_delete(versions, range_end(versions)),
                   *[op_delete(kv.key) for kv in keys], op_delete(tenant.key),
                   *[op_delete(s, range_end(s)) for s in (self.usage_records.scope(name),
                     self.usage_records.staging_scope(name))]]  # fmt: skip
            if self.etcd.txn(compare, ops, applied=lambda t=tenant: _gone(self.etcd.get(t.key), t)):
                log.info("deleted tenant %s (force=%s)", name, force)
                return
        raise contended(f"tenant '{name}'")

    # ------------------------------------------------------------ API keys

    def put_key(self, rec: KeyRecord) -> None:
        check_key(rec)
        rec = dataclasses.replace(rec, created_at=rec.created_at or time.time())
        key, blob = self.keys.keys + rec.key_id.encode(), record_to_json(rec)
        usage_key = self.usage_records.key(rec.tenant)
        for _ in range(MAX_ATTEMPTS):
            tenant_kv = self._tenant_kv(rec.tenant)
            if self.etcd.get(key) is not None:
                raise AlreadyExists(f"API key '{rec.key_id}' already exists")
            tenant = record_from_json(TenantRecord, tenant_kv.value)
            load = self.usage_records.load(rec.tenant)
            check_key_count(rec.tenant, load.committed, self._max_keys)
            charge_key(tenant, load.total(), len(key) + len(blob), f"API key '{rec.key_id}'")
            own, own_rev = self.usage_records.record(rec.tenant)
            own.keys += 1
            own.bytes += len(key) + len(blob)
            compare = [cmp_mod(tenant_kv.key, tenant_kv.mod_revision), cmp_mod(key, 0),
                       cmp_mod(usage_key, own_rev)]  # fmt: skip
            if tenant.max_bytes:
                compare += self.usage_records.unchanged_since(rec.tenant, load.revision)
            ops = [op_put(key, blob), op_put(usage_key, usage_json(own))]
            if self.etcd.txn(compare, ops, applied=lambda: _holds(self.etcd.get(key), blob)):
                return
        raise contended(f"tenant '{rec.tenant}'")

    def get_key(self, key_id: str) -> KeyRecord | None:
        """Through the node's metadata copy (every authenticated call reads it)."""
        kv = self.metadata.get(self.keys.keys + key_id.encode()) if key_id else None
        return None if kv is None else record_from_json(KeyRecord, kv.value)

    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        recs = [record_from_json(KeyRecord, kv.value) for kv in self.etcd.scan(self.keys.keys)]
        return [r for r in recs if tenant is None or r.tenant == tenant]

    def delete_key(self, key_id: str) -> None:
        for _ in range(MAX_ATTEMPTS):
            kv = self.etcd.get(self.keys.keys + key_id.encode()) if key_id else None
            if kv is None:
                raise NotFound(f"API key '{key_id}' not found")
            tenant = record_from_json(KeyRecord, kv.value).tenant
            own, own_rev = self.usage_records.record(tenant)
            own.keys -= 1
            own.bytes -= len(kv.key) + len(kv.value)
            usage_key = self.usage_records.key(tenant)
            compare = [cmp_mod(kv.key, kv.mod_revision), cmp_mod(usage_key, own_rev)]
            ops = [op_delete(kv.key), op_put(usage_key, usage_json(own))]
            if self.etcd.txn(compare, ops, applied=lambda k=kv: _gone(self.etcd.get(k.key), k)):
                return
        raise contended(f"API key '{key_id}'")

    # ------------------------------------------------------------ prefixes: read

    def _pointer(self, tenant: str, name: str) -> bytes:
        return self.keys.prefixes + prefix_key(tenant, name)

    def _version_key(self, tenant: str, name: str, version: int) -> bytes:
        return self.keys.versions + item_key(tenant, name, version)

    def get_prefix(self, tenant: str, name: str, version: int = 0) -> PrefixRecord:
        return self._version_entry(tenant, name, version)[0]

    def _version_entry(
        self, tenant: str, name: str, version: int, *, cached: bool = False
    ) -> tuple[PrefixRecord, dict]:
        """The record of a version (0 = current) and its blob references; `cached`: read
        through the node's metadata copy (Lookup), else from etcd."""
        get = self.metadata.get if cached else self.etcd.get
        pointer = self._pointer(tenant, name)
        kv = get(pointer)
        if kv is None:
            raise NotFound(f"prefix '{name}' not found")
        current, blobs = decode_entry(kv.value)
        if cached and version > current.version:  # the copy is behind what the client saw
            kvs, revision = self.etcd.range(pointer)
            self.metadata.behind(revision)
            if not kvs:
                raise NotFound(f"prefix '{name}' not found")
            get, (current, blobs) = self.etcd.get, decode_entry(kvs[0].value)
        if version in (0, current.version):
            return current, blobs
        old = get(self._version_key(tenant, name, version))
        if old is None:
            stored = ", ".join(map(str, current.retained_versions))
            raise NotFound(f"prefix '{name}' has no version {version} (stored versions: {stored})")
        rec, blobs = decode_entry(old.value)
        rec.retained_versions = list(current.retained_versions)
        return rec, blobs

    def list_prefixes(
        self, tenant: str, *, start_after: str = "", name_prefix: str = "", limit: int = 100
    ) -> list[PrefixRecord]:
        if limit < 1:
            raise InvalidArgument(f"limit must be at least 1, got {limit}")
        scope = self._pointer(tenant, name_prefix)
        start = scope
        if start_after:
            start = max(scope, self._pointer(tenant, start_after) + b"\0")
        kvs, _ = self.etcd.range(start, range_end(scope), limit=limit)
        return [decode_entry(kv.value)[0] for kv in kvs]

    def read_version(
        self, tenant: str, name: str, version: int = 0, *, layers: list[int] | None = None
    ) -> VersionSnapshot:
        """The record of a version (0 = current), read once, and its layers' blobs."""
        rec, blobs = self._version_entry(tenant, name, version)
        return self._snapshot(rec, blobs, range(rec.num_layers) if layers is None else layers)

    def read_current_layer(
        self,
        tenant: str,
        name: str,
        layer: int,
        version: int = 0,
        *,
        open_layer: Callable[[PrefixRecord, Callable[[], VersionSnapshot]], T],
    ) -> tuple[PrefixRecord, T]:
        """As `Store.read_current_layer`: the version resolved from one record, and `read()`
        the blobs that record names (content-addressed, so they are exactly that version's;
        the collector keeps a replaced version's blobs for its grace period). The record is
        read through the node's metadata copy: no etcd round trip in steady state."""
        rec, blobs = self._version_entry(tenant, name, version, cached=True)
        check_layer(rec, layer)
        return rec, open_layer(rec, lambda: self._snapshot(rec, blobs, [layer]))

    def _snapshot(self, rec: PrefixRecord, blobs: dict, layers) -> VersionSnapshot:
        wanted = list(layers)
        for layer in wanted:
            check_layer(rec, layer)
        refs = [BlobRef.from_json(blobs["shards"][layer]) for layer in wanted]
        refs += [BlobRef.from_json(r) for layer in wanted for r in blobs["indices"][layer]]
        data = iter(self._read_blobs(blobs["upload"], refs))
        shards = {layer: next(data) for layer in wanted}
        groups = rec.shape.num_groups
        indices = {layer: [next(data) for _ in range(groups)] for layer in wanted}
        return VersionSnapshot(rec, shards, indices)

    def _read_blobs(self, upload: str, refs: list[BlobRef]) -> list[bytes]:
        """Through the node's cache: only the blobs it lacks are read from Redis."""
        names = [f"{upload}:{r.digest}" for r in refs]
        found = [self.cache.get(n) for n in names]
        missing = [i for i, blob in enumerate(found) if blob is None]
        if missing:
            fetched = self.blobs.read(upload, [refs[i] for i in missing])
            for i, blob in zip(missing, fetched, strict=True):
                found[i] = blob
                self.cache.put(names[i], blob)
        return found

    def read_shard_chunk(
        self, tenant: str, name: str, version: int, layer: int, start: int, size: int
    ) -> tuple[bytes, int]:
        """As `Store.read_shard_chunk`: bytes [start, start + size) of one layer's shard and
        its length (from the node's cache once the shard is in it); Aborted once that
        version is no longer stored."""
        try:
            rec, blobs = self._version_entry(tenant, name, version)
            check_layer(rec, layer)
            ref = BlobRef.from_json(blobs["shards"][layer])
            cache_name = f"{blobs['upload']}:{ref.digest}"
            hit = self.cache.get_range(cache_name, start, size)
            if hit is not None:
                return hit
            shard = self._read_blobs(blobs["upload"], [ref])[0]
        except NotFound:
            raise version_gone(name, version) from None
        return shard[start : start + size], len(shard)

    # ------------------------------------------------------------ prefixes: write

    def stage_hook(self, upload: str) -> None:
        """Called between staging and publishing (tests kill the node here)."""

    def delete_prefix(self, tenant: str, name: str, *, expected_version: int = 0) -> int:
        pointer = self._pointer(tenant, name)
        versions = self.keys.versions + item_key(tenant, name)
        for _ in range(MAX_ATTEMPTS):
            kv = self.etcd.get(pointer)
            if kv is None:
                raise NotFound(f"prefix '{name}' not found")
            current = decode_entry(kv.value)[0]
            check_expected(name, current.version, expected_version)
            compare = [cmp_mod(pointer, kv.mod_revision)]
            ops = [op_delete(pointer), op_delete(versions, range_end(versions)),
                   op_delete(self.usage_records.key(tenant, name))]  # fmt: skip
            if self.etcd.txn(compare, ops, applied=lambda k=kv: _gone(self.etcd.get(pointer), k)):
                log.info("deleted %s/%s (was at version %d)", tenant, name, current.version)
                return current.version
        raise contended(f"prefix '{name}'")

    # ------------------------------------------------------------ accounting

    def usage(self, tenant: str) -> tuple[int, int]:
        """(number of prefixes, bytes counted against the quota) of a tenant (see Usage)."""
        u = self.tenant_usage(tenant)
        return u.prefixes, u.bytes

    def tenant_usage(self, tenant: str) -> Usage:
        """Committed usage (reservations of uploads in flight not counted)."""
        return self.usage_records.committed(tenant)

    def recount_usage(self, tenant: str) -> Usage:
        """The usage of a tenant counted from its records (what the kept counters must equal)."""
        usage = Usage()
        scope = f"{tenant}\0".encode()
        for kv in self.etcd.scan(self.keys.prefixes + scope):
            usage.prefixes += 1
            usage.bytes += len(kv.key) + len(kv.value)
        usage.bytes += sum(map(entry_bytes, self.etcd.scan(self.keys.versions + scope)))
        for kv in self.etcd.scan(self.keys.keys):
            if record_from_json(KeyRecord, kv.value).tenant == tenant:
                usage.keys += 1
                usage.bytes += len(kv.key) + len(kv.value)
        return usage

    def upload_allowance(self, tenant: str, name: str) -> int | None:
        """As `Store.upload_allowance`: bytes a new version of `name` may add before the
        tenant's byte quota refuses it (None: no quota); uploads in flight count as reserved."""
        tenant_rec = self.get_tenant(tenant)
        if not tenant_rec.max_bytes:
            return None
        left = tenant_rec.max_bytes - self.usage_records.load(tenant).total().bytes
        kv = self.etcd.get(self._pointer(tenant, name))
        if kv is not None:
            current = decode_entry(kv.value)[0]
            left += sum(self.publisher.version_bytes(tenant, name, v)
                        for v in dropped_by_next(current, self._retain))  # fmt: skip
            left += len(kv.key) + len(kv.value)
        return max(left, 0)

    def count_records(self) -> dict[str, int]:
        """Records in etcd by kind; shards and indices: the blobs that stored versions name."""
        counts = {"tenants": 0, "keys": 0, "prefixes": 0, "versions": 0, "shards": 0, "indices": 0}
        for kind in ("tenants", "keys", "prefixes"):
            counts[kind] = self.etcd.count(getattr(self.keys, kind))
        for kv in self.etcd.scan(self.keys.versions):
            blobs = json.loads(kv.value)["blobs"]
            counts["versions"] += 1
            counts["shards"] += len(blobs["shards"])
            counts["indices"] += sum(len(g) for g in blobs["indices"])
        return counts

    def info(self) -> dict:
        """As `Store.info` (map_size: the node's cache budget; used_bytes: etcd's database plus
        Redis's memory), and the number of live nodes; counts only, no scans."""
        etcd_bytes = int(self.etcd.status().get("dbSize", 0))
        return {
            "map_size": self.cache.max_bytes,
            "used_bytes": etcd_bytes + self.blobs.used_bytes(),
            "num_tenants": self.etcd.count(self.keys.tenants),
            "num_prefixes": self.etcd.count(self.keys.prefixes),
            "path": str(self.path),
            "nodes": self.etcd.count(self.keys.nodes),
        }


# ---------------------------------------------------------------- helpers


def _unchanged_since(prefix: bytes, revision: int) -> dict:
    """No key under `prefix` was created or changed after `revision`."""
    return cmp_mod(prefix, revision + 1, result="LESS", end=range_end(prefix))


def _holds(kv: KV | None, value: bytes) -> bool:
    """A read-back: the key holds exactly what a lost write put."""
    return kv is not None and kv.value == value


def _gone(kv: KV | None, was: KV) -> bool:
    """A read-back: the key a lost delete removed is absent (or created anew since)."""
    return kv is None or kv.create_revision != was.create_revision
