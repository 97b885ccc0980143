"""Memory decoding inside transformers: the `memdb` attention function and the binding of sequences.

`install(model)` registers the attention function `memdb` through `transformers.AttentionInterface`
(with transformers' SDPA boolean mask function under the same name, so causal and padding masks
are kept) and switches the model to it. While no sequence is bound it runs plain SDPA, so an
installed model behaves like the original.

`bind(model, source)` binds the batch to a *state source* for the duration of a `with` block:
a `memory.Memory` (the lookup memory), a `memory.PrefixKV` (exact prefix keys/values), or a
list with one source (or None) per batch row. At every layer the attention function then

1. computes the state of the live queries on the live context (the KV cache, causal / padding
   mask as transformers built it), exactly, in float32;
2. asks each row's source for the state of its queries on the prefix (`prefix_state`);
3. merges the two with the online-softmax identity and returns the output in the query dtype.

Positions of live tokens (`live_positions`): the prompt leaves the prefix out, so transformers
numbers live tokens from 0. With "after_prefix" (default) a hook on the rotary embedding shifts
them by the source's `prefix_length` (the position right after the prefix, as in calibration);
with "zero" they stay at 0, 1, ... The memory lookup is position-free in both key modes (keys come
from the pre-RoPE query) and RoPE makes live-to-live attention depend only on relative
positions, so for a `Memory` the two choices differ by rounding only (and in how much of the
model's context is left); an `PrefixKV` needs "after_prefix" to equal in-context learning.

A decode step (T = 1) bound to one source goes through the one attention seam
(`source_attention.SourceAttention`, which the graphed step uses too): on CUDA a `Memory` whose
options the kernels cover (fitted rows in the builder's formats; looked-up entries with hard
top-1, with or without the first-order lse correction, any lse_bias) runs its fused Triton
kernel and a `PrefixKV` shared-prefix attention, instead of steps 1-3 (same function, to bf16
rounding); off CUDA looked-up entries take the kernel's torch form. `MEMDB_FUSED=0` or
`fused.set_enabled(False)` turns the kernels off, and observers always see steps 1-3.

Works with `model.generate` and a KV cache (the cache holds live tokens only), with batches
(rows may mix sources and unbound rows), on CPU and CUDA. A binding lives on the model's
attention modules: one binding per model at a time, not thread-safe.

This module knows the transformers integration only; lookups and exact prefix states belong to
the sources.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from memdb_worker.memory.keys import LayerQuery, RopeSpec
from memdb_worker.memory.state import State, attention_state, empty_state, merge_states

if TYPE_CHECKING:
    from memdb_worker.attend.source_attention import SourceAttention

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "memdb"
LivePositions = Literal["after_prefix", "zero"]
_ATTR = "_memdb_binding"


@runtime_checkable
class StateSource(Protocol):
    """Anything that gives queries their attention state on a prefix."""

    @property
    def prefix_length(self) -> int:
        """Position right after the prefix (where live tokens start with "after_prefix")."""
        ...

    def prefix_state(self, query: LayerQuery) -> State:
        """State [B, H, T, ...] of the queries on the prefix at query.layer."""
        ...


@dataclass
class LayerEvent:
    """What an observer sees at each layer of a bound forward pass (all float32)."""

    query: LayerQuery
    live: State  # [B, H, T, d] state on the live context
    prefix: State  # [B, H, T, d] state from the sources (lse = -inf for unbound rows)
    merged: State  # [B, H, T, d] what attention returns


Observer = Callable[[LayerEvent], None]


@dataclass
class Binding:
    """The sources of one batch; see `bind`."""

    sources: StateSource | list[StateSource | None]
    live_positions: LivePositions
    rope: RopeSpec
    observers: list[Observer] = field(default_factory=list)
    # decode steps of a single source: the one attention seam
    seam: SourceAttention | None = None

    def offsets(self, batch: int, device: torch.device) -> torch.Tensor:
        """Position shift of each row's live tokens, [B, 1] (or [1, 1] for a single source)."""
        if self.live_positions == "zero":
            return torch.zeros(1, 1, dtype=torch.long, device=device)
        if not isinstance(self.sources, list):
            return torch.full((1, 1), self.sources.prefix_length, dtype=torch.long, device=device)
        self._check_batch(batch)
        vals = [0 if s is None else int(s.prefix_length) for s in self.sources]
        return torch.tensor(vals, dtype=torch.long, device=device).view(-1, 1)

    def _check_batch(self, batch: int) -> None:
        if isinstance(self.sources, list) and len(self.sources) != batch:
            raise ValueError(
                f"the binding has {len(self.sources)} per-row sources but the batch has {batch} "
                "rows; bind one source for every row, or a single source for all"
            )


