"""The local build step of `memdb-admin`: load a model, build or append to a memory.

Everything here needs the worker extra (torch, transformers); `memdb_worker` is imported only
when a build runs, so the client-only install still runs every other command. Errors a person
can fix (no model there, budget too large, a memory of another model) raise `BuildError` with
one line.

Appending is `memdb_worker.build.append.append_chunk` (the composability of attention states).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from memdb.shards import Shard


class BuildError(Exception):
    """A build cannot run or failed for a reason the user can fix (one line)."""


_MODELS: dict[tuple[str, str, str], Any] = {}  # (path, device, dtype) -> LoadedModel
_FINGERPRINTS: dict[int, str] = {}


def require_worker() -> None:
    """Import the worker (torch, transformers); BuildError if the extra is not installed."""
    try:
        import memdb_worker.build.builder  # noqa: F401
    except ImportError as exc:
        raise BuildError(
            f"building a memory needs the worker extra ({exc.name or exc} is missing): "
            "pip install 'memdb[worker]'"
        ) from None


def load_model(path: str, device: str, dtype: str | None):
    """The model and tokenizer at `path` ("default" = SmolLM2), loaded once per process."""
    require_worker()
    import torch

    from memdb_worker.model import loading as wm

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BuildError(f"--device {device}: CUDA is not available on this machine; use cpu")
    key = (path, device, dtype or "auto")
    if key not in _MODELS:
        try:
            _MODELS[key] = wm.load_model(path, device=device, dtype=dtype)
        except (FileNotFoundError, ValueError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BuildError(f"cannot load model '{path}': {first}") from None
    return _MODELS[key]


def set_threads(n: int) -> None:
    """CPU threads of torch and of FAISS (k-means) in this process."""
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def fingerprint(model) -> str:
    from memdb_worker.model.loading import model_fingerprint

    if id(model) not in _FINGERPRINTS:
        _FINGERPRINTS[id(model)] = model_fingerprint(model)
    return _FINGERPRINTS[id(model)]


def option_names() -> list[str]:
    """The fields of the builder's BuildOptions (for the CLI's --help and checks)."""
    require_worker()
    from memdb_worker.build.builder import BuildOptions

    return [f.name for f in fields(BuildOptions)]


def make_options(**kwargs):
    """BuildOptions from CLI values (None = the builder's default)."""
    require_worker()
    from memdb_worker.build.builder import BuildOptions

    given = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return BuildOptions(**given)
    except (TypeError, ValueError) as exc:
        raise BuildError(f"bad build option: {exc}") from None


@dataclass
class Tokenized:
    prefix: list[int]
    traces: list[list[int]]

    @property
    def trace_tokens(self) -> int:
        return sum(len(t) for t in self.traces)


def tokenize(tokenizer, prefix: str, traces: Sequence[str]) -> Tokenized:
    from memdb_worker.build.builder import tokenize_prefix, tokenize_traces

    ids = tokenize_prefix(tokenizer, prefix)
    trace_ids = tokenize_traces(tokenizer, traces)
    if not trace_ids:
        raise BuildError("no calibration traces: every trace is empty")
    return Tokenized(ids, trace_ids)


def check_budget(tok: Tokenized, budget: int, options) -> int:
    """The number of calibration records the build will keep; BuildError if budget exceeds it
    (the records, or for fitted entries the prefix's tokens)."""
    per = options.max_tokens_per_trace
    total = sum(len(t) if per is None else min(len(t), per) for t in tok.traces)
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
            f"budget M={budget} exceeds the {records} calibration tokens ({len(tok.traces)} "
            f"traces, {tok.trace_tokens} tokens, max_records={options.max_records}); add "
            "traces or lower --budget"
        )
    return records


def prefill_chunks(
    model, tokens: int, chunk_tokens: int | None, sink_tokens: int = 0
) -> tuple[int, int]:
    """(number of chunks, chunk size) the prefix will be encoded in (as `encode_prefix`)."""
    from memdb_worker.model.prefix import default_chunk_tokens

    size = chunk_tokens or default_chunk_tokens(model)
    if tokens <= size:
        return 1, size
    return -(-tokens // (size - min(sink_tokens, size // 2))), size


def build(model, tokenizer, tok: Tokenized, budget: int, options, progress: bool):
    """Calibrate and cluster (the builder's own progress bars); returns its BuiltMemory."""
    from memdb_worker.build.builder import build_memory

    try:
        return build_memory(model, tokenizer, tok.prefix, tok.traces, budget, options, progress)
    except ValueError as exc:
        raise BuildError(str(exc)) from None


def server_params(metadata: dict[str, str], extra: dict[str, Any]) -> dict[str, str]:
    """The build parameters stored on the server: the builder's options and key space, the
    prefix layout and where the inputs came from (flat strings, each at most 4096 chars)."""
    out: dict[str, str] = {}
    try:
        opts = json.loads(metadata.get("build_params", "{}"))
    except ValueError:
        opts = {}
    for k, v in opts.items():
        out[k] = v if isinstance(v, str) else json.dumps(v)
    for k in (
        "key_mode",
        "granularity",
        "common_position",
        "whiten",
        "entry_state",
        "lse_correction",
        "budget",
        "prefix_length",
        "token_count",
        "chunk_lengths",
        "scaling",
        "appended_chunks",
    ):
        if k in metadata:
            out[k] = metadata[k]
    for k, v in extra.items():
        if v is not None:
            out[k] = v if isinstance(v, str) else json.dumps(v)
    return {k[:256]: v[:4096] for k, v in out.items()}


def append_chunk(model, tokenizer, shards: Sequence[Shard], text, **kwargs):
    """The worker's `append.append_chunk`, with its errors as BuildError (one line)."""
    require_worker()
    from memdb_worker.build.append import append_chunk as _append

    try:
        return _append(model, tokenizer, shards, text, **kwargs)
    except ValueError as exc:
        raise BuildError(f"cannot append: {exc}") from None
