"""The storage backends of a server: the seam between the services and where data lives.

`Backend` states the methods of the store that the services and the server call (today's
`memdb_server.storage.Store` has them: it is the `local` backend, one LMDB file); `open_backend`
builds the configured one with the `EventBus` that feeds its Watch streams:

    local    Store (LMDB) + an in-process EventBus (services publish their own changes)
    cluster  ClusterStore (etcd + Redis Cluster + an LMDB read cache) + a ClusterEventBus fed
             by an etcd watch (every node's changes reach every node's watchers)

Knows nothing of gRPC.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from memdb.shards import Shard
from memdb_server.build_jobs import JobTable
from memdb_server.config import ServerConfig
from memdb_server.events import EventBus, WatchLimits
from memdb_server.records import KeyRecord, PrefixRecord, TenantRecord, Usage, VersionSnapshot

T = TypeVar("T")


class Backend(Protocol):
    # tenants
    def put_tenant(self, rec: TenantRecord) -> None: ...
    def get_tenant(self, name: str) -> TenantRecord: ...
    def list_tenants(self) -> list[TenantRecord]: ...
    def delete_tenant(self, name: str, *, force: bool = False) -> None: ...

    # API keys
    def put_key(self, rec: KeyRecord) -> None: ...
    def get_key(self, key_id: str) -> KeyRecord | None: ...
    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]: ...
    def delete_key(self, key_id: str) -> None: ...

    # prefixes
    def get_prefix(self, tenant: str, name: str, version: int = 0) -> PrefixRecord: ...
    def list_prefixes(
        self, tenant: str, *, start_after: str = "", name_prefix: str = "", limit: int = 100
    ) -> list[PrefixRecord]: ...
    def read_version(
        self, tenant: str, name: str, version: int = 0, *, layers: list[int] | None = None
    ) -> VersionSnapshot: ...
    def write_version(
        self,
        tenant: str,
        name: str,
        *,
        mode: str,
        expected_version: int = 0,
        model_fingerprint: str,
        token_count: int,
        build_params: dict[str, str],
        index_kind: str,
        metric: str,
        shards: list[bytes],
        indices: list[list[bytes]],
        decoded: list[Shard] | None = None,
        still_wanted: Callable[[], bool] | None = None,
    ) -> PrefixRecord: ...
    def delete_prefix(self, tenant: str, name: str, *, expected_version: int = 0) -> int: ...
    def read_current_layer(
        self,
        tenant: str,
        name: str,
        layer: int,
        version: int = 0,
        *,
        open_layer: Callable[[PrefixRecord, Callable[[], VersionSnapshot]], T],
    ) -> tuple[PrefixRecord, T]: ...
    def read_shard_chunk(
        self, tenant: str, name: str, version: int, layer: int, start: int, size: int
    ) -> tuple[bytes, int]: ...

    # accounting
    def usage(self, tenant: str) -> tuple[int, int]: ...
    def tenant_usage(self, tenant: str) -> Usage: ...
    def recount_usage(self, tenant: str) -> Usage: ...
    def upload_allowance(self, tenant: str, name: str) -> int | None: ...
    def info(self) -> dict: ...
    def list_nodes(self) -> list[dict]: ...
    def job_table(self) -> JobTable: ...  # build jobs' records (memdb_server.build_jobs)
    def close(self) -> None: ...


def open_backend(config: ServerConfig, limits: WatchLimits) -> tuple[Backend, EventBus]:
    """The configured backend and the event bus of its Watch streams (with `limits`)."""
    if config.backend == "local":
        from memdb_server.storage import Store

        store = Store(
            config.data_dir,
            map_size=config.map_size,
            max_map_size=config.max_map_size,
            sync=config.sync,
            retain_versions=config.retain_versions,
            reserve_bytes=min(config.map_reserve_bytes, config.max_map_size // 8),
            max_keys_per_tenant=config.max_api_keys_per_tenant,
        )
        return store, EventBus(limits)
    from memdb_server.backends.cluster import ClusterStore

    store = ClusterStore(
        config.etcd_endpoints(),
        config.redis_endpoints(),
        cache_dir=config.data_dir / "cache",
        cache_bytes=config.cache_bytes,
        retain_versions=config.retain_versions,
        root=config.etcd_root,
        lease_ttl_s=config.node_lease_s,
        gc_interval_s=config.gc_interval_s,
        gc_grace_s=config.gc_grace_s,
        redis_min_replicas=config.redis_min_replicas,
        max_keys_per_tenant=config.max_api_keys_per_tenant,
        watch_limits=limits,
    )
    return store, store.event_bus
