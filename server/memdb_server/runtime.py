"""What every servicer of one server process shares: config, store, index cache, events, metrics,
and the bounded executor that runs blocking work (LMDB, FAISS) off the event loop.

Also the checks that several RPCs share (names, model fingerprints). Knows nothing of gRPC
transport details.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from memdb.errors import FailedPrecondition, InvalidArgument
from memdb_server.config import ServerConfig
from memdb_server.events import EventBus
from memdb_server.index import IndexCache, IndexParams
from memdb_server.metrics import ServerMetrics

if TYPE_CHECKING:
    from memdb_server.backends import Backend
    from memdb_server.build_jobs import Jobs

T = TypeVar("T")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class Runtime:
    config: ServerConfig
    store: (
        Backend  # memdb_server.storage.Store (local) or memdb_server.backends.cluster.ClusterStore
    )
    cache: IndexCache
    bus: EventBus
    metrics: ServerMetrics
    index_params: IndexParams
    executor: ThreadPoolExecutor
    started_at: float = field(default_factory=time.time)
    jobs: Jobs | None = None  # build jobs (build_jobs), on the store's job table

    async def blocking(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` in the executor, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


def check_name(name: str, what: str = "prefix name") -> str:
    if not _NAME.match(name or ""):
        raise InvalidArgument(
            f"{what} {name!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_fingerprint(expected: str, given: str, name: str) -> None:
    """Refuse a caller whose model is not the one that built the memory."""
    if not given:
        raise InvalidArgument(
            "model_fingerprint is required: send the fingerprint of the model you decode with"
        )
    if given != expected:
        raise FailedPrecondition(
            f"memory '{name}' was built for model {expected[:16]}, but the caller's model is "
            f"{given[:16]}; rebuild the memory with this model or use the model that built it"
        )
