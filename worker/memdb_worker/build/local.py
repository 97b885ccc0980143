"""The local build of `memdb-admin`: load a model, build or append to a memory on this machine.

The client finds this module through the entry point group `memdb.builders` (name "local",
pyproject.toml), so `memdb_client` imports nothing of the worker: without the worker extra the
entry point fails to load and the CLI says what to install. Models load once per process.
Errors a person can fix (no model there, budget too large, text a memory cannot take) raise
`memdb.errors.BuildError` with one line.

Appending is `append.append_chunk` (the composability of attention states).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memdb.build_options import BuildOptions
from memdb.errors import BuildError
from memdb.shards import Shard
from memdb_worker.build.append import Appended
from memdb_worker.build.append import append_chunk as _append
from memdb_worker.build.builder import BuiltMemory, build_memory
from memdb_worker.build.calibration import tokenize_prefix, tokenize_traces
from memdb_worker.build.heldout import split_traces
from memdb_worker.model import loading
from memdb_worker.model.prefix import default_chunk_tokens

_MODELS: dict[tuple[str, str, str], Any] = {}  # (path, device, dtype) -> LoadedModel
_FINGERPRINTS: dict[int, str] = {}


def load_model(path: str, device: str, dtype: str | None, quiet: bool = False):
    """The model and tokenizer at `path` ("default" = SmolLM2), loaded once per process;
    `quiet`: no transformers warnings or progress bars."""
    if quiet:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BuildError(f"--device {device}: CUDA is not available on this machine; use cpu")
    key = (path, device, dtype or "auto")
    if key not in _MODELS:
        try:
            _MODELS[key] = loading.load_model(path, device=device, dtype=dtype)
        except (FileNotFoundError, ValueError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BuildError(f"cannot load model '{path}': {first}") from None
    return _MODELS[key]


def set_threads(n: int) -> None:
    """CPU threads of torch and of FAISS (k-means) in this process."""
    import faiss

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def fingerprint(model) -> str:
    """The model's fingerprint (computed once per model)."""
    if id(model) not in _FINGERPRINTS:
        _FINGERPRINTS[id(model)] = loading.model_fingerprint(model)
    return _FINGERPRINTS[id(model)]


@dataclass
class Tokenized:
    prefix: list[int]
    traces: list[list[int]]

    @property
    def trace_tokens(self) -> int:
        return sum(len(t) for t in self.traces)


def tokenize(tokenizer, prefix: str, traces: Sequence[str]) -> Tokenized:
    """The prefix's and the calibration traces' token ids; BuildError if no trace has any."""
    ids = tokenize_prefix(tokenizer, prefix)
    trace_ids = tokenize_traces(tokenizer, traces)
    if not trace_ids:
        raise BuildError("no calibration traces: every trace is empty")
    return Tokenized(ids, trace_ids)


def check_budget(tok: Tokenized, budget: int, options: BuildOptions) -> int:
    """The number of calibration records the build will keep; BuildError if budget exceeds it
    (the records, or for fitted entries the prefix's tokens). Checked before the model runs."""
    per = options.max_tokens_per_trace
    fit, _ = split_traces(tok.traces, options.holdout, options.seed)  # held-out ones: not fit
    total = sum(len(t) if per is None else min(len(t), per) for t in fit)
    records = min(options.max_records, total)
    if budget < 1:
        raise BuildError("--budget must be at least 1")
    if options.fitted and budget > len(tok.prefix):
        raise BuildError(
            f"budget M={budget} exceeds the prefix's {len(tok.prefix)} tokens: fitted entries are "
            "at most one row per prefix token; lower --budget"
        )
    if budget > records and not options.fitted:
        raise BuildError(
            f"budget M={budget} exceeds the {records} calibration tokens ({len(fit)} fitted "
            f"traces of {len(tok.traces)}, {tok.trace_tokens} tokens, max_records="
            f"{options.max_records}); add traces or lower --budget"
        )
    return records


def prefill_chunks(
    model, tokens: int, chunk_tokens: int | None, sink_tokens: int = 0
) -> tuple[int, int]:
    """(number of chunks, chunk size) the prefix will be encoded in (as `encode_prefix`)."""
    size = chunk_tokens or default_chunk_tokens(model)
    if tokens <= size:
        return 1, size
    return -(-tokens // (size - min(sink_tokens, size // 2))), size


def build(
    model,
    tokenizer,
    tok: Tokenized,
    budget: int,
    options: BuildOptions,
    progress: bool,
    on_progress: Callable[..., None] | None = None,
) -> BuiltMemory:
    """Calibrate and cluster or fit (the builder's own progress bars; `on_progress(**fields)`:
    a build job's reports, see `build_memory`)."""
    try:
        return build_memory(model, tokenizer, tok.prefix, tok.traces, budget, options, progress,
                            on_progress)  # fmt: skip
    except ValueError as exc:
        raise BuildError(str(exc)) from None


def append_chunk(model, tokenizer, shards: Sequence[Shard], text, **kwargs) -> Appended:
    """`append.append_chunk`, with its errors as BuildError (one line)."""
    try:
        return _append(model, tokenizer, shards, text, **kwargs)
    except ValueError as exc:
        raise BuildError(f"cannot append: {exc}") from None
