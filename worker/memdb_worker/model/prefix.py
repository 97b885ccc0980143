"""The exact prefix: its per-layer keys/values, and its encoding (chunked past the context).

`encode_prefix` runs the model on the prefix and keeps, per layer, the post-RoPE keys and the
values of every token. A prefix longer than `chunk_tokens` is split into chunks encoded
independently, and their keys/values are concatenated: attention over the concatenation is the
exact merge of the chunks' states (DESIGN.md section 1), which is how the paper composes a
prefix longer than the model's context.

Attention sink: the paper encodes each chunk alone at positions 0..len-1, so every chunk's first
token becomes an attention sink (it soaks up attention mass at every layer) and the chunk's
later tokens see no context at all. Here a chunk after the first is encoded after a "sink": the
prefix's first `sink_tokens` tokens at positions 0..s-1, the chunk at s..s+len-1, and the sink's
own keys/values are dropped (`encode_chunk`). Measured on SmolLM2 (`python -m bench.chunking`:
TREC, a 2K prefix as two 1K chunks, 8 test sequences): next-token KL to the one-chunk prefix
0.051 without a sink, 0.031 with 32 sink tokens; and 0.011 when the second chunk also keeps its
true positions (which `append` does while the prefix fits the context). Accuracy of a memory
built from a ~32K prefix (M = 2048, 70 examples, seed 0) did not settle it: trec 0.700 with the
sink vs 0.771 without, clinc150 0.343 vs 0.286 (bench.quality `--sinks-32k 32 0` runs the
comparison). Validation settled it together with the chunk mass below:
bench/results/options_long.json ranks the 32-token sink first with averaged chunks (+0.022 mean
accuracy over the best ICL that fits the context, against +0.014 without the sink).

Chunk mass: attention over the concatenated chunks *sums* their attention mass, so a query
after a 32K prefix in 4.6 chunks of an 8K model sees 4.6 contexts' worth of demonstrations at
once, something it never saw in training. `chunk_mass="mean"` weights each chunk's mass by
1/C (`ExactPrefix.log_mass` = -log C added to the prefix's lse): the query attends to the
*average* of the chunks' contexts, as structured prompting does (Hao et al., 2022, "Structured
Prompting: Scaling In-Context Learning to 1,000 Examples"). A prefix of one chunk is unchanged.

`ExactPrefix` is a state source for `attention.bind`: it gives each query its exact state on the
prefix (what a memory approximates). Bound with live positions after the prefix it reproduces
in-context learning with the prefix in the prompt; the builder records its states as calibration.

This module knows nothing of memories, clustering or key modes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from memdb.build_options import CHUNK_MASSES, DEFAULT_SINK_TOKENS
from memdb_worker.memory.keys import LayerQuery
from memdb_worker.memory.state import State, attention_state, attention_state_and_key_mean

logger = logging.getLogger(__name__)

DEFAULT_LIVE_RESERVE = 1024


@dataclass
class ExactPrefix:
    """Post-RoPE keys and values of an encoded prefix, per layer."""

    keys: list[torch.Tensor]  # per layer [1, Hkv, N, d] (post-RoPE, model dtype)
    values: list[torch.Tensor]  # per layer [1, Hkv, N, d]
    scaling: float
    prefix_length: int  # position right after the (longest) chunk: where live tokens start
    token_count: int  # N, total prefix tokens over all chunks
    chunk_lengths: tuple[int, ...]
    sink_ids: tuple[int, ...] = ()  # the prefix's first tokens, encoded before later chunks
    log_mass: float = 0.0  # added to every lse: log of the weight of the prefix's mass

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def state(self, layer: int, q: torch.Tensor) -> State:
        """Exact state of post-RoPE queries q [B, H, T, d] on the prefix at `layer`."""
        k, v = self._kv(layer, q.device)
        return self._weighted(attention_state(q, k, v, self.scaling))

    def state_and_key_mean(self, layer: int, q: torch.Tensor) -> tuple[State, torch.Tensor]:
        """`state` plus the attention-weighted mean key [B, H, T, d] (post-RoPE frame)."""
        k, v = self._kv(layer, q.device)
        st, k_bar = attention_state_and_key_mean(q, k, v, self.scaling)
        return self._weighted(st), k_bar

    def with_chunk_mass(self, mode: str) -> ExactPrefix:
        """This prefix with its chunks' attention mass summed ("sum": exact attention over
        every chunk) or averaged ("mean": each chunk weighted 1/C, module doc)."""
        if mode not in CHUNK_MASSES:
            raise ValueError(f"chunk_mass must be one of {CHUNK_MASSES}, not {mode!r}")
        log_mass = -math.log(len(self.chunk_lengths)) if mode == "mean" else 0.0
        return replace(self, log_mass=log_mass)

    def _weighted(self, st: State) -> State:
        return st if self.log_mass == 0.0 else State(st.out, st.lse + self.log_mass)

    def prefix_state(self, query: LayerQuery) -> State:
        """State source protocol (see attention.bind)."""
        return self.state(query.layer, query.q)

    def head(self, n: int) -> ExactPrefix:
        """The first n tokens (the same as encoding them alone; single-chunk prefixes only)."""
        if len(self.chunk_lengths) != 1:
            raise ValueError("head() is only defined for a prefix encoded as one chunk")
        if not 0 < n <= self.token_count:
            raise ValueError(f"head({n}) of a {self.token_count}-token prefix")
        return ExactPrefix(
            keys=[k[:, :, :n] for k in self.keys],
            values=[v[:, :, :n] for v in self.values],
            scaling=self.scaling,
            prefix_length=n,
            token_count=n,
            chunk_lengths=(n,),
            sink_ids=self.sink_ids[:n],
            log_mass=self.log_mass,
        )

    @staticmethod
    def join(parts: Sequence[ExactPrefix], sink_ids: Sequence[int] = ()) -> ExactPrefix:
        """Chunks encoded apart as one prefix: attention over the concatenated keys/values is
        the exact merge of the chunks' states (mass summed, `with_chunk_mass` to average it);
        live tokens start after the furthest chunk."""
        return ExactPrefix(
            keys=[torch.cat(ks, dim=2) for ks in zip(*(p.keys for p in parts), strict=True)],
            values=[torch.cat(vs, dim=2) for vs in zip(*(p.values for p in parts), strict=True)],
            scaling=parts[0].scaling,
            prefix_length=max(p.prefix_length for p in parts),
            token_count=sum(p.token_count for p in parts),
            chunk_lengths=tuple(n for p in parts for n in p.chunk_lengths),
            sink_ids=tuple(sink_ids),
        )

    def nbytes(self) -> int:
        """Bytes of the prefix's KV cache as held here."""
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values])

    def _kv(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer], self.values[layer]
        if k.device != device:
            k, v = k.to(device), v.to(device)
        return k, v


