"""What one server node of a cluster runs beside its requests: its etcd lease and registration,
the etcd watch that feeds the node's Watch streams, and the garbage collector of Redis blobs.

- `NodeLease`: a lease kept alive by a thread; the node's registration and its uploads' staging
  records are attached to it, so they vanish when the node dies.
- `ClusterEventBus`: an `EventBus` fed by an etcd watch on the current-version pointers, so a
  change made through any node reaches the watchers of every node (local `publish` calls are
  ignored: this node's own changes arrive through etcd like everyone else's, once, in order).
- `GarbageCollector`: on the one node holding the collector's lease key, deletes the Redis keys
  of every upload that neither a stored version nor a live staging record has named for
  `grace_s` (crash-safe: an upload killed between staging and publishing is such an upload).
Knows the key layout (`Keys`) but not how versions are written.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from memdb.errors import MemdbError
from memdb_server.backends.etcd_gateway import EtcdClient, WatchEvent, WatchStop, cmp_mod, op_put
from memdb_server.backends.redis_blobs import BlobStore
from memdb_server.events import Event, EventBus, WatchLimits
from memdb_server.records import PrefixRecord, record_from_json

log = logging.getLogger(__name__)


class Keys:
    """The layout of memdb's keys in etcd, under one root (default `/memdb/`)."""

    def __init__(self, root: str = "/memdb/") -> None:
        r = root.encode()
        self.tenants = r + b"tenants/"
        self.keys = r + b"keys/"
        self.prefixes = r + b"prefixes/"  # + tenant \0 name -> current PrefixRecord + blobs
        self.versions = r + b"versions/"  # + tenant \0 name \0 version(8) -> PrefixRecord + blobs
        self.staging = r + b"staging/"  # + upload id -> {tenant, name, node}, on the node lease
        self.nodes = r + b"nodes/"  # + node id -> {address, started_at}, on the node lease
        self.usage = r + b"usage/"  # + tenant -> Usage (JSON), changed in every txn it counts
        self.gc_leader = r + b"gc-leader"


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


class ClusterEventBus(EventBus):
    def __init__(
        self, etcd: EtcdClient, keys: Keys, start_revision: int, limits: WatchLimits | None = None
    ) -> None:
        super().__init__(limits or WatchLimits())
        self._keys = keys
        self._stop = WatchStop()
        self._thread = threading.Thread(
            target=etcd.watch,
            args=(keys.prefixes, self._deliver, self._stop),
            kwargs={"start_revision": start_revision},
            name="memdb-etcd-watch",
            daemon=True,
        )
        self._thread.start()

    def publish(self, event: Event) -> None:
        """Ignored: every change, this node's too, is delivered from the etcd watch."""

    def _deliver(self, watch: WatchEvent) -> None:
        event = event_of(watch, self._keys)
        if event is not None:
            EventBus.publish(self, event)

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
    ) -> None:
        self._etcd, self._blobs, self._keys = etcd, blobs, keys
        self.node_id, self._lease, self.grace_s = node_id, lease, grace_s
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

    def live_uploads(self) -> set[str]:
        """Uploads named by a stored version (current or retained) or a live staging record."""
        live = set()
        for kv in self._etcd.scan(self._keys.versions):
            live.add(json.loads(kv.value)["blobs"]["upload"])
        for kv in self._etcd.scan(self._keys.staging):
            live.add(kv.key[len(self._keys.staging) :].decode())
        return live

    def collect(self) -> int:
        """One pass; returns how many Redis keys it deleted.

        Redis is scanned before etcd is read: a blob found in the scan was staged after its
        staging record was written, so the etcd read sees that record or the version that
        replaced it, unless the upload is garbage.
        """
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
