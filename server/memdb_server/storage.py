"""LMDB storage: tenants, API keys, prefixes and their versioned shards and indices.

This module owns the one LMDB environment of a server and its named sub-databases:

    meta      b"schema" -> the storage schema version
    tenants   tenant -> TenantRecord (JSON)
    keys      key_id -> KeyRecord (JSON; the secret is already hashed by the caller)
    prefixes  tenant \\0 name -> PrefixRecord of the current version (JSON)
    versions  tenant \\0 name \\0 version -> PrefixRecord of that version (JSON)
    shards    tenant \\0 name \\0 version layer -> safetensors bytes of one layer
    indices   tenant \\0 name \\0 version layer group -> serialized FAISS index bytes
    usage     tenant -> Usage (JSON): bytes, prefixes and keys the tenant stores
    jobs, job_inputs, build_models: build jobs (memdb_server.build_jobs.LmdbJobTable)

(version: 8 bytes, layer and group: 4 bytes, all big-endian, so keys sort numerically and every
record of a prefix, or of a tenant, is one range scan.) A version is written completely and made
current in one write transaction, so readers see the old version or the new one, never a mix;
versions older than the last `retain_versions` are deleted in the same transaction.

It validates shards (through memdb.shards), metadata sizes and quotas (counting every record
a tenant stores, updated in the write transaction that changes it), grows the LMDB map when
it fills but keeps its last `reserve_bytes` for deletes (so space can always be freed), and
reclaims reader slots of crashed processes. It does not know FAISS (index bytes are opaque
here), gRPC, or how API keys are hashed and checked.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import lmdb

from memdb.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from memdb_server import failpoints
from memdb_server.build_jobs import LmdbJobTable
from memdb_server.durable import fsync_dir, make_dirs_durably
from memdb_server.lmdbio import PAGE, RWLock, delete_range, file_size, round_up, scan
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
    record_from_json,
    record_to_json,
    version_gone,
)
from memdb_server.usage import (
    charge_key,
    charge_version,
    check_key_count,
    load_usage,
    recount,
    save_usage,
    stored_bytes,
    stored_versions,
    version_bytes,
)

log = logging.getLogger(__name__)

SCHEMA = b"1"
DBS = ("meta", "tenants", "keys", "prefixes", "versions", "shards", "indices", "usage", "jobs",
       "job_inputs", "build_models")  # fmt: skip
DEFAULT_TENANT = "default"
# The last bytes of the largest map are kept for deletes: a delete copies the B-tree pages it
# touches, so in a map filled to the brim even a delete fails. 64 MiB frees gigabytes (a
# delete needs about a page per leaf it empties plus 8 bytes per freed page); small maps keep
# an eighth.
DEFAULT_RESERVE = 64 << 20
DEFAULT_MAX_KEYS = 1000  # API keys per tenant

T = TypeVar("T")


# ---------------------------------------------------------------- the store


class Store(VersionWriter, VersionReads):
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
        reserve_bytes: int | None = None,
        max_keys_per_tenant: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if retain_versions < 1:
            raise InvalidArgument(f"retain_versions must be at least 1, got {retain_versions}")
        self.path = Path(path)
        make_dirs_durably(self.path)
        created = not (self.path / "data.mdb").exists()
        self._sync = sync
        self._retain = retain_versions
        self._max_keys = max_keys_per_tenant
        self._rw = RWLock()
        self._write_lock = threading.Lock()
        on_disk = file_size(self.path / "data.mdb")
        self._max_map_size = max(round_up(max_map_size), round_up(on_disk))
        if reserve_bytes is None:
            reserve_bytes = min(DEFAULT_RESERVE, self._max_map_size // 8)
        self._reserve = round_up(reserve_bytes)
        if not 0 <= self._reserve < self._max_map_size:
            raise InvalidArgument(
                f"reserve_bytes ({reserve_bytes}) must be below max_map_size ({max_map_size})"
            )
        self._cap = self._max_map_size - self._reserve  # writes other than deletes stop here
        initial = round_up(max(min(map_size, self._cap), on_disk, PAGE))
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
        if created and sync:  # the names of the new data.mdb and lock.mdb, and of the folder
            fsync_dir(self.path)
            fsync_dir(self.path.absolute().parent)
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
        for name, _ in txn.cursor(db=self._db["tenants"]):  # stores written before `usage`
            if txn.get(name, db=self._db["usage"]) is None:
                save_usage(txn, self._db, name.decode(), recount(txn, self._db, name.decode()))

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

    def _write(
        self, fn: Callable[[lmdb.Transaction], T], payload: int = 0, *, delete: bool = False
    ) -> T:
        """Run `fn` in one write transaction; on a full map, abort, grow the map and retry.

        Only a `delete` may grow the map into its reserve (the last `reserve_bytes` of
        max_map_size); afterwards the map shrinks back to the cap (or to what is used), so the
        pages a delete frees, not the reserve, are what later writes fill.
        """
        with self._write_lock:
            try:
                while True:
                    try:
                        with self._rw.shared(), self._env.begin(write=True) as txn:
                            return fn(txn)
                    except lmdb.MapFullError:
                        self._grow(payload, self._max_map_size if delete else self._cap)
                    except lmdb.TxnFullError:
                        raise ResourceExhausted(
                            f"one write of {payload} bytes touches more pages than an LMDB "
                            "transaction can hold; upload a smaller memory (fewer layers or "
                            "entries)"
                        ) from None
            finally:
                if delete:
                    self._shrink_to_cap()

    def _grow(self, payload: int, limit: int) -> None:
        with self._rw.exclusive():
            info = self._env.info()
            current = info["map_size"]
            used = (info["last_pgno"] + 1) * self._page
            if current >= limit:
                raise ResourceExhausted(
                    f"the store is full: a write of {payload} bytes does not fit in the LMDB map "
                    f"({used} of {self._max_map_size} bytes used, the last {self._reserve} kept "
                    "for deletes); delete prefixes, API keys or tenants, or raise the server's "
                    "max map size (--max-map-size)"
                )
            target = min(round_up(max(current * 2, used + 2 * payload)), limit)
            self._env.set_mapsize(target)
            log.info("grew the LMDB map from %d to %d bytes", current, target)

    def _shrink_to_cap(self) -> None:
        """Give back the part of the reserve a delete grew into but left unused."""
        if self._env.info()["map_size"] <= self._cap:
            return  # the usual case: no need to stop this process's readers
        with self._rw.exclusive():
            current = self._env.info()["map_size"]
            if current > self._cap:
                self._env.set_mapsize(self._cap)  # LMDB keeps at least what is used
                log.info("LMDB map back from %d to %d bytes", current, self._env.info()["map_size"])

    # ------------------------------------------------------------ tenants

    def put_tenant(self, rec: TenantRecord) -> None:
        """Create a tenant; AlreadyExists if the name is taken."""
        check_tenant(rec)
        rec = dataclasses.replace(rec, created_at=rec.created_at or time.time())

        def put(txn: lmdb.Transaction) -> None:
            if not txn.put(
                rec.name.encode(), record_to_json(rec), overwrite=False, db=self._db["tenants"]
            ):
                raise AlreadyExists(f"tenant '{rec.name}' already exists")
            save_usage(txn, self._db, rec.name, Usage())

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
            count = sum(1 for _ in scan(txn, self._db["prefixes"], start))
            if count and not force:
                raise FailedPrecondition(
                    f"tenant '{name}' still has {count} prefix(es); delete them first "
                    "or delete the tenant with force"
                )
            for db in ("prefixes", "versions", "shards", "indices"):
                delete_range(txn, self._db[db], start)
            for key_id, blob in list(txn.cursor(db=self._db["keys"])):
                if record_from_json(KeyRecord, blob).tenant == name:
                    txn.delete(key_id, db=self._db["keys"])
            txn.delete(name.encode(), db=self._db["tenants"])
            txn.delete(name.encode(), db=self._db["usage"])

        self._write(delete, delete=True)
        log.info("deleted tenant %s (force=%s)", name, force)

    # ------------------------------------------------------------ API keys

    def put_key(self, rec: KeyRecord) -> None:
        """Store an API key record; NotFound for an unknown tenant, AlreadyExists for the id."""
        check_key(rec)
        rec = dataclasses.replace(rec, created_at=rec.created_at or time.time())
        key, blob = rec.key_id.encode(), record_to_json(rec)

        def put(txn: lmdb.Transaction) -> None:
            tenant = self._tenant(txn, rec.tenant)
            usage = load_usage(txn, self._db, rec.tenant)
            check_key_count(rec.tenant, usage, self._max_keys)
            charge_key(tenant, usage, len(key) + len(blob), f"API key '{rec.key_id}'")
            if not txn.put(key, blob, overwrite=False, db=self._db["keys"]):
                raise AlreadyExists(f"API key '{rec.key_id}' already exists")
            save_usage(txn, self._db, rec.tenant, usage)

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
            key = key_id.encode()
            blob = txn.get(key, db=self._db["keys"]) if key_id else None
            if blob is None:
                raise NotFound(f"API key '{key_id}' not found")
            txn.delete(key, db=self._db["keys"])
            tenant = record_from_json(KeyRecord, blob).tenant
            usage = load_usage(txn, self._db, tenant)
            usage.keys -= 1
            usage.bytes -= len(key) + len(blob)
            save_usage(txn, self._db, tenant, usage)

        self._write(delete, delete=True)

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
            for key, blob in scan(txn, self._db["prefixes"], scope):
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
            return self._snapshot(txn, rec, range(rec.num_layers) if layers is None else layers)

    def read_current_layer(
        self,
        tenant: str,
        name: str,
        layer: int,
        version: int = 0,
        *,
        open_layer: Callable[[PrefixRecord, Callable[[], VersionSnapshot]], T],
    ) -> tuple[PrefixRecord, T]:
        """Resolve a version (0 = current) and open one of its layers in ONE read transaction.

        `open_layer(record, read)` runs inside the transaction; `read()` returns the snapshot of
        that layer (shard and index bytes) of exactly `record`'s version, so a caller with a
        cache keyed by version reads the bytes only on a miss. An update committed meanwhile
        cannot remove the version under it. Returns (record, what open_layer returned).
        """
        with self._read() as txn:
            rec = self._version_record(txn, tenant, name, version)
            check_layer(rec, layer)

            def read() -> VersionSnapshot:
                return self._snapshot(txn, rec, [layer])

            return rec, open_layer(rec, read)

    def _snapshot(
        self, txn: lmdb.Transaction, rec: PrefixRecord, layers: Iterable[int]
    ) -> VersionSnapshot:
        shards: dict[int, bytes] = {}
        indices: dict[int, list[bytes]] = {}
        for layer in layers:
            check_layer(rec, layer)
            key = item_key(rec.tenant, rec.name, rec.version, layer)
            shards[layer] = self._get(txn, "shards", key)
            indices[layer] = [
                self._get(txn, "indices", item_key(rec.tenant, rec.name, rec.version, layer, g))
                for g in range(rec.shape.num_groups)
            ]
        return VersionSnapshot(rec, shards, indices)

    def _get(self, txn: lmdb.Transaction, db: str, key: bytes) -> bytes:
        blob = txn.get(key, db=self._db[db])
        if blob is None:  # every record of a version is written in the transaction that lists it
            raise NotFound(f"{db} record {key!r} is missing; the store is damaged")
        return blob

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
        """One write transaction (see `VersionWriter.write_version`); `still_wanted` is asked
        inside it."""
        name = draft.name
        draft.stored_bytes = stored_bytes(draft.tenant, name, shards, indices)
        payload = draft.stored_bytes

        def commit(txn: lmdb.Transaction) -> PrefixRecord:
            rec = self._commit_version(txn, draft, mode, expected_version, shards, indices)
            if still_wanted is not None and not still_wanted():
                raise Cancelled(f"upload of '{name}' was cancelled; nothing was written")
            failpoints.hit("before_commit")
            return rec

        failpoints.hit("before_write_txn")
        rec = self._write(commit, payload)
        failpoints.hit("after_commit")
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
        check_mode(mode, name, current, expected_version)
        tenant_rec, usage = self._tenant(txn, tenant), load_usage(txn, self._db, tenant)
        rec, dropped = next_version(draft, current, self._retain, time.time())
        version = rec.version
        blob, pkey = record_to_json(rec), prefix_key(tenant, name)
        freed = sum(version_bytes(txn, self._db, tenant, name, old) for old in dropped)
        if current is not None:
            freed += len(pkey) + len(txn.get(pkey, db=self._db["prefixes"]))
        added = rec.stored_bytes + 2 * len(blob) + len(pkey) + len(item_key(tenant, name, 0))
        charge_version(tenant_rec, usage, added=added, freed=freed, new_prefix=current is None,
                       what=f"prefix '{name}' version {version}")  # fmt: skip
        for layer, shard in enumerate(shards):
            txn.put(item_key(tenant, name, version, layer), shard, db=self._db["shards"])
            for group, index in enumerate(indices[layer]):
                key = item_key(tenant, name, version, layer, group)
                txn.put(key, index, db=self._db["indices"])
        failpoints.hit("after_shards_put")
        for old in dropped:
            self._delete_version(txn, tenant, name, old)
        txn.put(item_key(tenant, name, version), blob, db=self._db["versions"])
        txn.put(pkey, blob, db=self._db["prefixes"])
        save_usage(txn, self._db, tenant, usage)
        return rec

    def _delete_version(self, txn: lmdb.Transaction, tenant: str, name: str, version: int) -> None:
        start = item_key(tenant, name, version)
        txn.delete(start, db=self._db["versions"])
        delete_range(txn, self._db["shards"], start)
        delete_range(txn, self._db["indices"], start)
        log.debug("reclaimed %s/%s version %d", tenant, name, version)

    def delete_prefix(self, tenant: str, name: str, *, expected_version: int = 0) -> int:
        """Delete every record of a prefix (all versions); returns the deleted current version."""

        def delete(txn: lmdb.Transaction) -> int:
            current = self._current(txn, tenant, name)
            if current is None:
                raise NotFound(f"prefix '{name}' not found")
            check_expected(name, current.version, expected_version)
            usage = load_usage(txn, self._db, tenant)
            pkey = prefix_key(tenant, name)
            usage.bytes -= len(pkey) + len(txn.get(pkey, db=self._db["prefixes"]))
            for version in stored_versions(txn, self._db, tenant, name):
                usage.bytes -= version_bytes(txn, self._db, tenant, name, version)
            usage.prefixes -= 1
            txn.delete(pkey, db=self._db["prefixes"])
            for db in ("versions", "shards", "indices"):
                delete_range(txn, self._db[db], item_key(tenant, name))
            save_usage(txn, self._db, tenant, usage)
            failpoints.hit("delete_before_commit")
            return current.version

        version = self._write(delete, delete=True)
        failpoints.hit("delete_after_commit")
        log.info("deleted %s/%s (was at version %d)", tenant, name, version)
        return version

    # ------------------------------------------------------------ accounting

    def usage(self, tenant: str) -> tuple[int, int]:
        """(number of prefixes, bytes counted against the quota) of a tenant (see Usage)."""
        with self._read() as txn:
            u = load_usage(txn, self._db, tenant)
        return u.prefixes, u.bytes

    def tenant_usage(self, tenant: str) -> Usage:
        with self._read() as txn:
            return load_usage(txn, self._db, tenant)

    def recount_usage(self, tenant: str) -> Usage:
        """The usage of a tenant counted from its records (what the kept counters must equal)."""
        with self._read() as txn:
            return recount(txn, self._db, tenant)

    def upload_allowance(self, tenant: str, name: str) -> int | None:
        """Bytes a new version of `name` may add before the tenant's byte quota refuses it
        (None: no quota): the quota, less the usage, plus what the write would drop (the
        version that falls out of retention). A new version needs at least its shard bytes,
        so an upload past this is refused whatever its indices."""
        with self._read() as txn:
            tenant_rec = self._tenant(txn, tenant)
            if not tenant_rec.max_bytes:
                return None
            left = tenant_rec.max_bytes - load_usage(txn, self._db, tenant).bytes
            current = self._current(txn, tenant, name)
            if current is not None:
                for old in dropped_by_next(current, self._retain):
                    left += version_bytes(txn, self._db, tenant, name, old)
                pkey = prefix_key(tenant, name)
                left += len(pkey) + len(txn.get(pkey, db=self._db["prefixes"]))
        return max(left, 0)

    def job_table(self) -> LmdbJobTable:
        """The durable records of build jobs, in this environment."""
        return LmdbJobTable(self._read, self._write, self._db)

    def list_nodes(self) -> list[dict]:
        """Server nodes sharing this store: none (one process owns an LMDB store; the cluster
        backend lists its nodes here)."""
        return []

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

    # ------------------------------------------------------------ streaming reads

    def read_shard_chunk(
        self, tenant: str, name: str, version: int, layer: int, start: int, size: int
    ) -> tuple[bytes, int]:
        """Bytes [start, start + size) of one layer's stored shard, and the shard's length, in
        one short read transaction that copies only those bytes (FetchMemory streams with it).
        Aborted once that version is no longer stored."""
        with self._rw.shared(), self._env.begin(buffers=True) as txn:
            view = txn.get(item_key(tenant, name, version, layer), db=self._db["shards"])
            if view is None:
                raise version_gone(name, version)
            return bytes(view[start : start + size]), len(view)
