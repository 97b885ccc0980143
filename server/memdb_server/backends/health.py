"""The serving health of a node, from its backend: NOT_SERVING while etcd or Redis is out of
reach, SERVING again once both answer.

`HealthMonitor(check, set_serving)` polls `check()` (e.g. `ClusterStore.healthy`) every
`period_s` on a thread and calls `set_serving(bool)` on every change (the server maps it onto
grpc.health.v1). Knows nothing of gRPC.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(
        self, check: Callable[[], bool], set_serving: Callable[[bool], None], period_s: float = 1.0
    ) -> None:
        self._check, self._set = check, set_serving
        self.serving: bool | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(period_s,), name="memdb-health", daemon=True
        )
        self._thread.start()

    def _run(self, period_s: float) -> None:
        while True:
            try:
                ok = bool(self._check())
            except Exception:  # a check that fails is an unhealthy backend
                log.exception("backend health check failed")
                ok = False
            if ok != self.serving:
                log.log(logging.INFO if ok else logging.WARNING, "backend %s",
                        "reachable: SERVING" if ok else "unreachable: NOT_SERVING")  # fmt: skip
                self.serving = ok
                self._set(ok)
            if self._stop.wait(period_s):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
