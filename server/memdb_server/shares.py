"""Per-tenant time shares: while tenants contend, none of them takes the server's time.

Every blocking job (a unary call, one message of a streamed answer) is charged its time in the
executor, to its tenant's token bucket. The bucket fills at `share` seconds per second up to
`burst_s`; a job may start while its tenant's bucket is above zero, and its time is taken out
when it ends (the bucket may go below zero: a long job is paid for by waiting after it).

While its bucket is below half full (it has been using its share), a tenant runs one job at
a time: several of its jobs at once would take every core, and the others' jobs would wait
for the interpreter behind them.

The bucket binds only a tenant that has used more than some other active tenant lately (job
time, decaying over `usage_tau_s`): the lightest tenant is never held back, so a tenant whose
light calls fit no share still goes first.

It binds only while another tenant is active (had a job waiting or running, or one that ended
in the last `window_s` seconds; so one call of another tenant holds a heavy tenant back for up
to `window_s`): a tenant alone has the whole server, and a debt run up alone is forgiven at its
next job. A job that must wait does so on the event loop, holding no thread,
behind the tenant's earlier waiting jobs (first in, first out).

Knows nothing of gRPC, auth or what the jobs do: `key()` (called in the call's context) names
the tenant, the clock and the sleep are injectable for tests.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass
class _Bucket:
    tokens: float  # seconds of job time the tenant may still start jobs on
    filled_at: float  # when `tokens` was last brought up to date
    seen_at: float  # when the tenant last asked for a job
    jobs: int = 0  # jobs running or waiting
    running: int = 0  # jobs running
    line: deque = field(default_factory=deque)  # tickets of its jobs waiting, first in first
    used: float = 0.0  # job seconds, decaying with time constant usage_tau_s
    used_at: float = 0.0  # when `used` was last brought up to date


class TimeShares:
    """Token buckets of job time, one per tenant, that bind only under contention."""

    def __init__(
        self,
        share: float,
        burst_s: float,
        window_s: float,
        key: Callable[[], Hashable],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        usage_tau_s: float = 1.0,
    ) -> None:
        if not 0 < share:
            raise ValueError(f"share must be > 0 (seconds per second), got {share}")
        self.share, self.burst_s, self.window_s = share, burst_s, window_s
        self.usage_tau_s = usage_tau_s
        self._key = key
        self._clock, self._sleep = clock, sleep
        self._buckets: dict[Hashable, _Bucket] = {}
        self.poll_s = 0.002  # how often a job waiting for its tenant's running job looks again
        self.waits = 0  # jobs that waited for their share (a metric)
        self.waited_s = 0.0  # seconds they waited in all (a metric)
        self._swept_at = -math.inf  # when idle tenants were last looked for

    def contended(self, key: Hashable, now: float) -> bool:
        """Whether a tenant other than `key` is active at `now`."""
        return self._until_alone(key, now) > 0

    def _until_alone(self, key: Hashable, now: float) -> float:
        """Seconds until no tenant but `key` is active, if none of them asks for a job meanwhile
        (a window for one with a job running or waiting)."""
        return max(
            (
                self.window_s if b.jobs > 0 else b.seen_at + self.window_s - now
                for k, b in self._buckets.items()
                if k != key
            ),
            default=0.0,
        )

    def _fill(self, b: _Bucket, now: float) -> None:
        b.tokens = min(self.burst_s, b.tokens + (now - b.filled_at) * self.share)
        b.filled_at = now

    def _usage(self, b: _Bucket, now: float) -> float:
        b.used *= math.exp(-max(0.0, now - b.used_at) / self.usage_tau_s)
        b.used_at = now
        return b.used

    def _spend(self, b: _Bucket, seconds: float, now: float) -> None:
        self._fill(b, now)
        b.tokens -= seconds
        b.used = self._usage(b, now) + seconds

    def _lightest(self, key: Hashable, b: _Bucket, now: float) -> bool:
        """Whether the tenant has used no more than every other active tenant lately."""
        mine = self._usage(b, now)
        return all(
            mine <= self._usage(o, now)
            for k, o in self._buckets.items()
            if k != key and (o.jobs > 0 or now - o.seen_at < self.window_s)
        )

    def wait_s(self, key: Hashable) -> float:
        """Seconds the tenant's next job would wait now (0: it may start)."""
        now = self._clock()
        b = self._buckets.get(key)
        if b is None:
            return 0.0
        self._fill(b, now)
        if not self.contended(key, now):
            b.tokens = max(b.tokens, 0.0)  # alone: a debt run up alone is forgiven
            return 0.0
        if self._lightest(key, b, now):
            return 0.0  # the lightest active tenant is never held back
        if b.tokens <= 0:
            return -b.tokens / self.share + 1e-4
        if b.running and b.tokens < self.burst_s / 2:
            return self.poll_s  # using its share: one job at a time (checked again soon)
        return 0.0

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Around one job: wait for the tenant's share, then charge the job's time."""
        key = self._key()
        now = self._clock()
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(tokens=self.burst_s, filled_at=now, seen_at=now)
        b.seen_at = now
        b.jobs += 1
        try:
            asked = self._clock()
            if await self._wait_turn(key, b):
                self.waits += 1
                self.waited_s += self._clock() - asked
            start = self._clock()
            b.running += 1
            try:
                yield
            finally:
                b.running -= 1
                end = self._clock()
                self._spend(b, end - start, end)
        finally:
            b.jobs -= 1
            b.seen_at = self._clock()
            self._forget_idle(b.seen_at)

    def charge_from_now(self) -> Callable[[], None]:
        """A callable that, called later, charges the time since now to the calling context's
        tenant (what a job's answer costs after it: sending it)."""
        key, now = self._key(), self._clock()

        def charge(*_: object) -> None:
            b = self._buckets.get(key)
            if b is not None:
                end = self._clock()
                self._spend(b, max(0.0, end - now), end)

        return charge

    async def _wait_turn(self, key: Hashable, b: _Bucket) -> bool:
        """Wait until this job may start: first in its tenant's line and within its share.
        Returns whether it waited."""
        ticket = object()
        b.line.append(ticket)
        naps = 0
        try:
            while True:
                if b.line[0] is not ticket:
                    nap = self.poll_s  # an earlier job of the tenant goes first
                elif (wait := self.wait_s(key)) > 0:
                    nap = min(wait, self._until_alone(key, self._clock()) + 1e-4)
                else:
                    return naps > 0
                naps += 1
                await self._sleep(nap)
        finally:
            b.line.remove(ticket)

    def _forget_idle(self, now: float) -> None:
        """Drop tenants idle for a while with full buckets (they start afresh as new ones); a
        sweep over every tenant, so at most once per window, not at every job's end."""
        if now - self._swept_at < self.window_s:
            return
        self._swept_at = now
        idle = []
        for k, b in self._buckets.items():
            self._fill(b, now)
            if b.jobs == 0 and now - b.seen_at > 10 * self.window_s and b.tokens >= 0:
                idle.append(k)
        for k in idle:
            del self._buckets[k]
