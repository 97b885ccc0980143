"""In-process publish/subscribe of prefix version changes, behind the Watch RPC.

The service publishes an event after a PutPrefix or DeletePrefix commits; each Watch stream
holds a subscription (a bounded queue). Knows nothing of gRPC or storage.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    kind: str  # "put" | "delete"
    tenant: str
    name: str
    version: int
    model_fingerprint: str
    at: float


@dataclass(eq=False)
class Subscription:
    tenant: str
    names: frozenset[str]  # empty: every prefix of the tenant
    queue: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=10_000))
    overflowed: bool = False

    def wants(self, event: Event) -> bool:
        return event.tenant == self.tenant and (not self.names or event.name in self.names)


class EventBus:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._lock = threading.Lock()
        self.closed = threading.Event()

    def subscribe(self, tenant: str, names: list[str]) -> Subscription:
        sub = Subscription(tenant, frozenset(names))
        with self._lock:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)

    def publish(self, event: Event) -> None:
        with self._lock:
            subs = [s for s in self._subs if s.wants(event)]
        for sub in subs:
            try:
                sub.queue.put_nowait(event)
            except queue.Full:
                sub.overflowed = True  # the stream ends; the watcher re-syncs
                log.warning("watch subscription of tenant %s overflowed", sub.tenant)

    def close(self) -> None:
        self.closed.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._subs)
