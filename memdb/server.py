"""The memdb-server process: wiring, `run_server` (also the test fixture) and the CLI.

`run_server(config)` starts everything in-process (gRPC with health, reflection, interceptors;
Prometheus metrics; the LMDB store) and stops it gracefully on exit. `main()` is the
`memdb-server` console script: flags > MEMDB_* environment > config file > defaults, and a
graceful shutdown on SIGTERM / SIGINT.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

import memdb
from memdb.admin_service import AdminServicer
from memdb.auth import Authenticator, AuthInterceptor
from memdb.config import ServerConfig, load_config
from memdb.durable import write_file_durably
from memdb.events import EventBus
from memdb.index import IndexCache, IndexParams, set_threads
from memdb.interceptors import ErrorInterceptor
from memdb.memory_service import MemoryServicer
from memdb.metrics import MetricsInterceptor, ServerMetrics
from memdb.runtime import Runtime
from memdb.storage import Store
from memdb.v1 import memdb_pb2 as pb
from memdb.v1 import memdb_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICES = ("memdb.v1.MemoryService", "memdb.v1.AdminService")


@dataclass
class RunningServer:
    address: str  # host:port the gRPC server listens on
    metrics_address: str | None
    admin_key: str
    runtime: Runtime


@contextmanager
def run_server(config: ServerConfig) -> Iterator[RunningServer]:
    """Serve until the block exits, then shut down gracefully."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    set_threads(config.faiss_threads)
    store = Store(
        config.data_dir,
        map_size=config.map_size,
        max_map_size=config.max_map_size,
        sync=config.sync,
        retain_versions=config.retain_versions,
        reserve_bytes=min(config.map_reserve_bytes, config.max_map_size // 8),
        max_keys_per_tenant=config.max_api_keys_per_tenant,
    )
    rt = Runtime(
        config=config,
        store=store,
        cache=IndexCache(config.index_cache_bytes),
        bus=EventBus(),
        metrics=ServerMetrics(),
        index_params=_index_params(config),
    )
    admin_key = _admin_key(config)
    server, health_servicer, address = _grpc_server(rt, admin_key)
    metrics_address = _serve_metrics(rt)
    _write_ready_file(config.ready_file, address, metrics_address)
    log.info("memdb %s serving on %s (data in %s)", memdb.__version__, address, config.data_dir)
    try:
        yield RunningServer(address, metrics_address, admin_key, rt)
    finally:
        log.info("shutting down (grace %.1fs)", config.shutdown_grace_s)
        health_servicer.enter_graceful_shutdown()
        rt.bus.close()
        server.stop(config.shutdown_grace_s).wait()
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


def _grpc_server(rt: Runtime, admin_key: str) -> tuple[grpc.Server, health.HealthServicer, str]:
    c = rt.config
    options = [
        ("grpc.max_send_message_length", c.max_message_bytes),
        ("grpc.max_receive_message_length", c.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    interceptors = [
        MetricsInterceptor(rt.metrics),
        ErrorInterceptor(),
        AuthInterceptor(Authenticator(rt.store, admin_key)),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=c.max_workers, thread_name_prefix="memdb-rpc"),
        interceptors=interceptors,
        options=options,
    )
    pb_grpc.add_MemoryServiceServicer_to_server(MemoryServicer(rt), server)
    pb_grpc.add_AdminServiceServicer_to_server(AdminServicer(rt), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if c.reflection:
        names = (*[pb.DESCRIPTOR.services_by_name[s.split(".")[-1]].full_name for s in SERVICES],
                 health.SERVICE_NAME, reflection.SERVICE_NAME)  # fmt: skip
        reflection.enable_server_reflection(names, server)
    port = _bind(server, c)
    for name in ("", *SERVICES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.start()
    host = c.listen.rpartition(":")[0]
    return server, health_servicer, f"{host}:{port}"


def _bind(server: grpc.Server, c: ServerConfig) -> int:
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
