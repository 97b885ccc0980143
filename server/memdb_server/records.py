"""Records of the store (tenants, API keys, prefix versions) and their LMDB keys.

Owns the dataclasses the store keeps as JSON, their JSON round trip, the snapshot of one
version, how record keys are laid out so that a prefix or a tenant is one range scan, and the
checks of what a write may carry (names, modes, metadata sizes, indices). Knows nothing of
LMDB transactions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from memdb.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from memdb.shards import Shard, ShardShape, check_consistent, decode_shard

T = TypeVar("T")
log = logging.getLogger(__name__)

# Size limits of what a caller may store as metadata (InvalidArgument past them). A record is
# copied into every version and every listing: these keep each one small.
MAX_FINGERPRINT_BYTES = 256  # a sha256 hex digest is 64
MAX_BUILD_PARAMS = 64  # entries
MAX_BUILD_PARAM_KEY_BYTES = 256
MAX_BUILD_PARAM_VALUE_BYTES = 4096
MAX_BUILD_PARAMS_BYTES = 16 * 1024  # keys + values of all entries
MAX_DESCRIPTION_BYTES = 1024  # of an API key
MAX_TENANT_BYTES = 128
MAX_NAME_BYTES = 255  # with the tenant and 16 bytes of numbers, well under LMDB's 511-byte keys
ROLES = ("admin", "writer", "reader", "worker")
MODES = ("create", "update", "upsert")
INDEX_KINDS = ("flat", "ivf", "hnsw")
METRICS = ("cosine", "ip")


# ---------------------------------------------------------------- records


@dataclass
class TenantRecord:
    name: str
    max_bytes: int = 0  # 0 = unlimited; counts every record of the tenant (see Usage)
    max_prefixes: int = 0  # 0 = unlimited
    created_at: float = 0.0


@dataclass
class Usage:
    """What a tenant makes the server store, kept up to date in every write transaction.

    `bytes` counts key + value bytes of every record of the tenant: its API keys, and of
    every retained version of every prefix its shards, indices and records (not the tenant
    record itself, which the admin creates). The quota `TenantRecord.max_bytes` bounds it.
    """

    bytes: int = 0
    prefixes: int = 0
    keys: int = 0


@dataclass
class KeyRecord:
    key_id: str
    tenant: str
    role: str  # admin | writer | reader | worker
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
    stored_bytes: int = 0  # key + value bytes of this version's shard and index records


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
    return record_from_dict(cls, json.loads(blob))


def record_from_dict(cls: type[T], data: dict) -> T:
    """A record from its parsed JSON (for callers that read more fields of the same object)."""
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


def check_metadata(model_fingerprint: str, build_params: dict[str, str]) -> None:
    """InvalidArgument (a short message) if the fingerprint or build parameters are too big."""
    if len(model_fingerprint.encode()) > MAX_FINGERPRINT_BYTES:
        raise InvalidArgument(
            f"model_fingerprint is {len(model_fingerprint.encode())} bytes; "
            f"at most {MAX_FINGERPRINT_BYTES} are allowed"
        )
    if len(build_params) > MAX_BUILD_PARAMS:
        raise InvalidArgument(
            f"build_params has {len(build_params)} entries; at most {MAX_BUILD_PARAMS} are allowed"
        )
    total = 0
    for k, v in build_params.items():
        kb, vb = len(k.encode()), len(v.encode())
        if kb > MAX_BUILD_PARAM_KEY_BYTES or vb > MAX_BUILD_PARAM_VALUE_BYTES:
            raise InvalidArgument(
                f"build_params entry '{k[:40]}' is too big: keys may have "
                f"{MAX_BUILD_PARAM_KEY_BYTES} bytes, values {MAX_BUILD_PARAM_VALUE_BYTES}"
            )
        total += kb + vb
    if total > MAX_BUILD_PARAMS_BYTES:
        raise InvalidArgument(
            f"build_params hold {total} bytes; at most {MAX_BUILD_PARAMS_BYTES} are allowed"
        )


def check_description(description: str) -> None:
    if len(description.encode()) > MAX_DESCRIPTION_BYTES:
        raise InvalidArgument(
            f"the description is {len(description.encode())} bytes; "
            f"at most {MAX_DESCRIPTION_BYTES} are allowed"
        )


def version_gone(name: str, version: int) -> Aborted:
    """The error of a streamed read whose version is no longer stored."""
    return Aborted(
        f"version {version} of prefix '{name}' was replaced or deleted during this "
        "read (it is no longer retained); fetch it again"
    )


def check_layer(rec: PrefixRecord, layer: int) -> None:
    if not 0 <= layer < rec.num_layers:
        raise InvalidArgument(
            f"layer {layer} out of range: prefix '{rec.name}' has {rec.num_layers} layers "
            f"(0..{rec.num_layers - 1})"
        )


def check_stored_name(value: str, what: str, max_bytes: int) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty string")
    if any(ord(c) < 32 for c in value):
        raise InvalidArgument(f"{what} {value[:40]!r} contains control characters")
    if len(value.encode()) > max_bytes:
        raise InvalidArgument(f"{what} '{value[:40]}...' is longer than {max_bytes} bytes")


def check_write_args(
    mode: str,
    model_fingerprint: str,
    token_count: int,
    build_params: dict[str, str],
    index_kind: str,
    metric: str,
) -> None:
    if mode not in MODES:
        raise InvalidArgument(f"mode '{mode}' is unknown; use {', '.join(MODES)}")
    if not model_fingerprint:
        raise InvalidArgument("model_fingerprint is empty; send the fingerprint of the model")
    if token_count < 0:
        raise InvalidArgument(f"token_count must be >= 0, got {token_count}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in build_params.items()):
        raise InvalidArgument("build_params must map strings to strings")
    if index_kind not in INDEX_KINDS:
        raise InvalidArgument(f"index kind '{index_kind}' is unknown; use {', '.join(INDEX_KINDS)}")
    if metric not in METRICS:
        raise InvalidArgument(f"metric '{metric}' is unknown; use {' or '.join(METRICS)}")


def check_indices(indices: list[list[bytes]], num_layers: int, num_groups: int) -> None:
    if len(indices) != num_layers:
        raise InvalidArgument(f"got indices for {len(indices)} layers, expected {num_layers}")
    for layer, groups in enumerate(indices):
        if len(groups) != num_groups or not all(groups):
            raise InvalidArgument(
                f"layer {layer}: got {len(groups)} indices, expected one non-empty index per "
                f"group ({num_groups})"
            )


def check_tenant(rec: TenantRecord) -> None:
    """What `put_tenant` may store (every backend)."""
    check_stored_name(rec.name, "tenant name", MAX_TENANT_BYTES)
    if rec.max_bytes < 0 or rec.max_prefixes < 0:
        raise InvalidArgument("tenant quotas must be 0 (unlimited) or positive")


def check_key(rec: KeyRecord) -> None:
    """What `put_key` may store (every backend)."""
    check_stored_name(rec.key_id, "API key id", MAX_NAME_BYTES)
    if rec.role not in ROLES:
        raise InvalidArgument(f"role '{rec.role}' is unknown; use {', '.join(ROLES)}")
    if not rec.secret_hash:
        raise InvalidArgument(f"API key '{rec.key_id}' has no secret hash")
    check_description(rec.description)


def draft_version(
    tenant: str,
    name: str,
    *,
    mode: str,
    model_fingerprint: str,
    token_count: int,
    build_params: dict[str, str],
    index_kind: str,
    metric: str,
    shards: list[bytes],
    indices: list[list[bytes]],
    decoded: list[Shard] | None = None,
) -> PrefixRecord:
    """Check everything a write carries and return its record without a version (every
    backend; `stored_bytes` is left 0 for the backend to fill). InvalidArgument on bad input."""
    check_stored_name(tenant, "tenant name", MAX_TENANT_BYTES)
    check_stored_name(name, "prefix name", MAX_NAME_BYTES)
    check_write_args(mode, model_fingerprint, token_count, build_params, index_kind, metric)
    check_metadata(model_fingerprint, build_params)
    if decoded is None:
        decoded = [decode_shard(blob, where=f"layer {i}") for i, blob in enumerate(shards)]
    elif len(decoded) != len(shards):
        raise InvalidArgument(f"{len(decoded)} decoded shards for {len(shards)} blobs")
    shape = check_consistent(decoded)
    check_indices(indices, len(shards), shape.num_groups)
    return PrefixRecord(
        tenant=tenant,
        name=name,
        version=0,
        model_fingerprint=model_fingerprint,
        num_layers=len(shards),
        shape=shape,
        dtype=str(decoded[0].out.dtype),
        token_count=token_count,
        build_params=dict(build_params),
        extra_tensors=decoded[0].entry_extras,
        bytes=sum(len(b) for b in shards),
        index_kind=index_kind,
        metric=metric,
        created_at=0.0,
        updated_at=0.0,
    )


class VersionReads:
    """Single-layer reads of every backend, from its `read_version`."""

    def get_shard(self, tenant: str, name: str, version: int, layer: int) -> bytes:
        return self.read_version(tenant, name, version, layers=[layer]).shard(layer)  # type: ignore[attr-defined]

    def get_index(self, tenant: str, name: str, version: int, layer: int, group: int) -> bytes:
        snap = self.read_version(tenant, name, version, layers=[layer])  # type: ignore[attr-defined]
        return snap.index(layer, group)


class VersionWriter:
    """`write_version` of every backend: the checks and the draft are shared here, storing it
    is the backend's `_store_version`."""

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
    ) -> PrefixRecord:
        """Validate and store a new version (current + 1) and make it current, atomically.

        `indices[layer][group]` are serialized indices over that layer's keys. Raises
        InvalidArgument (bad shard: names layer and tensor), NotFound (tenant; prefix in update
        mode), AlreadyExists (create mode), FailedPrecondition (`expected_version` nonzero and
        not current), ResourceExhausted (quota, store full). On any error nothing is written.
        `decoded`: the shards as the caller already decoded them with `decode_shard` (skips
        decoding and validating them a second time). `still_wanted`: asked just before the
        write commits; False aborts it (Cancelled, nothing written).
        """
        draft = draft_version(
            tenant,
            name,
            mode=mode,
            model_fingerprint=model_fingerprint,
            token_count=token_count,
            build_params=build_params,
            index_kind=index_kind,
            metric=metric,
            shards=shards,
            indices=indices,
            decoded=decoded,
        )
        rec = self._store_version(draft, mode, expected_version, shards, indices, still_wanted)
        log.info("stored %s/%s version %d (%d bytes)", tenant, name, rec.version, rec.bytes)
        return rec

    def _store_version(
        self,
        draft: PrefixRecord,
        mode: str,
        expected: int,
        shards: list[bytes],
        indices: list[list[bytes]],
        still_wanted: Callable[[], bool] | None,
    ) -> PrefixRecord:
        raise NotImplementedError


