"""The server's configuration: one typed, validated object per process.

Precedence: command-line flags > `MEMDB_*` environment variables > a TOML config file
(`--config` or `MEMDB_CONFIG`) > the defaults below. This module knows nothing of how the
settings are used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

MiB = 1 << 20
GiB = 1 << 30


class ServerConfig(BaseSettings):
    """Every knob of `memdb-server`. Environment names are `MEMDB_<FIELD>` in upper case."""

    model_config = SettingsConfigDict(env_prefix="MEMDB_", extra="forbid")

    config: Path | None = Field(None, description="TOML file with any of these settings")
    data_dir: Path = Field(Path("memdb-data"), description="folder of the LMDB environment")
    listen: str = Field("127.0.0.1:50051", description="gRPC address; port 0 picks a free one")
    metrics_listen: str = Field(
        "127.0.0.1:9464", description="Prometheus /metrics address; empty disables it"
    )
    admin_key: SecretStr | None = Field(
        None, description="root API key; if unset one is generated into <data_dir>/admin.key"
    )
    reflection: bool = Field(True, description="serve gRPC server reflection")
    tls_cert: Path | None = Field(None, description="PEM certificate chain (enables TLS)")
    tls_key: Path | None = Field(None, description="PEM private key (with tls_cert)")
    max_workers: int = Field(
        64, ge=2, description="threads for blocking work (LMDB, FAISS); waiting streams hold none"
    )
    max_tenant_jobs: int = Field(
        16, ge=1, description="blocking jobs of one tenant at once; more wait, holding no thread"
    )
    # 0.02: `python -m bench.reliability.share_sweep` on 2 cores (bench/results/
    # neighbour_shares.json): the other tenant's p99 ratio 1.5 at 0.02 and 0.05, 6.6 at 0.1,
    # 8.6-10.8 at 0.25, while the noisy tenant got 46-54 heavy Lookups through at every share
    # (it runs whenever it has used no more than the others: memdb_server.shares)
    tenant_cpu_share: float = Field(
        0.02, gt=0,
        description="share of the server's CPUs (in job time) the heaviest tenant's blocking "
        "work is held to while other tenants are active; a tenant alone is not limited",
    )  # fmt: skip
    tenant_share_burst_s: float = Field(
        0.05, ge=0, description="seconds of work a tenant may start at once above its share"
    )
    # 1.0: the window bench/results/neighbour_shares.json was measured with (no shorter window
    # has a kept measurement). The cost: one call of another tenant holds a heavy one back for
    # up to 1 s.
    share_window_s: float = Field(
        1.0, gt=0, description="a tenant with a job in the last this many seconds is active"
    )
    max_uploads: int = Field(
        16,
        ge=1,
        description="PutPrefix streams at once, at most max_workers - 1 (each holds a thread)",
    )
    stream_idle_timeout_s: float = Field(
        120.0, gt=0, description="PutPrefix: seconds the client may send nothing"
    )
    max_health_watches: int = Field(64, ge=1, description="open health Watch streams")
    max_calls_per_tenant: int = Field(
        512, ge=1, description="open calls of one tenant (streams and waiting calls included)"
    )
    max_concurrent_rpcs: int = Field(
        2048, ge=16, description="calls served at once; past it RESOURCE_EXHAUSTED (health too)"
    )
    max_watch_streams: int = Field(1024, ge=1, description="open Watch streams, all tenants")
    max_watch_streams_per_tenant: int = Field(256, ge=1, description="open Watch streams/tenant")
    max_watch_streams_per_key: int = Field(64, ge=1, description="open Watch streams per API key")
    max_message_bytes: int = Field(64 * MiB, ge=MiB, description="max size of one gRPC message")
    max_upload_bytes: int = Field(2 * GiB, ge=MiB, description="max bytes of one memory upload")
    fetch_chunk_bytes: int = Field(4 * MiB, ge=64 * 1024, description="FetchMemory chunk size")
    max_lookup_queries: int = Field(8192, ge=1, description="max query rows in one Lookup")
    max_k: int = Field(256, ge=1, description="max top-k in one Lookup")
    max_lookup_answer_bytes: int = Field(
        32 * MiB, ge=64 * 1024,
        description="max bytes of one Lookup answer (also kept under max_message_bytes)",
    )  # fmt: skip
    max_lookup_work: int = Field(
        1 << 37, ge=1,
        description="max search work of one Lookup: queries x groups x keys scanned x key dim",
    )  # fmt: skip
    # storage
    map_size: int = Field(1 * GiB, ge=MiB, description="initial LMDB map size (grows by itself)")
    max_map_size: int = Field(1 << 40, ge=MiB, description="LMDB map size never exceeds this")
    sync: bool = Field(True, description="fsync on every commit (durable)")
    retain_versions: int = Field(2, ge=1, description="versions kept per prefix (current + old)")
    # index
    index_kind: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    index_auto_threshold: int = Field(100_000, ge=1, description="auto: flat below this M")
    index_nprobe: int = Field(16, ge=1)
    index_hnsw_m: int = Field(32, ge=4)
    index_ef_search: int = Field(128, ge=1)
    index_cache_bytes: int = Field(2 * GiB, ge=0, description="RAM budget of loaded indices")
    faiss_threads: int = Field(0, ge=0, description="FAISS OpenMP threads; 0 = automatic")
    use_gpu: bool = Field(False, description="put flat indices on the GPU (needs faiss-gpu)")
    # cluster backend (memdb_server.backends)
    backend: Literal["local", "cluster"] = Field("local", description="local LMDB or cluster")
    etcd: str = Field("", description="cluster: etcd client URLs, comma-separated")
    redis: str = Field("", description="cluster: Redis Cluster host:port list, comma-separated")
    redis_min_replicas: int = Field(
        1, ge=0, description="cluster: replicas that must hold new blobs before publishing"
    )
    etcd_root: str = Field("/memdb/", description="cluster: key prefix of memdb in etcd")
    cache_bytes: int = Field(1 * GiB, ge=MiB, description="cluster: node's LMDB blob cache")
    node_lease_s: int = Field(10, ge=2, description="cluster: TTL of the node's etcd lease")
    gc_interval_s: float = Field(30.0, ge=0, description="cluster: blob GC period; 0 = off")
    gc_grace_s: float = Field(60.0, ge=0, description="cluster: unreferenced blobs kept this long")
    # build jobs (memdb_server.build_jobs)
    build_lease_s: float = Field(
        30.0, gt=0, description="a claimed build job goes back to the queue this long after "
        "its worker's last report"
    )  # fmt: skip
    build_worker_live_s: float = Field(
        120.0, gt=0, description="a build job is refused unless a worker of its model polled "
        "for jobs this recently"
    )  # fmt: skip
    # process
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    shutdown_grace_s: float = Field(5.0, ge=0)
    ready_file: Path | None = Field(
        None, description="write {address, metrics} as JSON here once serving"
    )

    # storage limits (issue 11): the map's reserve for deletes, API keys per tenant
    map_reserve_bytes: int = Field(
        64 * MiB, ge=0, description="last bytes of max_map_size kept for deletes (capped at 1/8)"
    )
    max_api_keys_per_tenant: int = Field(1000, ge=1, description="API keys one tenant may hold")

    @field_validator("listen")
    @classmethod
    def _has_port(cls, v: str) -> str:
        host, _, port = v.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"listen must be HOST:PORT, got {v!r}")
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither")
        if self.map_size > self.max_map_size:
            raise ValueError("map_size must not exceed max_map_size")
        if self.backend == "cluster" and not (self.etcd_endpoints() and self.redis_endpoints()):
            raise ValueError("backend cluster needs --etcd URLS and --redis HOST:PORT,...")
        if self.max_watch_streams + self.max_health_watches >= self.max_concurrent_rpcs:
            raise ValueError(
                "max_watch_streams + max_health_watches must be below max_concurrent_rpcs, so "
                "that other calls (health included) are served while every stream is open"
            )
        return self

    def etcd_endpoints(self) -> list[str]:
        return [u.strip() for u in self.etcd.split(",") if u.strip()]

    def redis_endpoints(self) -> list[str]:
        return [u.strip() for u in self.redis.split(",") if u.strip()]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        path = _config_path(init_settings)
        if path is not None:
            if not path.is_file():
                raise ValueError(f"config file {path} does not exist")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def _config_path(init_settings: PydanticBaseSettingsSource) -> Path | None:
    given: Any = init_settings().get("config") or os.environ.get("MEMDB_CONFIG")
    return Path(given) if given else None


def load_config(**flags: Any) -> ServerConfig:
    """Build the config from flags (None means 'not given'), the environment and the file."""
    return ServerConfig(**{k: v for k, v in flags.items() if v is not None})
