"""The entry of a version in etcd: its `PrefixRecord` and its blob references, as one JSON value
(under its version key and, for the current version, its prefix's pointer), and what an entry
costs its tenant. Knows nothing of how entries are written.
"""

from __future__ import annotations

import dataclasses
import json

from memdb_server.backends.etcd_gateway import KV
from memdb_server.records import (
    PrefixRecord,
    TenantRecord,
    record_from_dict,
    record_from_json,
    record_to_json,
)


def encode_entry(rec: PrefixRecord, blobs: dict) -> bytes:
    data = json.loads(record_to_json(rec))
    data["blobs"] = blobs
    return json.dumps(data, sort_keys=True).encode()


def decode_entry(value: bytes) -> tuple[PrefixRecord, dict]:
    data = json.loads(value)  # parsed once: the record and its blob references
    return record_from_dict(PrefixRecord, data), data["blobs"]


def entry_bytes(kv: KV) -> int:
    """What a stored version record costs: its etcd key + value and its blobs in Redis."""
    return len(kv.key) + len(kv.value) + record_from_json(PrefixRecord, kv.value).stored_bytes


@dataclasses.dataclass
class Plan:
    """A planned write of a version: the record, what it adds and frees, its txn parts."""

    rec: PrefixRecord
    tenant: TenantRecord
    tenant_revision: int
    added: int
    freed: int
    new_prefix: bool
    compare: list[dict]  # [tenant unchanged, pointer unchanged, prefix usage unchanged]
    ops: list[dict]
