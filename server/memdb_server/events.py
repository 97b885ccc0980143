"""In-process publish/subscribe of prefix version changes, behind the Watch RPC.

The service publishes an event (from any thread) after a PutPrefix or DeletePrefix commits; each
Watch stream holds a subscription: a bounded asyncio queue on the server's event loop, so a
waiting stream holds no thread. The bus caps the open subscriptions per API key, per tenant and
in all, and can end the subscriptions of a key (revoked) or of everyone (shutdown). Knows
nothing of gRPC or storage.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

from memdb.errors import MemdbError, ResourceExhausted

log = logging.getLogger(__name__)

QUEUE_EVENTS = 10_000


@dataclass(frozen=True)
class Event:
    kind: str  # "put" | "delete"
    tenant: str
    name: str
    version: int
    model_fingerprint: str
    at: float


@dataclass(frozen=True)
class WatchLimits:
    per_key: int = 64
    per_tenant: int = 256
    total: int = 512


class _Ended:
    """Queued last: the stream ends, with `error` (None: it ends normally)."""

    def __init__(self, error: MemdbError | None) -> None:
        self.error = error


@dataclass(eq=False)
class Subscription:
    tenant: str
    key_id: str
    names: frozenset[str]  # empty: every prefix of the tenant
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=QUEUE_EVENTS))
    overflowed: bool = False

    def wants(self, event: Event) -> bool:
        return event.tenant == self.tenant and (not self.names or event.name in self.names)

    async def next(self) -> Event:
        """The next event; raises the error the subscription was ended with, or StopAsyncIteration
        when it ended normally."""
        item = await self.queue.get()
        if isinstance(item, _Ended):
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item

    def _offer(self, event: Event) -> None:  # on the loop
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True  # the stream ends; the watcher re-syncs
            log.warning("watch subscription of tenant %s overflowed", self.tenant)

    def _end(self, error: MemdbError | None) -> None:  # on the loop
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(_Ended(error))


class EventBus:
    def __init__(self, limits: WatchLimits = WatchLimits()) -> None:
        self.limits = limits
        self._subs: set[Subscription] = set()
        self._lock = threading.Lock()
        self.closed = threading.Event()

    def subscribe(self, tenant: str, key_id: str, names: list[str]) -> Subscription:
        """A subscription for the calling stream (on the event loop); ResourceExhausted past
        the limits."""
        sub = Subscription(tenant, key_id, frozenset(names), asyncio.get_running_loop())
        with self._lock:
            self._check_limits(tenant, key_id)
            self._subs.add(sub)
        if self.closed.is_set():
            sub._end(None)
        return sub

    def _check_limits(self, tenant: str, key_id: str) -> None:
        lim = self.limits
        by_key = sum(1 for s in self._subs if s.key_id == key_id)
        by_tenant = sum(1 for s in self._subs if s.tenant == tenant)
        if by_key >= lim.per_key:
            raise ResourceExhausted(
                f"API key {key_id} already holds {by_key} Watch streams, the server's "
                f"max_watch_streams_per_key ({lim.per_key}); close a stream, share one per "
                "process, or give replicas their own keys"
            )
        if by_tenant >= lim.per_tenant:
            raise ResourceExhausted(
                f"tenant '{tenant}' already holds {by_tenant} Watch streams, the server's "
                f"max_watch_streams_per_tenant ({lim.per_tenant}); close a stream first"
            )
        if len(self._subs) >= lim.total:
            raise ResourceExhausted(
                f"the server holds {len(self._subs)} Watch streams, its max_watch_streams "
                f"({lim.total}); retry later"
            )

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)

    def publish(self, event: Event) -> None:
        """Queue `event` for every subscription that wants it (callable from any thread)."""
        with self._lock:
            subs = [s for s in self._subs if s.wants(event)]
        for sub in subs:
            _on_loop(sub, sub._offer, event)

    def holders(self) -> Counter[tuple[str, str]]:
        """Open subscriptions per (tenant, key_id)."""
        with self._lock:
            return Counter((s.tenant, s.key_id) for s in self._subs)

    def end(
        self, error: MemdbError | None, *, key_id: str | None = None, tenant: str | None = None
    ) -> int:
        """End the subscriptions of `key_id` and/or `tenant` (all if neither) with `error`;
        returns how many. The end is queued before any event published after this call."""
        with self._lock:
            subs = [
                s
                for s in self._subs
                if (key_id is None or s.key_id == key_id) and (tenant is None or s.tenant == tenant)
            ]
        for sub in subs:
            _on_loop(sub, sub._end, error)
        return len(subs)

    def close(self) -> None:
        """End every stream normally (the server is stopping)."""
        self.closed.set()
        self.end(None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._subs)


def _on_loop(sub: Subscription, fn, arg) -> None:
    try:
        sub.loop.call_soon_threadsafe(fn, arg)
    except RuntimeError:  # the loop is closed: the stream is gone
        pass
