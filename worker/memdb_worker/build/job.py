"""One build job on this machine: build (or append to) the memory a claimed job names, upload it
as the job's version, and report on the way.

The build is `local`'s, the path `memdb-admin prefix insert --local` takes (tokenize, check the
budget, calibrate, fit), with the builder's `on_progress` hooked to a `Heartbeat`: a thread that
reports the latest progress to the server every `interval` seconds (which also extends the
job's lease) and notices a cancelled or lost job, which stops the build at its next progress
step. The upload is the ordinary PutPrefix with header.build_job: the server writes it with the
job's expected version and marks the job done. Errors a person can fix (a budget the traces
cannot fill, text a memory cannot take, a stale version) fail the job with their one line.
Knows nothing of the job loop or of serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from memdb.build_options import BuildOptions
from memdb.errors import Aborted, Cancelled, FailedPrecondition, MemdbError
from memdb.shards import encode_shard, holds_fitted_rows
from memdb_client import MemdbClient
from memdb_client.build import server_params
from memdb_client.build_jobs import BuildJob
from memdb_worker.build import local

logger = logging.getLogger(__name__)


class Heartbeat:
    """Reports a job's progress every `interval` s from its own thread; a context manager.

    `update(**fields)` (the builder's `on_progress`) records progress (a new stage is reported
    at once) and raises Cancelled once the job was cancelled, or Aborted once another worker
    holds it."""

    def __init__(self, client: MemdbClient, job: BuildJob, worker_id: str, interval: float):
        self._client, self._job, self._worker = client, job, worker_id
        self._interval = interval
        self._fields: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ended: MemdbError | None = None
        self._thread = threading.Thread(target=self._run, name="memdb-build-heartbeat",
                                        daemon=True)  # fmt: skip

    def __enter__(self) -> Heartbeat:
        self._send()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def update(self, **fields: Any) -> None:
        with self._lock:
            new_stage = fields.get("stage", self._fields.get("stage")) != self._fields.get("stage")
            self._fields.update(fields)
        if new_stage:  # a stage's first report goes out now (short builds end between beats)
            self._send()
        self.check()

    def add_bytes(self, n: int) -> None:  # gRPC's sending thread: never raises
        with self._lock:
            self._fields["bytes_uploaded"] = self._fields.get("bytes_uploaded", 0) + n

    def check(self) -> None:
        if self._ended is not None:
            raise self._ended

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._send()

    def _send(self) -> None:
        with self._lock:
            fields = dict(self._fields)
        try:
            got = self._client.report_build(self._job.job_id, self._worker, "running", **fields)
        except (Aborted, FailedPrecondition) as exc:  # another worker holds it, or it ended
            self._ended = Aborted(str(exc))
            self._stop.set()
            return
        except MemdbError as exc:  # the server is away: the lease may lapse, keep building
            logger.warning("build job %s: report failed: %s", self._job.job_id, exc)
            return
        if got.state == "cancelled":
            self._ended = Cancelled(f"build job {self._job.job_id} was cancelled")
            self._stop.set()


def run_job(
    job: BuildJob,
    loaded,
    client: MemdbClient,
    worker_id: str,
    *,
    interval: float = 1.0,
    progress: bool = False,
) -> int | None:
    """Build, upload and finish `job` (claimed by `worker_id`) with the model `loaded`; returns
    the version stored, or None if the job was cancelled, lost to another worker, or failed
    (reported to the server with its reason)."""
    try:
        with Heartbeat(client, job, worker_id, interval) as beat:
            make = _append if job.spec.append else _build
            blobs, fields = make(job, loaded, client, worker_id, beat.update, progress)
            beat.update(stage="upload", total_bytes=sum(len(b) for b in blobs))
            info = client.put_prefix(
                job.spec.name, blobs, on_bytes=beat.add_bytes, mode=job.spec.mode,
                expected_version=job.base_version, build_job=(job.job_id, worker_id),
                index_kind=job.spec.index_kind, metric=job.spec.metric, **fields,
            )  # fmt: skip
    except (Cancelled, Aborted) as exc:
        logger.info("build job %s stopped: %s", job.job_id, exc)
        return None
    except (MemdbError, ValueError) as exc:
        _fail(client, job, worker_id, str(exc))
        return None
    except Exception as exc:  # a bug or an OOM: the job fails, the worker lives on
        logger.exception("build job %s failed", job.job_id)
        _fail(client, job, worker_id, f"the worker failed: {type(exc).__name__}: {exc}")
        return None
    _confirm(client, job, worker_id, info.version)
    logger.info("build job %s done: '%s' version %d", job.job_id, job.spec.name, info.version)
    return info.version


def _options(spec) -> BuildOptions:
    """The job's options ({}: the defaults)."""
    return BuildOptions.from_metadata(spec.options) if spec.options else BuildOptions()


