"""The memory builder: calibration over traces, clustering, and the shards of a memory.

`build_memory` = `calibrate` + `cluster` (split so a benchmark can cluster one calibration at
several budgets and options); the options are `memdb.build_options.BuildOptions`:

1. `calibrate` (module `calibration`, re-exported here): encode the prefix
   (`prefix.encode_prefix`, chunked past the context), then run every trace *after* it (the
   prefix's keys/values are reused, never recomputed; a chunked prefix is attended as the
   concatenation of its chunks, i.e. the merge of their states) with live positions right
   after the prefix. At every layer, for the recorded trace tokens, keep the
   pre-RoPE query and the exact state on the prefix only (out, lse; and the attention-weighted
   mean key pulled back to the pre-RoPE query, `k_bar`, when the lse correction is asked for).
   Memory stays bounded: traces run in small batches and only a uniform sample of at most
   `max_records` trace tokens is kept (reservoir sampling over the stream of tokens, seeded),
   optionally after keeping at most `max_tokens_per_trace` random tokens of each trace. The
   records take about `max_records * layers * H * (2d + 1) * 4` bytes (2.3 GB for SmolLM2 at the
   default 16384; add H*d*4 per token and layer with `k_bar`).
2. `cluster`: per layer and index group, FAISS spherical k-means (cosine) of the lookup keys to
   M centroids, then the entries of the paper's Eq. 5 (key = mean of member keys; Z = exp(lse)
   averaged in log space, logsumexp - log n; out = the Z-weighted mean of members' outputs), or
   states recomputed at the centroid query. With M equal to the number of records every record
   is its own entry (no clustering: the memory holds exact states of exact queries).
   With entry_state "fitted" (`fitted`), no clustering either: per layer and KV head, M of the
   prefix's key rows (those the calibration queries attend most), biases and values fitted so
   that attention over them reproduces the records' exact states.

Deterministic for a given seed (sampling and k-means seeds derive from `BuildOptions.seed`).
This module knows nothing of storage or serving; it emits `memdb.shards.Shard`s.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from memdb.build_options import CALIBRATION_FIELDS, BuildOptions, EntryState
from memdb.shards import Shard
from memdb_worker.build import heldout
from memdb_worker.build.calibration import Calibration, calibrate, tokenize_prefix, tokenize_traces
from memdb_worker.build.fitting import fit_group, warm_solver
from memdb_worker.memory.formats import keys_as_stored, quantize_keys, to_numpy
from memdb_worker.memory.keys import KeySpace, RopeSpec, apply_rope, fit_whitening, rope_transpose
from memdb_worker.memory.memory import DecodeOptions, Memory, lookup_keys
from memdb_worker.memory.prefix_kv import PrefixKV
from memdb_worker.memory.state import aggregate_states

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_FIELDS",
    "BuildOptions",
    "BuiltMemory",
    "Calibration",
    "EntryState",
    "build_memory",
    "calibrate",
    "cluster",
    "tokenize_prefix",
    "tokenize_traces",
]


@dataclass
class BuiltMemory:
    """The shards of a memory (one per layer) and their common metadata."""

    shards: list[Shard]
    metadata: dict[str, str]
    build_seconds: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def token_count(self) -> int:
        return int(self.metadata["token_count"])

    @property
    def budget(self) -> int:
        return int(self.metadata["budget"])

    @property
    def model_fingerprint(self) -> str:
        return self.metadata["model_fingerprint"]

    def nbytes(self) -> int:
        """Bytes of the shards' tensors as stored (`formats.memory_bytes`)."""
        total = 0
        for s in self.shards:
            scale = () if s.key_scale is None else (s.key_scale,)
            for a in (s.keys, *scale, s.out, s.lse, *s.extras.values()):
                total += a.nbytes
        return total

    def to_memory(
        self, device: str | torch.device = "cpu", options: DecodeOptions | None = None
    ) -> Memory:
        return Memory.from_shards(self.shards, device=device, options=options)


