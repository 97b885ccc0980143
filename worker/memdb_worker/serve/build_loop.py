"""The worker's build-job loop: claim the server's build jobs for this worker's model, run them.

A thread polls ClaimBuild every `poll_s` seconds with the serving model's fingerprint (that
poll is also what tells the server a worker of this model is live) and runs each job it gets
with `memdb_worker.build.job.run_job`, one at a time. Builds use their own copy of the model,
loaded on the first job (`build.local.load_model`, as `memdb-admin --local` does): the serving
model's attention is bound per forward pass by the scheduler, so a build cannot share it. A key
without the worker role turns the loop off with one warning; an unreachable server is retried.
Knows nothing of HTTP or decoding.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

from memdb.errors import MemdbError, PermissionDenied, Unauthenticated
from memdb_client import MemdbClient
from memdb_worker.build import local
from memdb_worker.build.job import run_job
from memdb_worker.serve.config import WorkerConfig

logger = logging.getLogger(__name__)


class BuildLoop:
    def __init__(
        self, config: WorkerConfig, fingerprint: str, client: Callable[[], MemdbClient]
    ) -> None:
        self.config = config
        self.fingerprint = fingerprint
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._client = client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memdb-build-jobs", daemon=True)
        self.current: str | None = None  # the job being built
        self.done = 0
        self.stopped = 0  # failed, cancelled or lost to another worker
        self.enabled = True

    def start(self) -> BuildLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def stats(self) -> dict:
        return {"enabled": self.enabled, "worker_id": self.worker_id, "current": self.current,
                "done": self.done, "stopped": self.stopped}  # fmt: skip

    def _run(self) -> None:
        client = self._client()
        try:
            while not self._stop.is_set():
                wait = self._once(client)
                if wait is None:
                    return
                self._stop.wait(wait)
        finally:
            client.close()

    def _once(self, client: MemdbClient) -> float | None:
        """Claim and run one job; the seconds to wait before the next poll (None: stop)."""
        try:
            job, lease_s = client.claim_build(self.worker_id, self.fingerprint)
        except (PermissionDenied, Unauthenticated) as exc:
            logger.warning("build jobs off: this worker's key cannot claim them (%s); create "
                           "one with `memdb-admin key create --role worker`", exc)  # fmt: skip
            self.enabled = False
            return None
        except MemdbError as exc:
            logger.info("build jobs: the server is unreachable (%s); retrying", exc)
            return self.config.reconnect_max_s
        if job is None:
            return self.config.build_poll_s
        self.current = job.job_id
        try:
            loaded = local.load_model(self.config.model, self.config.device,
                                      self.config.dtype or None, quiet=True)  # fmt: skip
            version = run_job(job, loaded, client, self.worker_id,
                              interval=min(1.0, lease_s / 3))  # fmt: skip
        except MemdbError as exc:  # the model did not load: fail the job, keep polling
            logger.warning("build job %s: %s", job.job_id, exc)
            try:
                client.report_build(job.job_id, self.worker_id, "failed", error=str(exc))
            except MemdbError:
                pass  # its lease lapses instead
            version = None
        finally:
            self.current = None
        if version is None:
            self.stopped += 1
        else:
            self.done += 1
        return 0.0
