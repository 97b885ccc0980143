"""The local build step of `memdb-admin`: load a model, build or append to a memory.

Everything here needs the worker extra (torch, transformers); `memdb_worker` is imported only
when a build runs, so the client-only install still runs every other command. Errors a person
can fix (no model there, budget too large, a memory of another model) raise `BuildError` with
one line.

Appending (`append_chunk`) uses the composability of attention states (DESIGN.md section 1):
a new chunk is encoded on its own (positions 0..n-1, like the builder's chunks) and, at every
layer, each stored entry's query gets its exact state on the chunk, which is merged with the
stored state by the online-softmax identity. The entry's query is recovered from the stored key
in every key mode: the mean pre-RoPE query `q_mean` when the memory stores it, else the key
with its whitening (stored per layer) inverted and, for `rope_common`, the common rotation
undone. Keys do not change. What an append cannot know is each entry's members: the state on
the new chunk is that of the entry's mean query (exact for `centroid` entries; for Eq. 5
`average` entries the members' own states would be Z-averaged instead), and the traces' queries
are not re-run with the new text in context (a rebuild would see it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
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
        import memdb_worker.builder  # noqa: F401
    except ImportError as exc:
        raise BuildError(
            f"building a memory needs the worker extra ({exc.name or exc} is missing): "
            "pip install 'memdb[worker]'"
        ) from None


def load_model(path: str, device: str, dtype: str | None):
    """The model and tokenizer at `path` ("default" = SmolLM2), loaded once per process."""
    require_worker()
    import torch

    from memdb_worker import model as wm

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
    from memdb_worker.model import model_fingerprint

    if id(model) not in _FINGERPRINTS:
        _FINGERPRINTS[id(model)] = model_fingerprint(model)
    return _FINGERPRINTS[id(model)]


def option_names() -> list[str]:
    """The fields of the builder's BuildOptions (for the CLI's --help and checks)."""
    require_worker()
    from memdb_worker.builder import BuildOptions

    return [f.name for f in fields(BuildOptions)]


def make_options(**kwargs):
    """BuildOptions from CLI values (None = the builder's default)."""
    require_worker()
    from memdb_worker.builder import BuildOptions

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
    from memdb_worker.builder import tokenize_prefix, tokenize_traces

    ids = tokenize_prefix(tokenizer, prefix)
    trace_ids = tokenize_traces(tokenizer, traces)
    if not trace_ids:
        raise BuildError("no calibration traces: every trace is empty")
    return Tokenized(ids, trace_ids)


def check_budget(tok: Tokenized, budget: int, options) -> int:
    """The number of calibration records the build will keep; BuildError if budget exceeds it."""
    per = options.max_tokens_per_trace
    total = sum(len(t) if per is None else min(len(t), per) for t in tok.traces)
    records = min(options.max_records, total)
    if budget < 1:
        raise BuildError("--budget must be at least 1")
    if budget > records:
        raise BuildError(
            f"budget M={budget} exceeds the {records} calibration tokens ({len(tok.traces)} "
            f"traces, {tok.trace_tokens} tokens, max_records={options.max_records}); add "
            "traces or lower --budget"
        )
    return records


def prefill_chunks(model, tokens: int, chunk_tokens: int | None) -> tuple[int, int]:
    """(number of chunks, chunk size) the prefix will be encoded in."""
    from memdb_worker.prefix import default_chunk_tokens

    size = chunk_tokens or default_chunk_tokens(model)
    return -(-tokens // size), size


def build(model, tokenizer, tok: Tokenized, budget: int, options, progress: bool):
    """Calibrate and cluster (the builder's own progress bars); returns its BuiltMemory."""
    from memdb_worker.builder import build_memory

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


# -- append --------------------------------------------------------------------------------------
@dataclass
class Appended:
    shards: list[Shard]
    metadata: dict[str, str]
    tokens: int  # tokens of the appended text
    token_count: int  # tokens of the whole prefix now
    query_position: int  # where the entries' queries were placed for the new chunk


def append_chunk(
    model,
    tokenizer,
    shards: Sequence[Shard],
    text: str | Sequence[int],
    *,
    chunk_tokens: int | None = None,
    query_position: int | None = None,
    progress: bool = True,
) -> Appended:
    """Merge every entry's state on a new prefix chunk into the stored shards (see module doc).

    `text` is text (tokenized without special tokens, like the builder's later chunks) or ids.
    `query_position`: RoPE position of the entries' queries for the new chunk; default: where
    calibration put the traces' tokens on average (the new prefix length plus half the mean
    trace length).
    """
    import torch
    from tqdm.auto import tqdm

    from memdb_worker.keys import apply_rope, undo_rope
    from memdb_worker.memory import keyspace_from_metadata
    from memdb_worker.prefix import encode_prefix
    from memdb_worker.state import State, merge_states

    if not shards:
        raise BuildError("the stored memory has no layers")
    meta = {k: v for k, v in shards[0].metadata.items() if k not in ("layer", "memdb.format")}
    try:
        ks = keyspace_from_metadata(meta, shards)
    except ValueError as exc:
        raise BuildError(f"cannot append: {exc}") from None
    cfg = model.config
    heads, kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    if (len(shards), ks.num_heads, ks.num_kv_heads, ks.head_dim) != (
        int(cfg.num_hidden_layers),
        heads,
        kv_heads,
        d,
    ):
        raise BuildError("cannot append: the memory's layers/heads do not match the model")
    if isinstance(text, str):
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    else:
        ids = [int(t) for t in text]
    if not ids:
        raise BuildError("the text to append is empty")

    with torch.inference_mode():
        new = encode_prefix(model, ids, chunk_tokens, progress=progress)
    old_chunks = json.loads(meta.get("chunk_lengths", "[]"))
    old_len = int(meta.get("prefix_length", "0"))
    prefix_length = max(old_len, new.prefix_length)
    if query_position is None:
        query_position = prefix_length + _mean_trace_offset(meta)
    rope = ks.rope
    assert rope is not None
    cos_p, sin_p = rope.cos_sin(torch.tensor(query_position))
    ng, hg = ks.num_groups, ks.heads_per_group

    def to_heads(x: torch.Tensor) -> torch.Tensor:  # [I, M, h, e] -> [1, H, M, e]
        return x.permute(0, 2, 1, 3).reshape(ng * hg, x.shape[1], x.shape[-1]).unsqueeze(0)

    def to_groups(x: torch.Tensor) -> torch.Tensor:  # [1, H, M, e] -> [I, M, h, e]
        return x[0].reshape(ng, hg, x.shape[2], x.shape[-1]).permute(0, 2, 1, 3).contiguous()

    out_shards = []
    bar = tqdm(range(len(shards)), desc="merging layers", unit="layer", disable=not progress)
    with torch.inference_mode():
        for layer in bar:
            s = shards[layer]
            q_pre = to_heads(_entry_queries(s, ks, layer, undo_rope))  # [1, H, M, d] pre-RoPE
            q_post = apply_rope(q_pre, cos_p, sin_p).to(new.keys[layer].device)
            has_kbar = "k_bar" in s.extras
            if has_kbar:
                st, kb = new.state_and_key_mean(layer, q_post)
                kb = undo_rope(kb.cpu(), cos_p, sin_p)  # the builder stores k_bar pre-RoPE
            else:
                st, kb = new.state(layer, q_post), None
            st = State(st.out.cpu(), st.lse.cpu())
            old_out = to_heads(torch.from_numpy(s.out.astype("float32")))
            old_lse = to_heads(torch.from_numpy(s.lse.astype("float32"))[..., None])[..., 0]
            if has_kbar:
                old_out = torch.cat([old_out, to_heads(torch.from_numpy(s.extras["k_bar"]))], -1)
                new_out = torch.cat([st.out, kb], dim=-1)
            else:
                new_out = st.out
            merged = merge_states(State(old_out, old_lse), State(new_out, st.lse))
            out = to_groups(merged.out)
            extras = dict(s.extras)
            if has_kbar:
                extras["k_bar"] = out[..., d:].numpy().astype(s.extras["k_bar"].dtype)
            lse = to_groups(merged.lse.unsqueeze(-1))[..., 0]
            if not (torch.isfinite(lse).all() and torch.isfinite(out).all()):
                raise BuildError(f"merging layer {layer} gave non-finite states; not uploading")
            out_shards.append(
                Shard(
                    keys=s.keys,
                    out=out[..., :d].numpy().astype(s.out.dtype),
                    lse=lse.numpy().astype("float32"),
                    extras=extras,
                    metadata={},
                )
            )
    token_count = int(meta.get("token_count", "0")) + len(ids)
    appended = json.loads(meta.get("appended_chunks", "[]")) + [len(ids)]
    meta.update(
        token_count=str(token_count),
        prefix_length=str(prefix_length),
        chunk_lengths=json.dumps(list(old_chunks) + list(new.chunk_lengths)),
        appended_chunks=json.dumps(appended),
    )
    for i, s in enumerate(out_shards):
        s.metadata = {**meta, "layer": str(i)}
    return Appended(out_shards, meta, len(ids), token_count, int(query_position))


def _entry_queries(s: Shard, ks, layer: int, undo_rope: Callable):
    """Each entry's mean pre-RoPE query [I, M, h, d] (float32)."""
    import torch

    ng, m = s.keys.shape[:2]
    hg, d = ks.heads_per_group, ks.head_dim
    if "q_mean" in s.extras:
        return torch.from_numpy(s.extras["q_mean"].astype("float32"))
    x = torch.from_numpy(s.keys.astype("float32")).reshape(ng, m, hg, d)  # grouped per head
    x = x.permute(1, 0, 2, 3).reshape(m, ng * hg, d)  # [M, H, d] key space, per head
    if ks.whiten is not None:
        w = ks.whiten[layer].double()  # key = W (x - mu)
        mu = ks.whiten_mean[layer].double() if ks.whiten_mean is not None else 0.0
        x = (torch.linalg.solve(w, x.double().permute(1, 2, 0)).permute(2, 0, 1) + mu).float()
    if ks.mode == "rope_common":
        cos, sin = ks.rope.cos_sin(torch.tensor(ks.common_position))
        x = undo_rope(x, cos, sin)
    return x.reshape(m, ng, hg, d).permute(1, 0, 2, 3).contiguous()


def _mean_trace_offset(meta: dict[str, str]) -> int:
    try:
        params = json.loads(meta.get("build_params", "{}"))
        tokens, count = float(params["trace_tokens"]), float(params["trace_count"])
    except (ValueError, KeyError, TypeError):
        return 0
    if count <= 0 or not math.isfinite(tokens / count):
        return 0
    return max(0, round((tokens / count - 1) / 2))