def install(model: torch.nn.Module) -> None:
    """Register the `memdb` attention (and mask) functions and switch `model` to them."""
    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, memdb_attention)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


@contextmanager
def bind(
    model: torch.nn.Module,
    source: StateSource | Sequence[StateSource | None] | None,
    *,
    live_positions: LivePositions = "after_prefix",
    observers: Sequence[Observer] = (),
) -> Iterator[Binding | None]:
    """Bind the model's next forward passes to a state source (or one per batch row).

    `source=None` runs plainly. Installs the `memdb` attention if needed; restores the previous
    binding on exit.
    """
    if live_positions not in ("after_prefix", "zero"):
        raise ValueError(f"live_positions must be 'after_prefix' or 'zero', not {live_positions!r}")
    install(model)
    attn_modules = _attention_modules(model)
    if source is None:
        binding = None
    else:
        sources: StateSource | list[StateSource | None]
        if isinstance(source, Sequence):
            sources = list(source)
            distinct = [s for s in sources if s is not None]
        else:
            sources = source
            distinct = [source]
        for s in {id(s): s for s in distinct}.values():
            check = getattr(s, "check_model", None)
            if check is not None:
                check(model)
        binding = Binding(sources, live_positions, RopeSpec.from_model(model), list(observers))
        if not isinstance(sources, list):
            from memdb_worker.attend.source_attention import SourceAttention

            p = next(model.parameters())
            binding.seam = SourceAttention(sources, binding.rope, device=p.device, dtype=p.dtype)
    previous = [getattr(m, _ATTR, None) for m in attn_modules]
    hooks = []
    try:
        for m in attn_modules:
            setattr(m, _ATTR, binding)
        if binding is not None and live_positions == "after_prefix":
            hook = _position_hook(binding, attn_modules[0])
            for rot in _rotary_modules(model):
                hooks.append(rot.register_forward_pre_hook(hook, with_kwargs=True))
        yield binding
    finally:
        for h in hooks:
            h.remove()
        for m, prev in zip(attn_modules, previous, strict=True):
            setattr(m, _ATTR, prev)


def current_binding(model: torch.nn.Module) -> Binding | None:
    """The binding active on `model`, if any."""
    mods = _attention_modules(model)
    return getattr(mods[0], _ATTR, None) if mods else None