def _build(job: BuildJob, loaded, client, worker_id, report: Callable, progress: bool):
    spec = job.spec
    options = _options(spec)
    tok = local.tokenize(loaded.tokenizer, spec.prefix_text, spec.traces)
    report(stage="prefill", prefix_tokens=len(tok.prefix))
    local.check_budget(tok, spec.budget, options)
    built = local.build(loaded.model, loaded.tokenizer, tok, spec.budget, options, progress,
                        on_progress=report)  # fmt: skip
    params = server_params(built.metadata, {**spec.build_params, "built_by": f"worker {worker_id}"})
    blobs = [encode_shard(s) for s in built.shards]
    fields = {"model_fingerprint": local.fingerprint(loaded.model),
              "token_count": built.token_count, "build_params": params}  # fmt: skip
    return blobs, fields


def _append(job: BuildJob, loaded, client: MemdbClient, worker_id, report: Callable, progress):
    spec = job.spec
    fp = local.fingerprint(loaded.model)
    mem = client.fetch_memory(spec.name, model_fingerprint=fp, version=job.base_version,
                              build_job=(job.job_id, worker_id))  # fmt: skip
    report(stage="prefill", num_layers=len(mem.shards))
    res = local.append_chunk(loaded.model, loaded.tokenizer, mem.shards, spec.prefix_text,
                             chunk_tokens=_options(spec).chunk_tokens,
                             query_position=spec.query_position, progress=progress)  # fmt: skip
    report(stage="merged", tokens_prefilled=res.tokens, layers_fitted=len(res.shards))
    params = dict(mem.info.build_params)
    params.update(server_params(res.metadata, {}))
    for k in ("calibration_records", "trace_count", "trace_tokens"):  # the original values
        if k in mem.info.build_params:
            params[k] = mem.info.build_params[k]
    source = spec.build_params.get("source", "")
    sources = [s for s in [params.get("appended_sources", ""), source] if s]
    params["appended_sources"] = ", ".join(sources)[-4096:]
    how = "rows" if holds_fitted_rows(res.metadata) else "merged states"
    logger.info("build job %s: appended %d tokens as %s", job.job_id, res.tokens, how)
    fields = {"model_fingerprint": fp, "token_count": res.token_count, "build_params": params}
    return [encode_shard(s) for s in res.shards], fields


def _fail(client: MemdbClient, job: BuildJob, worker_id: str, error: str) -> None:
    logger.warning("build job %s failed: %s", job.job_id, error)
    try:
        client.report_build(job.job_id, worker_id, "failed", error=error[:4000])
    except MemdbError as exc:
        logger.warning("build job %s: could not report its failure: %s", job.job_id, exc)


def _confirm(client: MemdbClient, job: BuildJob, worker_id: str, version: int) -> None:
    try:
        client.report_build(job.job_id, worker_id, "done", version=version)
    except MemdbError as exc:  # the upload already made it done
        logger.info("build job %s: done report not taken: %s", job.job_id, exc)
