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
1/C (`PrefixKV.log_mass` = -log C added to the prefix's lse): the query attends to the
*average* of the chunks' contexts, as structured prompting does (Hao et al., 2022, "Structured
Prompting: Scaling In-Context Learning to 1,000 Examples"). A prefix of one chunk is unchanged.

The result is a `memdb_worker.memory.PrefixKV`, a state source for `attend.bind`: it gives
each query its exact state on the prefix (what a memory approximates).

This module knows nothing of memories, clustering or key modes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from memdb.build_options import DEFAULT_SINK_TOKENS
from memdb_worker.memory.prefix_kv import PrefixKV

logger = logging.getLogger(__name__)

DEFAULT_LIVE_RESERVE = 1024


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
) -> PrefixKV:
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
    return PrefixKV(
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
) -> PrefixKV:
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
    return PrefixKV.join(parts, sink_ids=ids[: max(0, sink_tokens)].tolist())


def attention_scaling(model: torch.nn.Module) -> float:
    """The softmax scaling of the model's attention (its first attention module's)."""
    for mod in model.modules():
        if hasattr(mod, "layer_idx") and hasattr(mod, "scaling") and hasattr(mod, "q_proj"):
            return float(mod.scaling)
    raise ValueError("no attention module with layer_idx/scaling/q_proj found in the model")
