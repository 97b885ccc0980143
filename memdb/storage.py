"""LMDB storage: tenants, API keys, prefixes and their versioned shards and indices.

This module owns the one LMDB environment of a server and its named sub-databases:

    meta      b"schema" -> the storage schema version
    tenants   tenant -> TenantRecord (JSON)
    keys      key_id -> KeyRecord (JSON; the secret is already hashed by the caller)
    prefixes  tenant \\0 name -> PrefixRecord of the current version (JSON)
    versions  tenant \\0 name \\0 version -> PrefixRecord of that version (JSON)
    shards    tenant \\0 name \\0 version layer -> safetensors bytes of one layer
    indices   tenant \\0 name \\0 version layer group -> serialized FAISS index bytes

(version: 8 bytes, layer and group: 4 bytes, all big-endian, so keys sort numerically and every
record of a prefix, or of a tenant, is one range scan.) A version is written completely and made
current in one write transaction, so readers see the old version or the new one, never a mix;
versions older than the last `retain_versions` are deleted in the same transaction.

It validates shards (through memdb.shards) and quotas, grows the LMDB map when it fills, and
reclaims reader slots of crashed processes. It does not know FAISS (index bytes are opaque
here), gRPC, or how API keys are hashed and checked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import lmdb

from memdb import failpoints
from memdb.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
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

log = logging.getLogger(__name__)

SCHEMA = b"1"
DBS = ("meta", "tenants", "keys", "prefixes", "versions", "shards", "indices")
DEFAULT_TENANT = "default"
ROLES = ("admin", "writer", "reader")
MODES = ("create", "update", "upsert")
INDEX_KINDS = ("flat", "ivf", "hnsw")
METRICS = ("cosine", "ip")
MAX_TENANT_BYTES = 128
MAX_NAME_BYTES = 255  # with the tenant and 16 bytes of numbers, well under LMDB's 511-byte keys
PAGE = 4096

T = TypeVar("T")


# ---------------------------------------------------------------- locking


class _RWLock:
    """Many holders of `shared`, or one of `exclusive` (waiting exclusives go first).

    Every LMDB transaction of this process runs under `shared`; growing the map runs under
    `exclusive`, because the map must not be replaced while a transaction of this process is
    open. Not re-entrant: never take `shared` twice in one thread.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# ---------------------------------------------------------------- the store


