"""Plain typed results of the client: dataclasses with numpy arrays, built from wire messages.

Owns the conversion from `memdb.v1` messages; knows nothing of channels or calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from memdb.shards import Shard
from memdb.v1 import memdb_pb2 as pb

ROLES = {"reader": pb.ROLE_READER, "writer": pb.ROLE_WRITER, "admin": pb.ROLE_ADMIN,
         "worker": pb.ROLE_WORKER}  # fmt: skip
ROLE_NAMES = {v: k for k, v in ROLES.items()}


def _time(ts) -> datetime:
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)


@dataclass(frozen=True)
class PrefixInfo:
    tenant: str
    name: str
    version: int
    model_fingerprint: str
    num_layers: int
    num_groups: int
    budget: int
    key_dim: int
    heads_per_group: int
    head_dim: int
    dtype: str
    token_count: int
    build_params: dict[str, str]
    extra_tensors: list[str]
    bytes: int
    index_kind: str
    metric: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_pb(cls, m: pb.PrefixInfo) -> PrefixInfo:
        return cls(
            tenant=m.tenant,
            name=m.name,
            version=m.version,
            model_fingerprint=m.model_fingerprint,
            num_layers=m.num_layers,
            num_groups=m.num_groups,
            budget=m.budget,
            key_dim=m.key_dim,
            heads_per_group=m.heads_per_group,
            head_dim=m.head_dim,
            dtype=m.dtype,
            token_count=m.token_count,
            build_params=dict(m.build_params),
            extra_tensors=list(m.extra_tensors),
            bytes=m.bytes,
            index_kind=m.index_kind,
            metric=m.metric,
            created_at=_time(m.created_at),
            updated_at=_time(m.updated_at),
        )


@dataclass(frozen=True)
class LookupResult:
    version: int
    ids: np.ndarray  # int64 [Q, I, k]
    scores: np.ndarray  # float32 [Q, I, k]
    out: np.ndarray | None  # [Q, I, k, h, d]
    lse: np.ndarray | None  # [Q, I, k, h]
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [Q, I, k, ...]


@dataclass
class MemoryShards:
    """A whole fetched version: its info and every layer's shard (the stored memory, not yet on
    a device: the worker's `memdb_worker.memory.Memory.from_shards` loads the shards)."""

    info: PrefixInfo
    shards: list[Shard] = field(default_factory=list)


@dataclass(frozen=True)
class WatchEvent:
    type: str  # "put" | "delete"
    name: str
    version: int
    model_fingerprint: str
    at: datetime

    @classmethod
    def from_pb(cls, m: pb.WatchEvent) -> WatchEvent:
        kind = {pb.EVENT_TYPE_PUT: "put", pb.EVENT_TYPE_DELETE: "delete"}.get(m.type, "unknown")
        return cls(kind, m.name, m.version, m.model_fingerprint, _time(m.at))


@dataclass(frozen=True)
class TenantInfo:
    name: str
    max_bytes: int
    max_prefixes: int
    num_prefixes: int
    bytes: int
    created_at: datetime

    @classmethod
    def from_pb(cls, m: pb.Tenant) -> TenantInfo:
        q = m.quotas
        return cls(m.name, q.max_bytes, q.max_prefixes, m.num_prefixes, m.bytes,
                   _time(m.created_at))  # fmt: skip


@dataclass(frozen=True)
class ApiKeyInfo:
    key_id: str
    tenant: str
    role: str
    description: str
    created_at: datetime

    @classmethod
    def from_pb(cls, m: pb.ApiKeyInfo) -> ApiKeyInfo:
        return cls(m.key_id, m.tenant, ROLE_NAMES.get(m.role, "unknown"), m.description,
                   _time(m.created_at))  # fmt: skip


@dataclass(frozen=True)
class Stats:
    server_version: str
    store_bytes: int
    map_size: int
    num_tenants: int
    num_prefixes: int
    tenants: dict[str, tuple[int, int]]  # tenant -> (num_prefixes, bytes)
    index_cache_bytes: int
    index_cache_hits: int
    index_cache_misses: int
    uptime_s: float
    nodes: tuple[tuple[str, str], ...] = ()  # cluster: (node id, address) of each live node

    @classmethod
    def from_pb(cls, m: pb.StatsResponse) -> Stats:
        return cls(
            server_version=m.server_version,
            store_bytes=m.store_bytes,
            map_size=m.map_size,
            num_tenants=m.num_tenants,
            num_prefixes=m.num_prefixes,
            tenants={t.tenant: (t.num_prefixes, t.bytes) for t in m.tenants},
            index_cache_bytes=m.index_cache_bytes,
            index_cache_hits=m.index_cache_hits,
            index_cache_misses=m.index_cache_misses,
            uptime_s=m.uptime_s,
            nodes=tuple((n.node_id, n.address) for n in m.nodes),
        )
