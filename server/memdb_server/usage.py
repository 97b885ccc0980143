"""What each tenant stores, for its quota: the usage counters kept in the `usage` sub-database,
updated in the same write transaction as the records they count, and recounted from the
records when a store predates them.

A tenant's bytes are the key + value bytes of every record of it: its API keys, and of every
retained version of every prefix its shards, indices, version record and current record (not
its tenant record). Knows the record layout (memdb_server.records), not how the store writes.
"""

from __future__ import annotations

import lmdb

from memdb.errors import ResourceExhausted
from memdb_server.lmdbio import scan
from memdb_server.records import (
    KeyRecord,
    PrefixRecord,
    TenantRecord,
    Usage,
    item_key,
    record_from_json,
    record_to_json,
)

Dbs = dict[str, object]  # sub-database name -> LMDB handle


def stored_bytes(tenant: str, name: str, shards: list[bytes], indices: list[list[bytes]]) -> int:
    """Key + value bytes of a version's shard and index records."""
    shard_key, index_key = len(item_key(tenant, name, 0, 0)), len(item_key(tenant, name, 0, 0, 0))
    return sum(shard_key + len(b) for b in shards) + sum(
        index_key + len(b) for layer in indices for b in layer
    )


def check_prefix_count(tenant: TenantRecord, usage: Usage) -> None:
    if tenant.max_prefixes and usage.prefixes > tenant.max_prefixes:
        raise ResourceExhausted(
            f"tenant '{tenant.name}' has {usage.prefixes - 1} prefixes, its quota is "
            f"{tenant.max_prefixes}; delete a prefix or raise the tenant's max_prefixes"
        )


def check_bytes(tenant: TenantRecord, usage: Usage, what: str) -> None:
    if tenant.max_bytes and usage.bytes > tenant.max_bytes:
        raise ResourceExhausted(
            f"{what} would bring tenant '{tenant.name}' to {usage.bytes} stored bytes (every "
            f"retained version's shards and indices, records and API keys), over its "
            f"{tenant.max_bytes}-byte quota; delete prefixes, upload a smaller memory, keep "
            "fewer versions or raise the tenant's max_bytes"
        )


def check_key_count(tenant: str, usage: Usage, max_keys: int) -> None:
    if usage.keys >= max_keys:
        raise ResourceExhausted(
            f"tenant '{tenant}' has {usage.keys} API keys, the most a tenant may "
            "have; revoke unused keys first"
        )


def charge_key(tenant: TenantRecord, usage: Usage, key_bytes: int, what: str) -> None:
    """Count a new API key of `key_bytes` (key + value) in `usage`, or ResourceExhausted."""
    usage.keys += 1
    usage.bytes += key_bytes
    check_bytes(tenant, usage, what)


def charge_version(
    tenant: TenantRecord, usage: Usage, *, added: int, freed: int, new_prefix: bool, what: str
) -> None:
    """Count a new version (`added` bytes; `freed`: what it replaces or drops) in `usage`, or
    ResourceExhausted past the tenant's prefix or byte quota."""
    if new_prefix:
        usage.prefixes += 1
        check_prefix_count(tenant, usage)
    usage.bytes += added - freed
    check_bytes(tenant, usage, what)


def load_usage(txn: lmdb.Transaction, dbs: Dbs, tenant: str) -> Usage:
    blob = txn.get(tenant.encode(), db=dbs["usage"])
    return Usage() if blob is None else record_from_json(Usage, blob)


def save_usage(txn: lmdb.Transaction, dbs: Dbs, tenant: str, usage: Usage) -> None:
    txn.put(tenant.encode(), record_to_json(usage), db=dbs["usage"])


def version_bytes(txn: lmdb.Transaction, dbs: Dbs, tenant: str, name: str, version: int) -> int:
    """Key + value bytes of every record of one stored version (0 if it is not stored)."""
    key = item_key(tenant, name, version)
    blob = txn.get(key, db=dbs["versions"])
    if blob is None:
        return 0
    stored = record_from_json(PrefixRecord, blob).stored_bytes
    if not stored:  # a version written before records kept their size: count it
        stored = sum(
            len(k) + len(v) for db in ("shards", "indices") for k, v in scan(txn, dbs[db], key)
        )
    return len(key) + len(blob) + stored


def stored_versions(txn: lmdb.Transaction, dbs: Dbs, tenant: str, name: str) -> list[int]:
    start = item_key(tenant, name)
    return [int.from_bytes(k[len(start) :], "big") for k, _ in scan(txn, dbs["versions"], start)]


def recount(txn: lmdb.Transaction, dbs: Dbs, tenant: str) -> Usage:
    usage = Usage()
    for pkey, blob in scan(txn, dbs["prefixes"], f"{tenant}\0".encode()):
        usage.prefixes += 1
        usage.bytes += len(pkey) + len(blob)
        name = record_from_json(PrefixRecord, blob).name
        for version in stored_versions(txn, dbs, tenant, name):
            usage.bytes += version_bytes(txn, dbs, tenant, name, version)
    for key_id, blob in txn.cursor(db=dbs["keys"]):
        if record_from_json(KeyRecord, blob).tenant == tenant:
            usage.keys += 1
            usage.bytes += len(key_id) + len(blob)
    return usage
