"""memdb_client: the typed Python client of the memdb server (and, later, the admin CLI).

Needs no torch and no FAISS: numpy, grpcio, protobuf and safetensors only.
"""

from memdb.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MemdbError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from memdb.shards import Shard
from memdb_client.client import MemdbClient, Watch
from memdb_client.types import (
    ApiKeyInfo,
    LookupResult,
    MemoryShards,
    PrefixInfo,
    Stats,
    TenantInfo,
    WatchEvent,
)

__all__ = [
    "AlreadyExists", "ApiKeyInfo", "FailedPrecondition", "InvalidArgument", "LookupResult",
    "MemdbClient", "MemdbError", "MemoryShards", "NotFound", "PermissionDenied", "PrefixInfo",
    "ResourceExhausted", "Shard", "Stats", "TenantInfo", "Unauthenticated", "Unavailable",
    "Watch", "WatchEvent",
]  # fmt: skip
