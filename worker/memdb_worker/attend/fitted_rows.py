"""Fitted-row decode attention: a memory's fitted rows and the live KV in one fused pass.

A fitted memory (`memory.fitted`) answers a post-RoPE query q of a head of KV head g with
attention over g's rows (k_j, v_j, b_j): logits s * q.k_j + b_j. One decode step (T = 1) of
one layer, `fitted_attention`, computes attention over [rows ; live KV] exactly as
`fitted_state` merged with the live state (`state.merge_states`), in two launches
(`fitted_kernels`):

1. `fitted_phase1`: row programs per (chunk of batch rows, KV head, slice of the head's rows):
   the chunk's rows and the KV head's query heads folded into one query tile (so the rows are
   read once per step for the whole batch, as in `shared_prefix`), float8 e4m3 keys widened to
   the query dtype and times their per-row scale, the per-row bias added to the logits,
   bfloat16 values, online softmax, a partial state; and live programs per (batch row, KV head,
   slice of its live KV), as the other decode kernels have them;
2. `fitted_combine` per (batch row, query head): every partial state loaded at once (one
   round trip, so more slices in step 1 cost little here), merged, one output write.

Rows are ragged per KV head (`FittedRows.offsets`): a layer whose heads keep different numbers
of rows needs no padding. Every launch shape comes from host-side sizes fixed when the rows are
prepared (`prepare`), and no value is read back, so the launches can be captured in CUDA
graphs. `check` lists the reasons a memory's rows do not fit the kernels (the caller falls back
to the reference path, `fitted_reference`: `fitted_state` + `merge_states` in torch ops).

This module knows fitted rows and tensors; nothing of models, shards, lookups or scheduling.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from memdb_worker.attend import fitted_kernels as fk
from memdb_worker.attend.fused_kernels import HAVE_TRITON
from memdb_worker.attend.launch import live_mask, pow2, slices, sm_count
from memdb_worker.attend.shared_prefix import MAX_FOLDED_ROWS, SharedConfig
from memdb_worker.memory.fitted import fitted_state
from memdb_worker.memory.state import State, attention_state, merge_states

if TYPE_CHECKING:
    from memdb_worker.memory.memory import Memory

logger = logging.getLogger(__name__)

KEY_DTYPES = (torch.float8_e4m3fn, torch.bfloat16, torch.float16)
VALUE_DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIMS = (16, 32, 64, 128, 256)
_ATTR = "_memdb_fitted_rows"


@dataclass(frozen=True)
class FittedRows:
    """One layer's fitted rows in the form the kernels read, ragged per KV head."""

    keys: torch.Tensor  # [R, d] float8_e4m3fn | bfloat16 | float16, rows of all heads
    key_scale: torch.Tensor | None  # [R] float32, iff keys are float8: key = keys * key_scale
    values: torch.Tensor  # [R, d] bfloat16 | float16
    bias: torch.Tensor  # [R] float32, added to the logits
    offsets: torch.Tensor  # [Hkv + 1] int32 on the rows' device: head g has rows [o[g], o[g+1])
    counts: tuple[int, ...]  # rows per KV head (the host's copy of the offsets)

    @property
    def kv_heads(self) -> int:
        return len(self.counts)

    @property
    def max_rows(self) -> int:
        return max(self.counts, default=0)

    def head(self, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """KV head g's keys as float32 (times their scale), values and biases: [M_g, d],
        [M_g, d], [M_g]."""
        a = sum(self.counts[:g])
        b = a + self.counts[g]
        keys = self.keys[a:b].float()
        if self.key_scale is not None:
            keys = keys * self.key_scale[a:b, None]
        return keys, self.values[a:b], self.bias[a:b]

    def nbytes(self) -> int:
        """Bytes the kernels read of the rows (keys, scales, values, biases)."""
        ts = [self.keys, self.values, self.bias] + ([self.key_scale] if self.key_scale is not None
                                                    else [])  # fmt: skip
        return sum(t.numel() * t.element_size() for t in ts)


def rows_of_heads(
    heads: Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]],
) -> FittedRows:
    """Ragged rows from one (keys [M_g, d], key_scale [M_g] | None, values [M_g, d], bias
    [M_g]) per KV head, concatenated in head order (M_g may differ, also be 0)."""
    if not heads:
        raise ValueError("fitted rows need at least one KV head")
    counts = tuple(int(k.shape[0]) for k, _, _, _ in heads)
    scaled = [s is not None for _, s, _, _ in heads]
    if any(scaled) and not all(scaled):
        raise ValueError("either every KV head's keys have a key_scale or none")
    keys = torch.cat([k for k, _, _, _ in heads]).contiguous()
    scale = torch.cat([s for _, s, _, _ in heads]).float().contiguous() if all(scaled) else None
    values = torch.cat([v for _, _, v, _ in heads]).contiguous()
    bias = torch.cat([b for _, _, _, b in heads]).float().contiguous()
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32,
                           device=keys.device)  # fmt: skip
    return FittedRows(keys, scale, values, bias, offsets, counts)


