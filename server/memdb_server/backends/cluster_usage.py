"""What a tenant stores and has reserved on the cluster, laid out so that one tenant's writes do
not contend on one key.

- Committed usage is kept per prefix: `usage/<tenant>\\0<name>` holds that prefix's `Usage`
  (prefixes = 1, its bytes), changed in the transaction that publishes or deletes the prefix
  (whose compare on the prefix's pointer already orders its writers); `usage/<tenant>\\0` (the
  empty name) holds the tenant's API keys. A tenant's usage is the sum of its range.
- Reservations are the staging records of its uploads in flight, `staging/<tenant>\\0<upload>`
  (on the uploading node's lease): each carries the bytes (and the prefix slot) its version will
  add. An upload reserves before any blob reaches Redis, in a transaction that checks the quota
  against committed usage plus every other reservation and compares that neither range changed
  since it was read; so staged bytes never exceed the quota left. The publish transaction
  deletes the reservation as it charges the prefix's usage; an abort deletes it; a node that
  dies takes its reservations with its lease.
Without a quota nothing is compared across prefixes. Knows the key layout and the `Usage`
arithmetic (memdb_server.usage); not how versions are drafted or blobs stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from memdb_server.backends.cluster_node import Keys
from memdb_server.backends.etcd_gateway import KV, EtcdClient, cmp_mod, range_end
from memdb_server.records import Usage, record_from_json, record_to_json

KEYS_RECORD = ""  # the usage record of a tenant's API keys: the empty prefix name


@dataclass
class Reservation:
    """What an upload in flight holds against its tenant's quota (its staging record)."""

    tenant: str
    name: str
    node: str
    at: float
    bytes: int = 0  # net bytes its version adds (what it adds minus what it drops), >= 0
    new_prefix: bool = False  # it creates the prefix: holds one of max_prefixes

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_json(cls, value: bytes) -> Reservation:
        raw = json.loads(value)
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


@dataclass
class TenantLoad:
    """A tenant's committed usage and reservations, read at one etcd revision."""

    committed: Usage
    reserved: list[tuple[bytes, Reservation]]  # (staging key, reservation)
    revision: int

    def total(self, *, excluding: bytes = b"") -> Usage:
        """Committed usage plus every reservation (but `excluding`'s), as one `Usage`."""
        usage = Usage(self.committed.bytes, self.committed.prefixes, self.committed.keys)
        for key, res in self.reserved:
            if key != excluding:
                usage.bytes += res.bytes
                usage.prefixes += int(res.new_prefix)
        return usage


class ClusterUsage:
    """The usage and reservation records of the cluster's tenants."""

    def __init__(self, etcd: EtcdClient, keys: Keys) -> None:
        self._etcd = etcd
        self._keys = keys

    # ------------------------------------------------------------ keys

    def scope(self, tenant: str) -> bytes:
        """The key range of every usage record of a tenant."""
        return self._keys.usage + f"{tenant}\0".encode()

    def key(self, tenant: str, name: str = KEYS_RECORD) -> bytes:
        """The usage record of one prefix (or, with no name, of the tenant's API keys)."""
        return self.scope(tenant) + name.encode()

    def staging_scope(self, tenant: str) -> bytes:
        return self._keys.staging + f"{tenant}\0".encode()

    def staging_key(self, tenant: str, upload: str) -> bytes:
        return self.staging_scope(tenant) + upload.encode()

    # ------------------------------------------------------------ reads

    def committed(self, tenant: str) -> Usage:
        """The tenant's usage: the sum of its per-prefix and API-key records."""
        scope = self.scope(tenant)
        return summed(self._etcd.range(scope, range_end(scope))[0])

    def record(self, tenant: str, name: str = KEYS_RECORD) -> tuple[Usage, int]:
        """One usage record and its mod revision (0: absent, an empty Usage)."""
        kv = self._etcd.get(self.key(tenant, name))
        return (Usage(), 0) if kv is None else (record_from_json(Usage, kv.value), kv.mod_revision)

    def load(self, tenant: str) -> TenantLoad:
        """Committed usage and reservations of a tenant, read at one revision."""
        scope, staging = self.scope(tenant), self.staging_scope(tenant)
        usage_kvs, revision = self._etcd.range(scope, range_end(scope))
        staged, _ = self._etcd.range(staging, range_end(staging), revision=revision)
        reserved = [(kv.key, Reservation.from_json(kv.value)) for kv in staged]
        return TenantLoad(summed(usage_kvs), reserved, revision)

    def unchanged_since(self, tenant: str, revision: int) -> list[dict]:
        """Compares: no usage record or reservation of the tenant was written after
        `revision` (deletes only free room, so they need no compare)."""
        return [
            _unchanged_since(self.scope(tenant), revision),
            _unchanged_since(self.staging_scope(tenant), revision),
        ]


def summed(kvs: list[KV]) -> Usage:
    usage = Usage()
    for kv in kvs:
        part = record_from_json(Usage, kv.value)
        usage.bytes += part.bytes
        usage.prefixes += part.prefixes
        usage.keys += part.keys
    return usage


def usage_json(usage: Usage | None = None) -> bytes:
    return record_to_json(usage or Usage())


def _unchanged_since(prefix: bytes, revision: int) -> dict:
    """No key under `prefix` was created or changed after `revision`."""
    return cmp_mod(prefix, revision + 1, result="LESS", end=range_end(prefix))
