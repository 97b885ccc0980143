"""A node's bounded local read cache of shard and index blobs: an LMDB file evicted by LRU.

Blobs are immutable and named by content (upload id + sha256), so a cached blob never goes
stale: there is nothing to invalidate, only space to reclaim. The cache holds at most
`max_bytes` of values; the least recently used blobs go first. It is a cache: it opens without
fsync, and a damaged or full file is simply emptied. Knows nothing of Redis or etcd.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

import lmdb

log = logging.getLogger(__name__)

MiB = 1 << 20


class BlobCache:
    def __init__(self, path: Path | str, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(
            str(self.path),
            map_size=2 * max_bytes + 64 * MiB,  # room for LMDB's free pages and overhead
            max_dbs=2,
            sync=False,
            metasync=False,
        )
        self._blobs = self._env.open_db(b"blobs")
        self._atime = self._env.open_db(b"atime")
        self._lock = threading.Lock()
        self._lru: OrderedDict[bytes, int] = OrderedDict()  # key -> size, oldest first
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._load()

    def _load(self) -> None:
        with self._env.begin() as txn:
            order = sorted(
                (float(t.decode()), k) for k, t in txn.cursor(db=self._atime)
            )  # oldest first
            for _, key in order:
                size = len(txn.get(key, default=b"", db=self._blobs))
                self._lru[key] = size
                self.nbytes += size
        if self._lru:
            log.info("blob cache %s: %d blobs, %d bytes", self.path, len(self._lru), self.nbytes)

    def close(self) -> None:
        with self._lock:
            if self._env is not None:
                self._env.close()
                self._env = None

    def get(self, key: str) -> bytes | None:
        with self._lock:
            if not self._touch(key.encode()):
                return None
            with self._env.begin() as txn:
                return txn.get(key.encode(), db=self._blobs)

    def get_range(self, key: str, start: int, size: int) -> tuple[bytes, int] | None:
        """Bytes [start, start + size) of a cached blob and its length, copying only those."""
        with self._lock:
            if not self._touch(key.encode()):
                return None
            with self._env.begin(buffers=True) as txn:
                view = txn.get(key.encode(), db=self._blobs)
                return bytes(view[start : start + size]), len(view)

    def _touch(self, k: bytes) -> bool:
        """Count a hit (the blob becomes the most recently used) or a miss."""
        if k not in self._lru:
            self.misses += 1
            return False
        self._lru.move_to_end(k)
        self.hits += 1
        return True

    def put(self, key: str, blob: bytes) -> None:
        if len(blob) > self.max_bytes:
            return
        k = key.encode()
        with self._lock:
            if k in self._lru:
                self._lru.move_to_end(k)
                return
            try:
                self._put(k, blob)
            except lmdb.MapFullError:
                log.warning("blob cache %s is full of free pages; emptying it", self.path)
                self._clear()
                self._put(k, blob)

    def _put(self, k: bytes, blob: bytes) -> None:
        with self._env.begin(write=True) as txn:
            while self._lru and self.nbytes + len(blob) > self.max_bytes:
                old, size = self._lru.popitem(last=False)
                txn.delete(old, db=self._blobs)
                txn.delete(old, db=self._atime)
                self.nbytes -= size
            txn.put(k, blob, db=self._blobs)
            txn.put(k, repr(time.time()).encode(), db=self._atime)
        self._lru[k] = len(blob)
        self.nbytes += len(blob)

    def _clear(self) -> None:
        with self._env.begin(write=True) as txn:
            txn.drop(self._blobs, delete=False)
            txn.drop(self._atime, delete=False)
        self._lru.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru)
