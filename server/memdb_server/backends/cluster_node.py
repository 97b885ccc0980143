"""What one server node of a cluster runs beside its requests: its etcd lease and registration,
the etcd watch that feeds the node's Watch streams, and the garbage collector of Redis blobs.

- `NodeLease`: a lease kept alive by a thread; the node's registration and its uploads' staging
  records are attached to it, so they vanish when the node dies.
- `ClusterEventBus`: an `EventBus` fed by one etcd watch on the node's whole root, so a
  change made through any node reaches the watchers of every node (local `publish` calls are
  ignored: this node's own changes arrive through etcd like everyone else's, once, in order).
  The same watch keeps the node's `MetadataCache` and scrubs from its `BlobCache` the blobs of
  every deleted version record (a retention drop, a prefix or tenant deletion), so a deleted
  tenant's bytes leave every node's disk.
- `GarbageCollector`: on the one node holding the collector's lease key, deletes the Redis keys
  of every upload that neither a stored version nor a live staging record has named for
  `grace_s` (crash-safe: an upload killed between staging and publishing is such an upload).
  It never deletes a blob that a version names: a publish is fenced on its staging record
  (cluster_publish), and a staging record goes (with its node's lease, or expired here in a
  txn) before any blob of its upload does.
Knows the key layout (`Keys`) but not how versions are written.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from memdb.errors import MemdbError
from memdb_server.backends.blob_cache import BlobCache
from memdb_server.backends.etcd_gateway import (
    EtcdClient,
    WatchEvent,
    WatchProgress,
    WatchStop,
    cmp_mod,
    op_delete,
    op_put,
)
from memdb_server.backends.metadata_cache import MetadataCache
from memdb_server.backends.redis_blobs import BlobStore
from memdb_server.events import Event, EventBus, WatchLimits
from memdb_server.records import PrefixRecord, item_key, prefix_key, record_from_json

log = logging.getLogger(__name__)

MAX_STAGING_S = 3600.0  # an upload not published this long after it reserved is given up


class Keys:
    """The layout of memdb's keys in etcd, under one root (default `/memdb/`)."""

    def __init__(self, root: str = "/memdb/") -> None:
        r = root.encode()
        self.tenants = r + b"tenants/"
        self.keys = r + b"keys/"
        self.prefixes = r + b"prefixes/"  # + tenant \0 name -> current PrefixRecord + blobs
        self.versions = r + b"versions/"  # + tenant \0 name \0 version(8) -> PrefixRecord + blobs
        self.staging = r + b"staging/"  # + tenant \0 upload -> Reservation, on the node lease
        self.nodes = r + b"nodes/"  # + node id -> {address, started_at}, on the node lease
        self.usage = r + b"usage/"  # + tenant \0 name -> that prefix's Usage ("": API keys)
        self.gc_leader = r + b"gc-leader"

    def pointer(self, tenant: str, name: str) -> bytes:
        return self.prefixes + prefix_key(tenant, name)

    def version(self, tenant: str, name: str, version: int) -> bytes:
        return self.versions + item_key(tenant, name, version)

    def versions_of(self, tenant: str, name: str) -> bytes:
        """The key range (a prefix) of every version record of one prefix."""
        return self.versions + item_key(tenant, name)

    def upload_of(self, staging_key: bytes) -> str:
        """The upload id a staging key names."""
        return staging_key[len(self.staging) :].rsplit(b"\0", 1)[-1].decode()


# ---------------------------------------------------------------- lease


class NodeLease:
    """An etcd lease of `ttl` seconds, refreshed every ttl/3 s; re-granted if it expired."""

    def __init__(self, etcd: EtcdClient, ttl: int) -> None:
        self._etcd = etcd
        self.ttl = ttl
        self.id = etcd.grant(ttl)
        self._on_regrant: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memdb-lease", daemon=True)
        self._thread.start()

    def on_regrant(self, fn) -> None:
        """Call `fn()` after the lease had to be granted anew (to re-attach records)."""
        self._on_regrant.append(fn)

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if self._etcd.keepalive(self.id) <= 0:
                    log.warning("node lease %x expired; granting a new one", self.id)
                    self.id = self._etcd.grant(self.ttl)
                    for fn in self._on_regrant:
                        fn()
            except MemdbError as exc:
                log.warning("could not refresh the node lease: %s", exc)

    def close(self, *, revoke: bool = True) -> None:
        self._stop.set()
        self._thread.join()
        if revoke:
            try:
                self._etcd.revoke(self.id)
            except MemdbError as exc:
                log.warning("could not revoke the node lease: %s", exc)


# ---------------------------------------------------------------- events


def event_of(watch: WatchEvent, keys: Keys) -> Event | None:
    """The memdb event of an etcd change of a current-version pointer."""
    kv = watch.kv if watch.kind == "put" else watch.prev
    if kv is None or not watch.kv.key.startswith(keys.prefixes):
        return None
    rec = record_from_json(PrefixRecord, kv.value)
    at = rec.updated_at if watch.kind == "put" else time.time()
    return Event(watch.kind, rec.tenant, rec.name, rec.version, rec.model_fingerprint, at)


def dropped_upload(watch: WatchEvent, keys: Keys) -> str | None:
    """The upload whose blobs a deleted version record named."""
    if watch.kind != "delete" or watch.prev is None or not watch.kv.key.startswith(keys.versions):
        return None
    return json.loads(watch.prev.value)["blobs"]["upload"]


def root_of(keys: Keys) -> bytes:
    """The prefix every key of the layout starts with."""
    parts = [keys.tenants, keys.keys, keys.prefixes, keys.versions, keys.staging, keys.nodes,
             keys.usage, keys.gc_leader]  # fmt: skip
    return bytes(os.path.commonprefix(parts))


