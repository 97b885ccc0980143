"""Publishing a version on the cluster: reserve its quota, stage its blobs, publish it fenced,
and settle a publish whose reply was lost.

1. Reserve: the upload's staging record `staging/<tenant>\0<upload>`, on the node's lease,
   carries what the version will add to the tenant's usage; the transaction that writes it checks
   the quota against committed usage plus every other reservation (cluster_usage). Nothing is in
   Redis yet, so a refused write costs no blob traffic, and staged bytes never exceed the quota.
2. Stage: the blobs go to Redis under the upload id (redis_blobs).
3. Publish: one etcd transaction puts the version record and the current pointer, charges the
   prefix's usage record and deletes the reservation, compared on the tenant, the pointer and
   on the reservation still being there. That compare is the fence: a node paused or cut off past
   its lease has lost its reservation (etcd deleted it with the lease), and the collector may
   have deleted its blobs, so its publish fails with a retryable error and never answers OK.
4. Settle: when the publish's reply is lost (etcd_gateway raises OutcomeUnknown), the version
   records are read back: one naming this upload means it was published (the client is told
   OK); the reservation still there means it was not (the publish is tried again, compared as
   before); neither means it cannot be told, and the client gets OutcomeUnknown (UNAVAILABLE)
   while the blobs stay for the collector, which deletes only blobs no version names.
Knows the key layout, the entry format and the usage records; nothing of gRPC or reads.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from memdb.errors import Cancelled, NotFound, OutcomeUnknown, Unavailable
from memdb_server import failpoints
from memdb_server.backends.cluster_entries import Plan, decode_entry, encode_entry, entry_bytes
from memdb_server.backends.cluster_node import Keys, NodeLease
from memdb_server.backends.cluster_usage import ClusterUsage, Reservation, usage_json
from memdb_server.backends.etcd_gateway import EtcdClient, cmp_mod, op_delete, op_put
from memdb_server.backends.redis_blobs import BlobStore
from memdb_server.records import (
    PrefixRecord,
    TenantRecord,
    Usage,
    check_mode,
    next_version,
    record_from_json,
)
from memdb_server.usage import charge_version

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 64  # compare-and-swap retries of one change before giving up (Unavailable)


class Publisher:
    """The write path of versions of one node. Thread-safe."""

    def __init__(
        self,
        etcd: EtcdClient,
        blobs: BlobStore,
        keys: Keys,
        usage_records: ClusterUsage,
        lease: NodeLease,
        *,
        node_id: str,
        retain: int,
        on_staged: Callable[[str], None],
    ) -> None:
        self.etcd, self.blobs, self.keys = etcd, blobs, keys
        self.usage_records, self.lease = usage_records, lease
        self.node_id, self._retain, self._on_staged = node_id, retain, on_staged

    def write(
        self,
        draft: PrefixRecord,
        mode: str,
        expected_version: int,
        shards: list[bytes],
        indices: list[list[bytes]],
        still_wanted: Callable[[], bool] | None,
    ) -> PrefixRecord:
        """Reserve, stage, publish (see the module docstring); the published record."""
        upload = uuid.uuid4().hex
        refs = self.blobs.refs(shards)
        index_refs = [self.blobs.refs(groups) for groups in indices]
        draft.stored_bytes = self.blobs.stored_bytes(upload, refs + sum(index_refs, []))
        blobs = {"upload": upload, "shards": [r.to_json() for r in refs],
                 "indices": [[r.to_json() for r in g] for g in index_refs]}  # fmt: skip
        staging, reservation, plan = self._reserve(draft, mode, expected_version, blobs)
        try:
            self.blobs.stage(upload, shards, refs)
            for groups, group_refs in zip(indices, index_refs, strict=True):
                self.blobs.stage(upload, groups, group_refs)
            self._on_staged(upload)
            failpoints.hit("cluster_before_publish")
            return self._publish(draft, mode, expected_version, blobs, staging, reservation,
                                 still_wanted, plan)  # fmt: skip
        except OutcomeUnknown:
            raise  # it may be published: its blobs stay (the collector keeps what a version names)
        except BaseException:
            self._abandon(upload, staging)
            raise

    def _abandon(self, upload: str, staging: bytes) -> None:
        """Release the reservation and delete the blobs of an upload known not to be published."""
        try:
            self.etcd.delete(staging)
            self.blobs.delete_upload(upload)
        except Unavailable as exc:  # the lease releases it; the collector removes the blobs
            log.warning("could not remove abandoned upload %s: %s", upload, exc)

    def _prepare(self, draft: PrefixRecord, mode: str, expected: int, blobs: dict) -> Plan:
        """Read what the write depends on, check the mode (the store's checks and messages),
        and plan the new record, what it adds and frees, and the compares and ops of its txn."""
        tenant_name, name = draft.tenant, draft.name
        pointer = self.keys.pointer(tenant_name, name)
        tenant_kv = self._tenant_kv(tenant_name)
        kv = self.etcd.get(pointer)
        current = decode_entry(kv.value)[0] if kv else None
        check_mode(mode, name, current, expected)
        rec, dropped = next_version(draft, current, self._retain, time.time())
        entry = encode_entry(rec, blobs)
        version_key = self.keys.version(tenant_name, name, rec.version)
        freed = sum(self.version_bytes(tenant_name, name, v) for v in dropped)
        if kv is not None:
            freed += len(kv.key) + len(kv.value)
        added = len(version_key) + len(pointer) + 2 * len(entry) + rec.stored_bytes
        own, own_rev = self.usage_records.record(tenant_name, name)
        if kv is not None and not own_rev:  # a prefix written before per-prefix usage records
            own = Usage(len(kv.key) + len(kv.value) + self.versions_bytes(tenant_name, name), 1)
        own.prefixes, own.bytes = 1, own.bytes + added - freed
        usage_key = self.usage_records.key(tenant_name, name)
        compare = [cmp_mod(tenant_kv.key, tenant_kv.mod_revision),
                   cmp_mod(pointer, kv.mod_revision if kv else 0),
                   cmp_mod(usage_key, own_rev)]  # fmt: skip
        ops = [op_put(version_key, entry), op_put(pointer, entry),
               op_put(usage_key, usage_json(own))]  # fmt: skip
        ops += [op_delete(self.keys.version(tenant_name, name, v)) for v in dropped]
        tenant = record_from_json(TenantRecord, tenant_kv.value)
        return Plan(rec, tenant, tenant_kv.mod_revision, added, freed, current is None,
                     compare, ops)  # fmt: skip

    def _charge(self, plan: Plan, *, excluding: bytes = b"") -> list[dict]:
        """Check the plan against the tenant's quota, counting every reservation but
        `excluding`'s; the compares that keep that check true until the txn. None without a
        quota, and none for a write that adds no bytes and no prefix (most updates: what they
        add, the versions they drop free): it cannot take the tenant past its quota whatever
        the others do, so one tenant's updates of different names never contend."""
        tenant = plan.tenant
        if not (tenant.max_bytes or tenant.max_prefixes):
            return []
        load = self.usage_records.load(tenant.name)
        charge_version(tenant, load.total(excluding=excluding), added=plan.added,
                       freed=plan.freed, new_prefix=plan.new_prefix,
                       what=f"prefix '{plan.rec.name}' version {plan.rec.version}")  # fmt: skip
        if plan.added <= plan.freed and not plan.new_prefix:
            return []
        return self.usage_records.unchanged_since(tenant.name, load.revision)

    def _reserve(
        self, draft: PrefixRecord, mode: str, expected: int, blobs: dict
    ) -> tuple[bytes, Reservation, Plan]:
        """Reserve the upload's quota in its staging record, before any blob is staged; and
        the plan it reserved for (the publish's first try: its compares say if it went stale)."""
        staging = self.usage_records.staging_key(draft.tenant, blobs["upload"])
        for _ in range(MAX_ATTEMPTS):
            plan = self._prepare(draft, mode, expected, blobs)  # fails fast on the mode
            reservation = Reservation(draft.tenant, draft.name, self.node_id, time.time(),
                                      max(plan.added - plan.freed, 0), plan.new_prefix)  # fmt: skip
            compare = [plan.compare[0], cmp_mod(staging, 0), *self._charge(plan)]
            put = op_put(staging, reservation.to_json(), lease=self.lease.id)
            if self.etcd.txn(compare, [put], applied=lambda: self.etcd.get(staging) is not None):
                return staging, reservation, plan
        raise contended(f"tenant '{draft.tenant}'")

    def _publish(
        self,
        draft: PrefixRecord,
        mode: str,
        expected: int,
        blobs: dict,
        staging: bytes,
        reservation: Reservation,
        still_wanted: Callable[[], bool] | None,
        plan: Plan | None = None,
    ) -> PrefixRecord:
        """The txn that makes the version current, compared on its reservation still being
        there (fencing: once the lease that holds it expired, the collector may have deleted
        the blobs, so the version must not be published)."""
        upload = blobs["upload"]
        for _ in range(MAX_ATTEMPTS):
            plan = plan or self._prepare(draft, mode, expected, blobs)
            if still_wanted is not None and not still_wanted():
                raise Cancelled(f"upload of '{draft.name}' was cancelled; nothing was written")
            compare = [*plan.compare, cmp_mod(staging, 0, result="GREATER")]
            net = plan.added - plan.freed
            if net > reservation.bytes or plan.new_prefix > reservation.new_prefix:
                compare += self._charge(plan, excluding=staging)  # outgrew its reservation
            ops = [*plan.ops, op_delete(staging)]
            if self.etcd.txn(compare, ops, applied=lambda: self._published(draft, upload, staging)):
                return plan.rec
            plan = None  # stale: read again
            late = self.record_naming(draft.tenant, draft.name, upload)
            if late is not None:  # an earlier attempt whose reply was lost was applied late
                return late
            if self.etcd.get(staging) is None:
                raise Unavailable(
                    f"the upload of '{draft.name}' lost its reservation before it was published "
                    f"(node {self.node_id} lost its etcd lease: paused or cut off from etcd for "
                    "longer than its lease TTL); nothing was published; send the write again"
                )
        raise contended(f"prefix '{draft.name}'")

    def record_naming(self, tenant: str, name: str, upload: str) -> PrefixRecord | None:
        """The stored version of a prefix whose blobs are `upload`'s, if any."""
        scope = self.keys.versions_of(tenant, name)
        for kv in self.etcd.scan(scope):
            rec, blobs = decode_entry(kv.value)
            if blobs["upload"] == upload:
                return rec
        return None

    def _published(self, draft: PrefixRecord, upload: str, staging: bytes) -> bool:
        """Settle a publish whose reply was lost: True if a version names the upload, False
        if its reservation is still there (the txn deletes it: not applied)."""
        if self.record_naming(draft.tenant, draft.name, upload) is not None:
            return True
        if self.etcd.get(staging) is not None:
            return False
        raise OutcomeUnknown(
            f"the write of '{draft.name}' was sent but its reply was lost, and neither a version "
            "naming it nor its reservation is left; read the prefix before writing again"
        )

    def version_bytes(self, tenant: str, name: str, version: int) -> int:
        kv = self.etcd.get(self.keys.version(tenant, name, version))
        return 0 if kv is None else entry_bytes(kv)

    def versions_bytes(self, tenant: str, name: str) -> int:
        """What every stored version record of a prefix costs (see `entry_bytes`)."""
        return sum(map(entry_bytes, self.etcd.scan(self.keys.versions_of(tenant, name))))

    def _tenant_kv(self, name: str):
        kv = self.etcd.get(self.keys.tenants + name.encode())
        if kv is None:
            raise NotFound(f"tenant '{name}' not found")
        return kv


def contended(what: str) -> Unavailable:
    return Unavailable(f"{what} kept changing under {MAX_ATTEMPTS} attempts; retry")