def next_version(
    draft: PrefixRecord, current: PrefixRecord | None, retain: int, now: float
) -> tuple[PrefixRecord, list[int]]:
    """The record of the version `draft` becomes (current + 1) and the versions it drops out of
    the last `retain`."""
    version = current.version + 1 if current else 1
    retained = (current.retained_versions if current else []) + [version]
    rec = dataclasses.replace(
        draft,
        version=version,
        created_at=current.created_at if current else now,
        updated_at=now,
        retained_versions=retained[-retain:],
    )
    return rec, retained[:-retain]


def dropped_by_next(current: PrefixRecord | None, retain: int) -> list[int]:
    """The versions the next write of a prefix will drop (what it frees)."""
    kept = current.retained_versions if current else []
    return kept[: max(0, len(kept) + 1 - retain)]


def check_expected(name: str, at: int, expected: int) -> None:
    if expected and expected != at:
        raise FailedPrecondition(
            f"prefix '{name}' is at version {at}, not the expected {expected}; re-read it and retry"
        )


def check_mode(mode: str, name: str, current: PrefixRecord | None, expected: int) -> None:
    if mode == "create" and current is not None:
        raise AlreadyExists(
            f"prefix '{name}' already exists (version {current.version}); use update or upsert"
        )
    if mode == "update" and current is None:
        raise NotFound(f"prefix '{name}' not found; use create or upsert")
    check_expected(name, current.version if current else 0, expected)
