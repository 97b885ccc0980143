"""The Triton kernels of the fused decode path (see `fused` for what they compute and how they
are launched): `_scan` (the lookup over a memory's keys), `_live` (split-KV flash attention of
one KV head's query heads over a slice of keys: the live context, or a shared prefix with the
batch folded into the query rows), `phase1` (scan and live programs in one launch) and
`combine` (top-1 gather, live reduction and merge).

This module holds the kernels only; it knows nothing of memories or models.
"""

from __future__ import annotations

try:  # Triton is optional: without it (or on CPU) the reference path runs
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None
    HAVE_TRITON = False

if HAVE_TRITON:

    @triton.jit
    def scan(
        pid,
        q_ptr,
        sq_b,
        sq_h,
        pos_ptr,
        inv_freq_ptr,
        rope_scaling,
        keys_ptr,
        inv_norm_ptr,
        bias_ptr,
        M,
        best_s_ptr,
        best_i_ptr,
        B,
        NG,
        S,
        tiles_per_split,
        HAS_BIAS: tl.constexpr,
        KEY_F32: tl.constexpr,
        KEY_FP8: tl.constexpr,
        KEYS_A: tl.constexpr,
        GEMV: tl.constexpr,
        D: tl.constexpr,
        HPG: tl.constexpr,
        DK: tl.constexpr,
        QH: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        # DK = HPG * D (the group's heads side by side, QH = 1) or D (the mean of its HPG heads'
        # queries, QH = HPG); float8 keys are widened to float16 tiles (exact) for the products
        HALF: tl.constexpr = D // 2
        i = pid % NG
        rest = pid // NG
        split = rest % S
        bblk = rest // S
        offs_b = bblk * BLOCK_B + tl.arange(0, BLOCK_B)
        bmask = offs_b < B
        kk = tl.arange(0, DK)
        dd = kk % D
        partner = (dd + HALF) % D
        sign = tl.where(dd < HALF, -1.0, 1.0)
        pos = tl.load(pos_ptr + offs_b, mask=bmask, other=0).to(tl.float32)
        f = tl.load(inv_freq_ptr + (dd % HALF))
        ang = pos[:, None] * f[None, :]
        c = tl.cos(ang) * rope_scaling
        s = tl.sin(ang) * rope_scaling
        qpre = tl.zeros([BLOCK_B, DK], tl.float32)
        for j in tl.static_range(QH):
            head = i * HPG + j + kk // D
            qrow = q_ptr + offs_b.to(tl.int64)[:, None] * sq_b + head[None, :] * sq_h
            x = tl.load(qrow + dd[None, :], mask=bmask[:, None], other=0.0).to(tl.float32)
            xr = tl.load(qrow + partner[None, :], mask=bmask[:, None], other=0.0).to(tl.float32)
            xr = xr * sign[None, :]  # rotate_half(x)
            qpre += (x * c - xr * s) / (c * c + s * s)  # undo RoPE, [BLOCK_B, DK] float32
        if QH > 1:
            qpre = qpre / QH
        if KEY_F32 or GEMV:
            q_hi = qpre
            q_lo = qpre
        elif KEY_FP8:
            q_hi = qpre.to(tl.float16)
            q_lo = (qpre - q_hi.to(tl.float32)).to(tl.float16)
        else:
            kdt = keys_ptr.dtype.element_ty
            q_hi = qpre.to(kdt)
            q_lo = (qpre - q_hi.to(tl.float32)).to(kdt)
        q_hi_t = tl.trans(q_hi)  # [DK, BLOCK_B]
        q_lo_t = tl.trans(q_lo)

        # running maximum per (entry lane, row), reduced once after the loop (no per-tile
        # cross-warp reduction); ties go to the smallest entry id
        m_start = split * tiles_per_split * BLOCK_M
        offs_m0 = tl.arange(0, BLOCK_M)
        kbase = keys_ptr + i.to(tl.int64) * M * DK
        if KEYS_A or GEMV:
            run = tl.full([BLOCK_M, BLOCK_B], float("-inf"), tl.float32)
            run_i = tl.zeros([BLOCK_M, BLOCK_B], tl.int32)
        else:
            run = tl.full([BLOCK_B, BLOCK_M], float("-inf"), tl.float32)
            run_i = tl.zeros([BLOCK_B, BLOCK_M], tl.int32)
        for tile in range(tiles_per_split):
            m0 = m_start + tile * BLOCK_M
            offs_m = m0 + offs_m0
            mm = offs_m < M
            kt = tl.load(kbase + offs_m[:, None] * DK + kk[None, :], mask=mm[:, None], other=0.0)
            if KEY_FP8:
                kt = kt.to(tl.float16)
            inv_n = tl.load(inv_norm_ptr + i * M + offs_m, mask=mm, other=0.0)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + i * M + offs_m, mask=mm, other=0.0)
            if GEMV:  # few rows: float32 multiply-adds from registers, no tensor cores
                sc = tl.sum(kt.to(tl.float32)[:, None, :] * qpre[None, :, :], axis=2)
                if HAS_BIAS:
                    sc = sc + bias[:, None]
                sc = sc * inv_n[:, None]
                sc = tl.where(mm[:, None], sc, float("-inf"))
                upd = sc > run
                run_i = tl.where(upd, offs_m[:, None], run_i)
            elif KEYS_A:  # the key tile is the large operand: scores^T [BLOCK_M, BLOCK_B]
                if KEY_F32:
                    sc = tl.dot(kt, q_hi_t, input_precision="tf32x3")
                else:
                    sc = tl.dot(kt, q_hi_t) + tl.dot(kt, q_lo_t)
                if HAS_BIAS:
                    sc = sc + bias[:, None]
                sc = sc * inv_n[:, None]
                sc = tl.where(mm[:, None], sc, float("-inf"))
                upd = sc > run
                run_i = tl.where(upd, offs_m[:, None], run_i)
            else:  # scores [BLOCK_B, BLOCK_M]
                if KEY_F32:
                    sc = tl.dot(q_hi, tl.trans(kt), input_precision="tf32x3")
                else:
                    ktt = tl.trans(kt)
                    sc = tl.dot(q_hi, ktt) + tl.dot(q_lo, ktt)
                if HAS_BIAS:
                    sc = sc + bias[None, :]
                sc = sc * inv_n[None, :]
                sc = tl.where(mm[None, :], sc, float("-inf"))
                upd = sc > run
                run_i = tl.where(upd, offs_m[None, :], run_i)
            run = tl.where(upd, sc, run)
        if KEYS_A or GEMV:
            best = tl.max(run, axis=0)
            besti = tl.min(tl.where(run == best[None, :], run_i, 2147483647), axis=0)
        else:
            best = tl.max(run, axis=1)
            besti = tl.min(tl.where(run == best[:, None], run_i, 2147483647), axis=1)
        dst = (split * B + offs_b) * NG + i
        tl.store(best_s_ptr + dst, best, mask=bmask)
        tl.store(best_i_ptr + dst, besti, mask=bmask)

    @triton.jit
    def online_softmax_step(m_i, l_i, acc, sc, vt, IEEE: tl.constexpr):
        """One tile of flash attention: scores sc [R, N] (-inf where masked) and values vt
        [N, D] into the running (max, sum, weighted sum) of R query rows; returns them."""
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def live_partial(
        pid,
        q_ptr,
        sq_b,
        sq_h,
        k_ptr,
        sk_b,
        sk_h,
        sk_n,
        v_ptr,
        sv_b,
        sv_h,
        sv_n,
        mask_ptr,
        sm_b,
        sm_n,
        N,
        B,
        H,
        HKV,
        SL,
        live_split,
        scale,
        lo_ptr,
        ll_ptr,
        HAS_MASK: tl.constexpr,
        IEEE: tl.constexpr,
        LIVE_T: tl.constexpr,
        D: tl.constexpr,
        G: tl.constexpr,
        GP: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        sl = pid % SL
        rest = pid // SL
        kh = rest % HKV
        b = (rest // HKV).to(tl.int64)
        offs_g = tl.arange(0, GP)
        gm = offs_g < G
        offs_d = tl.arange(0, D)
        hq = kh * G + offs_g
        q = tl.load(
            q_ptr + b * sq_b + hq[:, None] * sq_h + offs_d[None, :], mask=gm[:, None], other=0.0
        )
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        acc_t = tl.zeros([D, GP], tl.float32)
        q_t = tl.trans(q)
        n0 = sl * live_split
        n_end = tl.minimum(n0 + live_split, N)
        kbase = k_ptr + b * sk_b + kh * sk_h
        vbase = v_ptr + b * sv_b + kh * sv_h
        for start in range(n0, n_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            inb = offs_n < n_end
            kt = tl.load(
                kbase + offs_n.to(tl.int64)[:, None] * sk_n + offs_d[None, :],
                mask=inb[:, None],
                other=0.0,
            )
            vt = tl.load(
                vbase + offs_n.to(tl.int64)[:, None] * sv_n + offs_d[None, :],
                mask=inb[:, None],
                other=0.0,
            )
            ok = inb
            if HAS_MASK:
                mv = tl.load(mask_ptr + b * sm_b + offs_n.to(tl.int64) * sm_n, mask=inb, other=0)
                ok = ok & (mv != 0)
            if LIVE_T:  # keys / values as the large operands: s^T [BLOCK_N, GP], acc^T [D, GP]
                if IEEE:
                    sc = tl.dot(kt, q_t, input_precision="ieee") * scale
                else:
                    sc = tl.dot(kt, q_t) * scale
                sc = tl.where(ok[:, None], sc, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(sc, axis=0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(sc - m_safe[None, :])
                alpha = tl.exp(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, axis=0)
                if IEEE:
                    pv = tl.dot(tl.trans(vt.to(tl.float32)), p, input_precision="ieee")
                else:
                    pv = tl.dot(tl.trans(vt), p.to(vt.dtype))
                acc_t = acc_t * alpha[None, :] + pv
            else:
                if IEEE:
                    sc = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale
                else:
                    sc = tl.dot(q, tl.trans(kt)) * scale
                sc = tl.where(ok[None, :], sc, float("-inf"))
                m_new, l_i, acc = online_softmax_step(m_i, l_i, acc, sc, vt, IEEE)
            m_i = m_new
        if LIVE_T:
            acc = tl.trans(acc_t)
        lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        row = (sl * B + b) * H + hq
        tl.store(ll_ptr + row, lse, mask=gm)
        tl.store(lo_ptr + row[:, None] * D + offs_d[None, :], out, mask=gm[:, None])

    @triton.jit
    def phase1(
        n_scan,
        q_ptr,
        sq_b,
        sq_h,
        pos_ptr,
        inv_freq_ptr,
        rope_scaling,
        keys_ptr,
        inv_norm_ptr,
        bias_ptr,
        M,
        best_s_ptr,
        best_i_ptr,
        B,
        NG,
        S,
        tiles_per_split,
        k_ptr,
        sk_b,
        sk_h,
        sk_n,
        v_ptr,
        sv_b,
        sv_h,
        sv_n,
        mask_ptr,
        sm_b,
        sm_n,
        N,
        H,
        HKV,
        SL,
        live_split,
        scale,
        lo_ptr,
        ll_ptr,
        HAS_BIAS: tl.constexpr,
        KEY_F32: tl.constexpr,
        KEY_FP8: tl.constexpr,
        HAS_MASK: tl.constexpr,
        IEEE: tl.constexpr,
        KEYS_A: tl.constexpr,
        LIVE_T: tl.constexpr,
        GEMV: tl.constexpr,
        D: tl.constexpr,
        HPG: tl.constexpr,
        DK: tl.constexpr,
        QH: tl.constexpr,
        G: tl.constexpr,
        GP: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if pid < n_scan:
            scan(
                pid, q_ptr, sq_b, sq_h, pos_ptr, inv_freq_ptr, rope_scaling, keys_ptr,
                inv_norm_ptr, bias_ptr, M, best_s_ptr, best_i_ptr, B, NG, S, tiles_per_split,
                HAS_BIAS, KEY_F32, KEY_FP8, KEYS_A, GEMV, D, HPG, DK, QH, BLOCK_B, BLOCK_M,
            )  # fmt: skip
        else:
            live_partial(
                pid - n_scan, q_ptr, sq_b, sq_h, k_ptr, sk_b, sk_h, sk_n, v_ptr, sv_b, sv_h,
                sv_n, mask_ptr, sm_b, sm_n, N, B, H, HKV, SL, live_split, scale, lo_ptr, ll_ptr,
                HAS_MASK, IEEE, LIVE_T, D, G, GP, BLOCK_N,
            )  # fmt: skip

    @triton.jit
    def combine(
        best_s_ptr,
        best_i_ptr,
        S,
        B,
        NG,
        mem_out_ptr,
        so_i,
        so_m,
        so_j,
        mem_lse_ptr,
        sl_i,
        sl_m,
        lse_bias,
        q_ptr,
        sq_b,
        sq_h,
        pos_ptr,
        inv_freq_ptr,
        rope_scaling,
        qm_ptr,
        sqm_i,
        sqm_m,
        sqm_j,
        kb_ptr,
        skb_i,
        skb_m,
        skb_j,
        scale,
        lo_ptr,
        ll_ptr,
        SL,
        out_ptr,
        sout_b,
        sout_h,
        ids_ptr,
        H,
        HKV,
        D: tl.constexpr,
        HPG: tl.constexpr,
        G: tl.constexpr,
        GP: tl.constexpr,
        SP: tl.constexpr,
        SLP: tl.constexpr,
        CORRECT: tl.constexpr,
    ):
        HALF: tl.constexpr = D // 2
        pid = tl.program_id(0)
        kh = pid % HKV
        b = pid // HKV
        b64 = b.to(tl.int64)
        offs_g = tl.arange(0, GP)
        gm = offs_g < G
        hq = kh * G + offs_g
        grp = hq // HPG
        j = hq % HPG
        offs_d = tl.arange(0, D)
        # top-1 entry over the scan slices (slices are in entry order: first maximum wins)
        offs_s = tl.arange(0, SP)
        sm = gm[:, None] & (offs_s < S)[None, :]
        part = (offs_s[None, :] * B + b) * NG + grp[:, None]
        ps = tl.load(best_s_ptr + part, mask=sm, other=float("-inf"))
        pi = tl.load(best_i_ptr + part, mask=sm, other=0)
        sel = tl.argmax(ps, axis=1)
        ids = tl.sum(tl.where(offs_s[None, :] == sel[:, None], pi, 0), axis=1)
        ids64 = ids.to(tl.int64)
        mo = tl.load(
            mem_out_ptr + grp[:, None] * so_i + ids64[:, None] * so_m + j[:, None] * so_j
            + offs_d[None, :],
            mask=gm[:, None],
            other=0.0,
        ).to(tl.float32)  # fmt: skip
        ml = tl.load(mem_lse_ptr + grp * sl_i + ids64 * sl_m + j, mask=gm, other=float("-inf"))
        if CORRECT:  # first-order lse correction: + scale * (q_pre - q_mean) . k_bar
            partner = (offs_d + HALF) % D
            sign = tl.where(offs_d < HALF, -1.0, 1.0)
            qrow = q_ptr + b64 * sq_b + hq[:, None] * sq_h
            x = tl.load(qrow + offs_d[None, :], mask=gm[:, None], other=0.0).to(tl.float32)
            xr = tl.load(qrow + partner[None, :], mask=gm[:, None], other=0.0).to(tl.float32)
            xr = xr * sign[None, :]  # rotate_half(x)
            pos = tl.load(pos_ptr + b).to(tl.float32)
            ang = pos * tl.load(inv_freq_ptr + (offs_d % HALF))
            c = tl.cos(ang) * rope_scaling
            s = tl.sin(ang) * rope_scaling
            qpre = (x * c[None, :] - xr * s[None, :]) / (c * c + s * s)[None, :]  # undo RoPE
            qm = tl.load(
                qm_ptr + grp[:, None] * sqm_i + ids64[:, None] * sqm_m + j[:, None] * sqm_j
                + offs_d[None, :],
                mask=gm[:, None],
                other=0.0,
            ).to(tl.float32)  # fmt: skip
            kb = tl.load(
                kb_ptr + grp[:, None] * skb_i + ids64[:, None] * skb_m + j[:, None] * skb_j
                + offs_d[None, :],
                mask=gm[:, None],
                other=0.0,
            ).to(tl.float32)  # fmt: skip
            ml = ml + scale * tl.sum((qpre - qm) * kb, axis=1)
        ml = ml + lse_bias
        # live slices, all at once: weights [SLP, GP], outputs [SLP, GP, D]
        offs_l = tl.arange(0, SLP)
        lmask = (offs_l < SL)[:, None] & gm[None, :]
        lrow = (offs_l[:, None] * B + b) * H + hq[None, :]
        ll = tl.load(ll_ptr + lrow, mask=lmask, other=float("-inf"))
        lo = tl.load(lo_ptr + lrow[:, :, None] * D + offs_d[None, None, :],
                     mask=lmask[:, :, None], other=0.0)  # fmt: skip
        mx = tl.maximum(tl.max(ll, axis=0), ml)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        wl = tl.exp(ll - mx[None, :])
        wm = tl.exp(ml - mx)
        total = tl.sum(wl, axis=0) + wm
        acc = wm[:, None] * mo + tl.sum(wl[:, :, None] * lo, axis=0)
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(
            out_ptr + b64 * sout_b + hq[:, None] * sout_h + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=gm[:, None],
        )
        tl.store(ids_ptr + b64 * H + hq, ids, mask=gm)

    # -- shared-prefix (cascade) attention: see memdb_worker.attend.shared_prefix ----------------

    @triton.jit
    def shared_phase1(
        n_prefix,
        qf_ptr,
        sqf_b,
        pk_ptr,
        spk_h,
        spk_n,
        pv_ptr,
        spv_h,
        spv_n,
        NP,
        C,
        HF,
        SLP,
        p_split,
        plo_ptr,
        pll_ptr,
        q_ptr,
        sq_b,
        sq_h,
        k_ptr,
        sk_b,
        sk_h,
        sk_n,
        v_ptr,
        sv_b,
        sv_h,
        sv_n,
        mask_ptr,
        sm_b,
        sm_n,
        N,
        B,
        H,
        HKV,
        SL,
        live_split,
        scale,
        lo_ptr,
        ll_ptr,
        HAS_MASK: tl.constexpr,
        IEEE: tl.constexpr,
        D: tl.constexpr,
        G: tl.constexpr,
        GP: tl.constexpr,
        GF: tl.constexpr,
        GFP: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Prefix programs (folded queries: GF = rows x G per KV head, keys shared by every row,
        split over the prefix) and live programs (per row) in one launch; partial states out."""
        pid = tl.program_id(0)
        if pid < n_prefix:
            live_partial(
                pid, qf_ptr, sqf_b, D, pk_ptr, 0, spk_h, spk_n, pv_ptr, 0, spv_h, spv_n,
                pk_ptr, 0, 0, NP, C, HF, HKV, SLP, p_split, scale, plo_ptr, pll_ptr,
                False, IEEE, False, D, GF, GFP, BLOCK_N,
            )  # fmt: skip
        else:
            live_partial(
                pid - n_prefix, q_ptr, sq_b, sq_h, k_ptr, sk_b, sk_h, sk_n, v_ptr, sv_b, sv_h,
                sv_n, mask_ptr, sm_b, sm_n, N, B, H, HKV, SL, live_split, scale, lo_ptr, ll_ptr,
                HAS_MASK, IEEE, False, D, G, GP, BLOCK_N,
            )  # fmt: skip

    @triton.jit
    def merge_block(m_i, l_i, acc, lse, out):
        """Online-softmax merge of partial states lse [S, GP] / out [S, GP, D] into the running
        (max, sum, weighted sum)."""
        m_new = tl.maximum(m_i, tl.max(lse, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp(lse - m_safe[None, :])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(w, axis=0)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * out, axis=0)
        return m_new, l_i, acc

    @triton.jit
    def shared_combine(plo_ptr, pll_ptr, SLP, C, HF, BC, lo_ptr, ll_ptr, SL, B, H, HKV, out_ptr,
                       sout_b, sout_h, D: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                       GF: tl.constexpr, SB: tl.constexpr):  # fmt: skip
        """Per (row, KV head): merge the prefix slices' and the live slices' partial states."""
        pid = tl.program_id(0)
        kh = pid % HKV
        b = pid // HKV
        offs_g = tl.arange(0, GP)
        gm = offs_g < G
        hq = kh * G + offs_g
        offs_d = tl.arange(0, D)
        offs_s = tl.arange(0, SB)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        frow = kh * GF + (b % BC) * G + offs_g  # the row's queries among the folded ones
        for s0 in range(0, SLP, SB):
            sm = ((s0 + offs_s) < SLP)[:, None] & gm[None, :]
            row = ((s0 + offs_s)[:, None] * C + b // BC) * HF + frow[None, :]
            lse = tl.load(pll_ptr + row, mask=sm, other=float("-inf"))
            out = tl.load(plo_ptr + row[:, :, None] * D + offs_d[None, None, :],
                          mask=sm[:, :, None], other=0.0)  # fmt: skip
            m_i, l_i, acc = merge_block(m_i, l_i, acc, lse, out)
        for s0 in range(0, SL, SB):
            sm = ((s0 + offs_s) < SL)[:, None] & gm[None, :]
            row = ((s0 + offs_s)[:, None] * B + b) * H + hq[None, :]
            lse = tl.load(ll_ptr + row, mask=sm, other=float("-inf"))
            out = tl.load(lo_ptr + row[:, :, None] * D + offs_d[None, None, :],
                          mask=sm[:, :, None], other=0.0)  # fmt: skip
            m_i, l_i, acc = merge_block(m_i, l_i, acc, lse, out)
        res = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + b.to(tl.int64) * sout_b + hq[:, None] * sout_h + offs_d[None, :],
            res.to(out_ptr.dtype.element_ty),
            mask=gm[:, None],
        )
