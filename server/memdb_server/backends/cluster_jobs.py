"""Build jobs' records on the cluster backend: etcd keys under the root, changed by CAS.

    <root>jobs/<job id>          -> JobRecord (JSON)
    <root>job-inputs/<job id>    -> {"prefix_text", "traces"} (JSON)
    <root>build-models/<fp>      -> {"last_seen", "worker_id"}: a worker polled for that model

Every node reads and writes the same records, so a job submitted on one node is claimed
through another: `update` reads a record and writes it back only if its mod revision is
unchanged (etcd txn), retrying on a lost race, so two nodes never both claim one job. The
lease is the record's `lease_until` deadline (`build_jobs.Jobs`), not an etcd lease: a job must
outlive the node that handed it out. Knows nothing of the life cycle itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

from memdb.errors import Aborted, NotFound
from memdb_server.backends.etcd_gateway import EtcdClient, cmp_mod, op_put
from memdb_server.build_jobs import JobRecord, from_json, to_json

CAS_ATTEMPTS = 32


class EtcdJobTable:
    """`build_jobs.JobTable` on etcd (`ClusterStore.job_table`)."""

    def __init__(self, etcd: EtcdClient, root: bytes) -> None:
        self._etcd = etcd
        self._jobs = root + b"jobs/"
        self._inputs = root + b"job-inputs/"
        self._models = root + b"build-models/"

    def insert(self, rec: JobRecord, inputs: bytes) -> None:
        key = self._jobs + rec.job_id.encode()
        ops = [op_put(self._inputs + rec.job_id.encode(), inputs), op_put(key, to_json(rec))]
        self._etcd.txn([cmp_mod(key, 0)], ops, applied=lambda: self._etcd.get(key) is not None)

    def get(self, job_id: str) -> JobRecord | None:
        kv = self._etcd.get(self._jobs + job_id.encode()) if job_id else None
        return None if kv is None else from_json(kv.value)

    def inputs(self, job_id: str) -> bytes:
        kv = self._etcd.get(self._inputs + job_id.encode())
        if kv is None:
            raise NotFound(f"build job {job_id!r} has no inputs")
        return kv.value

    def scan(self) -> Iterator[JobRecord]:
        return (from_json(kv.value) for kv in self._etcd.scan(self._jobs))

    def update(self, job_id: str, change: Callable[[JobRecord], JobRecord]) -> JobRecord:
        key = self._jobs + job_id.encode()
        for _ in range(CAS_ATTEMPTS):
            kv = self._etcd.get(key)
            if kv is None:
                raise NotFound(f"build job {job_id!r} not found")
            rec = change(from_json(kv.value))
            blob = to_json(rec)
            if blob == kv.value:
                return rec
            if self._etcd.txn([cmp_mod(key, kv.mod_revision)], [op_put(key, blob)],
                              applied=lambda b=blob: _holds(self._etcd, key, b)):  # fmt: skip
                return rec
        raise Aborted(f"build job {job_id!r} kept changing under this write; retry")

    def saw_model(self, fingerprint: str, seen: dict) -> None:
        self._etcd.put(self._models + fingerprint.encode(), json.dumps(seen).encode())

    def models(self) -> dict[str, dict]:
        n = len(self._models)
        return {kv.key[n:].decode(): json.loads(kv.value) for kv in self._etcd.scan(self._models)}


def _holds(etcd: EtcdClient, key: bytes, blob: bytes) -> bool:
    kv = etcd.get(key)
    return kv is not None and kv.value == blob
