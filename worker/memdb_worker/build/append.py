"""Appending text to a built memory without rebuilding it.

Appending (`append_chunk`) uses the composability of attention states (DESIGN.md section 1): a
new chunk is encoded after the prefix's sink tokens (its first tokens, stored in the metadata as
`sink_ids`; see prefix.py) and, while the whole prefix still fits the model's context, at its
true positions (right after the stored prefix, so the new text has the same distances to the
live tokens as in a rebuilt prefix; past the context it restarts after the sink, like the
builder's later chunks). Then, at every layer, each stored entry's query gets its exact state on
the chunk, which is merged with the stored state by the online-softmax identity. Keys do not
change.

The entry's per-head query comes from what is stored: the mean pre-RoPE query `q_mean` when the
memory stores it (lse_correction builds: exact), else the key, dequantized (float8 keys times
their key_scale), its whitening (stored per layer) inverted and, for `rope_common`, the common
rotation undone (exact up to the key's dtype). A group-mean key (group_key "mean", the default
format "kv_group_mean" without lse_correction) holds only the mean over a KV group's heads of
their queries: there each head's query is *estimated* from it (`head_queries`: a ridge
regression of each head's query on its group's mean query, fitted on the appended text's own
queries while it is encoded; the estimates average to the stored key exactly). The state on the
new chunk is then that of an estimated query, an error the other formats do not have
(bench/results/append_default_cpu.json: append against a rebuild in the default format).
Whitened group-mean keys (one whitening per head, averaged) are refused.

What an append cannot know in any format is each entry's members: the state on the new chunk is
that of the entry's mean query (exact for `centroid` entries; for Eq. 5 `average` entries the
members' own states would be Z-averaged instead), and the traces' queries are not re-run with
the new text in context (a rebuild would see it).

A memory of fitted rows (entry_state "fitted", `fitted`) takes the new chunk's own keys and
values as extra rows (bias 0): exact for the chunk, M grows by its length (`_append_rows`).

Chunk mass (prefix.py): with the chunks' mass summed the new text's states simply merge in.
Averaged (`chunk_mass="mean"`, the memory's `log_mass` = -log C), text that continues at its
true positions weighs as the chunk it continues, and text that restarts past the context adds
chunks, every chunk then weighing 1/(C + new): the stored lse (or fitted biases) and the new
text's are shifted as a rebuild from the whole prefix would weigh them (`chunk_weights`).

Knows nothing of servers or files: it maps stored shards and new text to new shards.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from memdb.build_options import BuildOptions, build_params
from memdb.shards import Shard, holds_fitted_rows
from memdb_worker.attend.attention import bind
from memdb_worker.memory.formats import quantize_keys, to_numpy
from memdb_worker.memory.head_queries import HeadQueryFit, QueryStats
from memdb_worker.memory.keys import KeySpace, apply_rope, rope_transpose, undo_rope
from memdb_worker.memory.memory import group_key_of, keyspace_from_metadata
from memdb_worker.memory.state import State, merge_states
from memdb_worker.model.prefix import (
    PrefixKV,
    default_chunk_tokens,
    encode_chunk,
    encode_prefix,
)


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
    if not shards:
        raise ValueError("the stored memory has no layers")
    meta = {k: v for k, v in shards[0].metadata.items() if k not in ("layer", "memdb.format")}
    ks = keyspace_from_metadata(meta, shards)
    cfg = model.config
    heads, kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    if (len(shards), ks.num_heads, ks.num_kv_heads, ks.head_dim) != (
        int(cfg.num_hidden_layers),
        heads,
        kv_heads,
        d,
    ):
        raise ValueError("cannot append: the memory's layers/heads do not match the model")
    if isinstance(text, str):
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    else:
        ids = [int(t) for t in text]
    if not ids:
        raise ValueError("the text to append is empty")

    if holds_fitted_rows(meta):
        return _append_rows(model, shards, ids, meta, chunk_tokens, progress)

    stats = None  # group-mean keys: the new text's queries fit each head's entry query
    if group_key_of(meta, ks) == "mean" and "q_mean" not in shards[0].extras:
        if ks.whiten is not None:
            raise ValueError(
                "appending to whitened group-mean keys without q_mean is not supported: rebuild "
                "the memory from the whole prefix (or build it with lse_correction)"
            )
        stats = QueryStats(len(shards), kv_heads, ks.heads_per_group, d)

    old_len = int(meta.get("prefix_length", "0"))
    sink = json.loads(meta.get("sink_ids", "[]"))
    with bind(model, stats, live_positions="zero") if stats else nullcontext():
        new, restarted = _encode_new(model, ids, sink, old_len, chunk_tokens, progress)
    old_shift, new_shift, log_mass = chunk_weights(meta, restarted, len(new.chunk_lengths))
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
            fit = stats.fit(layer) if stats is not None else None
            q_pre = to_heads(entry_queries(s, ks, layer, fit))  # [1, H, M, d] pre-RoPE
            q_post = apply_rope(q_pre, cos_p, sin_p).to(new.keys[layer].device)
            has_kbar = "k_bar" in s.extras
            if has_kbar:
                st, kb = new.state_and_key_mean(layer, q_post)
                kb = rope_transpose(kb.cpu(), cos_p, sin_p)  # as the builder stores k_bar
            else:
                st, kb = new.state(layer, q_post), None
            st = State(st.out.cpu(), st.lse.cpu())
            old_out = to_heads(torch.from_numpy(s.out.astype("float32")))
            old_lse = to_heads(torch.from_numpy(s.lse.astype("float32"))[..., None])[..., 0]
            if has_kbar:
                kb_old = torch.from_numpy(s.extras["k_bar"].astype("float32"))
                old_out = torch.cat([old_out, to_heads(kb_old)], -1)
                new_out = torch.cat([st.out, kb], dim=-1)
            else:
                new_out = st.out
            merged = merge_states(
                State(old_out, old_lse + old_shift), State(new_out, st.lse + new_shift)
            )
            out = to_groups(merged.out)
            extras = dict(s.extras)
            if has_kbar:
                extras["k_bar"] = out[..., d:].numpy().astype(s.extras["k_bar"].dtype)
            lse = to_groups(merged.lse.unsqueeze(-1))[..., 0]
            if not (torch.isfinite(lse).all() and torch.isfinite(out).all()):
                raise ValueError(f"merging layer {layer} gave non-finite states; not uploading")
            out_shards.append(
                Shard(
                    keys=s.keys,
                    out=out[..., :d].numpy().astype(s.out.dtype),
                    lse=lse.numpy().astype("float32"),
                    extras=extras,
                    metadata={},
                    key_scale=s.key_scale,  # the keys are kept: float8 keys keep their scale
                )
            )
    return _appended(out_shards, meta, new, len(ids), int(query_position), log_mass)


def _append_rows(
    model,
    shards: Sequence[Shard],
    ids: list[int],
    meta: dict[str, str],
    chunk_tokens: int | None,
    progress: bool,
) -> Appended:
    """A fitted memory (entry_state "fitted") plus a chunk: its rows and the chunk's own keys
    and values (bias 0), so attention over them is the exact merge of the fitted prefix and the
    chunk. The chunk is kept whole (M grows by its tokens); a rebuild fits it down."""
    old_len = int(meta.get("prefix_length", "0"))
    sink = json.loads(meta.get("sink_ids", "[]"))
    new, restarted = _encode_new(model, ids, sink, old_len, chunk_tokens, progress)
    old_shift, new_shift, log_mass = chunk_weights(meta, restarted, len(new.chunk_lengths))
    out_shards = []
    for layer, s in enumerate(shards):
        keys, scale = quantize_keys(new.keys[layer][0].float().cpu(), s.keys.dtype.name)
        values = new.values[layer][0].cpu().unsqueeze(2)  # [Hkv, n, 1, d]
        values = values.to(getattr(torch, s.values.dtype.name))  # the stored values' dtype
        key_scale = None
        if scale is not None:
            key_scale = np.concatenate([s.key_scale, to_numpy(scale)], axis=1)
        out_shards.append(
            Shard.of_rows(
                keys=np.concatenate([s.keys, to_numpy(keys)], axis=1),
                values=np.concatenate([s.values, to_numpy(values)], axis=1),
                bias=np.concatenate(
                    [
                        s.bias + np.float32(old_shift),
                        np.full(values.shape[:3], new_shift, np.float32),
                    ],
                    axis=1,
                ),
                key_scale=key_scale,
            )
        )
    return _appended(out_shards, meta, new, len(ids), max(old_len, new.prefix_length), log_mass)


def chunk_weights(
    meta: dict[str, str], restarted: bool, new_chunks: int
) -> tuple[float, float, float]:
    """(old shift, new shift, log_mass after) of the lse of the stored states and of the new
    text's, for the memory's chunk mass (prefix.py). Summed: nothing moves. Averaged over C
    chunks (log_mass = -log C): text that continues a chunk at its true positions weighs as
    that chunk, 1/C; text that restarts adds `new_chunks` chunks, and every chunk weighs
    1/(C + new_chunks), as a rebuild from the whole prefix would weigh them."""
    log_mass = float(meta.get("log_mass", "0"))
    if BuildOptions.from_metadata(meta).chunk_mass != "mean":
        return 0.0, 0.0, log_mass
    if not restarted:
        return 0.0, log_mass, log_mass
    old = round(math.exp(-log_mass))
    total = old + new_chunks
    return math.log(old / total), -math.log(total), -math.log(total)


def _appended(
    shards: list[Shard],
    meta: dict[str, str],
    new: PrefixKV,
    tokens: int,
    query_position: int,
    log_mass: float,
) -> Appended:
    """The new shards with the memory's metadata after appending `new` (`tokens` tokens): its
    budget, token count, live position, chunks and appended chunks; one copy per layer."""
    token_count = int(meta.get("token_count", "0")) + tokens
    chunks = json.loads(meta.get("chunk_lengths", "[]")) + list(new.chunk_lengths)
    meta.update(
        budget=str(shards[0].keys.shape[1]),
        token_count=str(token_count),
        prefix_length=str(max(int(meta.get("prefix_length", "0")), new.prefix_length)),
        chunk_lengths=json.dumps(chunks),
        appended_chunks=json.dumps(json.loads(meta.get("appended_chunks", "[]")) + [tokens]),
        log_mass=repr(float(log_mass)),
    )
    for i, s in enumerate(shards):
        s.metadata = {**meta, "layer": str(i)}
    return Appended(shards, meta, tokens, token_count, query_position)


def _encode_new(
    model, ids: list[int], sink: list[int], start: int, chunk_tokens: int | None, progress: bool
) -> tuple[PrefixKV, bool]:
    """The new text's keys/values: at its true positions after the stored prefix when it fits
    `chunk_tokens` (default: the context minus the live reserve), else chunked after the sink;
    and whether it restarted (new chunks) rather than continuing at its true positions."""
    limit = chunk_tokens or default_chunk_tokens(model)
    with torch.inference_mode():
        if start + len(ids) <= limit and start >= len(sink):
            return encode_chunk(model, ids, sink, start), False
        restart = encode_prefix(model, sink + ids, chunk_tokens, progress, sink_tokens=len(sink))
    # drop the sink tokens, which lead the first chunk
    s = len(sink)
    return PrefixKV(
        keys=[k[:, :, s:] for k in restart.keys],
        values=[v[:, :, s:] for v in restart.values],
        scaling=restart.scaling,
        prefix_length=restart.prefix_length,
        token_count=len(ids),
        chunk_lengths=(restart.chunk_lengths[0] - s, *restart.chunk_lengths[1:]),
    ), True


def entry_queries(
    s: Shard, ks: KeySpace, layer: int, fit: HeadQueryFit | None = None
) -> torch.Tensor:
    """Each entry's mean pre-RoPE query [I, M, h, d] (float32): the stored q_mean, else from the
    key (module doc); group-mean keys need `fit`, which estimates each head's query."""
    if "q_mean" in s.extras:
        return torch.from_numpy(s.extras["q_mean"].astype("float32"))
    ng, m, dk = s.keys.shape
    hg, d = ks.heads_per_group, ks.head_dim
    hk = dk // d  # heads per key: h side by side, or 1 for a group-mean key
    x = torch.from_numpy(s.keys.astype("float32"))  # [I, M, Dk]
    if s.key_scale is not None:  # float8: the key is keys * key_scale (memory.MemoryLayer)
        x = x * torch.from_numpy(s.key_scale.astype("float32")).unsqueeze(-1)
    x = x.reshape(ng, m, hk, d).permute(1, 0, 2, 3).reshape(m, ng * hk, d)  # [M, I * hk, d]
    if ks.whiten is not None:
        if hk != hg:
            raise ValueError("whitened group-mean keys cannot be turned back into queries")
        w = ks.whiten[layer].double()  # key = W (x - mu)
        mu = ks.whiten_mean[layer].double() if ks.whiten_mean is not None else 0.0
        x = (torch.linalg.solve(w, x.double().permute(1, 2, 0)).permute(2, 0, 1) + mu).float()
    if ks.mode == "rope_common":
        cos, sin = ks.rope.cos_sin(torch.tensor(ks.common_position))
        x = undo_rope(x, cos, sin)
    x = x.reshape(m, ng, hk, d).permute(1, 0, 2, 3).contiguous()  # [I, M, hk, d]
    if hk == hg:
        return x
    if fit is None:
        raise ValueError("a group-mean key holds no per-head query: pass the fit (head_queries)")
    return fit.head_queries(x[:, :, 0])


def _mean_trace_offset(meta: dict[str, str]) -> int:
    try:
        params = build_params(meta)
        tokens, count = float(params["trace_tokens"]), float(params["trace_count"])
    except (ValueError, KeyError, TypeError):
        return 0
    if count <= 0 or not math.isfinite(tokens / count):
        return 0
    return max(0, round((tokens / count - 1) / 2))
