"""A node's bounded local read cache of shard and index blobs: an LMDB file evicted by LRU, from
which the blobs of deleted versions are scrubbed.

Blobs are immutable and named `<upload>:<digest>` (an upload id, then the content's hash), so a
cached blob never goes stale: there is nothing to invalidate, only space to reclaim. The cache
holds at most `max_bytes` of values; the least recently used blobs go first. It is a cache: it
opens without fsync, and a damaged or full file is simply emptied.

Deleted data does not stay: `forget(upload)` (the store calls it when a version naming that
upload is deleted, on every node) stops the upload's blobs being served or cached at once, and
within `scrub_delay_s` plus one rewrite removes them from the file on disk. Deleting an LMDB
record only frees its pages, which keep their old bytes until reused, so the scrubber rewrites
the file compactly (`Environment.copy(compact=True)` writes only live pages) and swaps it in
(an atomic rename over the old file). A burst of deletes costs one rewrite: the scrubber waits
`scrub_delay_s` after the first before it starts. The copy is made from a read snapshot while
reads and writes go on; what changed meanwhile is redone in the new file under the lock, with
the swap. Knows nothing of Redis or etcd.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import lmdb

log = logging.getLogger(__name__)

MiB = 1 << 20
SCRUB_DELAY_S = 0.5  # a scrub starts this long after the first forget of a burst
FORGOTTEN_TTL_S = 3600.0  # a forgotten upload is refused this long (reads in flight finish)
COMPACT_DIR = "compact"  # the rewrite is built here, inside the cache's directory


class BlobCache:
    def __init__(
        self, path: Path | str, max_bytes: int, *, scrub_delay_s: float = SCRUB_DELAY_S
    ) -> None:
        self.max_bytes = max_bytes
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.path / COMPACT_DIR, ignore_errors=True)  # a rewrite cut short
        self.scrub_delay_s = scrub_delay_s
        self._lock = threading.Lock()  # the environment and the LRU
        self._open()
        self._lru: OrderedDict[bytes, int] = OrderedDict()  # key -> size, oldest first
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.scrubs = 0  # rewrites of the file
        self._forgotten: dict[bytes, float] = {}  # upload id + b":" -> when; own lock
        self._forgotten_lock = threading.Lock()
        self._pending = False  # forgotten blobs may still be in the file
        self._scrubbing = threading.Lock()  # one scrub at a time
        self._since_copy: set[bytes] | None = None  # keys put or deleted while a copy runs
        self._cleared_in_copy = False
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._load()
        self._scrubber = threading.Thread(target=self._run, name="memdb-cache-scrub", daemon=True)
        self._scrubber.start()

    def _open(self) -> None:
        self._env = lmdb.open(
            str(self.path),
            map_size=2 * self.max_bytes + 64 * MiB,  # room for LMDB's free pages and overhead
            max_dbs=2,
            sync=False,
            metasync=False,
        )
        self._blobs = self._env.open_db(b"blobs")
        self._atime = self._env.open_db(b"atime")

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
        self._closing.set()
        self._wake.set()
        self._scrubber.join()
        with self._scrubbing, self._lock:
            if self._env is not None:
                self._env.close()
                self._env = None

    def get(self, key: str) -> bytes | None:
        k = key.encode()
        with self._lock:
            if self._is_forgotten(k) or not self._touch(k):
                return None
            with self._env.begin() as txn:
                return txn.get(k, db=self._blobs)

    def get_range(self, key: str, start: int, size: int) -> tuple[bytes, int] | None:
        """Bytes [start, start + size) of a cached blob and its length, copying only those."""
        k = key.encode()
        with self._lock:
            if self._is_forgotten(k) or not self._touch(k):
                return None
            with self._env.begin(buffers=True) as txn:
                view = txn.get(k, db=self._blobs)
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
        """Cache a blob (not one of a forgotten upload, nor one larger than the cache)."""
        if len(blob) > self.max_bytes:
            return
        k = key.encode()
        with self._lock:
            if self._is_forgotten(k):  # a read that began before the delete: not kept
                return
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
                self._changed(old)
            txn.put(k, blob, db=self._blobs)
            txn.put(k, repr(time.time()).encode(), db=self._atime)
        self._lru[k] = len(blob)
        self.nbytes += len(blob)
        self._changed(k)

    def _changed(self, k: bytes) -> None:
        if self._since_copy is not None:
            self._since_copy.add(k)

    def _clear(self) -> None:
        with self._env.begin(write=True) as txn:
            txn.drop(self._blobs, delete=False)
            txn.drop(self._atime, delete=False)
        self._lru.clear()
        self.nbytes = 0
        self._cleared_in_copy = self._since_copy is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru)

    # ------------------------------------------------------------ forgetting

    def forget(self, upload: str) -> None:
        """Never serve or cache a blob of `upload` again; scrub its blobs from the file soon.
        Returns at once (it takes no lock the readers hold): safe on the etcd watch thread."""
        with self._forgotten_lock:
            self._forgotten[upload.encode() + b":"] = time.monotonic()
        self._wake.set()

    def keep_only(self, uploads: Iterable[str]) -> int:
        """Forget every cached upload not in `uploads` (a node that starts or resyncs: versions
        deleted while it was not watching); returns how many it forgot."""
        live = {u.encode() + b":" for u in uploads}
        with self._lock:
            cached = {k[: k.index(b":") + 1] for k in self._lru if b":" in k}
        gone = cached - live
        for group in gone:
            self.forget(group[:-1].decode())
        return len(gone)

    def _is_forgotten(self, k: bytes) -> bool:
        cut = k.find(b":")
        if cut < 0:
            return False
        with self._forgotten_lock:
            return k[: cut + 1] in self._forgotten

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._closing.wait(self.scrub_delay_s):  # gather the rest of a burst of deletes
                return
            self._wake.clear()
            try:
                self.scrub()
            except lmdb.Error:
                log.exception("could not scrub the blob cache %s", self.path)

    def scrub(self) -> int:
        """Delete the blobs of forgotten uploads and, if any went, rewrite the file without
        their bytes; returns how many blobs it deleted. The copy is made from a snapshot while
        reads and writes go on (about 1.4 s per GiB cached); only the swap takes the lock."""
        with self._forgotten_lock:
            horizon = time.monotonic() - FORGOTTEN_TTL_S
            self._forgotten = {g: t for g, t in self._forgotten.items() if t > horizon}
            groups = sorted(self._forgotten)
        with self._scrubbing:
            with self._lock:
                if self._env is None:
                    return 0
                deleted = self._delete_groups(groups)
                self._pending = self._pending or deleted > 0
            while self._pending and not self._closing.is_set():
                self._rewrite()
        return deleted

    def _delete_groups(self, groups: list[bytes]) -> int:
        deleted = 0
        with self._env.begin(write=True) as txn:
            cursor = txn.cursor(db=self._blobs)
            for group in groups:
                doomed = []
                if cursor.set_range(group):
                    for k in cursor.iternext(values=False):
                        if not k.startswith(group):
                            break
                        doomed.append(bytes(k))
                for k in doomed:
                    txn.delete(k, db=self._blobs)
                    txn.delete(k, db=self._atime)
                    self.nbytes -= self._lru.pop(k, 0)
                deleted += len(doomed)
        return deleted

    def _rewrite(self) -> None:
        """Copy the live pages of a snapshot to a new file and rename it over the old one, then
        redo there what changed since the snapshot; if a forgotten blob was deleted meanwhile
        (its bytes are in the copy), `_pending` stays set for another rewrite."""
        started = time.perf_counter()
        tmp = self.path / COMPACT_DIR
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with self._lock:
            snapshot = self._env.begin()
            self._since_copy, self._cleared_in_copy = set(), False
        try:
            self._env.copy(str(tmp), compact=True, txn=snapshot)
        except BaseException:
            with self._lock:
                snapshot.abort()
                self._since_copy = None
            raise
        with self._lock:
            snapshot.abort()
            changed, self._since_copy = self._since_copy, None
            carried = self._values([k for k in changed if k in self._lru])
            self._env.close()
            try:
                os.replace(tmp / "data.mdb", self.path / "data.mdb")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                self._open()
            self._pending = self._redo(changed, carried)
        self.scrubs += 1
        log.info("blob cache %s rewritten without deleted blobs in %.3f s (%d bytes live)",
                 self.path, time.perf_counter() - started, self.nbytes)  # fmt: skip

    def _values(self, keys: list[bytes]) -> dict[bytes, tuple[bytes, bytes]]:
        with self._env.begin() as txn:
            return {k: (txn.get(k, db=self._blobs), txn.get(k, db=self._atime)) for k in keys}

    def _redo(self, changed: set[bytes], carried: dict[bytes, tuple[bytes, bytes]]) -> bool:
        """Apply to the new file the puts and deletes made during the copy; True if one of
        them deleted a forgotten blob (whose bytes the copy holds)."""
        with self._env.begin(write=True) as txn:
            if self._cleared_in_copy:
                txn.drop(self._blobs, delete=False)
                txn.drop(self._atime, delete=False)
            for k in changed:
                if k in carried:
                    blob, atime = carried[k]
                    txn.put(k, blob, db=self._blobs)
                    txn.put(k, atime, db=self._atime)
                else:
                    txn.delete(k, db=self._blobs)
                    txn.delete(k, db=self._atime)
        return any(self._is_forgotten(k) for k in changed if k not in carried)
