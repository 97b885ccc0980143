"""Attention states: output and log-sum-exp of queries on a block of keys/values, and their merge.

For one head with scale `s`, a query `q` and a block of keys/values `K, V` (n rows) the state is

    lse = log sum_j exp(s * q.k_j)           natural log (base e), a scalar per query and head
    out = sum_j softmax_j(s * q.K) v_j       a d-vector per query and head

and two states of the same query on disjoint blocks merge exactly (`merge_states`). An empty
block (or a query that may see no key of it) has `lse = -inf` and `out = 0`, the neutral element
of the merge. Every function here accumulates in float32 whatever the input dtype and returns
float32; heads are grouped GQA-style (query head `h` reads key/value head `h // (H // Hkv)`,
the layout of transformers' `repeat_kv`).

This module owns the math only. It knows nothing of models, RoPE, memories or where the keys
come from.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

# Scores materialized at once by `attention_state` (elements); queries are chunked beyond it.
_MAX_SCORE_ELEMENTS = 1 << 25


class State(NamedTuple):
    """Attention state of queries on a block: `out` [B, H, T, d] and `lse` [B, H, T], float32."""

    out: torch.Tensor  # [B, H, T, d]
    lse: torch.Tensor  # [B, H, T]


def empty_state(batch: int, heads: int, length: int, head_dim: int, device=None) -> State:
    """The state of queries on an empty block: out = 0, lse = -inf (the merge's neutral element)."""
    out = torch.zeros(batch, heads, length, head_dim, dtype=torch.float32, device=device)
    lse = torch.full((batch, heads, length), -math.inf, dtype=torch.float32, device=device)
    return State(out, lse)


def attention_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
) -> State:
    """State of queries `q` [B, H, T, d] on keys `k` / values `v` [B, Hkv, N, d] (H % Hkv == 0).

    `mask` broadcasts to [B, 1|H, T, N]: boolean (True = may attend) or an additive float bias.
    Keys a query may not see count as absent; a query that sees none gets lse = -inf, out = 0.
    """
    state, _ = _attention(q, k, v, scale, mask, want_key_mean=False)
    return state


def attention_state_and_key_mean(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
) -> tuple[State, torch.Tensor]:
    """`attention_state` plus the attention-weighted mean key `k_bar` [B, H, T, d] (float32).

    `s * k_bar` is the gradient of `lse` with respect to the query (first-order lse correction).
    """
    state, k_bar = _attention(q, k, v, scale, mask, want_key_mean=True)
    assert k_bar is not None
    return state, k_bar


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,
    want_key_mean: bool,
) -> tuple[State, torch.Tensor | None]:
    b, h, t, d = q.shape
    bk, hkv, n, dk = k.shape
    if h % hkv:
        raise ValueError(f"{h} query heads cannot share {hkv} key/value heads")
    if bk not in (b, 1) or v.shape[:3] != k.shape[:3] or dk != d:
        raise ValueError(
            f"shapes do not match: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}"
        )
    dv = v.shape[-1]
    if bk == 1 and b > 1 and mask is None and n > 0 and t > 0:
        # Keys shared by the whole batch (a prefix): fold the batch into the queries so one
        # matmul reads them once instead of broadcasting a copy per row.
        folded = q.transpose(0, 1).reshape(1, h, b * t, d)  # [1, H, B*T, d]
        state, k_bar = _attention(folded, k, v, scale, None, want_key_mean)
        out = state.out.view(h, b, t, dv).transpose(0, 1)
        lse = state.lse.view(h, b, t).transpose(0, 1)
        if k_bar is not None:
            k_bar = k_bar.view(h, b, t, d).transpose(0, 1)
        return State(out, lse), k_bar
    if n == 0 or t == 0:
        state = empty_state(b, h, t, dv, device=q.device)
        k_bar = torch.zeros(b, h, t, d, dtype=torch.float32, device=q.device)
        return state, (k_bar if want_key_mean else None)
    if (_CPU_FLASH is not None and q.device.type == "cpu" and mask is None and dv == d
            and not want_key_mean):  # fmt: skip
        return _cpu_flash_state(q, k, v, scale), None
    # Chunk the queries so the score matrix [B, H, Tc, N] stays bounded.
    step = max(1, _MAX_SCORE_ELEMENTS // max(1, b * h * n))
    if step < t:
        k, v = k.float(), v.float()  # once, not per chunk (a long prefix is GBs)
        parts = [
            _attention(
                q[:, :, i : i + step],
                k,
                v,
                scale,
                None if mask is None else _slice_queries(mask, i, step, t),
                want_key_mean,
            )
            for i in range(0, t, step)
        ]
        out = torch.cat([p[0].out for p in parts], dim=2)
        lse = torch.cat([p[0].lse for p in parts], dim=2)
        k_bar = torch.cat([p[1] for p in parts], dim=2) if want_key_mean else None
        return State(out, lse), k_bar

    g = h // hkv
    qf = q.float().reshape(b, hkv, g * t, d)  # [B, Hkv, g*T, d]
    kf = k.float()  # [B|1, Hkv, N, d]
    vf = v.float()
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, Hkv, g*T, N]
    scores = scores.view(b, hkv, g, t, n)
    if mask is not None:
        m = _group_mask(mask, hkv, g)  # broadcasts to [B, Hkv, g, T, N]
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, -math.inf)
        else:
            scores = scores + m.float()
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, g, T]; -inf where nothing is visible
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores - safe.unsqueeze(-1)).view(b, hkv, g * t, n)  # masked keys give 0
    out = torch.matmul(p, vf).view(b, h, t, dv)
    k_bar = torch.matmul(p, kf).view(b, h, t, d) if want_key_mean else None
    return State(out, lse.reshape(b, h, t)), k_bar


