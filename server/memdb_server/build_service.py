"""The build plane: tenants submit, follow and cancel build jobs; workers claim and report them.

Every refusal a job can meet before a worker spends time on it is made at SubmitBuild: a bad
name, mode or option; a name taken (create) or free (update, append); a stale
expected_version; a model no live worker holds (a fingerprint a worker polled ClaimBuild for in
the last `build_worker_live_s` seconds, remembered across restarts); a tenant at its byte or
prefix quota. The job's record and life cycle are `build_jobs.Jobs`; its upload is an ordinary
PutPrefix (`admin_service`, header.build_job). Knows nothing of models or how memories are
built.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from memdb.build_options import BuildOptions
from memdb.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from memdb.v1 import memdb_pb2 as pb
from memdb.v1 import memdb_pb2_grpc as pb_grpc
from memdb.wire import timestamp
from memdb_server import auth
from memdb_server.build_jobs import (
    CANCELLED,
    DONE,
    FAILED,
    JOB_TAG,
    MAX_ID_BYTES,
    RUNNING,
    STATES,
    JobRecord,
    Jobs,
)
from memdb_server.records import PrefixRecord, check_metadata
from memdb_server.runtime import Runtime, check_name

log = logging.getLogger(__name__)

_STATE_PB = {s: i + 1 for i, s in enumerate(STATES)}  # BuildState values follow STATES
_PB_STATE = {v: k for k, v in _STATE_PB.items()}
_MODES = {pb.PUT_MODE_UNSPECIFIED: "create", pb.PUT_MODE_CREATE: "create",
          pb.PUT_MODE_UPDATE: "update"}  # fmt: skip
WATCH_POLL_S = 0.2  # WatchBuild reads the job this often (it may change on another node)


class BuildServicer(pb_grpc.BuildServiceServicer):
    def __init__(self, rt: Runtime, jobs: Jobs) -> None:
        self.rt = rt
        self.jobs = jobs

    # ------------------------------------------------------------ tenants
    def SubmitBuild(self, request: pb.SubmitBuildRequest, context) -> pb.BuildJob:
        tenant = auth.current().tenant
        s = request.spec
        name = check_name(s.name)
        mode = _MODES.get(s.mode)
        if mode is None:
            raise InvalidArgument("a build job's mode is CREATE or UPDATE (append: UPDATE)")
        if s.append and mode != "update":
            raise InvalidArgument("an append job updates a stored prefix: use mode UPDATE")
        current = self._current(tenant, name)
        base = self._check_target(name, mode, current, s.expected_version)
        fingerprint = self._fingerprint(name, s.model_fingerprint, current, s.append)
        self._check_inputs(s)
        self._check_quota(tenant, name, current)
        params = dict(s.build_params)
        check_metadata(fingerprint, params)
        rec = JobRecord(
            job_id="", tenant=tenant, name=name, mode=mode, model_fingerprint=fingerprint,
            budget=s.budget, append=s.append, expected_version=s.expected_version,
            base_version=base, options=dict(s.options), index_kind=s.index_kind,
            metric=s.metric, build_params=params,
            query_position=s.query_position if s.HasField("query_position") else None,
            prefix_chars=len(s.prefix_text), trace_count=len(s.traces),
        )  # fmt: skip
        inputs = json.dumps({"prefix_text": s.prefix_text, "traces": list(s.traces)}).encode()
        return job_pb(self.jobs.submit(rec, inputs))

    def _current(self, tenant: str, name: str) -> PrefixRecord | None:
        try:
            return self.rt.store.get_prefix(tenant, name)
        except NotFound:
            return None

    @staticmethod
    def _check_target(name: str, mode: str, current: PrefixRecord | None, expected: int) -> int:
        if mode == "create":
            if current is not None:
                raise AlreadyExists(
                    f"prefix '{name}' already exists (version {current.version}); submit an "
                    "update instead"
                )
            return 0
        if current is None:
            raise NotFound(f"prefix '{name}' not found; submit a create (prefix insert) first")
        if expected and expected != current.version:
            raise FailedPrecondition(
                f"prefix '{name}' is at version {current.version}, not the expected {expected}"
            )
        return current.version

    def _fingerprint(
        self, name: str, given: str, current: PrefixRecord | None, append: bool
    ) -> str:
        live = self.jobs.live_models(self.rt.config.build_worker_live_s)
        if not given and current is not None:
            given = current.model_fingerprint
        if append and current is not None and given != current.model_fingerprint:
            raise FailedPrecondition(
                f"prefix '{name}' was built with model {current.model_fingerprint[:16]}; "
                f"append with that model, not {given[:16]}"
            )
        if not given:
            if len(live) == 1:
                return next(iter(live))
            if not live:
                raise FailedPrecondition(_no_worker("any model", self.rt.config))
            raise InvalidArgument(
                "several models have live workers; name one with --model-fingerprint: "
                + ", ".join(sorted(live))
            )
        if given not in live:
            raise FailedPrecondition(_no_worker(f"model {given[:16]}", self.rt.config, live))
        return given

    @staticmethod
    def _check_inputs(s: pb.BuildSpec) -> None:
        if not s.prefix_text.strip():
            raise InvalidArgument("the build job's prefix text is empty")
        if s.append:
            return
        if s.budget < 1:
            raise InvalidArgument("the build job's budget M must be at least 1")
        if not any(t.strip() for t in s.traces):
            raise InvalidArgument("the build job has no calibration traces")
        try:
            BuildOptions.from_metadata(dict(s.options)) if s.options else BuildOptions()
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"bad build option: {exc}") from None

    def _check_quota(self, tenant: str, name: str, current: PrefixRecord | None) -> None:
        store = self.rt.store
        rec = store.get_tenant(tenant)
        count, _ = store.usage(tenant)
        if current is None and rec.max_prefixes and count >= rec.max_prefixes:
            raise ResourceExhausted(
                f"tenant '{tenant}' holds {count} of its {rec.max_prefixes} prefixes; delete "
                "one or raise the quota before building another"
            )
        allowance = store.upload_allowance(tenant, name)
        if allowance is not None and allowance <= 0:
            raise ResourceExhausted(
                f"tenant '{tenant}' has used its byte quota ({rec.max_bytes} bytes); delete "
                "prefixes or raise the quota before building"
            )

    def GetBuild(self, request: pb.GetBuildRequest, context) -> pb.BuildJob:
        return job_pb(self.jobs.get(request.job_id, _scope()))

    def ListBuilds(self, request: pb.ListBuildsRequest, context) -> pb.ListBuildsResponse:
        limit = min(request.limit or 100, 1000)
        recs = self.jobs.list(_scope(), include_finished=request.include_finished, limit=limit)
        return pb.ListBuildsResponse(jobs=[job_pb(r) for r in recs])

    def CancelBuild(self, request: pb.CancelBuildRequest, context) -> pb.BuildJob:
        return job_pb(self.jobs.cancel(request.job_id, _scope()))

    async def WatchBuild(
        self, request: pb.WatchBuildRequest, context
    ) -> AsyncIterator[pb.BuildJob]:
        """The job now, then each change, until it is final. Served on the event loop; polls
        the record (another node may hold the worker's reports)."""
        scope = _scope()
        last = None
        while True:
            rec = await self.rt.blocking(self.jobs.get, request.job_id, scope)
            if rec != last:
                yield job_pb(rec)
                last = rec
            if rec.final:
                return
            await asyncio.sleep(WATCH_POLL_S)

    # ------------------------------------------------------------ workers
    def ClaimBuild(self, request: pb.ClaimBuildRequest, context) -> pb.ClaimBuildResponse:
        if not request.worker_id or not request.model_fingerprint:
            raise InvalidArgument("ClaimBuild needs worker_id and model_fingerprint")
        check_metadata(request.model_fingerprint, {})  # it keys an LMDB record: bounded
        if len(request.worker_id.encode()) > MAX_ID_BYTES:
            raise InvalidArgument(f"worker_id is longer than {MAX_ID_BYTES} bytes")
        rec = self.jobs.claim(request.model_fingerprint, request.worker_id)
        if rec is None:
            return pb.ClaimBuildResponse(lease_s=self.jobs.lease_s)
        inputs = json.loads(self.jobs.table.inputs(rec.job_id))
        job = job_pb(rec)
        job.spec.prefix_text = inputs["prefix_text"]
        job.spec.traces.extend(inputs["traces"])
        return pb.ClaimBuildResponse(job=job, lease_s=self.jobs.lease_s)

    def ReportBuild(self, request: pb.ReportBuildRequest, context) -> pb.ReportBuildResponse:
        r = request
        state = _PB_STATE.get(r.state)
        if state not in (RUNNING, DONE, FAILED):
            raise InvalidArgument("ReportBuild's state is RUNNING, DONE or FAILED")
        if state == DONE:  # PutPrefix marked it done; this confirms (or repairs) that
            rec = self.jobs.get(r.job_id)
            if rec.state != DONE and not self._stored_by(rec, r.version):
                raise FailedPrecondition(
                    f"build job {r.job_id}: version {r.version} of '{rec.name}' was not stored "
                    "by this job; upload it with PutPrefix (header.build_job) first"
                )
            return pb.ReportBuildResponse(job=job_pb(self.jobs.get(r.job_id)))
        rec = self.jobs.report(
            r.job_id, r.worker_id, state, error=r.error, stage=r.stage,
            prefix_tokens=r.prefix_tokens, tokens_prefilled=r.tokens_prefilled,
            num_layers=r.num_layers, layers_fitted=r.layers_fitted, total_bytes=r.total_bytes,
            bytes_uploaded=r.bytes_uploaded,
        )  # fmt: skip
        if state == FAILED and rec.state == FAILED:
            log.warning("build job %s failed on %s: %s", rec.job_id, r.worker_id, rec.error)
        return pb.ReportBuildResponse(job=job_pb(rec), lease_s=self.jobs.lease_s)

    def _stored_by(self, rec: JobRecord, version: int) -> bool:
        try:
            stored = self.rt.store.get_prefix(rec.tenant, rec.name, version)
        except NotFound:
            return False
        return self.jobs.finish_if_stored(rec, stored.build_params, stored.version)


def job_upload(rt: Runtime, header: pb.PutPrefixHeader) -> JobRecord:
    """The job a worker's PutPrefix uploads (held by that worker, not cancelled); the header
    takes the job's name, mode and expected_version (the version the job saw)."""
    auth.current().require("worker", "uploading a build job's memory")
    job = rt.jobs.check_upload(header.build_job, header.build_worker)
    if header.model_fingerprint != job.model_fingerprint:
        raise InvalidArgument(
            f"build job {job.job_id} is for model {job.model_fingerprint[:16]}, the upload is "
            f"of {header.model_fingerprint[:16]}"
        )
    header.name = job.name
    header.mode = pb.PUT_MODE_CREATE if job.mode == "create" else pb.PUT_MODE_UPDATE
    header.expected_version = job.base_version
    header.build_params[JOB_TAG] = job.job_id
    return job


def job_tenant(rt: Runtime, request: pb.FetchMemoryRequest) -> str:
    """The tenant a worker's FetchMemory reads for the append job it holds: the job's."""
    auth.current().require("worker", "reading a build job's memory")
    job = rt.jobs.check_upload(request.build_job, request.build_worker)
    if not job.append or request.name != job.name:
        raise InvalidArgument(f"build job {job.job_id} appends to '{job.name}' only")
    return job.tenant


def job_writer(rt: Runtime, job: JobRecord) -> Callable[..., PrefixRecord]:
    """`write_version` for a job's upload: the job is done once its version is stored. A
    write refused because the job's own version is already there (an upload repeated after a
    reply was lost) returns that version."""

    def write(tenant: str, name: str, **kw) -> PrefixRecord:
        try:
            rec = rt.store.write_version(tenant, name, **kw)
        except (AlreadyExists, FailedPrecondition):
            current = rt.store.get_prefix(tenant, name)
            if not rt.jobs.finish_if_stored(job, current.build_params, current.version):
                raise
            return current
        rt.jobs.finish(job.job_id, rec.version)
        return rec

    return write


def _scope() -> str | None:
    """The tenant whose jobs the caller sees: its own (root: every tenant's)."""
    p = auth.current()
    return None if p.is_root else p.tenant


def _no_worker(what: str, config, live: dict | None = None) -> str:
    held = f" (live workers hold: {', '.join(f[:16] for f in sorted(live))})" if live else ""
    return (
        f"no worker holding {what} has polled for build jobs in the last "
        f"{config.build_worker_live_s:g} s{held}; start `memdb-worker` with a worker key "
        "(`memdb-admin key create --role worker`) or build with --local"
    )


def job_pb(rec: JobRecord) -> pb.BuildJob:
    """A job record as the wire's BuildJob (without the prefix text and traces)."""
    spec = pb.BuildSpec(
        name=rec.name, mode=pb.PUT_MODE_CREATE if rec.mode == "create" else pb.PUT_MODE_UPDATE,
        append=rec.append, expected_version=rec.expected_version, options=rec.options,
        budget=rec.budget, model_fingerprint=rec.model_fingerprint, index_kind=rec.index_kind,
        metric=rec.metric, build_params=rec.build_params,
    )  # fmt: skip
    if rec.query_position is not None:
        spec.query_position = rec.query_position
    job = pb.BuildJob(
        job_id=rec.job_id, tenant=rec.tenant, spec=spec, state=_STATE_PB[rec.state],
        base_version=rec.base_version, worker_id=rec.worker_id, stage=rec.stage,
        prefix_tokens=rec.prefix_tokens, tokens_prefilled=rec.tokens_prefilled,
        num_layers=rec.num_layers, layers_fitted=rec.layers_fitted, total_bytes=rec.total_bytes,
        bytes_uploaded=rec.bytes_uploaded, version=rec.version, error=rec.error,
        attempts=rec.attempts, created_at=timestamp(rec.created_at),
        updated_at=timestamp(rec.updated_at), prefix_chars=rec.prefix_chars,
        trace_count=rec.trace_count,
    )  # fmt: skip
    if rec.lease_until and rec.state not in (DONE, FAILED, CANCELLED):
        job.lease_until.CopyFrom(timestamp(rec.lease_until))
    return job
