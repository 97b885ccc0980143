"""Records of the store (tenants, API keys, prefix versions) and their LMDB keys.

Owns the dataclasses the store keeps as JSON, their JSON round trip, the snapshot of one
version, and how record keys are laid out so that a prefix or a tenant is one range scan.
Knows nothing of LMDB transactions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TypeVar

from memdb.errors import InvalidArgument
from memdb.shards import ShardShape

T = TypeVar("T")


# ---------------------------------------------------------------- records


@dataclass
class TenantRecord:
    name: str
    max_bytes: int = 0  # 0 = unlimited; counts the shard bytes of current versions
    max_prefixes: int = 0  # 0 = unlimited
    created_at: float = 0.0


@dataclass
class KeyRecord:
    key_id: str
    tenant: str
    role: str  # admin | writer | reader
    secret_hash: str
    description: str = ""
    created_at: float = 0.0


@dataclass
class PrefixRecord:
    tenant: str
    name: str
    version: int
    model_fingerprint: str
    num_layers: int
    shape: ShardShape
    dtype: str  # dtype of `out`
    token_count: int
    build_params: dict[str, str]
    extra_tensors: list[str]
    bytes: int  # shard bytes of this version
    index_kind: str
    metric: str
    created_at: float
    updated_at: float
    retained_versions: list[int] = field(default_factory=list)  # ascending, current last


@dataclass
class VersionSnapshot:
    """One version of a prefix as read in one transaction: its record, shards and indices.

    `shards[layer]` and `indices[layer][group]` hold the layers that were asked for (all of
    them unless `read_version(layers=...)` named some).
    """

    record: PrefixRecord
    shards: dict[int, bytes]
    indices: dict[int, list[bytes]]

    @property
    def version(self) -> int:
        return self.record.version

    def shard(self, layer: int) -> bytes:
        return self.shards[self._layer(layer)]

    def index(self, layer: int, group: int) -> bytes:
        groups = self.indices[self._layer(layer)]
        if not 0 <= group < len(groups):
            raise InvalidArgument(
                f"group {group} out of range: prefix '{self.record.name}' has {len(groups)} "
                "groups per layer"
            )
        return groups[group]

    def _layer(self, layer: int) -> int:
        check_layer(self.record, layer)
        if layer not in self.shards:
            raise InvalidArgument(f"layer {layer} was not read into this snapshot")
        return layer


def record_to_json(rec: TenantRecord | KeyRecord | PrefixRecord) -> bytes:
    return json.dumps(dataclasses.asdict(rec), sort_keys=True).encode()


def record_from_json(cls: type[T], blob: bytes) -> T:
    """The inverse of `record_to_json`; fields unknown to `cls` are ignored."""
    data = json.loads(blob)
    known = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if k in known}
    if cls is PrefixRecord:
        data["shape"] = ShardShape(**data["shape"])
    return cls(**data)


# ---------------------------------------------------------------- keys


def prefix_key(tenant: str, name: str) -> bytes:
    return f"{tenant}\0{name}".encode()


def item_key(tenant: str, name: str, *numbers: int) -> bytes:
    """tenant \0 name \0, then version (8 bytes), layer and group (4 bytes), big-endian.

    With fewer numbers it is the start of every key of the prefix (or of the version, layer).
    """
    head = f"{tenant}\0{name}\0".encode()
    return head + b"".join(n.to_bytes(w, "big") for n, w in zip(numbers, (8, 4, 4), strict=False))


def check_layer(rec: PrefixRecord, layer: int) -> None:
    if not 0 <= layer < rec.num_layers:
        raise InvalidArgument(
            f"layer {layer} out of range: prefix '{rec.name}' has {rec.num_layers} layers "
            f"(0..{rec.num_layers - 1})"
        )