def memdb_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The `memdb` attention: plain SDPA when unbound, else the live state merged with the sources'.

    query [B, H, T, d] (post-RoPE), key/value [B, Hkv, N, d] (the live KV cache), attention_mask
    boolean [B|1, 1, T, N] or None (causal, bottom-right aligned). Returns [B, T, H, d].
    """
    binding: Binding | None = getattr(module, _ATTR, None)
    if binding is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    b, h, t, d = query.shape
    scale = float(scaling if scaling is not None else module.scaling)
    fast = _fused_attention(module, binding, query, key, value, attention_mask, scale, kwargs)
    if fast is not None:
        return fast, None
    mask = attention_mask
    if mask is None and t > 1:
        n = key.shape[2]
        qi = torch.arange(t, device=query.device).view(t, 1) + (n - t)
        mask = (torch.arange(n, device=query.device).view(1, n) <= qi).view(1, 1, t, n)
    live = attention_state(query, key, value, scale, mask)  # [B, H, T, d]

    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise RuntimeError(
            "memdb attention needs position_ids from the model (Llama-style models pass them)"
        )
    positions = (position_ids.long() + binding.offsets(b, query.device)).expand(b, t)
    lq = LayerQuery(
        layer=int(module.layer_idx),
        q=query,
        positions=positions,
        scaling=scale,
        rope=binding.rope,
        num_kv_heads=key.shape[1],
    )
    prefix = _prefix_state(binding, lq, b, h, t, value.shape[-1])
    merged = merge_states(live, prefix)
    for obs in binding.observers:
        obs(LayerEvent(query=lq, live=live, prefix=prefix, merged=merged))
    return merged.out.to(query.dtype).transpose(1, 2).contiguous(), None


def _fused_attention(
    module: torch.nn.Module,
    binding: Binding,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    kwargs: dict,
) -> torch.Tensor | None:
    """A decode step (T = 1) bound to one source, through the attention seam's kernel
    (`source_attention.SourceAttention`); None where no kernel runs (kernels off, a path of
    states, observers watching): then the reference path below runs."""
    seam = binding.seam
    if seam is None or binding.observers or query.shape[2] != 1:
        return None
    if not seam.fused or seam.path == "states":
        return None
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return None
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return None
    b = query.shape[0]
    positions = (position_ids.long() + binding.offsets(b, query.device)).expand(b, 1)[:, 0]
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, 0, -1, :]  # [B|1, N]: T = 1, the query's row
    return seam.decode(int(module.layer_idx), query, key, value, mask, positions, scale)


def _prefix_state(binding: Binding, lq: LayerQuery, b: int, h: int, t: int, dv: int) -> State:
    sources = binding.sources
    if not isinstance(sources, list):
        return _checked(sources.prefix_state(lq), b, h, t, dv)
    binding._check_batch(b)
    prefix = empty_state(b, h, t, dv, device=lq.q.device)
    groups: dict[int, tuple[StateSource, list[int]]] = {}
    for row, s in enumerate(sources):
        if s is not None:
            groups.setdefault(id(s), (s, []))[1].append(row)
    for s, rows in groups.values():
        idx = torch.tensor(rows, dtype=torch.long, device=lq.q.device)
        st = _checked(s.prefix_state(lq.select(idx)), len(rows), h, t, dv)
        prefix.out.index_copy_(0, idx, st.out)
        prefix.lse.index_copy_(0, idx, st.lse)
    return prefix


def _checked(st: State, b: int, h: int, t: int, dv: int) -> State:
    if st.out.shape != (b, h, t, dv) or st.lse.shape != (b, h, t):
        raise ValueError(
            f"a state source returned out {list(st.out.shape)} / lse {list(st.lse.shape)}, "
            f"expected [{b}, {h}, {t}, {dv}] / [{b}, {h}, {t}]"
        )
    return State(st.out.float(), st.lse.float())


def _position_hook(binding: Binding, owner: torch.nn.Module) -> Callable:
    """Forward pre-hook for the rotary embedding: shift live positions by the binding's offsets.

    It acts only while `binding` is the one on `owner` (a nested bind has its own hook).
    """

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict):
        if getattr(owner, _ATTR, None) is not binding:
            return None
        batch = args[0].shape[0] if args else kwargs["x"].shape[0]
        if "position_ids" in kwargs:
            pos = kwargs["position_ids"]
            kwargs = {**kwargs, "position_ids": pos + binding.offsets(batch, pos.device)}
            return args, kwargs
        if len(args) >= 2:
            pos = args[1]
            return (args[0], pos + binding.offsets(batch, pos.device), *args[2:]), kwargs
        return None

    return hook


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    mods = [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups") and hasattr(m, "q_proj")
    ]
    if not mods:
        raise ValueError("no Llama-style attention modules (layer_idx, q_proj) in the model")
    return mods


def _rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "inv_freq") and hasattr(m, "rope_type")]
