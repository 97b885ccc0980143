"""Build jobs: their records, their life cycle, and the LMDB table that keeps them durable.

A job is submitted by a tenant's writer (queued), claimed by a worker of its model fingerprint
(claimed, with a lease until `lease_until`), reported on by that worker (running: progress, and
a heartbeat that extends the lease) and ends done (its version is stored: set by the job's
PutPrefix, `Jobs.finish`), failed or cancelled; those three are final. A claimed or running job
whose lease lapsed goes back to queued at the next claim (after MAX_ATTEMPTS claims it fails
instead: a job that kills its workers is not retried forever).

A job is never run twice to completion: its version is written with expected_version = the
job's `base_version` (the prefix's version at submission; create: none) and tagged with
build_params["build_job"], so a second upload of the same job (a worker that lost its lease but
kept building) fails, and a job whose upload committed before its record said done is known
done by that tag (`Jobs.finish_if_stored`).

The records live in a `JobTable`: `LmdbJobTable` here (the local store's sub-databases `jobs`,
`job_inputs` and `build_models`) or `backends.cluster_jobs.EtcdJobTable`; every change is one
atomic read-modify-write of one record. Knows nothing of gRPC, models or how memories are built.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol

from memdb.errors import Aborted, FailedPrecondition, NotFound

log = logging.getLogger(__name__)

QUEUED, CLAIMED, RUNNING = "queued", "claimed", "running"
DONE, FAILED, CANCELLED = "done", "failed", "cancelled"
STATES = (QUEUED, CLAIMED, RUNNING, DONE, FAILED, CANCELLED)
FINAL = (DONE, FAILED, CANCELLED)
MAX_ATTEMPTS = 3  # claims of one job before it fails (each lapsed lease is one)
SEEN_WRITE_S = 5.0  # a worker's poll refreshes its model's last_seen at most this often
JOB_TAG = "build_job"  # build_params key naming the job that stored a version
MAX_ID_BYTES = 128  # job and worker ids (ours are 21 characters): an LMDB key stays < 511 bytes


@dataclasses.dataclass
class JobRecord:
    job_id: str
    tenant: str
    name: str
    mode: str  # create | update
    model_fingerprint: str
    budget: int = 0
    append: bool = False
    expected_version: int = 0
    base_version: int = 0
    options: dict[str, str] = dataclasses.field(default_factory=dict)
    index_kind: str = ""
    metric: str = ""
    build_params: dict[str, str] = dataclasses.field(default_factory=dict)
    query_position: int | None = None
    prefix_chars: int = 0
    trace_count: int = 0
    state: str = QUEUED
    worker_id: str = ""
    stage: str = QUEUED
    prefix_tokens: int = 0
    tokens_prefilled: int = 0
    num_layers: int = 0
    layers_fitted: int = 0
    total_bytes: int = 0
    bytes_uploaded: int = 0
    version: int = 0
    error: str = ""
    attempts: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    lease_until: float = 0.0

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def lapsed(self, now: float) -> bool:
        return self.state in (CLAIMED, RUNNING) and self.lease_until < now


PROGRESS = ("stage", "prefix_tokens", "tokens_prefilled", "num_layers", "layers_fitted",
            "total_bytes", "bytes_uploaded")  # fmt: skip


def to_json(rec: JobRecord) -> bytes:
    return json.dumps(dataclasses.asdict(rec), sort_keys=True).encode()


def from_json(blob: bytes) -> JobRecord:
    data = json.loads(blob)
    known = {f.name for f in dataclasses.fields(JobRecord)}
    return JobRecord(**{k: v for k, v in data.items() if k in known})


def new_job_id(now: float) -> str:
    """Sortable by submission time (what "oldest queued first" scans by), then random."""
    return f"{int(now * 1000):013x}{secrets.token_hex(4)}"


# ---------------------------------------------------------------- tables


class JobTable(Protocol):
    """Where job records live; every method is atomic on its own."""

    def insert(self, rec: JobRecord, inputs: bytes) -> None: ...
    def get(self, job_id: str) -> JobRecord | None: ...
    def inputs(self, job_id: str) -> bytes: ...
    def scan(self) -> Iterator[JobRecord]: ...  # oldest first
    def update(self, job_id: str, change: Callable[[JobRecord], JobRecord]) -> JobRecord: ...
    def saw_model(self, fingerprint: str, seen: dict) -> None: ...
    def models(self) -> dict[str, dict]: ...  # fingerprint -> {"last_seen", "worker_id"}


class LmdbJobTable:
    """Job records in the local store's LMDB environment (`Store.job_table`)."""

    def __init__(
        self,
        read: Callable[[], AbstractContextManager],
        write: Callable[..., object],
        dbs: dict,
    ) -> None:
        self._read, self._write = read, write
        self._jobs, self._inputs, self._models = dbs["jobs"], dbs["job_inputs"], dbs["build_models"]

    def insert(self, rec: JobRecord, inputs: bytes) -> None:
        def put(txn) -> None:
            txn.put(rec.job_id.encode(), inputs, db=self._inputs)
            txn.put(rec.job_id.encode(), to_json(rec), db=self._jobs)

        self._write(put, len(inputs))

    def get(self, job_id: str) -> JobRecord | None:
        with self._read() as txn:
            blob = txn.get(job_id.encode(), db=self._jobs) if job_id else None
        return None if blob is None else from_json(blob)

    def inputs(self, job_id: str) -> bytes:
        with self._read() as txn:
            blob = txn.get(job_id.encode(), db=self._inputs)
        if blob is None:
            raise NotFound(f"build job {job_id!r} has no inputs")
        return blob

    def scan(self) -> Iterator[JobRecord]:
        with self._read() as txn:
            blobs = [v for _, v in txn.cursor(db=self._jobs)]
        return (from_json(b) for b in blobs)

    def update(self, job_id: str, change: Callable[[JobRecord], JobRecord]) -> JobRecord:
        def apply(txn) -> JobRecord:
            blob = txn.get(job_id.encode(), db=self._jobs)
            if blob is None:
                raise NotFound(f"build job {job_id!r} not found")
            rec = change(from_json(blob))
            txn.put(job_id.encode(), to_json(rec), db=self._jobs)
            return rec

        return self._write(apply)

    def saw_model(self, fingerprint: str, seen: dict) -> None:
        self._write(lambda txn: txn.put(fingerprint.encode(), json.dumps(seen).encode(),
                                        db=self._models))  # fmt: skip

    def models(self) -> dict[str, dict]:
        with self._read() as txn:
            return {k.decode(): json.loads(v) for k, v in txn.cursor(db=self._models)}