def build_memory(
    model: torch.nn.Module,
    tokenizer,
    prefix: str | Sequence[int],
    traces: Sequence[str | Sequence[int]],
    budget: int,
    options: BuildOptions | None = None,
    progress: bool = True,
    on_progress: Callable[..., None] | None = None,
) -> BuiltMemory:
    """Build a memory of `budget` entries per layer and group from a prefix and traces;
    `on_progress(**fields)` hears the stages (`calibrate`, `cluster`). With `options.holdout`
    a fraction of the traces is kept out of the fit and each layer's error on them is stored
    in the metadata (`heldout`)."""
    options = options or BuildOptions()
    fit, held = heldout.split_traces(traces, options.holdout, options.seed)
    calib = calibrate(model, tokenizer, prefix, fit, options, progress, on_progress)
    built = cluster(calib, budget, options, progress=progress, on_progress=on_progress)
    if held:
        t0 = time.perf_counter()
        check = calibrate(model, tokenizer, calib.prefix_kv, held, options, progress=False)
        device = next(model.parameters()).device
        errors = heldout.layer_errors(built.to_memory(device), check)
        value = heldout.summary(errors, check.num_records, len(held))
        for meta in (built.metadata, *(s.metadata for s in built.shards)):
            meta[heldout.METADATA_KEY] = value
        built.build_seconds += time.perf_counter() - t0
    return built


# -- clustering ---------------------------------------------------------------------------------


@torch.inference_mode()
def cluster(
    calib: Calibration,
    budget: int,
    options: BuildOptions | None = None,
    progress: bool = True,
    on_progress: Callable[..., None] | None = None,
) -> BuiltMemory:
    """Cluster a calibration into `budget` entries per layer and group; emit the shards.

    Uses the key-space and entry fields of `options` (calibration fields are already spent).
    `on_progress(**fields)` (a build job's report) hears stage="fitting", num_layers and
    layers_fitted after each layer.
    """
    options = options or calib.options
    t0 = time.perf_counter()
    n = calib.num_records
    if budget < 1:
        raise ValueError("the budget M must be >= 1")
    if options.fitted and budget > calib.prefix_kv.token_count:
        raise ValueError(
            f"budget M={budget} exceeds the prefix's {calib.prefix_kv.token_count} tokens: fitted "
            "entries are at most one row per prefix token (its whole KV)"
        )
    if budget > n and not options.fitted:
        raise ValueError(
            f"budget M={budget} exceeds the {n} calibration tokens recorded "
            f"({calib.trace_count} traces of {calib.trace_tokens} tokens, max_records="
            f"{calib.options.max_records}); add traces or lower the budget"
        )
    if options.entry_state == "average" and options.lse_correction and calib.k_bar is None:
        raise ValueError("lse_correction with average entries needs calibrate(lse_correction=True)")
    pre = calib.prefix_kv
    common = pre.prefix_length if options.common_position is None else options.common_position
    ks = KeySpace(
        mode=options.key_mode,
        granularity=options.keyspace_granularity,
        num_heads=calib.num_heads,
        num_kv_heads=calib.num_kv_heads,
        head_dim=calib.head_dim,
        common_position=common,
        rope=calib.rope,
    )
    if options.whiten:
        fits = [fit_whitening(ks.rotate(q), center=options.whiten_center) for q in calib.q_pre]
        ks.whiten = [w for w, _ in fits]
        ks.whiten_mean = [mu for _, mu in fits]
    meta = _metadata(calib, ks, budget, options)
    layers = range(calib.num_layers)
    # fitted rows: the records' RoPE rotation, the same at every layer
    cos_sin = calib.rope.cos_sin(calib.positions) if options.fitted else None  # [N, d] each
    bar = tqdm(total=len(layers), desc="clustering layers", unit="layer", disable=not progress)
    fitted = itertools.count(1)  # next() is atomic: the pool threads share it

    def one(layer: int) -> Shard:
        with torch.inference_mode():  # thread-local: pool threads need it too
            if cos_sin is not None:
                shard = _fit_layer(calib, layer, budget, options, meta, cos_sin)
            else:
                shard = _cluster_layer(calib, ks, layer, budget, options, meta)
        bar.update()
        done = next(fitted)
        if on_progress is not None:
            on_progress(stage="fitting", num_layers=len(layers), layers_fitted=done)
        return shard

    workers = _cluster_workers(len(layers))
    if options.fitted and workers > 1:  # the solver's lazy CUDA set-up is not thread-safe
        warm_solver(calib.prefix_kv.keys[0].device)
    if workers == 1:
        shards = [one(layer) for layer in layers]
    else:  # layers in parallel (FAISS and torch release the GIL); each k-means seeded alone
        with _single_threaded(), ThreadPoolExecutor(workers) as pool:
            shards = list(pool.map(one, layers))
    bar.close()
    seconds = time.perf_counter() - t0
    logger.info("clustered %d records into M=%d entries in %.1f s", n, budget, seconds)
    stats = {"calibration_s": calib.seconds, "cluster_s": seconds, "records": float(n)}
    return BuiltMemory(shards, meta, build_seconds=calib.seconds + seconds, stats=stats)


