"""Prefix KV: the post-RoPE keys and values of an encoded prefix text, per layer, as a state
source (what a prefix cache holds, and what a memory approximates).

`PrefixKV.prefix_state` gives each query its exact state on the prefix. Bound (`attend.bind`)
with live positions after the prefix it reproduces in-context learning with the prefix text in
the prompt; the builder records its states as calibration. A prefix encoded in chunks
(`memdb_worker.model.prefix.encode_prefix`) is their concatenation, with the chunks' attention
mass summed or averaged (`with_chunk_mass`, `log_mass`).

Knows nothing of models (encoding is `memdb_worker.model.prefix`), memories or key modes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from memdb.build_options import CHUNK_MASSES
from memdb_worker.memory.keys import LayerQuery
from memdb_worker.memory.state import State, attention_state, attention_state_and_key_mean


@dataclass
class PrefixKV:
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

    def with_chunk_mass(self, mode: str) -> PrefixKV:
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

    def head(self, n: int) -> PrefixKV:
        """The first n tokens (the same as encoding them alone; single-chunk prefixes only)."""
        if len(self.chunk_lengths) != 1:
            raise ValueError("head() is only defined for a prefix encoded as one chunk")
        if not 0 < n <= self.token_count:
            raise ValueError(f"head({n}) of a {self.token_count}-token prefix")
        return PrefixKV(
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
    def join(parts: Sequence[PrefixKV], sink_ids: Sequence[int] = ()) -> PrefixKV:
        """Chunks encoded apart as one prefix: attention over the concatenated keys/values is
        the exact merge of the chunks' states (mass summed, `with_chunk_mass` to average it);
        live tokens start after the furthest chunk."""
        return PrefixKV(
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
