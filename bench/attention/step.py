"""Step scope of bench.attention: a whole decode step of an 8B-shaped model in a CUDA graph.

A decode step (embedding, 32 layers of RMSNorm / QKV / RoPE / KV write / attention / O /
SwiGLU MLP, final norm, LM head) of random Llama-3.1-8B-shaped weights, captured in a CUDA
graph; one layer's weights serve all 32 layers (each layer still streams its 0.44 GB from HBM,
far past L2), the KV caches and memories are distinct per layer (the KV cache is shared by groups
of layers when distinct ones would not fit; each still far past L2). Attention per way:

- no prefix: SDPA over the live context only (the memory's lower bound);
- sdpa:      per-row SDPA over each row's copy of the prefix plus its live context;
- shared:    the prefix KV once per layer for the whole batch (`shared_prefix.shared_attention`)
             plus each row's live context;
- memory:    the fused memory path, per memory format.

The memory's time does not depend on N: it is measured once per (batch, M, format) and repeated
on every N row. Called by `bench.attention.main` (`--scopes step`); writes rows of scope "step".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.attention import cases as A

HIDDEN, INTER, VOCAB, LAYERS = 4096, 14336, 128256, 32
KV_BUDGET = 36e9  # bytes of KV cache the step benchmark allocates at most


class Model:
    """Random Llama-3.1-8B-shaped weights (one layer's weights shared by all layers)."""

    def __init__(self):
        bf = A.ACT
        g = torch.Generator(device=A.DEVICE).manual_seed(5)

        def w(*shape, std=0.02):
            return (torch.randn(*shape, device=A.DEVICE, generator=g) * std).to(bf)

        self.emb = w(VOCAB, HIDDEN)
        self.lm_head = w(VOCAB, HIDDEN)
        self.wqkv = w((A.H + 2 * A.HKV) * A.D, HIDDEN)
        self.wo = w(HIDDEN, A.H * A.D)
        self.wgu = w(2 * INTER, HIDDEN)
        self.wdown = w(HIDDEN, INTER)
        self.ln = torch.ones(HIDDEN, device=A.DEVICE, dtype=bf)
        self.inv = A.rope_spec().inv_freq.to(A.DEVICE)


def make_step(model: Model, batch: int, attn, kv_pos: int, layers: int | None = None):
    """A decode step as a closure over static buffers; attn(layer, q, k_new, v_new) -> B*H*D."""
    H, HKV, D = A.H, A.HKV, A.D
    layers = LAYERS if layers is None else layers
    tok = torch.randint(0, VOCAB, (batch,), device=A.DEVICE)
    pos = torch.full((batch,), kv_pos, device=A.DEVICE)
    freqs = pos.float()[:, None] * model.inv
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(A.ACT)[:, None], emb.sin().to(A.ACT)[:, None]

    def rope(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), -1) * sin

    def step():
        h = model.emb[tok]
        for layer in range(layers):
            a = F.rms_norm(h, (HIDDEN,), model.ln, 1e-5)
            qkv = a @ model.wqkv.T
            q = rope(qkv[:, : H * D].view(batch, H, D))
            k = rope(qkv[:, H * D : (H + HKV) * D].view(batch, HKV, D))
            v = qkv[:, (H + HKV) * D :].view(batch, HKV, D)
            o = attn(layer, q.unsqueeze(2), k, v, pos)
            h = h + o.reshape(batch, H * D) @ model.wo.T
            a = F.rms_norm(h, (HIDDEN,), model.ln, 1e-5)
            gu = a @ model.wgu.T
            x = F.silu(gu[:, :INTER]) * gu[:, INTER:]
            h = h + x @ model.wdown.T
        return F.rms_norm(h, (HIDDEN,), model.ln, 1e-5) @ model.lm_head.T

    return step


