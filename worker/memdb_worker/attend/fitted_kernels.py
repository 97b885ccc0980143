"""The Triton kernels of fitted-row decode attention (see `fitted_rows` for what they compute and
how they are launched): `rows_partial` (split-KV attention of a chunk of the batch's rows, the
query heads of one KV head folded into one query tile, over a slice of that head's fitted
rows: float8 keys times their per-row scale, the per-row bias added to the logits),
`fitted_phase1` (row programs and the live programs of `fused_kernels.live_partial` in one
launch) and `fitted_combine` (per batch row and query head: all partial states loaded at once,
merged, one output write).

This module holds the kernels only; it knows nothing of memories or models.
"""

from __future__ import annotations

from memdb_worker.attend.fused_kernels import (
    HAVE_TRITON,
    live_partial,
    online_softmax_step,
    tl,
    triton,
)

if HAVE_TRITON:

    @triton.jit
    def rows_partial(pid, q_ptr, sq_b, sq_h, keys_ptr, ks_ptr, vals_ptr, bias_ptr, off_ptr, B, BC,
        C, HKV, SLP, split, scale, lse_bias, plo_ptr, pll_ptr, HAS_SCALE: tl.constexpr,
        IEEE: tl.constexpr, D: tl.constexpr, G: tl.constexpr, GF: tl.constexpr, GFP: tl.constexpr,
        BLOCK_N: tl.constexpr):  # fmt: skip
        """Program (chunk c of BC batch rows, KV head kh, slice sl of the head's rows): the
        partial state of the chunk's GF = BC x G folded queries on rows [off[kh] + sl * split,
        min(off[kh] + (sl + 1) * split, off[kh + 1])), stored at [sl, c, kh, GF] of plo / pll.
        The logit of row j is scale * key_scale[j] * (q . keys[j]) + bias[j]; lse_bias is added
        to the lse. A slice past the head's rows gives lse = -inf, out = 0."""
        sl = pid % SLP
        rest = pid // SLP
        kh = rest % HKV
        c = rest // HKV
        offs_f = tl.arange(0, GFP)
        row_b = c * BC + offs_f // G  # the folded query's batch row and head
        fm = (offs_f < GF) & (row_b < B)
        offs_d = tl.arange(0, D)
        hq = kh * G + offs_f % G
        q = tl.load(
            q_ptr + row_b.to(tl.int64)[:, None] * sq_b + hq[:, None] * sq_h + offs_d[None, :],
            mask=fm[:, None],
            other=0.0,
        )
        if IEEE:
            q = q.to(tl.float32)
        first = tl.load(off_ptr + kh)
        end = tl.load(off_ptr + kh + 1)
        r0 = first + sl * split
        r_end = tl.minimum(r0 + split, end)
        m_i = tl.full([GFP], float("-inf"), tl.float32)
        l_i = tl.zeros([GFP], tl.float32)
        acc = tl.zeros([GFP, D], tl.float32)
        for start in range(r0, r_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            inb = offs_n < r_end
            rows = offs_n.to(tl.int64)
            kt = tl.load(keys_ptr + rows[:, None] * D + offs_d[None, :], mask=inb[:, None],
                         other=0.0)  # fmt: skip
            vt = tl.load(vals_ptr + rows[:, None] * D + offs_d[None, :], mask=inb[:, None],
                         other=0.0)  # fmt: skip
            bias = tl.load(bias_ptr + rows, mask=inb, other=0.0)
            if HAS_SCALE:
                w = tl.load(ks_ptr + rows, mask=inb, other=0.0) * scale
            else:
                w = tl.full([BLOCK_N], 1.0, tl.float32) * scale
            if IEEE:
                sc = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(kt.to(q.dtype)))
            sc = sc * w[None, :] + bias[None, :]
            sc = tl.where(inb[None, :], sc, float("-inf"))
            m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, sc, vt, IEEE)
        lse = tl.where(l_i > 0, m_i + tl.log(l_i) + lse_bias, float("-inf"))
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        prow = ((sl * C + c) * HKV + kh) * GF + offs_f
        pm = offs_f < GF
        tl.store(pll_ptr + prow, lse, mask=pm)
        tl.store(plo_ptr + prow.to(tl.int64)[:, None] * D + offs_d[None, :], out,
                 mask=pm[:, None])  # fmt: skip

    @triton.jit
    def fitted_phase1(n_rows, q_ptr, sq_b, sq_h, keys_ptr, ks_ptr, vals_ptr, bias_ptr, off_ptr,
        BC, C, SLP, split, lse_bias, plo_ptr, pll_ptr, k_ptr, sk_b, sk_h, sk_n, v_ptr, sv_b, sv_h,
        sv_n, mask_ptr, sm_b, sm_n, N, B, H, HKV, SL, live_split, scale, lo_ptr, ll_ptr,
        HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr,
        G: tl.constexpr, GP: tl.constexpr, GF: tl.constexpr, GFP: tl.constexpr,
        BLOCK_N: tl.constexpr):  # fmt: skip
        """Row programs (`rows_partial`, the first n_rows) and live programs (per batch row, KV
        head and slice of its live KV) in one launch; partial states out."""
        pid = tl.program_id(0)
        if pid < n_rows:
            rows_partial(
                pid, q_ptr, sq_b, sq_h, keys_ptr, ks_ptr, vals_ptr, bias_ptr, off_ptr, B, BC, C,
                HKV, SLP, split, scale, lse_bias, plo_ptr, pll_ptr,
                HAS_SCALE, IEEE, D, G, GF, GFP, BLOCK_N,
            )  # fmt: skip
        else:
            live_partial(
                pid - n_rows, q_ptr, sq_b, sq_h, k_ptr, sk_b, sk_h, sk_n, v_ptr, sv_b, sv_h,
                sv_n, mask_ptr, sm_b, sm_n, N, B, H, HKV, SL, live_split, scale, lo_ptr, ll_ptr,
                HAS_MASK, IEEE, False, D, G, GP, BLOCK_N,
            )  # fmt: skip

    @triton.jit
    def fitted_combine(plo_ptr, pll_ptr, SLP, C, BC, HKV, lo_ptr, ll_ptr, SL, B, H, out_ptr,
                       sout_b, sout_h, D: tl.constexpr, G: tl.constexpr, GF: tl.constexpr,
                       SP: tl.constexpr, SLQ: tl.constexpr):  # fmt: skip
        """Per (batch row, query head): every row slice's and live slice's partial state
        loaded at once (SP >= SLP, SLQ >= SL: one round trip), merged, written once."""
        pid = tl.program_id(0)
        hq = pid % H
        b = pid // H
        kh = hq // G
        offs_d = tl.arange(0, D)
        offs_s = tl.arange(0, SP)
        sm = offs_s < SLP
        prow = ((offs_s * C + b // BC) * HKV + kh) * GF + (b % BC) * G + hq % G
        pl = tl.load(pll_ptr + prow, mask=sm, other=float("-inf"))
        po = tl.load(plo_ptr + prow.to(tl.int64)[:, None] * D + offs_d[None, :], mask=sm[:, None],
                     other=0.0)  # fmt: skip
        offs_l = tl.arange(0, SLQ)
        lm = offs_l < SL
        lrow = (offs_l * B + b) * H + hq
        ql = tl.load(ll_ptr + lrow, mask=lm, other=float("-inf"))
        qo = tl.load(lo_ptr + lrow.to(tl.int64)[:, None] * D + offs_d[None, :], mask=lm[:, None],
                     other=0.0)  # fmt: skip
        mx = tl.maximum(tl.max(pl, axis=0), tl.max(ql, axis=0))
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        wp = tl.exp(pl - mx)
        wl = tl.exp(ql - mx)
        total = tl.sum(wp, axis=0) + tl.sum(wl, axis=0)
        acc = tl.sum(wp[:, None] * po, axis=0) + tl.sum(wl[:, None] * qo, axis=0)
        res = acc / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + b.to(tl.int64) * sout_b + hq * sout_h + offs_d,
                 res.to(out_ptr.dtype.element_ty))  # fmt: skip