def _cpu_flash_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> State:
    """The state from torch's fused CPU attention kernel, which returns the log-sum-exp too and
    never materializes the scores (pinned equal to the scores path by the tests)."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    # GQA: query head h reads key/value head h // g, so a group's queries are one row block of
    # its key/value head (no copy of the keys per query head)
    qf = q.float().reshape(b, hkv, (h // hkv) * t, d)
    kf, vf = k.float().expand(b, -1, -1, -1), v.float().expand(b, -1, -1, -1)
    out, lse = _CPU_FLASH(qf, kf, vf, 0.0, False, attn_mask=None, scale=scale)
    return State(out.reshape(b, h, t, d), lse.reshape(b, h, t))


# torch's fused CPU attention with log-sum-exp (a private aten op: absent, the scores path serves)
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _group_mask(mask: torch.Tensor, hkv: int, g: int) -> torch.Tensor:
    # mask [B|1, 1|H, T, N] -> [B|1, 1|Hkv, 1|g, T, N]
    mb, mh, mt, mn = mask.shape
    if mh == 1:
        return mask.view(mb, 1, 1, mt, mn)
    return mask.view(mb, hkv, g, mt, mn)


def _slice_queries(mask: torch.Tensor, start: int, step: int, t: int) -> torch.Tensor:
    if mask.shape[2] == 1 and t != 1:
        return mask
    return mask[:, :, start : start + step]


def merge_states(a: State, b: State) -> State:
    """Exact merge of two states of the same queries on disjoint blocks (online-softmax identity).

    w = sigmoid(lse_a - lse_b); out = w out_a + (1 - w) out_b; lse = logaddexp(lse_a, lse_b),
    computed so that -inf on either or both sides is exact (both -inf gives out = 0, lse = -inf).
    """
    la, lb = a.lse.float(), b.lse.float()
    m = torch.maximum(la, lb)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(la - m), torch.exp(lb - m)  # [B, H, T]; 0 for -inf sides
    total = wa + wb
    denom = torch.where(total > 0, total, torch.ones_like(total))
    out = (wa.unsqueeze(-1) * a.out.float() + wb.unsqueeze(-1) * b.out.float()) / denom.unsqueeze(
        -1
    )
    lse = m + torch.log(total)  # log(0) = -inf when both sides are empty
    return State(out, lse)


def combine_states(
    lse: torch.Tensor, out: torch.Tensor, log_weights: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of `Z = exp(lse)` over `dim`: the entry of several stored states.

    lse [..., K, ...], out [..., K, ..., d] (K at `dim` of lse), log_weights broadcast to lse.
    Returns (lse', out') with K removed: lse' = log sum_k w_k Z_k, out' = sum_k (w_k Z_k) out_k /
    sum_k w_k Z_k. With uniform weights 1/K it is the paper's Eq. 5 for one cluster.
    """
    a = lse.float() + log_weights.float()
    mx = a.amax(dim=dim, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    w = torch.exp(a - mx)  # [..., K, ...], relative to the largest term (exact shift)
    total = w.sum(dim=dim)
    new_lse = mx.squeeze(dim) + torch.log(total)
    denom = torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    new_out = (w.unsqueeze(-1) * out.float()).sum(dim=dim) / denom
    return new_lse, new_out


def aggregate_states(
    lse: torch.Tensor, out: torch.Tensor, cluster: torch.Tensor, num_clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 entries of clusters: mean of `Z = exp(lse)`, `Z`-weighted mean of `out`.

    lse [P, h], out [P, h, e], cluster [P] (ids in [0, num_clusters)). Returns lse [C, h] =
    logsumexp over members - log n (stable in log space) and out [C, h, e]. A cluster without
    members gets lse = -inf and out = 0.
    """
    p, h = lse.shape
    lse = lse.float()
    idx = cluster.long().view(p, 1).expand(p, h)
    mx = torch.full((num_clusters, h), -math.inf, dtype=torch.float32, device=lse.device)
    mx = mx.scatter_reduce(0, idx, lse, reduce="amax", include_self=True)
    safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    w = torch.exp(lse - safe[cluster])  # [P, h]
    zsum = torch.zeros(num_clusters, h, dtype=torch.float32, device=lse.device).index_add_(
        0, cluster, w
    )
    osum = torch.zeros(num_clusters, h, out.shape[-1], dtype=torch.float32, device=lse.device)
    osum.index_add_(0, cluster, w.unsqueeze(-1) * out.float())
    count = torch.bincount(cluster, minlength=num_clusters).float().clamp_min(1)  # [C]
    new_lse = safe + torch.log(zsum) - torch.log(count).unsqueeze(-1)
    denom = torch.where(zsum > 0, zsum, torch.ones_like(zsum))
    return new_lse, osum / denom.unsqueeze(-1)


def reference_state(
    q: torch.Tensor,
    blocks: list[tuple[torch.Tensor, torch.Tensor]],
    scale: float,
    masks: list[torch.Tensor | None] | None = None,
) -> State:
    """Naive reference: one softmax over the concatenated keys of all blocks, in float64.

    blocks: (k, v) pairs of [B, Hkv, N_i, d]; masks (boolean, [B|1, 1|H, T, N_i]) per block.
    For tests: it shares no code with the chunked, merged path above.
    """
    b, h, t, d = q.shape
    ks = torch.cat([k.double() for k, _ in blocks], dim=2)
    vs = torch.cat([v.double() for _, v in blocks], dim=2)
    g = h // ks.shape[1]
    ks = ks.repeat_interleave(g, dim=1).expand(b, -1, -1, -1)  # [B, H, N, d]
    vs = vs.repeat_interleave(g, dim=1).expand(b, -1, -1, -1)
    scores = torch.einsum("bhtd,bhnd->bhtn", q.double(), ks) * scale
    if masks is not None:
        full = [
            torch.ones(1, 1, t, k.shape[2], dtype=torch.bool) if m is None else m
            for m, (k, _) in zip(masks, blocks, strict=True)
        ]
        full = [m.expand(b, h, t, m.shape[-1]) for m in full]
        scores = scores.masked_fill(~torch.cat(full, dim=-1), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    if scores.shape[-1] == 0:
        return State(torch.zeros(b, h, t, vs.shape[-1], dtype=torch.float32), lse.float())
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return State(torch.einsum("bhtn,bhnd->bhtd", p, vs).float(), lse.float())