def rows_of_layer(
    keys: torch.Tensor, key_scale: torch.Tensor | None, values: torch.Tensor, bias: torch.Tensor
) -> FittedRows:
    """Rows of a layer with M rows per KV head: keys / values [Hkv, M, d], key_scale [Hkv, M]
    | None, bias [Hkv, M] (views where the tensors are contiguous: no copy)."""
    hkv, m, d = keys.shape
    counts = (m,) * hkv
    offsets = (torch.arange(hkv + 1, device=keys.device) * m).to(torch.int32)
    scale = None if key_scale is None else key_scale.float().reshape(-1).contiguous()
    return FittedRows(keys.reshape(-1, d).contiguous(), scale,
                      values.reshape(-1, values.shape[-1]).contiguous(),
                      bias.float().reshape(-1).contiguous(), offsets, counts)  # fmt: skip


def check(memory: Memory) -> list[str]:
    """Reasons the fitted memory's rows do not fit the kernels (empty: they do)."""
    reasons = []
    ks = memory.keyspace
    if not memory.fitted:
        reasons.append("the memory holds looked-up entries, not fitted rows")
    if ks.head_dim not in HEAD_DIMS:
        reasons.append(f"head_dim {ks.head_dim} is not one of {HEAD_DIMS}")
    for i, lay in enumerate(memory.layers):
        if lay.keys.dtype not in KEY_DTYPES:
            reasons.append(f"layer {i}: keys are {lay.keys.dtype}, not one of {KEY_DTYPES}")
        if lay.out.dtype not in VALUE_DTYPES:
            reasons.append(f"layer {i}: values are {lay.out.dtype}, not one of {VALUE_DTYPES}")
        if lay.keys.shape[1] == 0:
            reasons.append(f"layer {i} holds no rows")
        if reasons:
            break
    return reasons


def prepare(memory: Memory, layer: int) -> FittedRows:
    """The kernels' form of a fitted memory's layer (computed once, kept on the layer)."""
    lay = memory.layers[layer]
    cached = getattr(lay, _ATTR, None)
    if cached is not None:
        return cached
    values, bias = lay.rows()  # [Hkv, M, d], [Hkv, M]
    rows = rows_of_layer(lay.keys, lay.key_scale, values, bias)
    setattr(lay, _ATTR, rows)
    return rows


def fitted_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None, rows: FittedRows, scale: float,
                     lse_bias: float = 0.0) -> torch.Tensor:  # fmt: skip
    """Attention of q [B, H, 1, d] over [rows ; live] in torch ops: `fitted_state` per KV head
    (its lse plus lse_bias) merged with the live state. k/v [B, Hkv, N, d] the live KV, mask
    boolean [B|1, (1, 1,) N] (True = attend) or None. Returns [B, 1, H, d] in q's dtype."""
    b, h, t, d = q.shape
    g = h // rows.kv_heads
    parts = []
    for kh in range(rows.kv_heads):
        keys, values, bias = rows.head(kh)
        qh = q[:, kh * g : (kh + 1) * g]
        parts.append(fitted_state(qh, keys[None], values[None], bias[None], scale))
    prefix = State(torch.cat([p.out for p in parts], 1), torch.cat([p.lse for p in parts], 1))
    if lse_bias:
        prefix = State(prefix.out, prefix.lse + lse_bias)
    mask4 = None if mask is None else mask.reshape(mask.shape[0], 1, 1, mask.shape[-1])
    live = attention_state(q, k, v, scale, mask4)
    return merge_states(live, prefix).out.to(q.dtype).transpose(1, 2).contiguous()


