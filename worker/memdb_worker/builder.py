"""The memory builder: calibration over traces, clustering, and the shards of a memory.

`build_memory` = `calibrate` + `cluster` (split so a benchmark can cluster one calibration at
several budgets and options):

1. `calibrate`: encode the prefix (`prefix.encode_prefix`, chunked past the context), then run
   every trace *after* it (the prefix's keys/values are reused, never recomputed; a chunked
   prefix is attended as the concatenation of its chunks, i.e. the merge of their states) with
   live positions right after the prefix. At every layer, for the recorded trace tokens, keep the
   pre-RoPE query and the exact state on the prefix only (out, lse; and the attention-weighted
   mean key `k_bar` when the lse correction is asked for).
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

Deterministic for a given seed (sampling and k-means seeds derive from `BuildOptions.seed`).
This module knows nothing of storage or serving; it emits `memdb.shards.Shard`s.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from memdb.shards import Shard
from memdb_worker.attention import bind
from memdb_worker.formats import KEY_DTYPES, KEY_SCALE, OUT_DTYPES, quantize_keys, to_numpy
from memdb_worker.keys import (
    GRANULARITIES,
    KEY_MODES,
    Granularity,
    KeyMode,
    KeySpace,
    LayerQuery,
    RopeSpec,
    apply_rope,
    fit_whitening,
    rope_transpose,
)
from memdb_worker.memory import DecodeOptions, Memory
from memdb_worker.model import model_fingerprint
from memdb_worker.prefix import DEFAULT_SINK_TOKENS, ExactPrefix, encode_prefix
from memdb_worker.state import State, aggregate_states

logger = logging.getLogger(__name__)

EntryState = Literal["average", "centroid"]
# BuildOptions fields spent by `calibrate` (the others are read by `cluster`; `seed` by both)
CALIBRATION_FIELDS = (
    "chunk_tokens",
    "sink_tokens",
    "max_records",
    "max_tokens_per_trace",
    "trace_batch_size",
)


@dataclass(frozen=True)
class BuildOptions:
    """Every choice of a build; the defaults are the paper's plain recipe except `lse_correction`
    (on: bench.options measured it the one option that improved every fidelity figure)."""

    # lookup keys (keys.py)
    key_mode: KeyMode = "pre_rope"
    whiten: bool = False
    whiten_center: bool = False  # whiten with the covariance (keys centered) not the 2nd moment
    common_position: int | None = None  # rope_common: None = the position right after the prefix
    granularity: Granularity = "head"
    # entries
    entry_state: EntryState = "average"  # Eq. 5 member averages, or recomputed at the centroid
    lse_correction: bool = True  # store q_mean and k_bar for the first-order lse correction
    store_q_mean: bool = True  # False: leave q_mean out where it equals the entry key
    key_dtype: Literal["float32", "float16", "bfloat16", "float8_e4m3fn"] = "float32"
    out_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # out, q_mean, k_bar
    # clustering
    kmeans_iters: int = 20
    seed: int = 0
    # calibration
    chunk_tokens: int | None = None  # None: the model's context minus 1024 positions
    sink_tokens: int = DEFAULT_SINK_TOKENS  # prefix tokens encoded before later chunks/appends
    max_records: int = 16384  # trace tokens kept (reservoir sample)
    max_tokens_per_trace: int | None = None  # None: every token of every trace
    trace_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.key_mode not in KEY_MODES:
            raise ValueError(f"key_mode must be one of {KEY_MODES}, not {self.key_mode!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}")
        if self.entry_state not in ("average", "centroid"):
            raise ValueError("entry_state must be 'average' or 'centroid'")
        if self.key_dtype not in KEY_DTYPES:
            raise ValueError(f"key_dtype must be one of {KEY_DTYPES}, not {self.key_dtype!r}")
        if self.out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, not {self.out_dtype!r}")
        if not self.store_q_mean and not self.q_mean_from_keys:
            raise ValueError(
                "store_q_mean=False needs q_mean to equal the entry key: lse_correction with "
                "average entries, pre_rope keys, no whitening, granularity head, kv_group or layer"
            )
        if self.sink_tokens < 0:
            raise ValueError("sink_tokens must be >= 0")
        if self.max_records < 1 or self.trace_batch_size < 1 or self.kmeans_iters < 1:
            raise ValueError("max_records, trace_batch_size and kmeans_iters must be >= 1")

    @property
    def q_mean_from_keys(self) -> bool:
        """Whether an entry's q_mean is its key (member averages of unwhitened pre-RoPE
        queries, concatenated per group), so that it need not be stored."""
        return (
            self.lse_correction
            and self.entry_state == "average"
            and self.key_mode == "pre_rope"
            and not self.whiten
            and self.granularity in ("head", "kv_group", "layer")
        )


@dataclass
class Calibration:
    """What calibration recorded: per layer, the records of the sampled trace tokens."""

    q_pre: list[torch.Tensor]  # per layer [N, H, d] pre-RoPE queries
    out: list[torch.Tensor]  # per layer [N, H, d] exact output on the prefix
    lse: list[torch.Tensor]  # per layer [N, H] exact lse on the prefix
    k_bar: list[torch.Tensor] | None  # per layer [N, H, d] (pre-RoPE frame) or None
    positions: torch.Tensor  # [N] RoPE position of each record
    prefix: ExactPrefix
    rope: RopeSpec
    num_heads: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str
    options: BuildOptions
    trace_count: int = 0
    trace_tokens: int = 0  # tokens of all traces (before sampling)
    seconds: float = 0.0

    @property
    def num_records(self) -> int:
        return int(self.positions.numel())

    @property
    def num_layers(self) -> int:
        return len(self.q_pre)


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
        total = 0
        for s in self.shards:
            for a in (s.keys, s.out, s.lse, *s.extras.values()):
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
) -> BuiltMemory:
    """Build a memory of `budget` entries per layer and group from a prefix and traces."""
    options = options or BuildOptions()
    calib = calibrate(model, tokenizer, prefix, traces, options, progress=progress)
    return cluster(calib, budget, options, progress=progress)


# -- calibration --------------------------------------------------------------------------------


def tokenize_prefix(tokenizer, prefix: str | Sequence[int]) -> list[int]:
    """Token ids of the prefix (text gets the tokenizer's special tokens, e.g. BOS)."""
    if isinstance(prefix, str):
        if tokenizer is None:
            raise ValueError("a text prefix needs a tokenizer")
        return list(tokenizer(prefix).input_ids)
    return [int(t) for t in prefix]


def tokenize_traces(tokenizer, traces: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Token ids of traces (they follow the prefix: no special tokens added); empty ones dropped."""
    out = []
    for t in traces:
        if isinstance(t, str):
            if tokenizer is None:
                raise ValueError("text traces need a tokenizer")
            ids = list(tokenizer(t, add_special_tokens=False).input_ids)
        else:
            ids = [int(x) for x in t]
        if ids:
            out.append(ids)
    return out


@torch.inference_mode()
def calibrate(
    model: torch.nn.Module,
    tokenizer,
    prefix: str | Sequence[int] | ExactPrefix,
    traces: Sequence[str | Sequence[int]],
    options: BuildOptions | None = None,
    progress: bool = True,
) -> Calibration:
    """Encode the prefix, run the traces after it, record queries and exact prefix states.

    `prefix` may also be an already encoded `ExactPrefix` (e.g. from `encode_prefix`), which is
    used as is (not re-encoded; `options.chunk_tokens` is then moot).
    """
    options = options or BuildOptions()
    t0 = time.perf_counter()
    encoded = prefix if isinstance(prefix, ExactPrefix) else None
    prefix_ids = [] if encoded is not None else tokenize_prefix(tokenizer, prefix)
    trace_ids = tokenize_traces(tokenizer, traces)
    if not trace_ids:
        raise ValueError("no calibration traces (or all of them are empty)")
    rng = np.random.default_rng(options.seed)
    selections = [_select_tokens(len(ids), options.max_tokens_per_trace, rng) for ids in trace_ids]
    total = sum(len(s) for s in selections)
    cap = min(options.max_records, total)

    cfg = model.config
    h = int(cfg.num_attention_heads)
    hkv = int(cfg.num_key_value_heads)
    d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // h)
    num_layers = int(cfg.num_hidden_layers)
    pre = (
        encoded
        if encoded is not None
        else encode_prefix(
            model,
            prefix_ids,
            options.chunk_tokens,
            progress=progress,
            sink_tokens=options.sink_tokens,
        )  # fmt: skip
    )
    rec = _Recorder(pre, num_layers, cap, h, d, options.lse_correction)

    device = next(model.parameters()).device
    order = sorted(range(len(trace_ids)), key=lambda i: -len(trace_ids[i]))
    reservoir = _Reservoir(cap, rng)
    bar = tqdm(total=len(order), desc="calibration traces", unit="trace", disable=not progress)
    body = getattr(model, "model", model)  # the decoder stack: no LM head needed
    with bind(model, rec, live_positions="after_prefix"):
        for start in range(0, len(order), options.trace_batch_size):
            batch = order[start : start + options.trace_batch_size]
            width = max(len(trace_ids[i]) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            rows, cols = [], []
            for r, i in enumerate(batch):
                ids[r, : len(trace_ids[i])] = torch.tensor(trace_ids[i])
                mask[r, : len(trace_ids[i])] = 1
                rows += [r] * len(selections[i])
                cols += selections[i]
            keep, slots = reservoir.offer(len(rows))
            rec.begin(
                torch.tensor(rows, dtype=torch.long)[keep].to(device),
                torch.tensor(cols, dtype=torch.long)[keep].to(device),
                torch.tensor(slots, dtype=torch.long).to(device),
            )
            pos = torch.arange(width).unsqueeze(0).expand(len(batch), width)
            body(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=pos.to(device),
                use_cache=False,
            )
            bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - t0
    logger.info(
        "calibration: %d traces, %d tokens, %d records kept, %.1f s",
        len(trace_ids),
        total,
        cap,
        seconds,
    )
    return Calibration(
        q_pre=rec.q_pre,
        out=rec.out,
        lse=rec.lse,
        k_bar=rec.k_bar,
        positions=rec.positions,
        prefix=pre,
        rope=RopeSpec.from_model(model),
        num_heads=h,
        num_kv_heads=hkv,
        head_dim=d,
        fingerprint=model_fingerprint(model),
        options=options,
        trace_count=len(trace_ids),
        trace_tokens=sum(len(t) for t in trace_ids),
        seconds=seconds,
    )


def _select_tokens(n: int, cap: int | None, rng: np.random.Generator) -> list[int]:
    if cap is None or n <= cap:
        return list(range(n))
    return sorted(int(i) for i in rng.choice(n, size=cap, replace=False))


class _Reservoir:
    """Uniform sample of at most `cap` items of a stream (algorithm R), one batch at a time."""

    def __init__(self, cap: int, rng: np.random.Generator) -> None:
        self.cap, self.rng, self.seen = cap, rng, 0

    def offer(self, n: int) -> tuple[list[int], list[int]]:
        """For n new items: indices of those kept and their slots (unique; later items win)."""
        slot_of: dict[int, int] = {}
        for j in range(n):
            if self.seen < self.cap:
                slot = self.seen
            else:
                slot = int(self.rng.integers(0, self.seen + 1))
                if slot >= self.cap:
                    slot = -1
            if slot >= 0:
                slot_of[slot] = j
            self.seen += 1
        pairs = sorted((j, s) for s, j in slot_of.items())
        return [j for j, _ in pairs], [s for _, s in pairs]


class _Recorder:
    """State source for calibration: exact prefix states, recorded for the selected tokens."""

    def __init__(self, prefix: ExactPrefix, layers: int, cap: int, h: int, d: int, kbar: bool):
        self.prefix = prefix
        self.q_pre = [torch.zeros(cap, h, d) for _ in range(layers)]
        self.out = [torch.zeros(cap, h, d) for _ in range(layers)]
        self.lse = [torch.zeros(cap, h) for _ in range(layers)]
        self.k_bar = [torch.zeros(cap, h, d) for _ in range(layers)] if kbar else None
        self.positions = torch.zeros(cap, dtype=torch.long)
        self.rows = self.cols = self.slots = torch.zeros(0, dtype=torch.long)

    @property
    def prefix_length(self) -> int:
        return self.prefix.prefix_length

    def begin(self, rows: torch.Tensor, cols: torch.Tensor, slots: torch.Tensor) -> None:
        self.rows, self.cols, self.slots = rows, cols, slots

    def prefix_state(self, query: LayerQuery) -> State:
        layer = query.layer
        if self.k_bar is not None:
            state, k_bar = self.prefix.state_and_key_mean(layer, query.q)
        else:
            state, k_bar = self.prefix.state(layer, query.q), None
        if self.slots.numel():
            r, c, s = self.rows, self.cols, self.slots.cpu()
            self.q_pre[layer][s] = query.q_pre[r, :, c].cpu()  # [n, H, d]
            self.out[layer][s] = state.out[r, :, c].cpu()
            self.lse[layer][s] = state.lse[r, :, c].cpu()
            if self.k_bar is not None and k_bar is not None:
                # s * k_bar is the lse's gradient in q (post-RoPE); stored as its pull-back to
                # q_pre so that lse(q_pre') ~ lse + s * k_bar . (q_pre' - q_pre) for any
                # attention scaling (memory.correct_lse)
                self.k_bar[layer][s] = query.pull_back(k_bar)[r, :, c].cpu()
            if layer == 0:
                self.positions[s] = query.positions[r, c].cpu()
        return state


# -- clustering ---------------------------------------------------------------------------------


@torch.inference_mode()
def cluster(
    calib: Calibration,
    budget: int,
    options: BuildOptions | None = None,
    progress: bool = True,
) -> BuiltMemory:
    """Cluster a calibration into `budget` entries per layer and group; emit the shards.

    Uses the key-space and entry fields of `options` (calibration fields are already spent).
    """
    options = options or calib.options
    t0 = time.perf_counter()
    n = calib.num_records
    if budget < 1:
        raise ValueError("the budget M must be >= 1")
    if budget > n:
        raise ValueError(
            f"budget M={budget} exceeds the {n} calibration tokens recorded "
            f"({calib.trace_count} traces of {calib.trace_tokens} tokens, max_records="
            f"{calib.options.max_records}); add traces or lower the budget"
        )
    if options.entry_state == "average" and options.lse_correction and calib.k_bar is None:
        raise ValueError("lse_correction with average entries needs calibrate(lse_correction=True)")
    pre = calib.prefix
    common = pre.prefix_length if options.common_position is None else options.common_position
    ks = KeySpace(
        mode=options.key_mode,
        granularity=options.granularity,
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
    bar = tqdm(total=len(layers), desc="clustering layers", unit="layer", disable=not progress)

    def one(layer: int) -> Shard:
        with torch.inference_mode():  # thread-local: pool threads need it too
            shard = _cluster_layer(calib, ks, layer, budget, options, meta)
        bar.update()
        return shard

    workers = _cluster_workers(len(layers))
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
    keys = ks.keys(q_pre, layer)  # [N, I, Dk]
    entry_keys = torch.zeros(ng, budget, ks.key_dim)
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
        out, lse, k_bar = _centroid_states(calib.prefix, calib.rope, layer, q_mean, pos_mean)
    stored_keys, key_scale = quantize_keys(entry_keys, options.key_dtype)
    state_dtype = getattr(torch, options.out_dtype)
    extras: dict[str, np.ndarray] = {}
    if key_scale is not None:
        extras[KEY_SCALE] = key_scale
    if options.lse_correction:
        if options.store_q_mean:
            extras["q_mean"] = to_numpy(q_mean.to(state_dtype))
        extras["k_bar"] = to_numpy(k_bar.to(state_dtype))
    if ks.whiten is not None:
        extras["whiten"] = ks.whiten[layer].numpy().astype(np.float32)
        extras["whiten_mean"] = ks.whiten_mean[layer].numpy().astype(np.float32)
    return Shard(
        keys=stored_keys,
        out=to_numpy(out.to(state_dtype)),
        lse=lse.numpy().astype(np.float32),
        extras=extras,
        metadata={**meta, "layer": str(layer)},
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
    prefix: ExactPrefix, rope: RopeSpec, layer: int, q_mean: torch.Tensor, pos: torch.Tensor
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
    pre = calib.prefix
    # Calibration fields come from the calibration actually run, the rest from `options`.
    build = asdict(options)
    build.update({f: getattr(calib.options, f) for f in CALIBRATION_FIELDS})
    build.update(
        calibration_seed=calib.options.seed,
        calibration_key_mean=calib.k_bar is not None,
        calibration_records=calib.num_records,
        trace_count=calib.trace_count,
        trace_tokens=calib.trace_tokens,
    )
    return {
        **ks.metadata(),
        "entry_state": options.entry_state,
        "lse_correction": "1" if options.lse_correction else "0",
        # "keys": q_mean is the entry key (dequantized), not stored (memory.Memory derives it)
        "q_mean": "keys" if options.lse_correction and not options.store_q_mean else "stored",
        "budget": str(budget),
        "num_layers": str(calib.num_layers),
        "prefix_length": str(pre.prefix_length),
        "token_count": str(pre.token_count),
        "chunk_lengths": json.dumps(list(pre.chunk_lengths)),
        "sink_ids": json.dumps(list(pre.sink_ids)),
        "calibration_positions": "after_prefix",  # trace tokens sat at prefix_length + t
        "model_fingerprint": calib.fingerprint,
        "rope": json.dumps(
            {
                "inv_freq": [float(x) for x in calib.rope.inv_freq.tolist()],
                "attention_scaling": calib.rope.attention_scaling,
            }
        ),
        "scaling": repr(float(pre.scaling)),
        "build_params": json.dumps(build, sort_keys=True),
    }
