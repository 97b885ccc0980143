"""Prometheus metrics of one server: requests by method and code, latencies, store and cache.

Each server owns a `CollectorRegistry` (several servers can live in one test process) and
serves it over HTTP with prometheus_client. Knows nothing of the services' logic.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from memdb_server.interceptors import Call, Hook

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1, 2.5, 5, 10, 30)  # fmt: skip


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "memdb_requests", "gRPC requests by method and status code", ["method", "code"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "memdb_request_seconds", "gRPC request latency (streams: until the last message)",
            ["method"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.upload_bytes = Counter(
            "memdb_upload_bytes", "shard bytes received by PutPrefix", registry=self.registry
        )
        self.fetch_bytes = Counter(
            "memdb_fetch_bytes", "shard bytes sent by FetchMemory", registry=self.registry
        )
        self.lookup_vectors = Counter(
            "memdb_lookup_vectors", "query vectors searched by Lookup", registry=self.registry
        )
        self.index_builds = Counter(
            "memdb_index_builds", "FAISS indices built (at upload only)", registry=self.registry
        )
        self.index_loads = Counter(
            "memdb_index_loads", "layers loaded from stored indices into the cache",
            registry=self.registry,
        )  # fmt: skip
        self._server: WSGIServer | None = None

    def gauge(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        """A gauge read from `fn` at scrape time (store size, cache bytes, ...)."""
        Gauge(name, doc, registry=self.registry).set_function(fn)

    def serve(self, address: str) -> int:
        """Serve /metrics on HOST:PORT (port 0 picks one); returns the port."""
        host, _, port = address.rpartition(":")
        self._server, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class MetricsHook(Hook):
    """Counts every call by method and status code and times it (streams: to their end)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._m = metrics

    @contextmanager
    def around(self, call: Call) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if call.code is grpc.StatusCode.OK:  # cancelled, or the server is stopping
                call.fail(grpc.StatusCode.CANCELLED, "cancelled")
            raise
        finally:
            self._m.latency.labels(call.short).observe(time.perf_counter() - start)
            self._m.requests.labels(call.short, call.code.name).inc()