def _cluster_workers(num_layers: int) -> int:
    """Layers clustered at once, each single-threaded: one per core from 4 cores up (one
    k-means of a few thousand records keeps many OpenMP threads idle: on a 16-core H100 host
    FAISS ran at about one core's speed), else 1."""
    cores = os.cpu_count() or 1
    return 1 if cores < 4 else min(num_layers, cores)


@contextmanager
def _single_threaded() -> Iterator[None]:
    """FAISS (OpenMP) and torch intra-op work on one thread each, restored after."""
    import faiss

    before = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before[0])
        torch.set_num_threads(before[1])


def _cluster_layer(
    calib: Calibration,
    ks: KeySpace,
    layer: int,
    budget: int,
    options: BuildOptions,
    meta: dict[str, str],
) -> Shard:
    ng, hg, d = ks.num_groups, ks.heads_per_group, ks.head_dim
    q_pre = calib.q_pre[layer]  # [N, H, d]
    keys = lookup_keys(ks, options.group_key, q_pre, layer)  # [N, I, Dk]
    entry_keys = torch.zeros(ng, budget, keys.shape[-1])
    out = torch.zeros(ng, budget, hg, d)
    lse = torch.zeros(ng, budget, hg)
    q_mean = torch.zeros(ng, budget, hg, d)
    k_bar = torch.zeros(ng, budget, hg, d)
    pos_mean = torch.zeros(ng, budget)
    for i in range(ng):
        heads = slice(i * hg, (i + 1) * hg)
        member, cid = _assign(keys[:, i], budget, options, seed=_seed(options.seed, layer, i))
        count = torch.bincount(cid, minlength=budget).float().unsqueeze(-1)  # [M, 1]
        entry_keys[i] = _mean(keys[member, i], cid, budget, count)
        q_mean[i] = _mean(q_pre[member, heads].reshape(len(member), -1), cid, budget, count).view(
            budget, hg, d
        )
        pos_mean[i] = _mean(calib.positions[member].float().unsqueeze(-1), cid, budget, count)[:, 0]
        if options.entry_state == "average":
            vals = calib.out[layer][member, heads]  # [P, h, d]
            if options.lse_correction:
                assert calib.k_bar is not None
                vals = torch.cat([vals, calib.k_bar[layer][member, heads]], dim=-1)
            e_lse, e_val = aggregate_states(calib.lse[layer][member, heads], vals, cid, budget)
            lse[i], out[i] = e_lse, e_val[..., :d]
            if options.lse_correction:
                k_bar[i] = e_val[..., d:]
    if options.entry_state == "centroid":
        out, lse, k_bar = _centroid_states(calib.prefix_kv, calib.rope, layer, q_mean, pos_mean)
    stored_keys, key_scale = quantize_keys(entry_keys, options.key_dtype)
    state_dtype = getattr(torch, options.out_dtype)
    extras: dict[str, np.ndarray] = {}
    if options.lse_correction:
        if options.store_q_mean:
            extras["q_mean"] = to_numpy(q_mean.to(state_dtype))
        extras["k_bar"] = to_numpy(k_bar.to(state_dtype))
    if ks.whiten is not None:
        extras["whiten"] = ks.whiten[layer].numpy().astype(np.float32)
        extras["whiten_mean"] = ks.whiten_mean[layer].numpy().astype(np.float32)
    return Shard(
        keys=to_numpy(stored_keys),
        out=to_numpy(out.to(state_dtype)),
        lse=lse.numpy().astype(np.float32),
        extras=extras,
        metadata={**meta, "layer": str(layer)},
        key_scale=None if key_scale is None else to_numpy(key_scale),
    )


