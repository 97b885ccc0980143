"""Shared-prefix ("cascade") decode attention: one prefix's KV read once for a whole batch.

When every row of a decode batch attends to the same cached prefix (prefix caching, one prefix
version shared by every request naming it), attention over `[prefix ; live_b]` splits exactly
(DESIGN.md section 1) into

1. the state of every row's queries on the prefix: the rows' queries folded into the query
   dimension of one attention per KV head (B x G query rows against N prefix keys), so the
   prefix's keys and values are read once per step whatever the batch;
2. the state of each row's queries on its own live context (the KV cache of its prompt and
   generated tokens, with its mask);
3. their merge with the online-softmax identity.

`shared_attention` runs this on CUDA in two Triton launches (`fused_kernels.shared_phase1`:
split-KV "flash-decoding" programs over slices of the prefix, so that even batch 1 fills the
GPU, and live programs per row; `fused_kernels.shared_combine`: the merge of all partial
states). `shared_reference` is the same function in torch ops (any device; the CPU path and
what the tests compare with). This is the fair baseline the memory is measured against
(DESIGN.md section 8) and the attention of the worker's prefix-cached full-prefix decode.

This module knows nothing of memories, models or caches: it takes tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from memdb_worker.attend import fused_kernels as fk
from memdb_worker.attend.fused_kernels import HAVE_TRITON
from memdb_worker.attend.launch import live_mask, pow2, slices, sm_count
from memdb_worker.memory.state import attention_state, merge_states

logger = logging.getLogger(__name__)

MAX_FOLDED_ROWS = 128  # query rows per prefix program (batch rows x heads per KV head)


@dataclass(frozen=True)
class SharedConfig:
    """Launch shape of the shared-prefix kernels (bench/attention.py may sweep them)."""

    block_n: int = 64  # keys per tile
    prefix_programs_per_sm: int = 2  # prefix slices: about this many programs per SM in all
    live_programs_per_sm: int = 1
    num_warps: int = 0  # 0: 8 when a KV head has more than 64 folded query rows, else 4
    num_stages: int = 2
    combine_warps: int = 4


def shared_reference(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of q [B, H, 1, d] over [prefix ; live] in torch ops (float32 math).

    prefix_k/v [1, Hkv, Np, d] shared by every row, k/v [B, Hkv, N, d] each row's live KV,
    mask boolean [B, N] (True = attend) or None. Returns [B, 1, H, d] in q's dtype.
    """
    prefix = attention_state(q, prefix_k, prefix_v, scale)  # folds the batch: read once
    mask4 = None if mask is None else mask.view(mask.shape[0], 1, 1, mask.shape[-1])
    live = attention_state(q, k, v, scale, mask4)
    return merge_states(prefix, live).out.to(q.dtype).transpose(1, 2).contiguous()


def shared_attention(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    config: SharedConfig | None = None,
) -> torch.Tensor:
    """`shared_reference`'s function in two Triton launches (CUDA, or Triton's interpreter)."""
    if not HAVE_TRITON:
        raise RuntimeError("shared_attention needs Triton")
    cfg = config or SharedConfig()
    b, h, t, d = q.shape
    if t != 1:
        raise ValueError("shared_attention decodes one token per sequence (T = 1)")
    hkv, np_ = prefix_k.shape[1], prefix_k.shape[2]
    n = k.shape[2]
    g = h // hkv
    if prefix_k.shape[0] != 1 or k.shape[1] != hkv or np_ == 0:
        raise ValueError(f"prefix {list(prefix_k.shape)} / live {list(k.shape)} do not fit")
    dev = q.device
    pk, pv = prefix_k[0], prefix_v[0]  # [Hkv, Np, d]
    if pk.stride(-1) != 1 or pv.stride(-1) != 1:
        pk, pv = pk.contiguous(), pv.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    # fold: C chunks of BC rows; chunk c's queries of KV head kh are rows kh*GF + (row, head)
    bc = max(1, min(b, MAX_FOLDED_ROWS // g))
    c = -(-b // bc)
    q2 = q[:, :, 0]  # [B, H, d]
    if c * bc != b:
        q2 = torch.cat([q2, q2.new_zeros(c * bc - b, h, d)])
    gf = bc * g
    qf = q2.reshape(c, bc, hkv, g, d).transpose(1, 2).reshape(c, hkv * gf, d)
    sms = sm_count(dev)
    bn = cfg.block_n
    p_split, slp = slices(np_, bn, (cfg.prefix_programs_per_sm * sms) // (c * hkv))
    live_split, sl = slices(n, bn, (cfg.live_programs_per_sm * sms) // (b * hkv))
    f32 = torch.float32
    plo = torch.empty(slp, c, hkv * gf, d, dtype=f32, device=dev)
    pll = torch.empty(slp, c, hkv * gf, dtype=f32, device=dev)
    lo = torch.empty(sl, b, h, d, dtype=f32, device=dev)
    ll = torch.empty(sl, b, h, dtype=f32, device=dev)
    out = torch.empty(b, 1, h, d, dtype=q.dtype, device=dev)
    q3 = q[:, :, 0]
    mk, sm_b, sm_n = live_mask(mask, b, ll)
    n_prefix = c * hkv * slp
    n_live = b * hkv * sl if n > 0 else 0
    fk.shared_phase1[(n_prefix + n_live,)](
        n_prefix, qf, qf.stride(0), pk, pk.stride(0), pk.stride(1), pv, pv.stride(0),
        pv.stride(1), np_, c, hkv * gf, slp, p_split, plo, pll,
        q3, q3.stride(0), q3.stride(1), k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2), mk, sm_b, sm_n, n, b, h, hkv, sl,
        live_split, float(scale), lo, ll,
        HAS_MASK=mask is not None, IEEE=q.dtype == torch.float32, D=d, G=g,
        GP=max(16, pow2(g)), GF=gf, GFP=max(16, pow2(gf)), BLOCK_N=bn,
        num_warps=cfg.num_warps or (8 if gf > 64 else 4), num_stages=cfg.num_stages,
    )  # fmt: skip
    fk.shared_combine[(b * hkv,)](
        plo, pll, slp, c, hkv * gf, bc, lo, ll, sl if n_live else 0, b, h, hkv,
        out, out.stride(0), out.stride(2),
        D=d, G=g, GP=max(2, pow2(g)), GF=gf, SB=8, num_warps=cfg.combine_warps,
    )  # fmt: skip
    return out


def floor_bytes(batch: int, heads: int, kv_heads: int, prefix: int, live: int, d: int,
                dtype_bytes: int = 2) -> int:  # fmt: skip
    """The fewest bytes shared-prefix decode moves: the prefix KV once, every row's live KV,
    q and the output."""
    kv = 2 * kv_heads * d * dtype_bytes * (prefix + batch * live)
    return kv + 2 * batch * heads * d * dtype_bytes


__all__ = ["SharedConfig", "floor_bytes", "shared_attention", "shared_reference"]
