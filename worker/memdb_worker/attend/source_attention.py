"""The one attention seam: a decode step's attention over its source and the live KV.

`SourceAttention(source, rope, device=, dtype=)` chooses once, for one source, how decode
queries (T = 1) attend, and `decode(layer, q, k, v, mask, positions, scale)` runs it. Both
callers go through it: `attention.memdb_attention` (the transformers path, a decode step bound to
one source) and `decode_step.StaticDecoder` (the graphed step). The paths (`path`):

- None (neither): "sdpa", SDPA over the live KV (kernels on or off);
- a `PrefixKV` (the prefix-cached full prefix): "shared_prefix", `shared_attention` (its KV read
  once per batch), with the kernels on; "states" off, and always for a chunk-weighted one;
- a `Memory` of fitted rows the kernel covers: "fitted_kernel",
  `fitted_rows.fitted_attention`, on; "states" off;
- a `Memory` of looked-up entries the kernel covers: "entries_kernel", `fused.memory_attention`,
  on; "entries_torch", its torch form `fused.decode_reference`, off;
- anything else (options no kernel covers, a memory on another device, other sources):
  "states".

"states" is the reference: the source's `prefix_state` merged with the live state by the
online-softmax identity (float32), as `attention.bind` defines attention over a source. The
kernels compute the same function to bf16 rounding (tests pin each to it). Kernels are on by
default on CUDA with Triton unless `MEMDB_FUSED=0` / `fused.set_enabled(False)`; `use_fused`
forces them on (Triton's interpreter on the CPU, tests) or off. Every path is safe to capture
in a CUDA graph once `prepare()` ran.

Shapes: q [B, H, 1, d] post-RoPE, k/v [B, Hkv, N, d] the live KV (the new token's included),
mask boolean [B|1, N] (True = attend) or None (all N), positions [B] the RoPE positions of q.
Returns [B, 1, H, d] in q's dtype.

This module knows the sources and the kernels; nothing of transformers' modules, caches or
scheduling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memdb_worker.attend import fitted_rows, fused
from memdb_worker.attend.shared_prefix import shared_attention
from memdb_worker.memory.keys import LayerQuery, RopeSpec
from memdb_worker.memory.memory import Memory
from memdb_worker.memory.prefix_kv import PrefixKV
from memdb_worker.memory.state import State, attention_state, merge_states

PATHS = ("sdpa", "shared_prefix", "fitted_kernel", "entries_kernel", "entries_torch", "states")


class SourceAttention:
    """How decode steps attend over one source (see the module); cheap to build."""

    def __init__(
        self,
        source: object | None,
        rope: RopeSpec,
        *,
        device: torch.device,
        dtype: torch.dtype,
        use_fused: bool | None = None,
    ) -> None:
        self.source = source
        self.rope = rope
        self.device, self.dtype = torch.device(device), dtype
        self._use_fused = use_fused
        self._paths = self._choose()  # (kernels on, kernels off)
        self._prefix_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._inv_freq = rope.inv_freq.to(self.device)

    @property
    def fused(self) -> bool:
        """Whether the kernels run (read at every call: `fused.disabled()` acts at once)."""
        if self._use_fused is None:
            return self.device.type == "cuda" and fused.enabled()
        return self._use_fused and fused.HAVE_TRITON

    @property
    def path(self) -> str:
        """The path decode steps take now (one of PATHS; the module's table)."""
        return self._paths[0] if self.fused else self._paths[1]

    def _choose(self) -> tuple[str, str]:
        src = self.source
        if src is None:
            return "sdpa", "sdpa"
        if isinstance(src, PrefixKV):
            return ("shared_prefix" if src.log_mass == 0.0 else "states"), "states"
        if isinstance(src, Memory) and src.device == self.device and fused.supports(src):
            if src.fitted:
                return "fitted_kernel", "states"
            return "entries_kernel", "entries_torch"
        return "states", "states"

    def prepare(self, num_layers: int) -> None:
        """Put every layer in its kernel's form now (before a CUDA graph is captured)."""
        path = self.path
        for layer in range(num_layers):
            if path == "shared_prefix":
                self._shared_kv(layer)
            elif path == "fitted_kernel":
                fitted_rows.prepare(self.source, layer)
            elif path in ("entries_kernel", "entries_torch"):
                fused.prepare_layer(self.source, layer)

    def decode(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Attention of q [B, H, 1, d] over the source and the live KV: [B, 1, H, d]."""
        path, src = self.path, self.source
        mask4 = None if mask is None else mask.view(mask.shape[0], 1, 1, mask.shape[-1])
        if path == "sdpa":
            b, h, _, d = q.shape
            hkv = k.shape[1]
            qg = q.reshape(b, hkv, h // hkv, d)  # a KV group's heads as query rows
            o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask4, scale=scale)
            return o.reshape(b, 1, h, d)
        if path == "shared_prefix":
            pk, pv = self._shared_kv(layer)
            return shared_attention(q, pk, pv, k, v, mask, scale)
        if path == "fitted_kernel":
            rows = fitted_rows.prepare(src, layer)
            return fitted_rows.fitted_attention(q, k, v, mask, rows, scale,
                                                fused.lse_bias(src, layer))  # fmt: skip
        if path in ("entries_kernel", "entries_torch"):
            args = (q, k, v, mask4, positions.reshape(-1), fused.prepare_layer(src, layer),
                    self._inv_freq, self.rope.attention_scaling, scale,
                    fused.lse_bias(src, layer))  # fmt: skip
            if path == "entries_kernel":
                return fused.memory_attention(*args, lse_correction=src.lse_corrected)
            return fused.decode_reference(*args, lse_correction=src.lse_corrected)[0]
        merged = self.states(layer, q, k, v, mask4, positions, scale)
        return merged.out.to(q.dtype).transpose(1, 2)

    def states(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask4: torch.Tensor | None,
        positions: torch.Tensor,
        scale: float,
    ) -> State:
        """The reference: the live state merged with the source's `prefix_state` (float32),
        state [B, H, 1, d]; mask4 boolean [B|1, 1, 1, N] or None."""
        b = q.shape[0]
        lq = LayerQuery(layer, q, positions.reshape(-1, 1).expand(b, 1), scale, self.rope,
                        k.shape[1])  # fmt: skip
        return merge_states(attention_state(q, k, v, scale, mask4), self.source.prefix_state(lq))

    def _shared_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self._prefix_kv.get(layer)
        if kv is None:
            src: PrefixKV = self.source
            kv = (src.keys[layer].to(self.device, self.dtype),
                  src.values[layer].to(self.device, self.dtype))  # fmt: skip
            self._prefix_kv[layer] = kv
        return kv
