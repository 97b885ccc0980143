"""The worker's memory cache: named memories from the memdb server, kept on the device.

`MemoryCache.get(name)` returns a state source for `attention.bind`:

- mode "cache" (default): the memory's current version, pulled once with `FetchMemory` and kept
  on the device (`memory.Memory`), least recently used memories evicted beyond a byte budget; a
  memory larger than the whole budget is served as in remote mode (the fetch stops as soon as
  it is seen to be too large);
- mode "remote": a `RemoteMemory` that looks every layer up through the server (`Lookup`), for
  memories too large to cache. Same lookup (cosine top-k) and the same decode options, applied
  by the same code (`memory.hits_state`; the lse correction's q_mean/k_bar rows come with the
  Lookup), so the same tokens as cache mode, for memories without whitening (refused:
  FailedPrecondition).

The cache follows the server's `Watch` stream in a background thread: a put or delete of a
memory drops its cached version at once, so the next request gets the new version (or
NotFound). A source that was handed out stays valid: a request in flight finishes on the version
it started with (it holds the reference; remote lookups pin that version). While the watch is
disconnected nothing is cached (a cached version could be stale): every memory request asks the
server, which answers Unavailable while it is down. The thread reconnects by itself with
exponential backoff, each attempt on a fresh client (a fresh channel, no gRPC reconnect backoff).

Errors are `memdb.errors`: an unknown memory is NotFound, a memory of another model
FailedPrecondition, an unreachable server Unavailable. This module knows nothing of HTTP,
scheduling or transformers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from memdb.errors import DeadlineExceeded, FailedPrecondition, MemdbError, Unavailable
from memdb.shards import decode_shard, holds_fitted_rows
from memdb_client import MemdbClient
from memdb_worker.memory.keys import KeySpace, LayerQuery
from memdb_worker.memory.memory import (
    LSE_CORRECTION_EXTRAS,
    DecodeOptions,
    Memory,
    check_options,
    group_key_of,
    hits_state,
    keyspace_from_metadata,
    lookup_keys,
)
from memdb_worker.memory.state import State

logger = logging.getLogger(__name__)


class NotRemote(FailedPrecondition):
    """A memory that remote mode cannot serve (whitened keys, fitted rows): cache it instead."""


CacheMode = Literal["cache", "remote"]
ClientFactory = Callable[[], MemdbClient]


class RemoteMemory:
    """A state source that looks each layer up through the server (one `Lookup` per layer call).

    Pinned to one version; answers like `Memory` with the same decode options: the server finds
    the top-k entries (cosine) and returns their states, plus their q_mean/k_bar rows when the
    first-order lse correction applies; `memory.hits_state` does the rest, as for `Memory`.
    `budget`, `num_layers` and `extras` describe the memory (to check `options` like `Memory`).
    """

    def __init__(
        self,
        client: Callable[[], MemdbClient],
        name: str,
        version: int,
        model_fingerprint: str,
        keyspace: KeySpace,
        metadata: dict[str, str],
        timeout: float = 10.0,
        *,
        options: DecodeOptions | None = None,
        budget: int,
        num_layers: int,
        extras: Sequence[str],
    ) -> None:
        self._client = client
        self.name = name
        self.version = version
        self.model_fingerprint = model_fingerprint
        self.keyspace = keyspace
        self.metadata = dict(metadata)
        self.timeout = timeout
        self.options = options or DecodeOptions()
        self.group_key = group_key_of(self.metadata, keyspace)
        if metadata.get("q_mean") == "keys" and "k_bar" in extras and self.options.lse_correction:
            raise ValueError(
                f"memory '{name}' keeps q_mean as its keys (store_q_mean=False), which Lookup does "
                "not return: remote lookups cannot apply its lse correction; use the cache mode"
            )
        self.lse_corrected = check_options(
            self.options, budget=budget, num_layers=num_layers, extras=extras
        )
        if metadata.get("q_mean") == "keys" and "k_bar" in extras and not self.lse_corrected:
            logger.warning("memory '%s': remote lookups answer without its lse correction "
                           "(q_mean is its keys; the cache mode applies it)", name)  # fmt: skip
        self.lookups = 0

    @property
    def prefix_length(self) -> int:
        return int(self.metadata.get("prefix_length", "0"))

    def nbytes(self) -> int:
        return 0  # nothing held on the device

    def prefix_state(self, query: LayerQuery) -> State:
        """State source protocol: one Lookup of the layer, then as `Memory.prefix_state`."""
        b, h, t, d = query.q.shape
        q_pre = query.q_pre.transpose(1, 2).reshape(b * t, h, d)
        keys = lookup_keys(self.keyspace, self.group_key, q_pre, query.layer)  # [n, I, Dk]
        res = self._client().lookup(
            self.name,
            query.layer,
            np.ascontiguousarray(keys.detach().cpu().numpy(), dtype=np.float32),
            model_fingerprint=self.model_fingerprint,
            k=self.options.top_k,
            version=self.version,
            timeout=self.timeout,
            extras=LSE_CORRECTION_EXTRAS if self.lse_corrected else (),
        )
        self.lookups += 1
        assert res.out is not None and res.lse is not None
        dev = query.q.device

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.array(a, dtype=np.float32)).to(dev)

        correction = None
        if self.lse_corrected:
            correction = [tensor(res.extras[x]) for x in LSE_CORRECTION_EXTRAS]
        # scores [n, I, k], lse [n, I, k, h], out [n, I, k, h, d]; the ids are never -1 (k <= M)
        return hits_state(query, q_pre, tensor(res.scores), tensor(res.lse), tensor(res.out),
                          self.options, correction)  # fmt: skip


Source = Memory | RemoteMemory


class _TooLarge(Exception):
    """A memory outgrew the cache budget while it was fetched."""


@dataclass
class _Entry:
    version: int
    source: Source
    nbytes: int


@dataclass
class CacheStats:
    entries: int
    bytes: int
    budget_bytes: int
    hits: int
    misses: int
    evictions: int
    invalidations: int
    fetch_seconds: float
    connected: bool
    reconnects: int


class MemoryCache:
    """Named memories of one tenant (the client's API key) for one model (its fingerprint)."""

    def __init__(
        self,
        client_factory: ClientFactory,
        model_fingerprint: str,
        *,
        device: str | torch.device = "cpu",
        budget_bytes: int = 1 << 30,
        mode: CacheMode = "cache",
        decode_options: DecodeOptions | None = None,
        watch: bool = True,
        reconnect_max_s: float = 2.0,
        lookup_timeout: float = 10.0,
    ) -> None:
        if mode not in ("cache", "remote"):
            raise ValueError(f"mode must be 'cache' or 'remote', not {mode!r}")
        self._factory = client_factory
        self.model_fingerprint = model_fingerprint
        self.device = torch.device(device)
        self.budget_bytes = int(budget_bytes)
        self.mode: CacheMode = mode
        self.decode_options = decode_options
        self.reconnect_max_s = reconnect_max_s
        self.lookup_timeout = lookup_timeout
        self._lock = threading.Lock()
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._seq: dict[str, int] = {}  # bumped by every watch event of a name
        self._last_event: dict[str, tuple[str, int]] = {}  # name -> (kind, version)
        self._epoch = 0  # bumped whenever the whole cache is dropped
        self._client = client_factory()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._watch_enabled = watch
        self._watch_call = None
        self._thread: threading.Thread | None = None
        self._hits = self._misses = self._evictions = self._invalidations = self._reconnects = 0
        self._fetch_seconds = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> MemoryCache:
        """Start following Watch (no-op when watch=False)."""
        if self._watch_enabled and self._thread is None:
            self._thread = threading.Thread(
                target=self._watch_loop, name="memdb-watch", daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        call = self._watch_call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.clear()
        self._client.close()

    def __enter__(self) -> MemoryCache:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """Whether the Watch stream is up (cached versions are known to be current)."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def client(self) -> MemdbClient:
        """The current client (replaced on every reconnect)."""
        return self._client

    # -- lookups ------------------------------------------------------------------------------

    def get(self, name: str) -> Source:
        """The state source of `name`'s current version (fetched unless cached)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                self._entries.move_to_end(name)
                self._hits += 1
                return entry.source
            fetch_lock = self._fetch_locks.setdefault(name, threading.Lock())
        with fetch_lock:
            with self._lock:
                entry = self._entries.get(name)
                if entry is not None:  # another thread fetched it meanwhile
                    self._entries.move_to_end(name)
                    self._hits += 1
                    return entry.source
                self._misses += 1
                seq, epoch = self._seq.get(name, 0), self._epoch
                trusted = self._connected.is_set() or not self._watch_enabled
            source, version, nbytes = self._load(name)
            with self._lock:
                # keep it unless the cache was dropped or another version was announced meanwhile
                changed = self._seq.get(name, 0) != seq
                current = not changed or self._last_event.get(name) == ("put", version)
                if trusted and self._epoch == epoch and current:
                    self._insert(name, _Entry(version, source, nbytes))
            return source

    def versions(self) -> dict[str, int]:
        """Cached memories and their versions (least recently used first)."""
        with self._lock:
            return {n: e.version for n, e in self._entries.items()}

    def clear(self) -> None:
        with self._lock:
            self._epoch += 1
            self._invalidations += len(self._entries)
            self._entries.clear()

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                entries=len(self._entries),
                bytes=sum(e.nbytes for e in self._entries.values()),
                budget_bytes=self.budget_bytes,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                invalidations=self._invalidations,
                fetch_seconds=self._fetch_seconds,
                connected=self._connected.is_set(),
                reconnects=self._reconnects,
            )

    # -- internals ----------------------------------------------------------------------------

    def _insert(self, name: str, entry: _Entry) -> None:
        """Add under the lock and evict least recently used memories beyond the budget."""
        if entry.nbytes > self.budget_bytes:  # the device copy came out larger than the blobs
            logger.warning("memory '%s' (%d bytes) exceeds the cache budget; not kept", name,
                           entry.nbytes)  # fmt: skip
            return
        self._entries[name] = entry
        self._entries.move_to_end(name)
        total = sum(e.nbytes for e in self._entries.values())
        while total > self.budget_bytes and len(self._entries) > 1:
            old, dropped = self._entries.popitem(last=False)
            total -= dropped.nbytes
            self._evictions += 1
            logger.info("memory '%s' evicted from the cache (%d bytes)", old, dropped.nbytes)

    def _load(self, name: str) -> tuple[Source, int, int]:
        client = self._client
        t0 = time.perf_counter()
        mode = self.mode
        try:
            if mode == "cache":
                try:
                    source, version, nbytes = self._load_cached(client, name)
                except _TooLarge:
                    logger.warning(
                        "memory '%s' exceeds the cache budget (%d bytes): looked up remotely",
                        name,
                        self.budget_bytes,
                    )
                    mode = "remote"
            if mode == "remote":
                source, version, nbytes = self._load_remote(client, name)
        except DeadlineExceeded as exc:
            raise Unavailable(f"memdb server at {client.address} timed out: {exc}") from None
        except MemdbError:
            raise
        except ValueError as exc:  # e.g. closed channel during a reconnect
            raise Unavailable(f"memdb server at {client.address}: {exc}") from None
        seconds = time.perf_counter() - t0
        with self._lock:
            self._fetch_seconds += seconds
        logger.info(
            "memory '%s' version %d loaded (%s mode, %d bytes, %.2f s)",
            name,
            version,
            mode,
            nbytes,
            seconds,
        )
        return source, version, nbytes

    def _load_cached(self, client: MemdbClient, name: str) -> tuple[Source, int, int]:
        """The whole memory onto the device (_TooLarge as soon as it exceeds the budget)."""
        received = 0

        def guard(n: int) -> None:
            nonlocal received
            received += n
            if received > self.budget_bytes:
                raise _TooLarge  # fetch_memory cancels the stream

        fetched = client.fetch_memory(
            name, model_fingerprint=self.model_fingerprint, on_bytes=guard
        )
        source = Memory.from_shards(fetched.shards, self.device, self.decode_options)
        return source, fetched.info.version, source.device_nbytes()

    def _load_remote(self, client: MemdbClient, name: str) -> tuple[Source, int, int]:
        """A RemoteMemory: only layer 0 is fetched, for the metadata (key space, positions)."""
        info, blobs = client.fetch_memory_raw(
            name, model_fingerprint=self.model_fingerprint, max_layers=1
        )
        shard = decode_shard(blobs[0], where="layer 0")
        meta = {k: v for k, v in shard.metadata.items() if k != "layer"}
        if meta.get("whiten", "0") == "1":
            raise NotRemote(
                f"memory '{name}' has whitened keys: remote mode cannot whiten queries without "
                "the per-layer whitening (serve it with --memory-mode cache and a budget that "
                "holds it)"
            )
        if holds_fitted_rows(meta):
            raise NotRemote(
                f"memory '{name}' has fitted entries: they are attended as a whole on the "
                "worker, not looked up remotely (serve it with --memory-mode cache and a budget "
                "that holds it)"
            )
        keyspace = keyspace_from_metadata(meta, [shard])
        source = RemoteMemory(
            self.client, name, info.version, self.model_fingerprint, keyspace, meta,
            self.lookup_timeout, options=self.decode_options, budget=info.budget,
            num_layers=info.num_layers, extras=info.extra_tensors,
        )  # fmt: skip
        return source, info.version, 0

    def _on_event(self, kind: str, name: str, version: int) -> None:
        with self._lock:
            self._seq[name] = self._seq.get(name, 0) + 1
            self._last_event[name] = (kind, version)
            entry = self._entries.get(name)
            stale = entry is not None and (kind == "delete" or entry.version != version)
            if stale:
                del self._entries[name]
                self._invalidations += 1
        if stale:
            logger.info("memory '%s' %s (version %d): cached version dropped", name, kind, version)

    def _watch_loop(self) -> None:
        backoff = 0.05
        failures = 0
        first = True
        while not self._stop.is_set():
            client = self._client if first else self._factory()
            first = False
            try:
                client.health(timeout=2.0)
                watch = client.watch(send_initial=True)
                self._watch_call = watch
                if client is not self._client:
                    old, self._client = self._client, client
                    old.close()
                    self._reconnects += 1
                self._connected.set()
                logger.info("watching memories on %s", client.address)
                backoff, failures = 0.05, 0
                for ev in watch:
                    self._on_event(ev.type, ev.name, ev.version)
                    if self._stop.is_set():
                        break
                if not self._stop.is_set():
                    logger.warning("watch stream on %s ended; reconnecting", client.address)
            except MemdbError as exc:
                failures += 1
                if not self._stop.is_set():  # the first failure of an outage, then every 30th
                    level = logging.WARNING if failures % 30 == 1 else logging.DEBUG
                    logger.log(level, "watch on %s failed (%s); reconnecting", client.address, exc)
            except Exception:
                logger.exception("watch loop error; reconnecting")
            finally:
                if self._connected.is_set():
                    self._connected.clear()
                    self.clear()
                if client is not self._client:
                    client.close()
            self._stop.wait(backoff)
            backoff = min(self.reconnect_max_s, backoff * 2)