def default_chunk_tokens(model: torch.nn.Module, live_reserve: int = DEFAULT_LIVE_RESERVE) -> int:
    """Largest chunk that leaves `live_reserve` positions of the context for live tokens."""
    ctx = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if ctx <= 0:
        return 1 << 30
    return max(1, ctx - min(live_reserve, ctx // 2))


@torch.inference_mode()
def encode_chunk(
    model: torch.nn.Module,
    ids: Sequence[int] | torch.Tensor,
    sink_ids: Sequence[int] = (),
    start: int | None = None,
) -> ExactPrefix:
    """`ids` encoded as one chunk after `sink_ids`: per-layer post-RoPE keys and values
    [1, Hkv, len, d].

    The sink sits at positions 0..s-1 and the chunk at start..start+len-1 (default start = s,
    right after the sink); the sink's own keys/values are dropped. Live tokens would start at
    start + len.
    """
    sink = torch.as_tensor(list(sink_ids), dtype=torch.long)
    part = torch.as_tensor(ids, dtype=torch.long).flatten()
    s, n = int(sink.numel()), int(part.numel())
    start = s if start is None else start
    if start < s:
        raise ValueError(f"a chunk cannot start at {start}, inside its {s}-token sink")
    device = next(model.parameters()).device
    x = torch.cat([sink, part]).to(device).unsqueeze(0)
    pos = torch.cat([torch.arange(s), torch.arange(n) + start]).to(device).unsqueeze(0)
    out = model(x, position_ids=pos, use_cache=True, logits_to_keep=1)  # only the KV is kept
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    return ExactPrefix(
        keys=[layer.keys[:, :, s:] for layer in cache.layers],
        values=[layer.values[:, :, s:] for layer in cache.layers],
        scaling=attention_scaling(model),
        prefix_length=start + n,
        token_count=n,
        chunk_lengths=(n,),
    )


@torch.inference_mode()
def encode_prefix(
    model: torch.nn.Module,
    prefix_ids: Sequence[int] | torch.Tensor,
    chunk_tokens: int | None = None,
    progress: bool = False,
    sink_tokens: int = DEFAULT_SINK_TOKENS,
) -> ExactPrefix:
    """Run the model on the prefix (chunks of at most `chunk_tokens`) and keep its keys/values.

    chunk_tokens defaults to the model's context minus DEFAULT_LIVE_RESERVE positions. Chunks are
    equal-sized up to one token (so no chunk is a short tail); chunks after the first are encoded
    after the prefix's first `sink_tokens` tokens (see the module doc), which count towards
    `chunk_tokens`.
    """
    ids = torch.as_tensor(prefix_ids, dtype=torch.long).flatten()
    n = int(ids.numel())
    if n == 0:
        raise ValueError("the prefix is empty")
    chunk = chunk_tokens or default_chunk_tokens(model)
    sink = ids[: max(0, min(sink_tokens, chunk // 2))].tolist()
    num_chunks = 1 if n <= chunk else -(-n // (chunk - len(sink)))
    bounds = torch.linspace(0, n, num_chunks + 1).round().long().tolist()
    it = range(num_chunks)
    if progress and num_chunks > 1:
        it = tqdm(it, desc="prefix chunks", unit="chunk")
    parts = [encode_chunk(model, ids[bounds[c] : bounds[c + 1]], sink if c else []) for c in it]
    logger.info("encoded a %d-token prefix in %d chunk(s)", n, num_chunks)
    return ExactPrefix.join(parts, sink_ids=ids[: max(0, sink_tokens)].tolist())


def attention_scaling(model: torch.nn.Module) -> float:
    """The softmax scaling of the model's attention (its first attention module's)."""
    for mod in model.modules():
        if hasattr(mod, "layer_idx") and hasattr(mod, "scaling") and hasattr(mod, "q_proj"):
            return float(mod.scaling)
    raise ValueError("no attention module with layer_idx/scaling/q_proj found in the model")