# ---------------------------------------------------------------- the life cycle


class Jobs:
    """The build jobs of one server (one `JobTable`); thread-safe."""

    def __init__(self, table: JobTable, *, lease_s: float, clock: Callable[[], float] = time.time):
        self.table = table
        self.lease_s = lease_s
        self._clock = clock
        self._seen_written: dict[str, float] = {}
        self._lock = threading.Lock()

    # -- tenants
    def submit(self, rec: JobRecord, inputs: bytes) -> JobRecord:
        now = self._clock()
        rec = dataclasses.replace(rec, job_id=new_job_id(now), state=QUEUED, stage=QUEUED,
                                  created_at=now, updated_at=now)  # fmt: skip
        self.table.insert(rec, inputs)
        log.info("build job %s queued: %s/%s (%s, model %s)", rec.job_id, rec.tenant, rec.name,
                 "append" if rec.append else rec.mode, rec.model_fingerprint[:16])  # fmt: skip
        return rec

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job (NotFound also when it belongs to another tenant than `tenant`)."""
        rec = self.table.get(job_id) if 0 < len(job_id.encode()) <= MAX_ID_BYTES else None
        if rec is None or (tenant is not None and rec.tenant != tenant):
            raise NotFound(f"build job {job_id!r} not found")
        return rec

    def list(self, tenant: str | None, *, include_finished: bool, limit: int) -> list[JobRecord]:
        """Newest first."""
        recs = [r for r in self.table.scan() if tenant is None or r.tenant == tenant]
        recs = [r for r in recs if include_finished or not r.final]
        return recs[::-1][:limit]

    def cancel(self, job_id: str, tenant: str | None) -> JobRecord:
        self.get(job_id, tenant)

        def cancel(rec: JobRecord) -> JobRecord:
            if rec.final:
                raise FailedPrecondition(f"build job {job_id} is already {rec.state}")
            return self._set(rec, state=CANCELLED, stage=CANCELLED, lease_until=0.0)

        rec = self.table.update(job_id, cancel)
        log.info("build job %s cancelled", job_id)
        return rec

    # -- workers
    def live_models(self, within_s: float) -> dict[str, dict]:
        """Fingerprints a worker polled for in the last `within_s` seconds."""
        now = self._clock()
        return {fp: s for fp, s in self.table.models().items()
                if now - float(s.get("last_seen", 0)) <= within_s}  # fmt: skip

    def claim(self, fingerprint: str, worker_id: str) -> JobRecord | None:
        """The oldest queued job of `fingerprint` (or one whose lease lapsed), now leased to
        `worker_id`; None if there is none."""
        now = self._clock()
        self._saw(fingerprint, worker_id, now)
        for rec in self.table.scan():
            if rec.model_fingerprint != fingerprint or not (rec.state == QUEUED or rec.lapsed(now)):
                continue
            try:
                got = self.table.update(rec.job_id, lambda r: self._take(r, worker_id, now))
            except Aborted:
                continue  # another worker (or node) took it first, or it ended
            if got.state == FAILED:
                log.warning("build job %s failed: %s", got.job_id, got.error)
                continue
            log.info("build job %s claimed by %s (attempt %d)", got.job_id, worker_id,
                     got.attempts)  # fmt: skip
            return got
        return None

    def _take(self, rec: JobRecord, worker_id: str, now: float) -> JobRecord:
        if not (rec.state == QUEUED or rec.lapsed(now)):
            raise Aborted(f"build job {rec.job_id} is {rec.state}")
        if rec.attempts >= MAX_ATTEMPTS:
            return self._set(rec, state=FAILED, stage=FAILED, lease_until=0.0,
                             error=f"{rec.attempts} workers stopped reporting on this job "
                             "(their leases lapsed); see the workers' logs")  # fmt: skip
        return self._set(rec, state=CLAIMED, stage="claimed", worker_id=worker_id,
                         attempts=rec.attempts + 1, lease_until=now + self.lease_s,
                         tokens_prefilled=0, layers_fitted=0, bytes_uploaded=0)  # fmt: skip

    def report(self, job_id: str, worker_id: str, state: str, **fields) -> JobRecord:
        """Progress (state running: a heartbeat too) or failure of the worker holding the job.
        A cancelled job is returned as is (the worker stops); Aborted if another worker holds
        it now."""

        def report(rec: JobRecord) -> JobRecord:
            if rec.state == CANCELLED:
                return rec
            self._check_holder(rec, worker_id)
            if state == FAILED:
                return self._set(
                    rec,
                    state=FAILED,
                    stage=FAILED,
                    lease_until=0.0,
                    error=fields.get("error") or "the worker gave no reason",
                )
            progress = {k: v for k, v in fields.items() if k in PROGRESS and v}
            return self._set(rec, state=RUNNING, lease_until=self._clock() + self.lease_s,
                             **progress)  # fmt: skip

        self.get(job_id)  # NotFound for an unknown (or overlong) id
        return self.table.update(job_id, report)

    def check_upload(self, job_id: str, worker_id: str) -> JobRecord:
        """The job a worker's PutPrefix (or FetchMemory) is for: held by that worker, live."""
        rec = self.get(job_id)
        if rec.state == CANCELLED:
            raise Aborted(f"build job {job_id} was cancelled; nothing is stored")
        self._check_holder(rec, worker_id)
        return rec

    def still_live(self, job_id: str) -> bool:
        rec = self.table.get(job_id)
        return rec is not None and rec.state in (CLAIMED, RUNNING)

    def finish(self, job_id: str, version: int) -> JobRecord:
        """The job's version is stored: done (final), whatever happened to the record since."""

        def done(rec: JobRecord) -> JobRecord:
            if rec.state == DONE:
                return rec
            return self._set(
                rec,
                state=DONE,
                stage=DONE,
                version=version,
                lease_until=0.0,
                error="",
                bytes_uploaded=rec.total_bytes or rec.bytes_uploaded,
            )

        rec = self.table.update(job_id, done)
        log.info("build job %s done: %s/%s version %d", job_id, rec.tenant, rec.name, version)
        return rec

    def finish_if_stored(self, rec: JobRecord, stored: dict[str, str], version: int) -> bool:
        """Mark `rec` done if the version `stored` (its build_params) is the job's own."""
        if stored.get(JOB_TAG) != rec.job_id:
            return False
        if rec.state != DONE:
            self.finish(rec.job_id, version)
        return True

    def _check_holder(self, rec: JobRecord, worker_id: str) -> None:
        if rec.final:
            raise FailedPrecondition(f"build job {rec.job_id} is already {rec.state}")
        if rec.state == QUEUED or rec.worker_id != worker_id:
            raise Aborted(
                f"build job {rec.job_id} is no longer held by worker {worker_id} (its lease "
                "lapsed and the job went back to the queue); stop building it"
            )

    def _saw(self, fingerprint: str, worker_id: str, now: float) -> None:
        with self._lock:
            if now - self._seen_written.get(fingerprint, 0.0) < SEEN_WRITE_S:
                return
            self._seen_written[fingerprint] = now
        self.table.saw_model(fingerprint, {"last_seen": now, "worker_id": worker_id})

    def _set(self, rec: JobRecord, **changes) -> JobRecord:
        return dataclasses.replace(rec, updated_at=self._clock(), **changes)