def kv_caches(batch: int, length: int, layers: int, budget: float = KV_BUDGET):
    """Distinct random KV buffers for as many layers as fit the budget (layers share them
    round-robin beyond)."""
    per = 2 * batch * A.HKV * length * A.D * 2
    n_buf = max(1, min(layers, int(budget // per)))
    if n_buf < 2 and layers > 1:
        raise torch.OutOfMemoryError(f"KV cache of {per / 1e9:.1f} GB per layer")
    bufs = []
    for i in range(n_buf):
        g = torch.Generator(device=A.DEVICE).manual_seed(100 + i)
        shape = (batch, A.HKV, length, A.D)
        k = torch.randn(*shape, device=A.DEVICE, generator=g, dtype=A.ACT)
        v = torch.randn(*shape, device=A.DEVICE, generator=g, dtype=A.ACT)
        bufs.append((k, v))
    return bufs, n_buf


def _live_write(bufs, nb, layer, k, v, at):
    kc, vc = bufs[layer % nb]
    kc[:, :, at] = k
    vc[:, :, at] = v
    return kc, vc


def step_rows(results: dict, bw: float, configs: dict, ns, ms, batches, formats,
              shared_configs: dict) -> None:  # fmt: skip
    from memdb_worker.attend import fused
    from memdb_worker.attend.shared_prefix import SharedConfig, shared_attention

    model = Model()
    rows = results["rows"]
    scale = A.D**-0.5
    live = A.LIVE
    for batch in batches:
        bufs, nb = kv_caches(batch, live, LAYERS)

        def attn_live(layer, q, k, v, pos, bufs=bufs, nb=nb):
            kc, vc = _live_write(bufs, nb, layer, k, v, live - 1)
            return F.scaled_dot_product_attention(q, kc, vc, scale=scale, enable_gqa=True)

        plain = A.bench(A.graphed(make_step(model, batch, attn_live, live - 1)), rep=200)
        A.log(f"step B={batch}: no prefix {plain / 1e3:.2f} ms")
        cfg = configs.get(batch, fused.default_config(batch))
        mem_t = {}
        for fmt in formats:
            for m in ms:
                mem = A.make_memory(m, layers=LAYERS, seed=m, fmt=fmt)
                fls = [fused.prepare_layer(mem, i) for i in range(LAYERS)]
                corr = mem.lse_corrected

                def attn_mem(layer, q, k, v, pos, fls=fls, cfg=cfg, corr=corr, bufs=bufs, nb=nb):
                    kc, vc = _live_write(bufs, nb, layer, k, v, live - 1)
                    return fused.memory_attention(
                        q, kc, vc, None, pos, fls[layer], model.inv, 1.0, scale, config=cfg,
                        lse_correction=corr,
                    )  # fmt: skip

                t = A.bench(A.graphed(make_step(model, batch, attn_mem, live - 1)), rep=200)
                fl = fls[0]
                scan = fl.keys.numel() * fl.keys.element_size() + fl.inv_norm.numel() * 4
                mem_t[fmt, m] = (t, mem.nbytes() // LAYERS, scan)
                A.log(f"step B={batch} M={m} {fmt}: memory {t / 1e3:.2f} ms")
                del mem, fls
                torch.cuda.empty_cache()
        scfg = shared_configs.get(batch, SharedConfig())
        for n in ns:
            t_sdpa = t_shared = None
            nbp = 0
            try:
                pbufs, nbp = kv_caches(1, n, LAYERS, KV_BUDGET / 2)

                def attn_shared(layer, q, k, v, pos, pbufs=pbufs, nbp=nbp, bufs=bufs, nb=nb,
                                scfg=scfg):  # fmt: skip
                    kc, vc = _live_write(bufs, nb, layer, k, v, live - 1)
                    pk, pv = pbufs[layer % nbp]
                    return shared_attention(q, pk, pv, kc, vc, None, scale, scfg)

                step = make_step(model, batch, attn_shared, n + live - 1)
                t_shared = A.bench(A.graphed(step), rep=200)
                del pbufs
                torch.cuda.empty_cache()
            except torch.OutOfMemoryError as exc:  # a failing kernel must not drop the baseline
                A.log(f"step B={batch} N={n}: shared skipped ({exc!r:.200})")
            try:
                sbufs, snb = kv_caches(batch, n + live, LAYERS)

                def attn_sdpa(layer, q, k, v, pos, sbufs=sbufs, snb=snb, n=n):
                    kc, vc = _live_write(sbufs, snb, layer, k, v, n + live - 1)
                    return F.scaled_dot_product_attention(q, kc, vc, scale=scale, enable_gqa=True)

                t_sdpa = A.bench(A.graphed(make_step(model, batch, attn_sdpa, n + live - 1)),
                                 rep=200)  # fmt: skip
                del sbufs
                torch.cuda.empty_cache()
            except torch.OutOfMemoryError as exc:
                A.log(f"step B={batch} N={n}: per-row sdpa skipped ({exc})")
            if t_sdpa is None and t_shared is None:
                continue
            best = min(t for t in (t_sdpa, t_shared) if t is not None)
            for (fmt, m), (t, nbytes, scan) in mem_t.items():
                key_bytes = LAYERS * scan  # what the scans read in all layers
                rows.append({
                    "N": n, "M": m, "batch": batch, "scope": "step", "memory_format": fmt,
                    "memory_bytes": nbytes, "prefix_kv_bytes": A.prefix_kv_bytes(n),
                    "sdpa_us": t_sdpa, "shared_us": t_shared, "memory_us": t,
                    "floor_us": plain + key_bytes / bw * 1e6, "no_prefix_us": plain,
                    "prefix_buffers": nbp, "layers": LAYERS,
                    "speedup": None if t_sdpa is None else t_sdpa / t,
                    "speedup_vs_shared": None if t_shared is None else t_shared / t,
                    "speedup_vs_best": best / t, "vs_no_prefix": t / plain,
                })  # fmt: skip
            A.log(f"step B={batch} N={n}: sdpa {_ms(t_sdpa)} ms, shared {_ms(t_shared)} ms")
        del bufs
        torch.cuda.empty_cache()


def _ms(t: float | None) -> str:
    return "n/a" if t is None else f"{t / 1e3:.2f}"


__all__ = ["Model", "make_step", "kv_caches", "step_rows"]