def _fit_layer(
    calib: Calibration,
    layer: int,
    budget: int,
    options: BuildOptions,
    meta: dict[str, str],
    cos_sin: tuple[torch.Tensor, torch.Tensor],
) -> Shard:
    """Fitted rows of every KV head of a layer (`fitting.fit_group`): keys [Hkv, M, d], values
    [Hkv, M, 1, d], bias [Hkv, M, 1] (`Shard.of_rows`); cos_sin: the records' RoPE [N, d]."""
    pre = calib.prefix_kv
    hkv, d = calib.num_kv_heads, calib.head_dim
    hg = calib.num_heads // hkv
    dev = pre.keys[layer].device
    cos, sin = cos_sin
    q = apply_rope(calib.q_pre[layer], cos.unsqueeze(1), sin.unsqueeze(1))  # [N, H, d] post-RoPE
    keys = torch.zeros(hkv, budget, d)
    values = torch.zeros(hkv, budget, 1, d)
    bias = torch.zeros(hkv, budget, 1)
    for g in range(hkv):
        heads = slice(g * hg, (g + 1) * hg)
        k, v, b = fit_group(
            pre.keys[layer][0, g],
            pre.values[layer][0, g],
            q[:, heads].reshape(-1, d).to(dev),
            calib.out[layer][:, heads].reshape(-1, d).to(dev),
            calib.lse[layer][:, heads].reshape(-1).to(dev) - pre.log_mass,
            budget,
            pre.scaling,
            steps=options.fit_steps,
            ridge=options.fit_ridge,
            seed=_seed(options.seed, layer, g),
            stored=partial(keys_as_stored, dtype=options.key_dtype)
            if options.fit_stored_keys
            else None,
        )
        # the chunk mass's constant lse shift (prefix.py) is fitted out and added back
        keys[g], values[g, :, 0], bias[g, :, 0] = k.cpu(), v.cpu(), b.cpu() + pre.log_mass
    stored_keys, key_scale = quantize_keys(keys, options.key_dtype)
    return Shard.of_rows(
        keys=to_numpy(stored_keys),
        values=to_numpy(values.to(getattr(torch, options.out_dtype))),
        bias=bias.numpy().astype(np.float32),
        metadata={**meta, "layer": str(layer)},
        key_scale=None if key_scale is None else to_numpy(key_scale),
    )


