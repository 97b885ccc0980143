"""The cluster backend: the store's records in etcd, its blobs in a Redis Cluster.

`ClusterStore` has the public methods of `memdb_server.storage.Store` with the same semantics and
errors, so the services cannot tell them apart; the checks of what a write may carry, the
draft of a new version and the quota arithmetic are the store's own (memdb_server.records,
memdb_server.usage):

- etcd holds tenants, hashed API keys, the current-version pointer of each prefix, the record
  of each retained version and each tenant's `Usage` (see `Keys`). Every change is one etcd
  transaction guarded by compare-and-swap on what it read (the tenant, the current pointer,
  the tenant's usage key), retried from a fresh read when another node changed them first: two
  writers of one version cannot both win, and a quota holds across nodes.
- A tenant's bytes are what it makes the cluster store: the etcd key + value bytes of its API
  keys, current pointers and retained version records, and the Redis key + value bytes of every
  retained version's shards and indices (`PrefixRecord.stored_bytes`). The usage key changes in
  the transaction that changes them.
- A new version's shards and indices are staged in Redis under a fresh upload id first, with a
  staging record on the node's lease; the transaction that makes the version current deletes
  that record. A crash in between leaves blobs that the garbage collector removes.
- Reads go through the node's LMDB `BlobCache` (LRU, bounded), then Redis.

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
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from memdb_server.backends.blob_cache import BlobCache
from memdb_server.backends.cluster_node import ClusterEventBus, GarbageCollector, Keys, NodeLease
from memdb_server.backends.etcd_gateway import (
    KV,
    EtcdClient,
    cmp_mod,
    op_delete,
    op_put,
    range_end,
)
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
    check_mode,
    check_tenant,
    dropped_by_next,
    item_key,
    next_version,
    prefix_key,
    record_from_dict,
    record_from_json,
    record_to_json,
    version_gone,
)
from memdb_server.storage import DEFAULT_MAX_KEYS, DEFAULT_TENANT
from memdb_server.usage import charge_key, charge_version, check_key_count

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 64  # compare-and-swap retries of one change before giving up (Unavailable)
T = TypeVar("T")


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
        _, revision = self.etcd.range(self.keys.tenants, limit=1)
        self._create_tenant(TenantRecord(DEFAULT_TENANT, created_at=time.time()))
        self.lease = NodeLease(self.etcd, lease_ttl_s)
        self.lease.on_regrant(self._register)
        self._register()
        self.event_bus = ClusterEventBus(self.etcd, self.keys, revision + 1, watch_limits)
        self.gc = GarbageCollector(self.etcd, self.blobs, self.keys, node_id=self.node_id,
                                   lease=self.lease, grace_s=gc_grace_s)  # fmt: skip
        if gc_interval_s > 0:
            self.gc.start(gc_interval_s)
        log.info("cluster node %s: etcd %s, redis %s", self.node_id, etcd, redis)

    def _register(self) -> None:
        info = {"node": self.node_id, "address": self._node_address, "started_at": time.time()}
        self.etcd.put(self.keys.nodes + self.node_id.encode(), json.dumps(info).encode(),
                      lease=self.lease.id)  # fmt: skip

    def set_address(self, address: str) -> None:
        """Publish the node's serving address in its registration (once it is known)."""
        self._node_address = address
        self._register()

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
        key = self.keys.tenants + rec.name.encode()
        ops = [op_put(key, record_to_json(rec)), op_put(self._usage_key(rec.name), _usage_json())]
        return self.etcd.txn([cmp_mod(key, 0)], ops)

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
                   op_delete(self._usage_key(name))]  # fmt: skip
            if self.etcd.txn(compare, ops):
                log.info("deleted tenant %s (force=%s)", name, force)
                return
        raise _contended(f"tenant '{name}'")

    # ------------------------------------------------------------ API keys

    def put_key(self, rec: KeyRecord) -> None:
        check_key(rec)
        rec = dataclasses.replace(rec, created_at=rec.created_at or time.time())
        key, blob = self.keys.keys + rec.key_id.encode(), record_to_json(rec)
        for _ in range(MAX_ATTEMPTS):
            tenant_kv = self._tenant_kv(rec.tenant)
            if self.etcd.get(key) is not None:
                raise AlreadyExists(f"API key '{rec.key_id}' already exists")
            usage, usage_rev = self._usage(rec.tenant)
            check_key_count(rec.tenant, usage, self._max_keys)
            tenant = record_from_json(TenantRecord, tenant_kv.value)
            charge_key(tenant, usage, len(key) + len(blob), f"API key '{rec.key_id}'")
            compare = [cmp_mod(tenant_kv.key, tenant_kv.mod_revision), cmp_mod(key, 0),
                       cmp_mod(self._usage_key(rec.tenant), usage_rev)]  # fmt: skip
            ops = [op_put(key, blob), op_put(self._usage_key(rec.tenant), _usage_json(usage))]
            if self.etcd.txn(compare, ops):
                return
        raise _contended(f"tenant '{rec.tenant}'")

    def get_key(self, key_id: str) -> KeyRecord | None:
        kv = self.etcd.get(self.keys.keys + key_id.encode()) if key_id else None
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
            usage, usage_rev = self._usage(tenant)
            usage.keys -= 1
            usage.bytes -= len(kv.key) + len(kv.value)
            compare = [cmp_mod(kv.key, kv.mod_revision),
                       cmp_mod(self._usage_key(tenant), usage_rev)]  # fmt: skip
            ops = [op_delete(kv.key), op_put(self._usage_key(tenant), _usage_json(usage))]
            if self.etcd.txn(compare, ops):
                return
        raise _contended(f"API key '{key_id}'")

    # ------------------------------------------------------------ prefixes: read

    def _pointer(self, tenant: str, name: str) -> bytes:
        return self.keys.prefixes + prefix_key(tenant, name)

    def _version_key(self, tenant: str, name: str, version: int) -> bytes:
        return self.keys.versions + item_key(tenant, name, version)

    def get_prefix(self, tenant: str, name: str, version: int = 0) -> PrefixRecord:
        return self._version_entry(tenant, name, version)[0]

    def _version_entry(self, tenant: str, name: str, version: int) -> tuple[PrefixRecord, dict]:
        """The record of a version (0 = current) and its blob references."""
        kv = self.etcd.get(self._pointer(tenant, name))
        if kv is None:
            raise NotFound(f"prefix '{name}' not found")
        current, blobs = _decode_entry(kv.value)
        if version in (0, current.version):
            return current, blobs
        old = self.etcd.get(self._version_key(tenant, name, version))
        if old is None:
            stored = ", ".join(map(str, current.retained_versions))
            raise NotFound(f"prefix '{name}' has no version {version} (stored versions: {stored})")
        rec, blobs = _decode_entry(old.value)
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
        return [_decode_entry(kv.value)[0] for kv in kvs]

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
        the collector keeps a replaced version's blobs for its grace period)."""
        rec, blobs = self._version_entry(tenant, name, version)
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

    def _store_version(
        self,
        draft: PrefixRecord,
        mode: str,
        expected_version: int,
        shards: list[bytes],
        indices: list[list[bytes]],
        still_wanted: Callable[[], bool] | None,
    ) -> PrefixRecord:
        """Stage the blobs in Redis, then publish in one etcd txn (see
        `VersionWriter.write_version`)."""
        tenant, name = draft.tenant, draft.name
        upload = uuid.uuid4().hex
        refs = self.blobs.refs(shards)
        index_refs = [self.blobs.refs(groups) for groups in indices]
        draft.stored_bytes = self.blobs.stored_bytes(upload, refs + sum(index_refs, []))
        blobs = {"upload": upload, "shards": [r.to_json() for r in refs],
                 "indices": [[r.to_json() for r in g] for g in index_refs]}  # fmt: skip
        self._prepare(draft, mode, expected_version, blobs)  # fail fast, before staging
        staging = self.keys.staging + upload.encode()
        note = {"tenant": tenant, "name": name, "node": self.node_id, "at": time.time()}
        self.etcd.put(staging, json.dumps(note).encode(), lease=self.lease.id)
        try:
            self.blobs.stage(upload, shards, refs)
            for groups, group_refs in zip(indices, index_refs, strict=True):
                self.blobs.stage(upload, groups, group_refs)
            self.stage_hook(upload)
            rec = self._publish(draft, mode, expected_version, blobs, staging, still_wanted)
        except BaseException:
            self._abandon(upload, staging)
            raise
        return rec

    def stage_hook(self, upload: str) -> None:
        """Called between staging and publishing (tests kill the node here)."""

    def _abandon(self, upload: str, staging: bytes) -> None:
        try:
            self.etcd.delete(staging)
            self.blobs.delete_upload(upload)
        except Unavailable as exc:  # the collector removes them later
            log.warning("could not remove abandoned upload %s: %s", upload, exc)

    def _prepare(
        self, draft: PrefixRecord, mode: str, expected: int, blobs: dict
    ) -> tuple[PrefixRecord, list, list]:
        """Read what the write depends on, check the mode and the quota (the store's checks
        and messages) and return the new record, the compares and the ops of its txn."""
        tenant_name, name = draft.tenant, draft.name
        pointer = self._pointer(tenant_name, name)
        tenant_kv = self._tenant_kv(tenant_name)
        usage, usage_rev = self._usage(tenant_name)
        kv = self.etcd.get(pointer)
        current = _decode_entry(kv.value)[0] if kv else None
        check_mode(mode, name, current, expected)
        rec, dropped = next_version(draft, current, self._retain, time.time())
        entry = _encode_entry(rec, blobs)
        version_key = self._version_key(tenant_name, name, rec.version)
        freed = sum(self._version_bytes(tenant_name, name, v) for v in dropped)
        if kv is not None:
            freed += len(kv.key) + len(kv.value)
        added = len(version_key) + len(pointer) + 2 * len(entry) + rec.stored_bytes
        tenant = record_from_json(TenantRecord, tenant_kv.value)
        charge_version(tenant, usage, added=added, freed=freed, new_prefix=current is None,
                       what=f"prefix '{name}' version {rec.version}")  # fmt: skip
        compare = [cmp_mod(tenant_kv.key, tenant_kv.mod_revision),
                   cmp_mod(pointer, kv.mod_revision if kv else 0),
                   cmp_mod(self._usage_key(tenant_name), usage_rev)]  # fmt: skip
        ops = [op_put(version_key, entry), op_put(pointer, entry),
               op_put(self._usage_key(tenant_name), _usage_json(usage))]  # fmt: skip
        ops += [op_delete(self._version_key(tenant_name, name, v)) for v in dropped]
        return rec, compare, ops

    def _publish(
        self,
        draft: PrefixRecord,
        mode: str,
        expected: int,
        blobs: dict,
        staging: bytes,
        still_wanted: Callable[[], bool] | None,
    ) -> PrefixRecord:
        for _ in range(MAX_ATTEMPTS):
            rec, compare, ops = self._prepare(draft, mode, expected, blobs)
            if still_wanted is not None and not still_wanted():
                raise Cancelled(f"upload of '{draft.name}' was cancelled; nothing was written")
            if self.etcd.txn(compare, [*ops, op_delete(staging)]):
                return rec
        raise _contended(f"prefix '{draft.name}'")

    def delete_prefix(self, tenant: str, name: str, *, expected_version: int = 0) -> int:
        pointer = self._pointer(tenant, name)
        versions = self.keys.versions + item_key(tenant, name)
        for _ in range(MAX_ATTEMPTS):
            kv = self.etcd.get(pointer)
            if kv is None:
                raise NotFound(f"prefix '{name}' not found")
            current = _decode_entry(kv.value)[0]
            check_expected(name, current.version, expected_version)
            usage, usage_rev = self._usage(tenant)
            stored, _ = self.etcd.range(versions, range_end(versions))
            usage.bytes -= len(kv.key) + len(kv.value) + sum(map(_entry_bytes, stored))
            usage.prefixes -= 1
            compare = [cmp_mod(pointer, kv.mod_revision),
                       cmp_mod(self._usage_key(tenant), usage_rev)]  # fmt: skip
            ops = [op_delete(pointer), op_delete(versions, range_end(versions)),
                   op_put(self._usage_key(tenant), _usage_json(usage))]  # fmt: skip
            if self.etcd.txn(compare, ops):
                log.info("deleted %s/%s (was at version %d)", tenant, name, current.version)
                return current.version
        raise _contended(f"prefix '{name}'")

    # ------------------------------------------------------------ accounting

    def _usage_key(self, tenant: str) -> bytes:
        return self.keys.usage + tenant.encode()

    def _usage(self, tenant: str) -> tuple[Usage, int]:
        """The tenant's usage counters and the mod revision of their key (0: not stored yet,
        then counted from the records)."""
        kv = self.etcd.get(self._usage_key(tenant))
        if kv is None:
            return self.recount_usage(tenant), 0
        return record_from_json(Usage, kv.value), kv.mod_revision

    def _version_bytes(self, tenant: str, name: str, version: int) -> int:
        kv = self.etcd.get(self._version_key(tenant, name, version))
        return 0 if kv is None else _entry_bytes(kv)

    def usage(self, tenant: str) -> tuple[int, int]:
        """(number of prefixes, bytes counted against the quota) of a tenant (see Usage)."""
        u = self.tenant_usage(tenant)
        return u.prefixes, u.bytes

    def tenant_usage(self, tenant: str) -> Usage:
        return self._usage(tenant)[0]

    def recount_usage(self, tenant: str) -> Usage:
        """The usage of a tenant counted from its records (what the kept counters must equal)."""
        usage = Usage()
        scope = f"{tenant}\0".encode()
        for kv in self.etcd.scan(self.keys.prefixes + scope):
            usage.prefixes += 1
            usage.bytes += len(kv.key) + len(kv.value)
        usage.bytes += sum(map(_entry_bytes, self.etcd.scan(self.keys.versions + scope)))
        for kv in self.etcd.scan(self.keys.keys):
            if record_from_json(KeyRecord, kv.value).tenant == tenant:
                usage.keys += 1
                usage.bytes += len(kv.key) + len(kv.value)
        return usage

    def upload_allowance(self, tenant: str, name: str) -> int | None:
        """As `Store.upload_allowance`: bytes a new version of `name` may add before the
        tenant's byte quota refuses it (None: no quota)."""
        tenant_rec = self.get_tenant(tenant)
        if not tenant_rec.max_bytes:
            return None
        left = tenant_rec.max_bytes - self.tenant_usage(tenant).bytes
        kv = self.etcd.get(self._pointer(tenant, name))
        if kv is not None:
            current = _decode_entry(kv.value)[0]
            left += sum(self._version_bytes(tenant, name, v)
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


def _encode_entry(rec: PrefixRecord, blobs: dict) -> bytes:
    data = json.loads(record_to_json(rec))
    data["blobs"] = blobs
    return json.dumps(data, sort_keys=True).encode()


def _decode_entry(value: bytes) -> tuple[PrefixRecord, dict]:
    data = json.loads(value)  # parsed once: the record and its blob references
    return record_from_dict(PrefixRecord, data), data["blobs"]


def _entry_bytes(kv: KV) -> int:
    """What a stored version record costs: its etcd key + value and its blobs in Redis."""
    return len(kv.key) + len(kv.value) + record_from_json(PrefixRecord, kv.value).stored_bytes


def _usage_json(usage: Usage | None = None) -> bytes:
    return record_to_json(usage or Usage())


def _unchanged_since(prefix: bytes, revision: int) -> dict:
    """No key under `prefix` was created or changed after `revision`."""
    return cmp_mod(prefix, revision + 1, result="LESS", end=range_end(prefix))


def _contended(what: str) -> Unavailable:
    return Unavailable(f"{what} kept changing under {MAX_ATTEMPTS} attempts; retry")
