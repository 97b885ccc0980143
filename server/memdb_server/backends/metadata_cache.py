"""A node's copy of the etcd records that reads need on every call (the current-version
pointers, the retained version records, the API keys), kept by the node's etcd watch, so a
steady-state Lookup and its authentication make no etcd round trip.

How fresh a read from the copy is:
- The copy is loaded at one revision, then changed by the watch's events in revision order;
  `revision` is the revision it reflects, advanced only once every event of a revision is in.
- Read-your-writes on one node: each write of this node's etcd client that changed etcd
  (`EtcdClient.on_write`) raises `required` to its revision and waits (up to `wait_s`) for the
  copy to reach it; the copy serves a read only once it has reached `required`.
- A read goes to etcd (linearizable, as before) when the copy is behind this node's writes,
  when the watch is not live (not yet open, broken, reconnecting), and when the key is absent
  from the copy (so a record created through another node a moment ago is found: only a miss
  costs a round trip). Events compacted away before the watch saw them: the copy reloads.
- Across nodes the copy lags the newest write by the watch's delay (milliseconds; seconds
  under a slow or cut etcd link, until the idle watch is re-opened): a read here may answer a
  version older than another node already serves. MemdbClient keeps its reads monotonic by
  asking again for the version it saw: newer than the copy's current one, it makes the store
  read etcd and hold the copy back (`behind`) until it caught up, so that even when that
  version is gone (replaced twice since) the client's next read of the current version is
  etcd's.
The copy holds every record of its scopes in memory (records only: a few KB per version, no
blobs). Knows etcd's keys and revisions, not what the records mean.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from memdb_server.backends.etcd_gateway import KV, EtcdClient, WatchEvent, WatchProgress, range_end

log = logging.getLogger(__name__)

WAIT_S = 2.0  # the longest a write waits for the copy to reach it (then reads fall back)
PAGE = 1000  # keys per range read of a load


class MetadataCache:
    def __init__(self, etcd: EtcdClient, scopes: Iterable[bytes], *, wait_s: float = WAIT_S):
        self._etcd = etcd
        self.scopes = tuple(scopes)
        self.wait_s = wait_s
        self._kvs: dict[bytes, KV] = {}
        self._changed = threading.Condition()
        self.revision = 0  # the etcd revision the copy reflects
        self.required = 0  # the revision of this node's latest write
        self.live = False  # the watch that feeds the copy is open
        self.hits = 0
        self.fallbacks = 0  # reads sent to etcd

    # ------------------------------------------------------------ reads

    def get(self, key: bytes) -> KV | None:
        """The key's record: from the copy when it may serve (see the module), else etcd's."""
        with self._changed:
            kv = self._kvs.get(key) if self._serves() else None
            if kv is not None:
                self.hits += 1
                return kv
            self.fallbacks += 1
        return self._etcd.get(key)

    def _serves(self) -> bool:
        return self.live and self.revision >= self.required

    def under(self, prefix: bytes) -> list[KV]:
        """Every record of the copy whose key starts with `prefix` (whatever its freshness)."""
        with self._changed:
            return [kv for k, kv in self._kvs.items() if k.startswith(prefix)]

    # ------------------------------------------------------------ keeping the copy

    def load(self) -> int:
        """Read every scope at one revision into the copy; returns that revision (the watch
        that keeps the copy starts after it). The copy serves once the watch is live."""
        kvs: dict[bytes, KV] = {}
        revision = 0
        for scope in self.scopes:
            start, end = scope, range_end(scope)
            while True:
                page, at = self._etcd.range(start, end, limit=PAGE, revision=revision)
                revision = revision or at
                kvs.update((kv.key, kv) for kv in page)
                if len(page) < PAGE:
                    break
                start = page[-1].key + b"\0"
        with self._changed:
            self._kvs, self.revision = kvs, revision
            self._changed.notify_all()
        log.info("metadata cache: %d records at revision %d", len(kvs), revision)
        return revision

    def apply(self, events: list[WatchEvent], progress: WatchProgress) -> None:
        """The watch's events of one response (in revision order) and where it stands now.
        Events the copy already holds (at or before its revision) are skipped."""
        with self._changed:
            for ev in events:
                if ev.kv.mod_revision <= self.revision or not ev.kv.key.startswith(self.scopes):
                    continue
                if ev.kind == "put":
                    self._kvs[ev.kv.key] = ev.kv
                else:
                    self._kvs.pop(ev.kv.key, None)
            self.revision = max(self.revision, progress.revision)
            self.live = progress.live
            self._changed.notify_all()
        if progress.lost:
            log.warning("metadata cache: watch events were compacted away; reloading")
            self.load()
            with self._changed:
                self.live = True

    def committed(self, revision: int) -> None:
        """A write of this node made `revision`: reads wait for the copy to hold it; wait a
        little for the watch to bring it (bounded: a broken watch only sends reads to etcd)."""
        with self._changed:
            self.required = max(self.required, revision)
            if self.live and not self._changed.wait_for(
                lambda: self.revision >= revision or not self.live, timeout=self.wait_s
            ):
                log.warning("metadata cache at revision %d; a write made %d", self.revision,
                            revision)  # fmt: skip

    def behind(self, revision: int) -> None:
        """A read showed etcd at `revision` ahead of the copy (a client saw a newer version
        than the copy's): the copy serves again only once it holds `revision`, reads go to
        etcd meanwhile. Never waits."""
        with self._changed:
            self.required = max(self.required, revision)

    def close(self) -> None:
        with self._changed:
            self.live = False
            self._changed.notify_all()
