"""The memdb-server process: wiring, `run_server` (also the test fixture) and the CLI.

`run_server(config)` starts everything in-process (the asyncio gRPC server with health,
reflection and the call hooks, in its own thread; Prometheus metrics; the storage backend: the
local LMDB store, or a cluster node that registers its address in etcd and reports
NOT_SERVING while etcd or Redis is out of reach) and stops it gracefully on exit. `main()` is the
`memdb-server` console script: flags > MEMDB_* environment > config file > defaults, and a
graceful shutdown on SIGTERM / SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

import memdb
from memdb.v1 import memdb_pb2_grpc as pb_grpc
from memdb_server import auth
from memdb_server.admin_service import AdminServicer
from memdb_server.auth import Authenticator, AuthHook
from memdb_server.backends import open_backend
from memdb_server.backends.health import HealthMonitor
from memdb_server.build_jobs import Jobs
from memdb_server.build_service import BuildServicer
from memdb_server.config import ServerConfig, load_config
from memdb_server.durable import write_file_durably
from memdb_server.events import WatchLimits
from memdb_server.index import IndexCache, IndexParams, set_threads
from memdb_server.interceptors import CallCap, Dispatcher, ErrorHook, Slots
from memdb_server.memory_service import MemoryServicer, end_revoked_watches
from memdb_server.metrics import MetricsHook, ServerMetrics
from memdb_server.runtime import Runtime
from memdb_server.shares import TimeShares

log = logging.getLogger(__name__)

SERVICES = ("memdb.v1.MemoryService", "memdb.v1.AdminService", "memdb.v1.BuildService")
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


@dataclass
class RunningServer:
    address: str  # host:port the gRPC server listens on
    metrics_address: str | None
    admin_key: str
    runtime: Runtime


@contextmanager
def run_server(config: ServerConfig) -> Iterator[RunningServer]:
    """Serve until the block exits, then shut down gracefully.

    The gRPC server is a `grpc.aio` server on an event loop in its own thread; blocking work
    (LMDB, FAISS) runs in a bounded thread pool (`max_workers`), so the caller's thread stays
    free (sync tests call the server from it)."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    log.info("FAISS uses %d thread(s) per search", set_threads(config.faiss_threads))
    store, bus = open_backend(config, _watch_limits(config))
    # OpenMP's thread count is per calling thread: each pool thread sets its own
    executor = ThreadPoolExecutor(
        max_workers=config.max_workers,
        thread_name_prefix="memdb-rpc",
        initializer=set_threads,
        initargs=(config.faiss_threads,),
    )
    rt = Runtime(
        config=config,
        store=store,
        cache=IndexCache(config.index_cache_bytes),
        bus=bus,
        metrics=ServerMetrics(),
        index_params=_index_params(config),
        executor=executor,
    )
    rt.jobs = Jobs(store.job_table(), lease_s=config.build_lease_s)
    admin_key = _admin_key(config)
    grpc_thread = _GrpcThread(rt, admin_key)
    monitor: HealthMonitor | None = None
    try:
        address = grpc_thread.start()
        if config.backend == "cluster":
            store.set_address(address)  # listed by `memdb-admin status`
            monitor = HealthMonitor(store.healthy, grpc_thread.set_serving)
        metrics_address = _serve_metrics(rt)
        _write_ready_file(config.ready_file, address, metrics_address)
        log.info("memdb %s serving on %s (data in %s)", memdb.__version__, address, config.data_dir)
        yield RunningServer(address, metrics_address, admin_key, rt)
    finally:
        log.info("shutting down (grace %.1fs)", config.shutdown_grace_s)
        if monitor is not None:
            monitor.close()
        rt.bus.close()
        grpc_thread.stop(config.shutdown_grace_s)
        executor.shutdown(wait=True, cancel_futures=True)
        rt.metrics.close()
        store.close()
        if config.ready_file is not None:
            config.ready_file.unlink(missing_ok=True)
        log.info("stopped")


def _index_params(c: ServerConfig) -> IndexParams:
    return IndexParams(
        kind=c.index_kind,
        auto_threshold=c.index_auto_threshold,
        nprobe=c.index_nprobe,
        hnsw_m=c.index_hnsw_m,
        ef_search=c.index_ef_search,
        use_gpu=c.use_gpu,
    )


def _watch_limits(c: ServerConfig) -> WatchLimits:
    return WatchLimits(
        per_key=c.max_watch_streams_per_key,
        per_tenant=c.max_watch_streams_per_tenant,
        total=c.max_watch_streams,
    )


