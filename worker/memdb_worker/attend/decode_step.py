"""A static-cache decode step of a Llama-style transformers model, captured in CUDA graphs.

`StaticDecoder(model, max_batch, max_live, source)` holds a static KV cache of the live tokens
([layers, max_batch, Hkv, max_live, d], rows are slots) and runs one decode step for the first
`b` slots with the model's own modules (embedding, RMSNorms, projections, rotary embedding, MLP,
LM head), so it computes what `model(...)` computes, without transformers' per-call Python work
(mask construction, cache bookkeeping, `torch.cat` of a DynamicCache). Attention goes through
the one attention seam, `source_attention.SourceAttention` (`self.attention`), which the
transformers path uses too: SDPA for None (neither), the fitted-row or looked-up-entry kernel
for a `memory.Memory` on CUDA (the entries' torch form elsewhere), shared-prefix attention for a
`memory.PrefixKV` (the full prefix, prefix-cached: its KV computed once, read once per batch),
and the states reference where no kernel covers the source.

The step samples inside with the one sampler (`sampling.sample`: greedy at temperature 0, else
the slot's temperature, top_k, top_p and seed, the draw a hash of its seed and step, so eager and
graphed steps draw alike), writes the sampled token as the slot's next input and advances its
length, so that
`graph(b)` captures the whole step for a batch bucket (1, 2, 4, 8, 16, 32) and consecutive
replays need no host work but reading the sampled tokens. Rows fewer than the bucket are padded
(slots past the active ones run on whatever they hold; their results are ignored).

`prefill(slots, prompts, temperatures)` runs the prompts through the model bound to the source
(`attention.bind`, live positions after the prefix) and copies their KV into the slots.

This module knows the Llama decoder layout and the attention sources; nothing of requests,
HTTP or scheduling. Not thread-safe (one thread drives a decoder).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from memdb_worker.attend.attention import LivePositions, bind
from memdb_worker.attend.sampling import new_seed, sample
from memdb_worker.attend.source_attention import SourceAttention
from memdb_worker.memory.keys import RopeSpec
from memdb_worker.memory.memory import Memory
from memdb_worker.memory.prefix_kv import PrefixKV

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32)


def bucket(n: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest batch bucket that holds n rows."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} rows exceed the largest bucket {buckets[-1]}")


class StaticDecoder:
    """Static KV cache + one decode step (eager or CUDA-graphed) for one attention source."""

    def __init__(
        self,
        model: torch.nn.Module,
        max_batch: int,
        max_live: int,
        source: Memory | PrefixKV | None = None,
        *,
        live_positions: LivePositions = "after_prefix",
        use_fused: bool | None = None,
    ) -> None:
        cfg = model.config
        self.model = model
        self.source = source
        self.live_positions: LivePositions = live_positions
        self.layers = list(model.model.layers)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        shape = (len(self.layers), max_batch, self.kv_heads, max_live, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        z = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.lengths, self.tokens, self.next = z.clone(), z.clone(), z.clone()
        # each slot's sampling (attend.sampling): temperature, top_p, top_k, seed, tokens drawn
        self.temps = torch.zeros(max_batch, dtype=torch.float32, device=self.device)
        self.top_p = torch.ones(max_batch, dtype=torch.float32, device=self.device)
        self.top_k, self.seeds, self.steps = z.clone(), z.clone(), z.clone()
        self.host_lengths = [0] * max_batch
        self.max_batch, self.max_live = max_batch, max_live
        self.offset = 0
        if source is not None and live_positions == "after_prefix":
            self.offset = int(source.prefix_length)
        self.rope = RopeSpec.from_model(model)
        if isinstance(source, Memory):
            source.check_model(model)
        # the one attention seam (also the transformers path's): the path per source
        self.attention = SourceAttention(source, self.rope, device=self.device, dtype=self.dtype,
                                         use_fused=use_fused)  # fmt: skip
        self.attention.prepare(len(self.layers))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None

    # -- prefill ------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self,
        slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        temperatures: Sequence[float] | None = None,
        pad_id: int = 0,
        *,
        top_p: Sequence[float] | None = None,
        top_k: Sequence[int] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Run the prompts (one batch, left-padded) bound to the source, copy each one's KV into
        its slot and set its sampling (temperature 0 = greedy, top_p 1, top_k 0 = off; seeds
        default to fresh ones); returns the logits of their last tokens [n, V] float32. The
        caller samples the first token (`sampling.sample` at step 0, the same seed) and sets it
        with `set_tokens`; the step draws the next ones from step 1 on."""
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1 or max(lengths) >= self.max_live:
            raise ValueError(f"prompts of {lengths} tokens do not fit {self.max_live} live slots")
        n, width = len(prompts), max(lengths)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - lengths[i] :] = torch.tensor(list(p))
            mask[i, width - lengths[i] :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.model.config)
        with bind(self.model, self.source, live_positions=self.live_positions):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                             use_cache=True, logits_to_keep=1)  # fmt: skip
        for layer, lay in enumerate(cache.layers):
            for i, (slot, t) in enumerate(zip(slots, lengths, strict=True)):
                self.k[layer, slot, :, :t] = lay.keys[i, :, width - t :]
                self.v[layer, slot, :, :t] = lay.values[i, :, width - t :]
        temps = temperatures or [0.0] * n
        top_p, top_k = top_p or [1.0] * n, top_k or [0] * n
        seeds = seeds or [new_seed() for _ in range(n)]
        for i, (slot, t) in enumerate(zip(slots, lengths, strict=True)):
            self.lengths[slot] = t
            self.host_lengths[slot] = t
            self.temps[slot], self.top_p[slot] = float(temps[i]), float(top_p[i])
            self.top_k[slot], self.seeds[slot] = int(top_k[i]), int(seeds[i])
            self.steps[slot] = 1  # the first token (step 0) is the caller's
        return out.logits[:, -1, :].float()

    def set_tokens(self, slots: Sequence[int], tokens: Sequence[int]) -> None:
        """The next input token of each slot (the first sampled one after a prefill)."""
        idx = torch.tensor(list(slots), device=self.device)
        self.tokens[idx] = torch.tensor(list(tokens), device=self.device)

    @torch.inference_mode()
    def compact(self, keep: Sequence[int]) -> None:
        """Keep the slots at these increasing indices, moved down to slots [0, len(keep))."""
        for i, j in enumerate(keep):
            if j < i or (i and j <= keep[i - 1]):
                raise ValueError(f"slots to keep must increase: {list(keep)}")
            if i != j:
                self.k[:, i] = self.k[:, j]
                self.v[:, i] = self.v[:, j]
                for x in (self.lengths, self.tokens, self.next, *self._sampling()):
                    x[i] = x[j]
                self.host_lengths[i] = self.host_lengths[j]
        self.free(len(keep))

    def _sampling(self) -> tuple[torch.Tensor, ...]:
        return self.temps, self.top_p, self.top_k, self.seeds, self.steps

    @torch.inference_mode()
    def free(self, first: int = 0) -> None:
        """Slots [first, max_batch) hold no row: empty them, as in a new decoder (padding
        slots of a bucket then never reach max_live before the rows do)."""
        self.lengths[first:] = 0
        for i in range(first, len(self.host_lengths)):
            self.host_lengths[i] = 0

    # -- the step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, batch: int, graphed: bool = False) -> torch.Tensor:
        """One decode step of slots [0, batch): returns their sampled tokens [batch] (a view of
        a static buffer, valid until the next step)."""
        if max(self.host_lengths[:batch]) >= self.max_live:
            raise ValueError(f"a slot is full ({self.max_live} live tokens)")
        if graphed:
            self.graph(batch).replay()
        else:
            self._step(batch)
        for i in range(batch):
            self.host_lengths[i] += 1
        return self.next[:batch]

    def graph(self, batch: int) -> torch.cuda.CUDAGraph:
        """The CUDA graph of `step(batch)` (captured on first use; state is left as it was)."""
        g = self.graphs.get(batch)
        if g is not None:
            return g
        state = (self.lengths, self.tokens, self.next, self.steps)  # what a step changes
        saved = [x.clone() for x in state]

        def restore():
            for x, y in zip(state, saved, strict=True):
                x.copy_(y)

        with torch.inference_mode():
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):  # compile kernels, settle allocations
                    self._step(batch)
                    restore()
            torch.cuda.current_stream().wait_stream(s)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                self._step(batch)
            restore()
        self.graphs[batch] = g
        return g

    def _step(self, b: int) -> None:
        logits = self._forward(b)
        nxt = sample(logits, self.temps[:b], self.top_p[:b], self.top_k[:b], self.seeds[:b],
                     self.steps[:b])  # fmt: skip
        self.next[:b].copy_(nxt)
        self.tokens[:b].copy_(nxt)
        self.lengths[:b] += 1
        self.steps[:b] += 1

    def _forward(self, b: int) -> torch.Tensor:
        """Logits [b, V] (float32) of the slots' next tokens; writes their K/V at their length."""
        h, hkv, d = self.heads, self.kv_heads, self.head_dim
        lens = self.lengths[:b]
        pos = lens + self.offset  # RoPE positions of the new tokens [b]
        x = self.model.model.embed_tokens(self.tokens[:b]).unsqueeze(1)  # [b, 1, hidden]
        cos, sin = self.model.model.rotary_emb(x, pos.view(b, 1))  # [b, 1, d]
        live = torch.arange(self.max_live, device=self.device).view(1, -1)
        mask = live <= lens.view(b, 1)  # [b, S]: the slot's tokens and the new one
        rows = torch.arange(b, device=self.device)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            a = layer.input_layernorm(x)
            q = attn.q_proj(a).view(b, 1, h, d).transpose(1, 2)  # [b, H, 1, d]
            k = attn.k_proj(a).view(b, 1, hkv, d).transpose(1, 2)  # [b, Hkv, 1, d]
            v = attn.v_proj(a).view(b, 1, hkv, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kc, vc = self.k[i, :b], self.v[i, :b]  # [b, Hkv, S, d]
            kc[rows, :, lens] = k[:, :, 0]
            vc[rows, :, lens] = v[:, :, 0]
            o = self.attention.decode(i, q, kc, vc, mask, pos, float(attn.scaling))  # [b, 1, H, d]
            x = x + attn.o_proj(o.reshape(b, 1, h * d))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(self.model.model.norm(x))[:, 0].float()


__all__ = ["BUCKETS", "StaticDecoder", "bucket"]
