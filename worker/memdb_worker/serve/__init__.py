"""memdb_worker.serve: the inference worker process.

Owns the memory cache that follows the memdb server (`cache`), the prefix cache of full
prefixes (`prefix_cache`), the continuous-batching scheduler and its sampler (`scheduler`), the
graphed static batches (`static_batch`), the OpenAI-compatible HTTP API (`api`, `http`), the
runtime that wires them (`runtime`), its config (`config`), metrics, the `memdb-worker` CLI and
child worker processes for tests and the demo (`process`).

Knows nothing of how memories are built or of attention's math: it asks `memdb_worker.attend`
to decode with the state sources it holds, and the server for memories by name.
"""

from memdb_worker.serve.cache import MemoryCache, RemoteMemory
from memdb_worker.serve.config import WorkerConfig, load_config
from memdb_worker.serve.http import serve
from memdb_worker.serve.prefix_cache import PrefixCache
from memdb_worker.serve.process import WorkerProcess, start_worker
from memdb_worker.serve.runtime import WorkerRuntime
from memdb_worker.serve.scheduler import GenerationRequest, SamplingParams, Scheduler

__all__ = [
    "GenerationRequest", "MemoryCache", "PrefixCache", "RemoteMemory", "SamplingParams",
    "Scheduler", "WorkerConfig", "WorkerProcess", "WorkerRuntime", "load_config", "serve",
    "start_worker",
]  # fmt: skip
