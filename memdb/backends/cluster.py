"""The cluster backend: the store's records in etcd, its blobs in a Redis Cluster.

`ClusterStore` has the public methods of `memdb.storage.Store` with the same semantics and
errors, so the services cannot tell them apart:

- etcd holds tenants, hashed API keys, the current-version pointer of each prefix and the record
  of each retained version (see `Keys`). Every change is one etcd transaction guarded by
  compare-and-swap on what it read (the tenant, the current pointer; for quotas, every prefix
  of the tenant), retried from a fresh read when another node changed them first: two writers
  of one version cannot both win, and a quota holds across nodes.
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

from memdb.backends.blob_cache import BlobCache
from memdb.backends.cluster_node import ClusterEventBus, GarbageCollector, Keys, NodeLease
from memdb.backends.etcd_gateway import (
    KV,
    EtcdClient,
    cmp_exists,
    cmp_mod,
    op_delete,
    op_put,
    range_end,
)
from memdb.backends.redis_blobs import BlobRef, BlobStore
from memdb.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from memdb.records import (
    KeyRecord,
    PrefixRecord,
    TenantRecord,
    VersionSnapshot,
    check_layer,
    item_key,
    prefix_key,
    record_from_json,
    record_to_json,
)
from memdb.shards import Shard, check_consistent, decode_shard
from memdb.storage import (
    DEFAULT_TENANT,
    MAX_NAME_BYTES,
    MAX_TENANT_BYTES,
    ROLES,
    _check_indices,
    _check_mode,
    _check_name,
    _check_write_args,
)

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 64  # compare-and-swap retries of one change before giving up (Unavailable)


class ClusterStore:
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
    ) -> None:
        if retain_versions < 1:
            raise InvalidArgument(f"retain_versions must be at least 1, got {retain_versions}")
        self._retain = retain_versions
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
        self._ensure_default_tenant()
        self.lease = NodeLease(self.etcd, lease_ttl_s)
        self.lease.on_regrant(self._register)
        self._register()
        self.event_bus = ClusterEventBus(self.etcd, self.keys, start_revision=revision + 1)
        self.gc = GarbageCollector(self.etcd, self.blobs, self.keys, node_id=self.node_id,
                                   lease=self.lease, grace_s=gc_grace_s)  # fmt: skip
        if gc_interval_s > 0:
            self.gc.start(gc_interval_s)
        log.info("cluster node %s: etcd %s, redis %s", self.node_id, etcd, redis)

    def _ensure_default_tenant(self) -> None:
        rec = TenantRecord(DEFAULT_TENANT, created_at=time.time())
        key = self.keys.tenants + DEFAULT_TENANT.encode()
        self.etcd.txn([cmp_mod(key, 0)], [op_put(key, record_to_json(rec))])

    def _register(self) -> None:
        info = {"node": self.node_id, "address": self._node_address, "started_at": time.time()}
        self.etcd.put(self.keys.nodes + self.node_id.encode(), json.dumps(info).encode(),
                      lease=self.lease.id)  # fmt: skip

    def set_address(self, address: str) -> None:
        """Publish the node's serving address in its registration (once it is known)."""
        self._node_address = address
        self._register()

    def list_nodes(self) -> list[dict]:
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
        _check_name(rec.name, "tenant name", MAX_TENANT_BYTES)
        if rec.max_bytes < 0 or rec.max_prefixes < 0:
            raise InvalidArgument("tenant quotas must be 0 (unlimited) or positive")
        rec = dataclasses.replace(rec, created_at=rec.created_at or time.time())
        key = self.keys.tenants + rec.name.encode()
        if not self.etcd.txn([cmp_mod(key, 0)], [op_put(key, record_to_json(rec))]):
            raise AlreadyExists(f"tenant '{rec.name}' already exists")

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
                   *[op_delete(kv.key) for kv in keys], op_delete(tenant.key)]  # fmt: skip
            if self.etcd.txn(compare, ops):
                log.info("deleted tenant %s (force=%s)", name, force)
                return
        raise _contended(f"tenant '{name}'")

    # ------------------------------------------------------------ API keys

    def put_key(self, rec: KeyRecord) -> None:
        _check_name(rec.key_id, "API key id", MAX_NAME_BYTES)
        if rec.role not in ROLES:
            raise InvalidArgument(f"role '{rec.role}' is unknown; use {', '.join(ROLES)}")
        if not rec.secret_hash:
            raise InvalidArgument(f"API key '{rec.key_id}' has no secret hash")
        rec = dataclasses.replace(rec, created_at=rec.created_at or time.time())
        key = self.keys.keys + rec.key_id.encode()
        tenant = self.keys.tenants + rec.tenant.encode()
        if not self.etcd.txn([cmp_exists(tenant), cmp_mod(key, 0)],
                             [op_put(key, record_to_json(rec))]):  # fmt: skip
            self._tenant_kv(rec.tenant)  # NotFound for an unknown tenant
            raise AlreadyExists(f"API key '{rec.key_id}' already exists")

    def get_key(self, key_id: str) -> KeyRecord | None:
        kv = self.etcd.get(self.keys.keys + key_id.encode()) if key_id else None
        return None if kv is None else record_from_json(KeyRecord, kv.value)

    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        recs = [record_from_json(KeyRecord, kv.value) for kv in self.etcd.scan(self.keys.keys)]
        return [r for r in recs if tenant is None or r.tenant == tenant]

    def delete_key(self, key_id: str) -> None:
        if not key_id or not self.etcd.delete(self.keys.keys + key_id.encode()):
            raise NotFound(f"API key '{key_id}' not found")

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
        rec, blobs = self._version_entry(tenant, name, version)
        wanted = range(rec.num_layers) if layers is None else layers
        for layer in wanted:
            check_layer(rec, layer)
        upload = blobs["upload"]
        refs = [BlobRef.from_json(blobs["shards"][layer]) for layer in wanted]
        refs += [BlobRef.from_json(r) for layer in wanted for r in blobs["indices"][layer]]
        data = iter(self._read_blobs(upload, refs))
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

    def read_current_layer(
        self, tenant: str, name: str, layer: int, version: int = 0
    ) -> VersionSnapshot:
        """The version (0 = current) resolved and one layer of it read, from one record."""
        return self.read_version(tenant, name, version, layers=[layer])

    def get_shard(self, tenant: str, name: str, version: int, layer: int) -> bytes:
        return self.read_version(tenant, name, version, layers=[layer]).shard(layer)

    def get_index(self, tenant: str, name: str, version: int, layer: int, group: int) -> bytes:
        return self.read_version(tenant, name, version, layers=[layer]).index(layer, group)

    # ------------------------------------------------------------ prefixes: write

    def write_version(
        self,
        tenant: str,
        name: str,
        *,
        mode: str,
        expected_version: int = 0,
        model_fingerprint: str,
        token_count: int,
        build_params: dict[str, str],
        index_kind: str,
        metric: str,
        shards: list[bytes],
        indices: list[list[bytes]],
        decoded: list[Shard] | None = None,
        still_wanted: Callable[[], bool] | None = None,
    ) -> PrefixRecord:
        """As `Store.write_version`: stage the blobs in Redis, then publish in one etcd txn."""
        _check_name(tenant, "tenant name", MAX_TENANT_BYTES)
        _check_name(name, "prefix name", MAX_NAME_BYTES)
        _check_write_args(mode, model_fingerprint, token_count, build_params, index_kind, metric)
        if decoded is None:
            decoded = [decode_shard(blob, where=f"layer {i}") for i, blob in enumerate(shards)]
        elif len(decoded) != len(shards):
            raise InvalidArgument(f"{len(decoded)} decoded shards for {len(shards)} blobs")
        shape = check_consistent(decoded)
        _check_indices(indices, len(shards), shape.num_groups)
        draft = PrefixRecord(
            tenant=tenant,
            name=name,
            version=0,
            model_fingerprint=model_fingerprint,
            num_layers=len(shards),
            shape=shape,
            dtype=str(decoded[0].out.dtype),
            token_count=token_count,
            build_params=dict(build_params),
            extra_tensors=sorted(decoded[0].extras),
            bytes=sum(len(b) for b in shards),
            index_kind=index_kind,
            metric=metric,
            created_at=0.0,
            updated_at=0.0,
        )
        self._check_write(draft, mode, expected_version)  # fail fast, before staging
        upload = uuid.uuid4().hex
        staging = self.keys.staging + upload.encode()
        note = {"tenant": tenant, "name": name, "node": self.node_id, "at": time.time()}
        self.etcd.put(staging, json.dumps(note).encode(), lease=self.lease.id)
        try:
            refs = self.blobs.stage(upload, shards)
            index_refs = [self.blobs.stage(upload, groups) for groups in indices]
            blobs = {"upload": upload, "shards": [r.to_json() for r in refs],
                     "indices": [[r.to_json() for r in g] for g in index_refs]}  # fmt: skip
            self.stage_hook(upload)
            rec = self._publish(draft, mode, expected_version, blobs, staging, still_wanted)
        except BaseException:
            self._abandon(upload, staging)
            raise
        log.info("stored %s/%s version %d (%d bytes)", tenant, name, rec.version, rec.bytes)
        return rec

    def stage_hook(self, upload: str) -> None:
        """Called between staging and publishing (tests kill the node here)."""

    def _abandon(self, upload: str, staging: bytes) -> None:
        try:
            self.etcd.delete(staging)
            self.blobs.delete_upload(upload)
        except Unavailable as exc:  # the collector removes them later
            log.warning("could not remove abandoned upload %s: %s", upload, exc)

    def _check_write(self, draft: PrefixRecord, mode: str, expected: int) -> None:
        tenant = record_from_json(TenantRecord, self._tenant_kv(draft.tenant).value)
        kv = self.etcd.get(self._pointer(draft.tenant, draft.name))
        current = _decode_entry(kv.value)[0] if kv else None
        _check_mode(mode, draft.name, current, expected)
        if tenant.max_bytes or tenant.max_prefixes:
            _check_quota(tenant, current, draft, self.usage(draft.tenant))

    def _publish(
        self,
        draft: PrefixRecord,
        mode: str,
        expected: int,
        blobs: dict,
        staging: bytes,
        still_wanted: Callable[[], bool] | None,
    ) -> PrefixRecord:
        tenant_name, name = draft.tenant, draft.name
        pointer = self._pointer(tenant_name, name)
        scope = self.keys.prefixes + f"{tenant_name}\0".encode()
        for _ in range(MAX_ATTEMPTS):
            tenant_kv = self._tenant_kv(tenant_name)
            tenant = record_from_json(TenantRecord, tenant_kv.value)
            kvs, revision = self.etcd.range(pointer)
            current = _decode_entry(kvs[0].value)[0] if kvs else None
            _check_mode(mode, name, current, expected)
            compare = [cmp_mod(tenant_kv.key, tenant_kv.mod_revision),
                       cmp_mod(pointer, kvs[0].mod_revision if kvs else 0)]  # fmt: skip
            if tenant.max_bytes or tenant.max_prefixes:
                usage, revision = self._usage_at(tenant_name)
                _check_quota(tenant, current, draft, usage)
                compare.append(_unchanged_since(scope, revision))
            version = current.version + 1 if current else 1
            now = time.time()
            retained = (current.retained_versions if current else []) + [version]
            rec = dataclasses.replace(
                draft,
                version=version,
                created_at=current.created_at if current else now,
                updated_at=now,
                retained_versions=retained[-self._retain :],
            )
            entry = _encode_entry(rec, blobs)
            ops = [op_put(self._version_key(tenant_name, name, version), entry),
                   op_put(pointer, entry), op_delete(staging)]  # fmt: skip
            ops += [op_delete(self._version_key(tenant_name, name, v))
                    for v in retained[: -self._retain]]  # fmt: skip
            if still_wanted is not None and not still_wanted():
                raise Cancelled(f"upload of '{name}' was cancelled; nothing was written")
            if self.etcd.txn(compare, ops):
                return rec
        raise _contended(f"prefix '{name}'")

    def delete_prefix(self, tenant: str, name: str, *, expected_version: int = 0) -> int:
        pointer = self._pointer(tenant, name)
        versions = self.keys.versions + item_key(tenant, name)
        for _ in range(MAX_ATTEMPTS):
            kv = self.etcd.get(pointer)
            if kv is None:
                raise NotFound(f"prefix '{name}' not found")
            current = _decode_entry(kv.value)[0]
            if expected_version and expected_version != current.version:
                raise FailedPrecondition(
                    f"prefix '{name}' is at version {current.version}, not the expected "
                    f"{expected_version}; re-read it and retry"
                )
            ops = [op_delete(pointer), op_delete(versions, range_end(versions))]
            if self.etcd.txn([cmp_mod(pointer, kv.mod_revision)], ops):
                log.info("deleted %s/%s (was at version %d)", tenant, name, current.version)
                return current.version
        raise _contended(f"prefix '{name}'")

    # ------------------------------------------------------------ accounting

    def usage(self, tenant: str) -> tuple[int, int]:
        return self._usage_at(tenant)[0]

    def _usage_at(self, tenant: str) -> tuple[tuple[int, int], int]:
        """((prefixes, shard bytes of current versions), the etcd revision of that read)."""
        scope = self.keys.prefixes + f"{tenant}\0".encode()
        kvs, revision = self.etcd.range(scope, range_end(scope))
        sizes = [json.loads(kv.value)["bytes"] for kv in kvs]
        return (len(sizes), sum(sizes)), revision

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
    return record_from_json(PrefixRecord, value), json.loads(value)["blobs"]


