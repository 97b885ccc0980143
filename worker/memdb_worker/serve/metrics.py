"""Prometheus metrics of one worker: HTTP requests, tokens, batches, the memory cache.

Each worker owns a `CollectorRegistry`. Request counters and latencies are updated by the API;
scheduler and cache figures are read from their `stats()` at scrape time. Knows nothing of
HTTP routing or decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from memdb_worker.serve.cache import CacheStats
from memdb_worker.serve.scheduler import SchedulerStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _StatsCollector(Collector):
    def __init__(
        self, cache: Callable[[], CacheStats | None], scheduler: Callable[[], SchedulerStats]
    ) -> None:
        self._cache = cache
        self._scheduler = scheduler

    def collect(self) -> Iterator:
        s = self._scheduler()
        for name, doc, value in (
            ("memdb_worker_prefills", "prefills (new batches and groups joining one)", s.batches),
            ("memdb_worker_decode_steps", "decode forwards", s.steps),
            ("memdb_worker_decode_rows", "rows summed over decode forwards", s.step_rows),
            ("memdb_worker_prompt_tokens", "prompt tokens prefilled", s.prompt_tokens),
            ("memdb_worker_generated_tokens", "tokens generated", s.generated_tokens),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("memdb_worker_queued", "requests waiting", value=s.queued)
        yield GaugeMetricFamily(
            "memdb_worker_last_batch_size", "rows of the last batch", value=s.last_batch_size
        )
        c = self._cache()
        if c is None:
            return
        yield GaugeMetricFamily("memdb_worker_cache_entries", "memories cached", value=c.entries)
        yield GaugeMetricFamily(
            "memdb_worker_cache_bytes", "bytes of cached memories", value=c.bytes
        )
        yield GaugeMetricFamily(
            "memdb_worker_cache_budget_bytes", "cache byte budget", value=c.budget_bytes
        )
        yield GaugeMetricFamily(
            "memdb_worker_server_connected", "1 while the Watch stream is up", value=c.connected
        )
        for name, doc, value in (
            ("memdb_worker_cache_hits", "memory cache hits", c.hits),
            ("memdb_worker_cache_misses", "memory cache misses (fetches)", c.misses),
            ("memdb_worker_cache_evictions", "memories evicted (LRU, bytes)", c.evictions),
            ("memdb_worker_cache_invalidations", "memories dropped by Watch", c.invalidations),
            ("memdb_worker_fetch_seconds", "seconds spent fetching memories", c.fetch_seconds),
            ("memdb_worker_reconnects", "reconnections to the server", c.reconnects),
        ):
            yield CounterMetricFamily(name, doc, value=value)


class WorkerMetrics:
    def __init__(
        self,
        cache: Callable[[], CacheStats | None],
        scheduler: Callable[[], SchedulerStats],
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "memdb_worker_requests", "HTTP requests by route and status", ["route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "memdb_worker_request_seconds", "request latency (streams: until the last chunk)",
            ["route", "memory"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.first_token = Histogram(
            "memdb_worker_first_token_seconds", "time to the first generated text",
            ["memory"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(_StatsCollector(cache, scheduler))

    def render(self) -> bytes:
        return generate_latest(self.registry)