def fitted_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    rows: FittedRows,
    scale: float,
    lse_bias: float = 0.0,
    config: SharedConfig | None = None,
    _only: str | None = None,
) -> torch.Tensor:
    """`fitted_reference`'s function in two Triton launches (CUDA, or Triton's interpreter).

    Parameters: q [B, H, 1, d] post-RoPE queries (last dim contiguous); k / v [B, Hkv, N, d]
    the live KV (N may be 0); mask boolean [B|1, (1, 1,) N] or None; rows the layer's fitted
    rows (`prepare`, `rows_of_heads`); scale the softmax scale; lse_bias added to the rows'
    lse (`DecodeOptions.lse_bias`). Returns out [B, 1, H, d] in q's dtype.
    """
    if not HAVE_TRITON:
        raise RuntimeError("fitted_attention needs Triton")
    cfg = config or SharedConfig()
    b, h, t, d = q.shape
    hkv, n = rows.kv_heads, k.shape[2]
    if t != 1:
        raise ValueError("fitted_attention decodes one token per sequence (T = 1)")
    if k.shape[1] != hkv or h % hkv or rows.keys.shape[-1] != d:
        raise ValueError(f"q {list(q.shape)} / live {list(k.shape)} do not fit rows of "
                         f"{hkv} KV heads, d = {rows.keys.shape[-1]}")  # fmt: skip
    g = h // hkv
    dev = q.device
    q3 = q[:, :, 0]  # [B, H, d]
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    bc = max(1, min(b, MAX_FOLDED_ROWS // g))  # batch rows per chunk of folded queries
    c = -(-b // bc)
    gf = bc * g
    sms = sm_count(dev)
    bn = cfg.block_n
    split, slp = slices(rows.max_rows, bn, (cfg.prefix_programs_per_sm * sms) // (c * hkv))
    live_split, sl = slices(n, bn, (cfg.live_programs_per_sm * sms) // (b * hkv))
    f32 = torch.float32
    plo = torch.empty(slp, c, hkv, gf, d, dtype=f32, device=dev)
    pll = torch.empty(slp, c, hkv, gf, dtype=f32, device=dev)
    lo = torch.empty(sl, b, h, d, dtype=f32, device=dev)
    ll = torch.empty(sl, b, h, dtype=f32, device=dev)
    out = torch.empty(b, 1, h, d, dtype=q.dtype, device=dev)
    mk, sm_b, sm_n = live_mask(mask, b, ll)
    n_rows = c * hkv * slp
    n_live = b * hkv * sl if n > 0 else 0
    ks = rows.key_scale if rows.key_scale is not None else rows.bias  # unused without a scale
    fk.fitted_phase1[(n_rows + n_live,)](
        n_rows, q3, q3.stride(0), q3.stride(1), rows.keys, ks, rows.values, rows.bias,
        rows.offsets, bc, c, slp, split, float(lse_bias), plo, pll,
        k, k.stride(0), k.stride(1), k.stride(2), v, v.stride(0), v.stride(1), v.stride(2),
        mk, sm_b, sm_n, n, b, h, hkv, sl, live_split, float(scale), lo, ll,
        HAS_SCALE=rows.key_scale is not None, HAS_MASK=mask is not None,
        IEEE=q.dtype == torch.float32, D=d, G=g, GP=max(16, pow2(g)), GF=gf,
        GFP=max(16, pow2(gf)), BLOCK_N=bn,
        num_warps=cfg.num_warps or (8 if gf > 64 else 4), num_stages=cfg.num_stages,
    )  # fmt: skip
    if _only == "phase1":  # (timing breakdown in bench.attention: the first launch alone)
        return out
    fk.fitted_combine[(b * h,)](
        plo, pll, slp, c, bc, hkv, lo, ll, sl if n_live else 0, b, h,
        out, out.stride(0), out.stride(2),
        D=d, G=g, GF=gf, SP=max(2, pow2(slp)), SLQ=max(2, pow2(sl)), num_warps=cfg.combine_warps,
    )  # fmt: skip
    return out


def floor_bytes(rows: FittedRows, batch: int, heads: int, kv_heads: int, live: int, d: int,
                dtype_bytes: int = 2) -> int:  # fmt: skip
    """The fewest bytes a fitted-row decode layer moves: the rows once for the batch, every
    row's live KV, q and the output."""
    kv = 2 * batch * kv_heads * live * d * dtype_bytes
    return rows.nbytes() + kv + 2 * batch * heads * d * dtype_bytes


__all__ = [
    "FittedRows",
    "check",
    "fitted_attention",
    "fitted_reference",
    "floor_bytes",
    "prepare",
    "rows_of_heads",
    "rows_of_layer",
]