class _GrpcThread:
    """The asyncio gRPC server (with health, reflection, the call hooks and the revoked-key
    check of Watch streams) on its own event loop thread."""

    def __init__(self, rt: Runtime, admin_key: str) -> None:
        self.rt = rt
        self.admin_key = admin_key
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="memdb-grpc",
                                       daemon=True)  # fmt: skip
        self.server: grpc.aio.Server | None = None
        self.health: health.aio.HealthServicer | None = None
        self.tasks: list[asyncio.Task] = []

    def start(self) -> str:
        self.thread.start()
        try:
            return self._run(self._start())
        except BaseException:
            self.stop(0)
            raise

    def stop(self, grace: float) -> None:
        if self.thread.is_alive():
            try:
                self._run(self._stop(grace))
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join()
        self.loop.close()

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def set_serving(self, serving: bool) -> None:
        """Health of every service: SERVING or NOT_SERVING (from any thread)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else (
            health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip
        if self.health is not None and self.thread.is_alive():
            self._run(self._set_all(status))

    async def _set_all(self, status) -> None:
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    async def _start(self) -> str:
        rt, c = self.rt, self.rt.config
        auth_hook = AuthHook(Authenticator(rt.store, self.admin_key))
        hooks = [
            MetricsHook(rt.metrics),
            ErrorHook(),
            CallCap(HEALTH_WATCH.__eq__, c.max_health_watches, "max_health_watches"),
            auth_hook,
            CallCap(
                auth_hook.applies,
                c.max_calls_per_tenant,
                "max_calls_per_tenant",
                key=lambda: f"tenant '{_tenant()}'",
            ),  # fmt: skip
        ]
        shares = TimeShares(
            c.tenant_cpu_share * len(os.sched_getaffinity(0)),
            c.tenant_share_burst_s,
            c.share_window_s,
            _tenant,
        )
        rt.metrics.gauge("memdb_share_waits", "jobs that waited for their tenant's time share "
                         "(tenant_cpu_share)", lambda: shares.waits)  # fmt: skip
        rt.metrics.gauge("memdb_share_wait_seconds", "seconds jobs waited for their tenant's "
                         "time share", lambda: shares.waited_s)  # fmt: skip
        dispatcher = Dispatcher(
            hooks,
            rt.executor,
            slots=Slots(c.max_tenant_jobs, _tenant),
            uploads=Slots(min(c.max_uploads, c.max_workers - 1), lambda: None),
            idle_timeout=c.stream_idle_timeout_s,
            shares=shares,
        )
        self.server = server = grpc.aio.server(
            interceptors=[dispatcher],
            options=[
                ("grpc.max_send_message_length", c.max_message_bytes),
                ("grpc.max_receive_message_length", c.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=c.max_concurrent_rpcs,
        )
        pb_grpc.add_MemoryServiceServicer_to_server(MemoryServicer(rt), server)
        pb_grpc.add_AdminServiceServicer_to_server(AdminServicer(rt), server)
        pb_grpc.add_BuildServiceServicer_to_server(BuildServicer(rt, rt.jobs), server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if c.reflection:
            names = (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)
        port = _bind(server, c)
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        self.tasks.append(asyncio.create_task(end_revoked_watches(rt)))
        host = c.listen.rpartition(":")[0]
        return f"{host}:{port}"

    async def _stop(self, grace: float) -> None:
        for task in self.tasks:
            task.cancel()
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)


def _tenant() -> str:
    return auth.current().tenant


def _bind(server: grpc.aio.Server, c: ServerConfig) -> int:
    if c.tls_cert is not None:
        creds = grpc.ssl_server_credentials([(c.tls_key.read_bytes(), c.tls_cert.read_bytes())])
        port = server.add_secure_port(c.listen, creds)
    else:
        port = server.add_insecure_port(c.listen)
    if port == 0:
        raise RuntimeError(f"could not listen on {c.listen}: is the address in use?")
    return port


def _serve_metrics(rt: Runtime) -> str | None:
    m, store, cache = rt.metrics, rt.store, rt.cache
    m.gauge("memdb_store_bytes", "bytes used in the LMDB map", lambda: store.info()["used_bytes"])
    m.gauge("memdb_map_size_bytes", "current LMDB map size", lambda: store.info()["map_size"])
    m.gauge("memdb_prefixes", "stored prefixes, all tenants", lambda: store.info()["num_prefixes"])
    m.gauge("memdb_index_cache_bytes", "bytes of loaded indices", lambda: cache.nbytes)
    m.gauge("memdb_index_cache_hits", "index cache hits since start", lambda: cache.hits)
    m.gauge("memdb_index_cache_misses", "index cache misses since start", lambda: cache.misses)
    m.gauge("memdb_watchers", "open Watch streams", lambda: len(rt.bus))
    if not rt.config.metrics_listen:
        return None
    port = m.serve(rt.config.metrics_listen)
    return f"{rt.config.metrics_listen.rpartition(':')[0]}:{port}"


def _admin_key(config: ServerConfig) -> str:
    """The configured root key, or one generated once into <data_dir>/admin.key (mode 600)."""
    if config.admin_key is not None:
        return config.admin_key.get_secret_value()
    path = config.data_dir / "admin.key"
    if path.exists():
        return path.read_text().strip()
    key = "mdb_root_" + secrets.token_urlsafe(32)
    write_file_durably(path, (key + "\n").encode(), mode=0o600)
    log.warning("no admin key configured: generated one into %s", path)
    return key


def _write_ready_file(path: Path | None, address: str, metrics: str | None) -> None:
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"address": address, "metrics": metrics, "pid": os.getpid()}))
    tmp.replace(path)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _flag_options(fn):
    """One --flag per ServerConfig field (None = not given, so env and file still apply)."""
    for name, field in reversed(list(ServerConfig.model_fields.items())):
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            decl = f"{flag}/--no-{name.replace('_', '-')}"
            fn = click.option(decl, name, default=None, help=field.description)(fn)
        else:
            fn = click.option(flag, name, default=None, help=field.description)(fn)
    return fn


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(memdb.__version__)
@_flag_options
def main(**flags) -> None:
    """Run the memdb memory server (settings: flags > MEMDB_* env > --config TOML > defaults)."""
    try:
        config = load_config(**flags)
    except (ValidationError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    setup_logging(config.log_level, config.log_format)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with run_server(config) as running:
        click.echo(f"memdb-server listening on {running.address}", err=True)
        stop.wait()
