"""Calibration: encode the prefix, run traces after it, record queries and exact prefix states.

`calibrate` encodes the prefix (`prefix.encode_prefix`, chunked past the context), then runs
every trace *after* it (the prefix's keys/values are reused, never recomputed) with live
positions right after the prefix. At every layer, for the recorded trace tokens, it keeps the
pre-RoPE query and the exact state on the prefix only (out, lse; and, for the lse correction,
the attention-weighted mean key pulled back to the pre-RoPE query, `k_bar`). Memory stays
bounded by a reservoir sample of trace tokens (see `builder`). This module knows nothing of
clustering or shards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from memdb.build_options import BuildOptions
from memdb_worker.attend.attention import bind
from memdb_worker.memory.keys import LayerQuery, RopeSpec
from memdb_worker.memory.prefix_kv import PrefixKV
from memdb_worker.memory.state import State
from memdb_worker.model.loading import model_fingerprint
from memdb_worker.model.prefix import encode_prefix

logger = logging.getLogger(__name__)


@dataclass
class Calibration:
    """What calibration recorded: per layer, the records of the sampled trace tokens."""

    q_pre: list[torch.Tensor]  # per layer [N, H, d] pre-RoPE queries
    out: list[torch.Tensor]  # per layer [N, H, d] exact output on the prefix
    lse: list[torch.Tensor]  # per layer [N, H] exact lse on the prefix
    k_bar: list[torch.Tensor] | None  # per layer [N, H, d] (pre-RoPE frame) or None
    positions: torch.Tensor  # [N] RoPE position of each record
    prefix_kv: PrefixKV  # the prefix's keys/values (exact states on the prefix)
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
    prefix: str | Sequence[int] | PrefixKV,
    traces: Sequence[str | Sequence[int]],
    options: BuildOptions | None = None,
    progress: bool = True,
    on_progress: Callable[..., None] | None = None,
) -> Calibration:
    """Encode the prefix, run the traces after it, record queries and exact prefix states.

    `on_progress(**fields)` (a build job's report) hears stage="calibration" and
    tokens_prefilled once the prefix is encoded.

    `prefix` may also be an already encoded `PrefixKV` (e.g. from `encode_prefix`), which is
    used as is (not re-encoded; `options.chunk_tokens` is then moot). Either way its chunks'
    mass is summed or averaged as `options.chunk_mass` says (`PrefixKV.with_chunk_mass`).
    """
    options = options or BuildOptions()
    t0 = time.perf_counter()
    encoded = prefix if isinstance(prefix, PrefixKV) else None
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
    ).with_chunk_mass(options.chunk_mass)
    if on_progress is not None:
        on_progress(stage="calibration", tokens_prefilled=pre.token_count)
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
        prefix_kv=pre,
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

    def __init__(self, prefix: PrefixKV, layers: int, cap: int, h: int, d: int, kbar: bool):
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