class Store:
    """The LMDB store of one server. Thread-safe; one instance per environment and process."""

    def __init__(
        self,
        path: Path | str,
        *,
        map_size: int = 1 << 30,
        max_map_size: int = 1 << 40,
        sync: bool = True,
        max_readers: int = 126,
        retain_versions: int = 2,
    ) -> None:
        if retain_versions < 1:
            raise InvalidArgument(f"retain_versions must be at least 1, got {retain_versions}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._sync = sync
        self._retain = retain_versions
        self._rw = _RWLock()
        self._write_lock = threading.Lock()
        initial = _round_up(max(map_size, _file_size(self.path / "data.mdb"), PAGE))
        self._max_map_size = max(_round_up(max_map_size), initial)
        self._env = lmdb.open(
            str(self.path),
            map_size=initial,
            max_dbs=len(DBS),
            max_readers=max_readers,
            sync=sync,
            metasync=sync,
            lock=True,
            meminit=False,
            max_spare_txns=max_readers,
        )
        self._db = {name: self._env.open_db(name.encode()) for name in DBS}
        self._page = self._env.stat()["psize"]
        self.reclaim_readers()
        self._write(self._init_meta)
        log.info("opened store %s (map %d bytes, sync=%s)", self.path, initial, sync)

    def _init_meta(self, txn: lmdb.Transaction) -> None:
        schema = txn.get(b"schema", db=self._db["meta"])
        if schema is None:
            txn.put(b"schema", SCHEMA, db=self._db["meta"])
        elif schema != SCHEMA:
            raise FailedPrecondition(
                f"store {self.path} has schema {schema.decode()}, this server reads "
                f"{SCHEMA.decode()}; use a matching server version or a new data dir"
            )
        if txn.get(DEFAULT_TENANT.encode(), db=self._db["tenants"]) is None:
            rec = TenantRecord(DEFAULT_TENANT, created_at=time.time())
            txn.put(DEFAULT_TENANT.encode(), record_to_json(rec), db=self._db["tenants"])

    def close(self) -> None:
        """Flush (when opened with sync=False) and close; idempotent."""
        with self._write_lock, self._rw.exclusive():
            if self._env is None:
                return
            if not self._sync:
                self._env.sync(True)
            self._env.close()
            self._env = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reclaim_readers(self) -> int:
        """Free reader slots left by crashed processes; returns how many were freed."""
        dead = self._env.reader_check()
        if dead:
            log.warning("reclaimed %d LMDB reader slot(s) of dead processes", dead)
        return dead

    # ------------------------------------------------------------ transactions

    @contextmanager
    def _read(self) -> Iterator[lmdb.Transaction]:
        with self._rw.shared(), self._env.begin(buffers=False) as txn:
            yield txn

    def _write(self, fn: Callable[[lmdb.Transaction], T], payload: int = 0) -> T:
        """Run `fn` in one write transaction; on a full map, abort, grow the map and retry."""
        with self._write_lock:
            while True:
                try:
                    with self._rw.shared(), self._env.begin(write=True) as txn:
                        return fn(txn)
                except lmdb.MapFullError:
                    self._grow(payload)
                except lmdb.TxnFullError:
                    raise ResourceExhausted(
                        f"one write of {payload} bytes touches more pages than an LMDB "
                        "transaction can hold; upload a smaller memory (fewer layers or entries)"
                    ) from None

    def _grow(self, payload: int) -> None:
        with self._rw.exclusive():
            info = self._env.info()
            current = info["map_size"]
            used = (info["last_pgno"] + 1) * self._page
            if current >= self._max_map_size:
                raise ResourceExhausted(
                    f"the store is full: a write of {payload} bytes does not fit in the "
                    f"{self._max_map_size}-byte LMDB map ({used} bytes used); delete prefixes "
                    "or raise the server's max map size"
                )
            target = _round_up(max(current * 2, used + 2 * payload))
            target = min(target, self._max_map_size)
            self._env.set_mapsize(target)
            log.info("grew the LMDB map from %d to %d bytes", current, target)

    # ------------------------------------------------------------ tenants

    def put_tenant(self, rec: TenantRecord) -> None:
        """Create a tenant; AlreadyExists if the name is taken."""
        _check_name(rec.name, "tenant name", MAX_TENANT_BYTES)
        if rec.max_bytes < 0 or rec.max_prefixes < 0:
            raise InvalidArgument("tenant quotas must be 0 (unlimited) or positive")
        rec = dataclasses.replace(rec, created_at=rec.created_at or time.time())

        def put(txn: lmdb.Transaction) -> None:
            if not txn.put(
                rec.name.encode(), record_to_json(rec), overwrite=False, db=self._db["tenants"]
            ):
                raise AlreadyExists(f"tenant '{rec.name}' already exists")

        self._write(put)

    def get_tenant(self, name: str) -> TenantRecord:
        with self._read() as txn:
            return self._tenant(txn, name)

    def _tenant(self, txn: lmdb.Transaction, name: str) -> TenantRecord:
        blob = txn.get(name.encode(), db=self._db["tenants"])
        if blob is None:
            raise NotFound(f"tenant '{name}' not found")
        return record_from_json(TenantRecord, blob)

    def list_tenants(self) -> list[TenantRecord]:
        with self._read() as txn:
            cursor = txn.cursor(db=self._db["tenants"])
            return [record_from_json(TenantRecord, v) for _, v in cursor]

    def delete_tenant(self, name: str, *, force: bool = False) -> None:
        """Delete a tenant. With prefixes: FailedPrecondition, unless `force`, which also
        deletes every record of its prefixes and its API keys."""

        def delete(txn: lmdb.Transaction) -> None:
            self._tenant(txn, name)
            start = f"{name}\0".encode()
            count = sum(1 for _ in _scan(txn, self._db["prefixes"], start))
            if count and not force:
                raise FailedPrecondition(
                    f"tenant '{name}' still has {count} prefix(es); delete them first "
                    "or delete the tenant with force"
                )
            for db in ("prefixes", "versions", "shards", "indices"):
                _delete_range(txn, self._db[db], start)
            for key_id, blob in list(txn.cursor(db=self._db["keys"])):
                if record_from_json(KeyRecord, blob).tenant == name:
                    txn.delete(key_id, db=self._db["keys"])
            txn.delete(name.encode(), db=self._db["tenants"])

        self._write(delete)
        log.info("deleted tenant %s (force=%s)", name, force)

    # ------------------------------------------------------------ API keys

    def put_key(self, rec: KeyRecord) -> None:
        """Store an API key record; NotFound for an unknown tenant, AlreadyExists for the id."""
        _check_name(rec.key_id, "API key id", MAX_NAME_BYTES)
        if rec.role not in ROLES:
            raise InvalidArgument(f"role '{rec.role}' is unknown; use {', '.join(ROLES)}")
        if not rec.secret_hash:
            raise InvalidArgument(f"API key '{rec.key_id}' has no secret hash")
        rec = dataclasses.replace(rec, created_at=rec.created_at or time.time())

        def put(txn: lmdb.Transaction) -> None:
            self._tenant(txn, rec.tenant)
            if not txn.put(
                rec.key_id.encode(), record_to_json(rec), overwrite=False, db=self._db["keys"]
            ):
                raise AlreadyExists(f"API key '{rec.key_id}' already exists")

        self._write(put)

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self._read() as txn:
            blob = txn.get(key_id.encode(), db=self._db["keys"]) if key_id else None
        return None if blob is None else record_from_json(KeyRecord, blob)

    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        """Every API key (of `tenant`, when given), sorted by key id."""
        with self._read() as txn:
            recs = [record_from_json(KeyRecord, v) for _, v in txn.cursor(db=self._db["keys"])]
        return [r for r in recs if tenant is None or r.tenant == tenant]

    def delete_key(self, key_id: str) -> None:
        def delete(txn: lmdb.Transaction) -> None:
            if not key_id or not txn.delete(key_id.encode(), db=self._db["keys"]):
                raise NotFound(f"API key '{key_id}' not found")

        self._write(delete)

    # ------------------------------------------------------------ prefixes: read

    def get_prefix(self, tenant: str, name: str, version: int = 0) -> PrefixRecord:
        """The record of the current version (or of `version`, if still stored)."""
        with self._read() as txn:
            return self._version_record(txn, tenant, name, version)

    def _current(self, txn: lmdb.Transaction, tenant: str, name: str) -> PrefixRecord | None:
        blob = txn.get(prefix_key(tenant, name), db=self._db["prefixes"])
        return None if blob is None else record_from_json(PrefixRecord, blob)

    def _version_record(
        self, txn: lmdb.Transaction, tenant: str, name: str, version: int
    ) -> PrefixRecord:
        current = self._current(txn, tenant, name)
        if current is None:
            raise NotFound(f"prefix '{name}' not found")
        if version in (0, current.version):
            return current
        blob = txn.get(item_key(tenant, name, version), db=self._db["versions"])
        if blob is None:
            stored = ", ".join(map(str, current.retained_versions))
            raise NotFound(f"prefix '{name}' has no version {version} (stored versions: {stored})")
        rec = record_from_json(PrefixRecord, blob)
        rec.retained_versions = list(current.retained_versions)
        return rec

    def list_prefixes(
        self, tenant: str, *, start_after: str = "", name_prefix: str = "", limit: int = 100
    ) -> list[PrefixRecord]:
        """Current records of a tenant's prefixes, sorted by name, after `start_after`."""
        if limit < 1:
            raise InvalidArgument(f"limit must be at least 1, got {limit}")
        scope, after = prefix_key(tenant, name_prefix), prefix_key(tenant, start_after)
        out: list[PrefixRecord] = []
        with self._read() as txn:
            for key, blob in _scan(txn, self._db["prefixes"], scope):
                if len(out) >= limit:
                    break
                if not start_after or key > after:
                    out.append(record_from_json(PrefixRecord, blob))
        return out

    def read_version(
        self, tenant: str, name: str, version: int = 0, *, layers: list[int] | None = None
    ) -> VersionSnapshot:
        """In one read transaction: the record of a version (0 = current) and the shard and
        index bytes of its layers (all, or those in `layers`)."""
        with self._read() as txn:
            rec = self._version_record(txn, tenant, name, version)
            wanted = range(rec.num_layers) if layers is None else layers
            shards: dict[int, bytes] = {}
            indices: dict[int, list[bytes]] = {}
            for layer in wanted:
                check_layer(rec, layer)
                shards[layer] = self._get(txn, "shards", item_key(tenant, name, rec.version, layer))
                indices[layer] = [
                    self._get(txn, "indices", item_key(tenant, name, rec.version, layer, g))
                    for g in range(rec.shape.num_groups)
                ]
        return VersionSnapshot(rec, shards, indices)

    def _get(self, txn: lmdb.Transaction, db: str, key: bytes) -> bytes:
        blob = txn.get(key, db=self._db[db])
        if blob is None:  # every record of a version is written in the transaction that lists it
            raise NotFound(f"{db} record {key!r} is missing; the store is damaged")
        return blob

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
        """Validate and store a new version (current + 1) and make it current, atomically.

        `indices[layer][group]` are serialized indices over that layer's keys. Raises
        InvalidArgument (bad shard: names layer and tensor), NotFound (tenant; prefix in update
        mode), AlreadyExists (create mode), FailedPrecondition (`expected_version` nonzero and
        not current), ResourceExhausted (quota, store full). On any error nothing is written.
        `decoded`: the shards as the caller already decoded them with `decode_shard` (skips
        decoding and validating them a second time). `still_wanted`: asked inside the write
        transaction just before it commits; False aborts it (Cancelled, nothing written).
        """
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
        payload = draft.bytes + sum(len(b) for layer in indices for b in layer)

        def commit(txn: lmdb.Transaction) -> PrefixRecord:
            rec = self._commit_version(txn, draft, mode, expected_version, shards, indices)
            if still_wanted is not None and not still_wanted():
                raise Cancelled(f"upload of '{name}' was cancelled; nothing was written")
            failpoints.hit("before_commit")
            return rec

        failpoints.hit("before_write_txn")
        rec = self._write(commit, payload)
        failpoints.hit("after_commit")
        log.info("stored %s/%s version %d (%d bytes)", tenant, name, rec.version, rec.bytes)
        return rec

    def _commit_version(
        self,
        txn: lmdb.Transaction,
        draft: PrefixRecord,
        mode: str,
        expected_version: int,
        shards: list[bytes],
        indices: list[list[bytes]],
    ) -> PrefixRecord:
        tenant, name = draft.tenant, draft.name
        current = self._current(txn, tenant, name)
        _check_mode(mode, name, current, expected_version)
        self._check_quota(txn, self._tenant(txn, tenant), current, draft)
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
        for layer, blob in enumerate(shards):
            txn.put(item_key(tenant, name, version, layer), blob, db=self._db["shards"])
            for group, index in enumerate(indices[layer]):
                key = item_key(tenant, name, version, layer, group)
                txn.put(key, index, db=self._db["indices"])
        failpoints.hit("after_shards_put")
        for old in retained[: -self._retain]:
            self._delete_version(txn, tenant, name, old)
        blob = record_to_json(rec)
        txn.put(item_key(tenant, name, version), blob, db=self._db["versions"])
        txn.put(prefix_key(tenant, name), blob, db=self._db["prefixes"])
        return rec

    def _check_quota(
        self,
        txn: lmdb.Transaction,
        tenant: TenantRecord,
        current: PrefixRecord | None,
        draft: PrefixRecord,
    ) -> None:
        count, used = self._usage(txn, tenant.name)
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

    def _delete_version(self, txn: lmdb.Transaction, tenant: str, name: str, version: int) -> None:
        start = item_key(tenant, name, version)
        txn.delete(start, db=self._db["versions"])
        _delete_range(txn, self._db["shards"], start)
        _delete_range(txn, self._db["indices"], start)
        log.debug("reclaimed %s/%s version %d", tenant, name, version)

    def delete_prefix(self, tenant: str, name: str, *, expected_version: int = 0) -> int:
        """Delete every record of a prefix (all versions); returns the deleted current version."""

        def delete(txn: lmdb.Transaction) -> int:
            current = self._current(txn, tenant, name)
            if current is None:
                raise NotFound(f"prefix '{name}' not found")
            if expected_version and expected_version != current.version:
                raise FailedPrecondition(
                    f"prefix '{name}' is at version {current.version}, not the expected "
                    f"{expected_version}; re-read it and retry"
                )
            txn.delete(prefix_key(tenant, name), db=self._db["prefixes"])
            for db in ("versions", "shards", "indices"):
                _delete_range(txn, self._db[db], item_key(tenant, name))
            failpoints.hit("delete_before_commit")
            return current.version

        version = self._write(delete)
        failpoints.hit("delete_after_commit")
        log.info("deleted %s/%s (was at version %d)", tenant, name, version)
        return version

    # ------------------------------------------------------------ accounting

    def usage(self, tenant: str) -> tuple[int, int]:
        """(number of prefixes, shard bytes of their current versions) of a tenant."""
        with self._read() as txn:
            return self._usage(txn, tenant)

    def _usage(self, txn: lmdb.Transaction, tenant: str) -> tuple[int, int]:
        sizes = [
            json.loads(v)["bytes"]
            for _, v in _scan(txn, self._db["prefixes"], f"{tenant}\0".encode())
        ]
        return len(sizes), sum(sizes)

    def count_records(self) -> dict[str, int]:
        """Entries in each sub-database (for stats and tests)."""
        with self._read() as txn:
            return {name: txn.stat(self._db[name])["entries"] for name in DBS}

    def info(self) -> dict:
        with self._read() as txn:
            info = self._env.info()
            tenants = txn.stat(self._db["tenants"])["entries"]
            prefixes = txn.stat(self._db["prefixes"])["entries"]
        return {
            "map_size": info["map_size"],
            "used_bytes": (info["last_pgno"] + 1) * self._page,
            "num_tenants": tenants,
            "num_prefixes": prefixes,
            "path": str(self.path),
        }


# ---------------------------------------------------------------- helpers


def _check_name(value: str, what: str, max_bytes: int) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty string")
    if any(ord(c) < 32 for c in value):
        raise InvalidArgument(f"{what} {value!r} contains control characters")
    if len(value.encode()) > max_bytes:
        raise InvalidArgument(f"{what} '{value[:40]}...' is longer than {max_bytes} bytes")


def _check_write_args(
    mode: str,
    model_fingerprint: str,
    token_count: int,
    build_params: dict[str, str],
    index_kind: str,
    metric: str,
) -> None:
    if mode not in MODES:
        raise InvalidArgument(f"mode '{mode}' is unknown; use {', '.join(MODES)}")
    if not model_fingerprint:
        raise InvalidArgument("model_fingerprint is empty; send the fingerprint of the model")
    if token_count < 0:
        raise InvalidArgument(f"token_count must be >= 0, got {token_count}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in build_params.items()):
        raise InvalidArgument("build_params must map strings to strings")
    if index_kind not in INDEX_KINDS:
        raise InvalidArgument(f"index kind '{index_kind}' is unknown; use {', '.join(INDEX_KINDS)}")
    if metric not in METRICS:
        raise InvalidArgument(f"metric '{metric}' is unknown; use {' or '.join(METRICS)}")


def _check_indices(indices: list[list[bytes]], num_layers: int, num_groups: int) -> None:
    if len(indices) != num_layers:
        raise InvalidArgument(f"got indices for {len(indices)} layers, expected {num_layers}")
    for layer, groups in enumerate(indices):
        if len(groups) != num_groups or not all(groups):
            raise InvalidArgument(
                f"layer {layer}: got {len(groups)} indices, expected one non-empty index per "
                f"group ({num_groups})"
            )


def _check_mode(mode: str, name: str, current: PrefixRecord | None, expected: int) -> None:
    if mode == "create" and current is not None:
        raise AlreadyExists(
            f"prefix '{name}' already exists (version {current.version}); use update or upsert"
        )
    if mode == "update" and current is None:
        raise NotFound(f"prefix '{name}' not found; use create or upsert")
    at = current.version if current else 0
    if expected and expected != at:
        raise FailedPrecondition(
            f"prefix '{name}' is at version {at}, not the expected {expected}; re-read it and retry"
        )


def _scan(txn: lmdb.Transaction, db: object, start: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) pairs of `db` whose key starts with `start`, in key order."""
    cursor = txn.cursor(db=db)
    if cursor.set_range(start):
        for key, value in cursor:
            if not key.startswith(start):
                return
            yield key, value


def _delete_range(txn: lmdb.Transaction, db: object, start: bytes) -> int:
    """Delete every key of `db` that starts with `start`; returns how many."""
    cursor = txn.cursor(db=db)
    deleted = 0
    if cursor.set_range(start):
        while cursor.key().startswith(start):  # delete() moves on; past the end key() is b""
            cursor.delete()
            deleted += 1
    return deleted


def _round_up(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
