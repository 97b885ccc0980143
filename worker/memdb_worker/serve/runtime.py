"""One worker process: the model, its memory cache, the scheduler and metrics, wired.

`WorkerRuntime.create(config)` loads the model (or takes a loaded one), computes its
fingerprint, connects the memory cache to the memdb server (it reconnects by itself) and starts
the scheduler thread. `http.serve(config)` puts it behind the HTTP API.

This module wires the parts; it knows nothing of HTTP shapes or decoding.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memdb.errors import NotFound, Unavailable
from memdb_client import MemdbClient
from memdb_worker.model.loading import LoadedModel, load_model, model_fingerprint
from memdb_worker.serve.build_loop import BuildLoop
from memdb_worker.serve.cache import MemoryCache, Source
from memdb_worker.serve.config import WorkerConfig
from memdb_worker.serve.metrics import WorkerMetrics
from memdb_worker.serve.prefix_cache import PrefixCache
from memdb_worker.serve.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    config: WorkerConfig
    model: Any
    tokenizer: Any
    fingerprint: str
    model_id: str
    cache: MemoryCache
    scheduler: Scheduler
    metrics: WorkerMetrics
    builds: BuildLoop | None  # the build-job loop (None: off, or a one-shot `generate`)
    started_at: float = field(default_factory=time.time)

    @classmethod
    def create(
        cls, config: WorkerConfig, loaded: LoadedModel | None = None, *, watch: bool = True
    ) -> WorkerRuntime:
        if config.threads:
            torch.set_num_threads(config.threads)
        t0 = time.perf_counter()
        if loaded is None:
            loaded = load_model(config.model, config.device, config.dtype or None)
        model, tokenizer = loaded
        fingerprint = model_fingerprint(model)
        logger.info("model ready in %.1f s, fingerprint %s", time.perf_counter() - t0, fingerprint)
        key = config.api_key.get_secret_value()

        def client() -> MemdbClient:
            return MemdbClient(config.server, key, tls=config.tls, timeout=30.0)

        cache = MemoryCache(
            client,
            fingerprint,
            device=config.device,
            budget_bytes=config.cache_bytes,
            mode=config.memory_mode,
            watch=watch,
            reconnect_max_s=config.reconnect_max_s,
            lookup_timeout=config.lookup_timeout_s,
        ).start()
        scheduler = Scheduler(
            model,
            tokenizer,
            max_batch=config.max_batch,
            batch_wait_s=config.batch_wait_ms / 1000,
            live_positions=config.live_positions,
            prefix_cache=PrefixCache(
                model, config.prefix_cache_bytes, min_tokens=config.prefix_cache_min_tokens
            ),
            static_live=config.static_live_tokens,
        ).start()
        metrics = WorkerMetrics(cache.stats, lambda: scheduler.stats)
        builds = BuildLoop(config, fingerprint, client).start() if (
            watch and config.build_jobs) else None  # fmt: skip
        return cls(config, model, tokenizer, fingerprint, _model_id(config), cache, scheduler,
                   metrics, builds)  # fmt: skip

    def resolve(self, name: str) -> Source:
        """The state source of memory `name` (raises memdb errors: NotFound, ...)."""
        try:
            return self.cache.get(name)
        except NotFound as exc:
            raise NotFound(
                f"memory '{name}' does not exist for this worker's tenant on the memdb server at "
                f"{self.config.server} ({exc}); list memories with `memdb-admin prefix list`"
            ) from None
        except Unavailable as exc:
            raise Unavailable(
                f"memory '{name}' is unavailable: the memdb server at {self.config.server} "
                f"cannot be reached ({exc}); requests without a memory are still served"
            ) from None

    def health(self) -> dict[str, Any]:
        c = self.cache.stats()
        return {
            "status": "ok",
            "model": self.model_id,
            "model_fingerprint": self.fingerprint,
            "device": str(self.config.device),
            "memdb_server": {"address": self.config.server, "connected": c.connected},
            "memory_mode": self.cache.mode,
            "cache": {
                "memories": self.cache.versions(),
                "bytes": c.bytes,
                "budget_bytes": c.budget_bytes,
            },
            "queued": self.scheduler.stats.queued,
            "build_jobs": self.builds.stats() if self.builds is not None else {"enabled": False},
        }

    def close(self) -> None:
        if self.builds is not None:
            self.builds.stop()
        self.scheduler.stop()
        self.cache.close()


def _model_id(config: WorkerConfig) -> str:
    if config.model_name:
        return config.model_name
    if config.model == "default":
        return "SmolLM2-135M-Instruct"
    return Path(config.model).name.removesuffix(".gguf")