class ClusterEventBus(EventBus):
    def __init__(
        self,
        etcd: EtcdClient,
        keys: Keys,
        start_revision: int,
        limits: WatchLimits | None = None,
        *,
        metadata: MetadataCache | None = None,
        blob_cache: BlobCache | None = None,
    ) -> None:
        """Watch from `start_revision` (the revision `metadata` was loaded at, plus one)."""
        super().__init__(limits or WatchLimits())
        self._keys, self._metadata, self._blob_cache = keys, metadata, blob_cache
        self._batch: list[WatchEvent] = []  # the events of the response being read
        self._scrub_dead_uploads()  # deleted while this node was not watching
        self._stop = WatchStop()
        self._thread = threading.Thread(
            target=etcd.watch,
            args=(root_of(keys), self._deliver, self._stop),
            kwargs={"start_revision": start_revision, "on_progress": self._progress},
            name="memdb-etcd-watch",
            daemon=True,
        )
        self._thread.start()

    def publish(self, event: Event) -> None:
        """Ignored: every change, this node's too, is delivered from the etcd watch."""

    def _deliver(self, watch: WatchEvent) -> None:
        self._batch.append(watch)

    def _progress(self, progress: WatchProgress) -> None:
        """The end of a watch response: the metadata copy first (a Watch event's version is
        then readable on this node), then the scrubs, then the Watch events, in order."""
        batch, self._batch = self._batch, []
        if self._metadata is not None:
            self._metadata.apply(batch, progress)
        if self._blob_cache is not None:
            for watch in batch:
                upload = dropped_upload(watch, self._keys)
                if upload is not None:
                    self._blob_cache.forget(upload)
            if progress.lost:
                self._scrub_dead_uploads()
        for watch in batch:
            event = event_of(watch, self._keys)
            if event is not None:
                EventBus.publish(self, event)

    def _scrub_dead_uploads(self) -> None:
        """Forget the cached blobs of every upload no version record of the copy names."""
        if self._metadata is None or self._blob_cache is None:
            return
        live = [json.loads(kv.value)["blobs"]["upload"]
                for kv in self._metadata.under(self._keys.versions)]  # fmt: skip
        if forgotten := self._blob_cache.keep_only(live):
            log.info("scrubbing %d cached uploads of deleted versions", forgotten)

    def close(self) -> None:
        super().close()
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- garbage collection


class GarbageCollector:
    def __init__(
        self,
        etcd: EtcdClient,
        blobs: BlobStore,
        keys: Keys,
        *,
        node_id: str,
        lease: NodeLease | None,
        grace_s: float,
        max_staging_s: float = MAX_STAGING_S,
    ) -> None:
        self._etcd, self._blobs, self._keys = etcd, blobs, keys
        self.node_id, self._lease, self.grace_s = node_id, lease, grace_s
        self.max_staging_s = max_staging_s
        self._unreferenced_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, interval_s: float) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(interval_s,), name="memdb-gc", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                if self.is_leader():
                    self.collect()
            except MemdbError as exc:
                log.warning("garbage collection failed: %s", exc)

    def is_leader(self) -> bool:
        """Take the collector's key (on this node's lease) if nobody holds it; True if ours."""
        me = self.node_id.encode()
        lease = self._lease.id if self._lease else 0
        self._etcd.txn(
            [cmp_mod(self._keys.gc_leader, 0)], [op_put(self._keys.gc_leader, me, lease)]
        )
        held = self._etcd.get(self._keys.gc_leader)
        return held is not None and held.value == me

    def expire_staging(self) -> int:
        """Delete staging records (reservations) older than `max_staging_s` whose node is still
        alive but whose upload never finished, each in a txn compared on the record read, so
        their blobs become garbage; a publish of such an upload then fails on its fence."""
        expired = 0
        now = time.time()
        for kv in self._etcd.scan(self._keys.staging):
            if now - float(json.loads(kv.value).get("at", now)) < self.max_staging_s:
                continue
            if self._etcd.txn([cmp_mod(kv.key, kv.mod_revision)], [op_delete(kv.key)]):
                log.warning("expired the reservation of upload %s", self._keys.upload_of(kv.key))
                expired += 1
        return expired

    def live_uploads(self) -> set[str]:
        """Uploads named by a stored version (current or retained) or a live staging record."""
        live = set()
        for kv in self._etcd.scan(self._keys.versions):
            live.add(json.loads(kv.value)["blobs"]["upload"])
        for kv in self._etcd.scan(self._keys.staging):
            live.add(self._keys.upload_of(kv.key))
        return live

    def collect(self) -> int:
        """One pass; returns how many Redis keys it deleted.

        Redis is scanned before etcd is read: a blob found in the scan was staged after its
        staging record was written, so the etcd read sees that record or the version that
        replaced it, unless the upload is garbage.
        """
        self.expire_staging()  # before the blob scan: an expired upload's blobs are garbage
        found = self._blobs.keys_by_upload()
        live = self.live_uploads()
        now = time.monotonic()
        deleted = 0
        for upload, keys in found.items():
            if upload in live:
                self._unreferenced_since.pop(upload, None)
                continue
            since = self._unreferenced_since.setdefault(upload, now)
            if now - since >= self.grace_s:
                deleted += self._blobs.delete_keys(keys)
                self._unreferenced_since.pop(upload, None)
        for upload in list(self._unreferenced_since):
            if upload not in found:
                del self._unreferenced_since[upload]
        if deleted:
            log.info("garbage collector deleted %d Redis keys", deleted)
        return deleted