def _check_quota(
    tenant: TenantRecord, current: PrefixRecord | None, draft: PrefixRecord, usage: tuple[int, int]
) -> None:
    """The quota check of `Store` (same limits, same messages), on usage read from etcd."""
    count, used = usage
    if current is None and tenant.max_prefixes and count + 1 > tenant.max_prefixes:
        raise ResourceExhausted(
            f"tenant '{tenant.name}' has {count} prefixes, its quota is "
            f"{tenant.max_prefixes}; delete a prefix or raise the tenant's max_prefixes"
        )
    after = used - (current.bytes if current else 0) + draft.bytes
    if tenant.max_bytes and after > tenant.max_bytes:
        raise ResourceExhausted(
            f"prefix '{draft.name}' needs {draft.bytes} bytes, which would bring tenant "
            f"'{tenant.name}' to {after} of its {tenant.max_bytes}-byte quota; delete "
            "prefixes, upload a smaller memory or raise the tenant's max_bytes"
        )


def _unchanged_since(prefix: bytes, revision: int) -> dict:
    """No key under `prefix` was created or changed after `revision`."""
    return cmp_mod(prefix, revision + 1, result="LESS", end=range_end(prefix))


def _contended(what: str) -> Unavailable:
    return Unavailable(f"{what} kept changing under {MAX_ATTEMPTS} attempts; retry")