def _assign(
    keys: torch.Tensor, budget: int, options: BuildOptions, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster keys [N, Dk] into `budget` groups: (member index, cluster id) pairs, every
    cluster non-empty. Identity when budget == N; spherical k-means otherwise."""
    n = keys.shape[0]
    if budget == n:
        ar = torch.arange(n)
        return ar, ar
    import faiss  # only clustering needs it

    x = torch.nn.functional.normalize(keys.float(), dim=-1).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(
        x.shape[1],
        budget,
        niter=options.kmeans_iters,
        seed=seed,
        spherical=True,
        verbose=False,
        min_points_per_centroid=1,
    )
    km.train(x)
    centroids = torch.from_numpy(km.centroids.copy())  # [M, Dk], unit norm
    sims = torch.from_numpy(x) @ centroids.T  # [N, M]
    cid = sims.argmax(dim=1)
    member = torch.arange(n)
    empty = torch.nonzero(torch.bincount(cid, minlength=budget) == 0).flatten()
    if empty.numel():
        # A centroid nobody chose gets its nearest record as sole member (shared, not moved).
        nearest = sims[:, empty].argmax(dim=0)
        member = torch.cat([member, nearest])
        cid = torch.cat([cid, empty])
    return member, cid


def _mean(x: torch.Tensor, cid: torch.Tensor, m: int, count: torch.Tensor) -> torch.Tensor:
    """Per-cluster mean of rows x [P, e] -> [M, e]."""
    acc = torch.zeros(m, x.shape[-1], dtype=torch.float32).index_add_(0, cid, x.float())
    return acc / count.clamp_min(1)


def _centroid_states(
    prefix: PrefixKV, rope: RopeSpec, layer: int, q_mean: torch.Tensor, pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact prefix states of the centroid queries q_mean [I, M, h, d], rotated to the mean
    position of their members pos [I, M]. Returns out [I, M, h, d], lse [I, M, h], k_bar."""
    ng, m, hg, d = q_mean.shape
    q = q_mean.permute(0, 2, 1, 3).reshape(ng * hg, m, d)  # [H, M, d]
    p = pos.round().long().repeat_interleave(hg, dim=0)  # [H, M]
    cos, sin = rope.cos_sin(p)  # [H, M, d]
    dev = prefix.keys[layer].device
    q_post = apply_rope(q, cos, sin).unsqueeze(0).to(dev)  # [1, H, M, d]
    state, kb = prefix.state_and_key_mean(layer, q_post)
    kb = rope_transpose(kb[0].cpu(), cos, sin)  # [H, M, d] the lse gradient in q_pre, / s
    out = state.out[0].cpu().view(ng, hg, m, d).permute(0, 2, 1, 3)
    lse = state.lse[0].cpu().view(ng, hg, m).permute(0, 2, 1)
    k_bar = kb.view(ng, hg, m, d).permute(0, 2, 1, 3)
    return out.contiguous(), lse.contiguous(), k_bar.contiguous()


def _seed(seed: int, layer: int, group: int) -> int:
    return (seed * 1_000_003 + layer * 1009 + group) % (2**31 - 1)


def _metadata(
    calib: Calibration, ks: KeySpace, budget: int, options: BuildOptions
) -> dict[str, str]:
    pre = calib.prefix_kv
    # Calibration fields come from the calibration actually run, the rest from `options`.
    ran = replace(options, **{f: getattr(calib.options, f) for f in CALIBRATION_FIELDS})
    built = ran.to_metadata(
        calibration_seed=calib.options.seed,
        calibration_key_mean=calib.k_bar is not None,
        calibration_records=calib.num_records,
        trace_count=calib.trace_count,
        trace_tokens=calib.trace_tokens,
    )
    return {
        **ks.metadata(),
        **built,
        "budget": str(budget),
        "num_layers": str(calib.num_layers),
        "prefix_length": str(pre.prefix_length),
        "token_count": str(pre.token_count),
        "chunk_lengths": json.dumps(list(pre.chunk_lengths)),
        "sink_ids": json.dumps(list(pre.sink_ids)),
        "log_mass": repr(float(pre.log_mass)),  # -log C: the chunks' mass averaged (prefix.py)
        "calibration_positions": "after_prefix",  # trace tokens sat at prefix_length + t
        "model_fingerprint": calib.fingerprint,
        "rope": json.dumps(
            {
                "inv_freq": [float(x) for x in calib.rope.inv_freq.tolist()],
                "attention_scaling": calib.rope.attention_scaling,
            }
        ),
        "scaling": repr(float(pre.scaling)),
    }
