"""Decode attention with a memory versus the prefix in the KV cache (GPU; device tool).

    python -m bench.attention [--out bench/results] [--quick]

Llama-3.1-8B-shaped attention (32 query heads, 8 KV heads, head dim 128, bf16, random weights),
live context C = 512 tokens, batch in {1, 8, 32}, prefix N in {1K ... 128K}, memory budget
M in {1K, 4K, 8K} (float16 keys and states, pre-RoPE keys, head granularity: I = 32 groups).
Side by side, in one run:

- sdpa:   torch SDPA (FlashAttention backend where it is faster) over the cached prefix plus
          the live context, N + C keys per row (what vLLM prefix caching does per sequence);
- memory: the worker's fused path (`memdb_worker.fused.memory_attention`: RoPE undone, lookup
          over the M keys, top-1 gather, attention over the C live keys, merge), two launches;
- floor:  the bytes the memory path must move (its keys once, the live KV, q, gathered states,
          output) over the device-to-device copy bandwidth measured in the same run.

scope "layer": one attention layer captured in a CUDA graph (as a serving engine runs decode),
`triton.testing.do_bench` medians of its replays (L2 flushed before every call); the same ops
launched eagerly from Python are in the `*_eager_us` fields (the fused path's two Triton launches
cost ~35 µs of Python time, more than the GPU work at batch 1).
scope "step": a whole decode step (embedding, 32 layers of RMSNorm / QKV / RoPE / KV write /
attention / O / SwiGLU MLP, final norm, LM head) of a random 8B-shaped model, captured in a CUDA
graph; one layer's weights serve all 32 layers (each layer still streams its 0.44 GB from HBM,
far past L2), the KV caches and memories are distinct per layer (the KV cache is shared by groups
of layers when distinct ones would not fit; each still far past L2). The memory's time does not
depend on N (the prefix is gone): it is measured once per (batch, M) and repeated on every N row.

Writes bench/results/attention_<gpu>.json ({"device", "rows": [{"N", "M", "batch", "scope",
"sdpa_us", "memory_us", "floor_us", ...}]}) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

H, HKV, D = 32, 8, 128
HIDDEN, INTER, VOCAB, LAYERS = 4096, 14336, 128256, 32
LIVE = 512
NS = [1024, 4096, 8192, 16384, 32768, 65536, 131072]
MS = [1024, 4096, 8192]
BATCHES = [1, 8, 32]
ROPE_THETA = 500000.0
KV_BUDGET = 36e9  # bytes of KV cache the step benchmark allocates at most


def log(*a):
    print(*a, flush=True)


def gpu_tag(name: str) -> str:
    for tag in ("h200", "h100", "a100", "l40s", "l4", "a10"):
        if tag in name.lower():
            return tag
    return name.lower().split()[-1].replace(" ", "_")


def bench(fn, rep=100) -> float:
    """Median µs of fn (do_bench flushes L2 before each call)."""
    from triton.testing import do_bench

    return 1e3 * float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream); returns replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (bytes read plus written)."""
    n = 1 << 28  # 1 GiB of float32
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))
    return 2 * n * 4 / (t * 1e-6)


def rope_spec():
    from memdb_worker.keys import RopeSpec

    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    return RopeSpec(inv_freq=inv, attention_scaling=1.0)


def make_memory(budget: int, layers: int = 1, seed: int = 0):
    """A random memory of the 8B shape on the GPU (float16 keys/states as the builder writes)."""
    from memdb_worker.keys import KeySpace
    from memdb_worker.memory import Memory, MemoryLayer

    g = torch.Generator(device="cuda").manual_seed(seed)
    ks = KeySpace("pre_rope", "head", H, HKV, D, rope=rope_spec())
    lays = []
    for _ in range(layers):
        keys = torch.randn(H, budget, D, device="cuda", generator=g).half()
        lays.append(
            MemoryLayer(
                keys=keys,
                inv_norm=1.0 / keys.float().norm(dim=-1).clamp_min(1e-30),
                out=torch.randn(H, budget, 1, D, device="cuda", generator=g).half(),
                lse=torch.randn(H, budget, 1, device="cuda", generator=g) * 2 + 8,
                extras={},
            )
        )
    return Memory(lays, ks, {"prefix_length": "0"})


class Inputs:
    def __init__(self, batch: int, kv_len: int, seed: int = 1):
        g = torch.Generator(device="cuda").manual_seed(seed)
        bf = torch.bfloat16
        self.q = torch.randn(batch, H, 1, D, device="cuda", generator=g, dtype=bf)
        self.k = torch.randn(batch, HKV, kv_len, D, device="cuda", generator=g, dtype=bf)
        self.v = torch.randn(batch, HKV, kv_len, D, device="cuda", generator=g, dtype=bf)
        self.pos = torch.randint(1000, 100000, (batch,), device="cuda", generator=g)


def sdpa_fn(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    scale = D**-0.5

    if backend == "default":
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    be = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]

    def fn():
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    return fn


def memory_fn(mem, layer, inp: Inputs, config):
    from memdb_worker import fused

    fl = fused.prepare_layer(mem, layer)
    inv = mem.keyspace.rope.inv_freq.cuda()
    return lambda: fused.memory_attention(
        inp.q, inp.k, inp.v, None, inp.pos, fl, inv, 1.0, D**-0.5, config=config
    )


def reference_fn(mem, inp: Inputs):
    """The worker's reference (unfused) path: torch ops, eager."""
    from memdb_worker.keys import LayerQuery
    from memdb_worker.state import attention_state, merge_states

    def fn():
        lq = LayerQuery(0, inp.q, inp.pos.view(-1, 1), D**-0.5, mem.keyspace.rope, HKV)
        live = attention_state(inp.q, inp.k, inp.v, D**-0.5, None)
        merged = merge_states(live, mem.prefix_state(lq))
        return merged.out.to(inp.q.dtype).transpose(1, 2).contiguous()

    return fn


# -- checks and tuning ------------------------------------------------------------------------


def check(results: dict) -> None:
    from memdb_worker import fused

    out = []
    for batch in (1, 8, 32):
        mem = make_memory(4096, seed=batch)
        inp = Inputs(batch, LIVE, seed=batch + 10)
        fl = fused.prepare_layer(mem, 0)
        args = (inp.q, inp.k, inp.v, None, inp.pos, fl, mem.keyspace.rope.inv_freq, 1.0, D**-0.5)
        want, want_ids = fused.decode_reference(*args)
        got, ids = fused.memory_attention(*args, return_ids=True)
        ref = reference_fn(mem, inp)()
        same = ids.long() == want_ids
        sel = same.unsqueeze(-1)
        err = float(((got - want).float() * sel).norm() / (want.float() * sel).norm())
        err_ref = float((want.float() - ref.float()).norm() / ref.float().norm())
        rec = {
            "batch": batch,
            "M": 4096,
            "ids_equal": float(same.float().mean()),
            "rel_err_vs_torch_form": err,
            "torch_form_vs_reference_path": err_ref,
        }
        out.append(rec)
        log("check", rec)
    results["checks"] = out


def tune(results: dict, quick: bool) -> dict:
    """Launch shapes per batch, timed as CUDA-graph replays (GPU time, no Python launch cost)."""
    from dataclasses import replace

    from memdb_worker import fused

    grid = []
    for bm in (64, 128):
        for w in (4, 8):
            for spsm in (1, 2, 4, 8):
                for st in (3, 4):
                    grid.append(fused.Config(block_m=bm, num_warps=w, scan_programs_per_sm=spsm,
                                             num_stages=st))  # fmt: skip
    if quick:
        grid = grid[:8]
    best = {}
    rows = []
    mem = make_memory(4096)
    for batch in BATCHES:
        inp = Inputs(batch, LIVE)

        def timed(cfg, only=None, inp=inp):
            from memdb_worker import fused as fz

            fl = fz.prepare_layer(mem, 0)
            inv = mem.keyspace.rope.inv_freq.cuda()
            fn = lambda: fz.memory_attention(  # noqa: E731
                inp.q, inp.k, inp.v, None, inp.pos, fl, inv, 1.0, D**-0.5, config=cfg, _only=only
            )
            return bench(graphed(fn), rep=30)

        times = []
        for cfg in grid:
            try:
                t = timed(cfg)
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile
                log("config failed", cfg, repr(exc)[:300])
                continue
            times.append((t, cfg))
            rows.append({"batch": batch, "config": cfg.__dict__, "us": t})
        times.sort(key=lambda x: x[0])
        cfg = times[0][1]
        live_times = [(times[0][0], cfg)]
        variants = [replace(cfg, keys_a=False)]
        for lt in (True, False):
            for lp in (1, 2, 4):
                variants.append(replace(cfg, live_t=lt, live_programs_per_sm=lp))
        for c in variants:
            if c != cfg:
                try:
                    t = timed(c)
                except Exception as exc:  # noqa: BLE001
                    log("config failed", c, repr(exc)[:300])
                    continue
                live_times.append((t, c))
                rows.append({"batch": batch, "config": c.__dict__, "us": t})
        live_times.sort(key=lambda x: x[0])
        best[batch] = live_times[0][1]
        parts = {p: timed(best[batch], p) for p in ("scan", "live")}
        results.setdefault("breakdown", []).append(
            {"batch": batch, "M": 4096, "total_us": live_times[0][0],
             "scan_only_us": parts["scan"], "live_only_us": parts["live"]}
        )  # fmt: skip
        log(f"tune batch {batch}: best {live_times[0][0]:.1f} us {best[batch]}; scan alone "
            f"{parts['scan']:.1f}, live alone {parts['live']:.1f}; "
            f"worst {times[-1][0]:.1f}")  # fmt: skip
    results["tuning"] = rows
    return best


# -- one layer -----------------------------------------------------------------------------------


def layer_rows(results: dict, bw: float, configs: dict, ns, ms, batches) -> None:
    from memdb_worker import fused

    rows = results["rows"]
    mems = {m: make_memory(m, seed=m) for m in ms}
    for batch in batches:
        cfg = configs.get(batch, fused.default_config(batch))
        inp = Inputs(batch, LIVE)
        mem_t = {}
        for m in ms:
            fn = memory_fn(mems[m], 0, inp, cfg)
            fl = fused.prepare_layer(mems[m], 0)
            floor = fused.floor_bytes(fl, batch, H, HKV, LIVE, D) / bw * 1e6
            mem_t[m] = (bench(graphed(fn)), bench(fn), floor)
            log(f"layer B={batch} M={m}: memory {mem_t[m][0]:.1f} us (eager {mem_t[m][1]:.1f}),"
                f" floor {floor:.1f} us")  # fmt: skip
        ref_us = bench(reference_fn(mems[4096], inp)) if batch in (1, 8) else None
        del inp
        for n in ns:
            try:
                kv = Inputs(batch, n + LIVE, seed=n)
            except torch.OutOfMemoryError:
                log(f"layer B={batch} N={n}: KV cache does not fit")
                continue
            times = {}
            for be in ("flash", "default"):
                try:
                    times[be] = bench(graphed(sdpa_fn(kv.q, kv.k, kv.v, be)))
                except Exception as exc:  # noqa: BLE001 - backend refuses the shapes
                    log(f"sdpa {be} failed: {repr(exc)[:160]}")
            be = min(times, key=times.get)
            sdpa_eager = bench(sdpa_fn(kv.q, kv.k, kv.v, be))
            kv_bytes = 2 * batch * HKV * (n + LIVE) * D * 2
            del kv
            torch.cuda.empty_cache()
            for m in ms:
                mt, mg, floor = mem_t[m]
                row = {
                    "N": n,
                    "M": m,
                    "batch": batch,
                    "scope": "layer",
                    "sdpa_us": times[be],
                    "memory_us": mt,
                    "floor_us": floor,
                    "sdpa_eager_us": sdpa_eager,
                    "memory_eager_us": mg,
                    "sdpa_backend": be,
                    "sdpa_floor_us": kv_bytes / bw * 1e6,
                    "speedup": times[be] / mt,
                    "vs_floor": mt / floor,
                }
                if m == 4096 and ref_us is not None:
                    row["reference_path_us"] = ref_us
                rows.append(row)
            log(f"layer B={batch} N={n}: sdpa {times[be]:.1f} us ({be}; eager {sdpa_eager:.1f})"
                f"  memory M=4K {mem_t.get(4096, (math.nan,))[0]:.1f} us")  # fmt: skip
    del mems
    torch.cuda.empty_cache()


# -- whole decode step ---------------------------------------------------------------------------


class Model:
    """Random Llama-3.1-8B-shaped weights (one layer's weights shared by all layers)."""

    def __init__(self):
        bf = torch.bfloat16
        g = torch.Generator(device="cuda").manual_seed(5)

        def w(*shape, std=0.02):
            return (torch.randn(*shape, device="cuda", generator=g) * std).to(bf)

        self.emb = w(VOCAB, HIDDEN)
        self.lm_head = w(VOCAB, HIDDEN)
        self.wqkv = w((H + 2 * HKV) * D, HIDDEN)
        self.wo = w(HIDDEN, H * D)
        self.wgu = w(2 * INTER, HIDDEN)
        self.wdown = w(HIDDEN, INTER)
        self.ln = torch.ones(HIDDEN, device="cuda", dtype=bf)
        self.inv = rope_spec().inv_freq.cuda()


def make_step(model: Model, batch: int, attn, kv_pos: int, layers: int = LAYERS):
    """A decode step as a closure over static buffers; attn(layer, q, k_new, v_new) -> [B,1,H,D]."""
    tok = torch.randint(0, VOCAB, (batch,), device="cuda")
    pos = torch.full((batch,), kv_pos, device="cuda")
    freqs = pos.float()[:, None] * model.inv
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(torch.bfloat16)[:, None], emb.sin().to(torch.bfloat16)[:, None]

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


def kv_caches(batch: int, length: int, layers: int):
    per = 2 * batch * HKV * length * D * 2
    n_buf = max(1, min(layers, int(KV_BUDGET // per)))
    if n_buf < 2 and layers > 1:
        raise torch.OutOfMemoryError(f"KV cache of {per / 1e9:.1f} GB per layer")
    bufs = []
    for i in range(n_buf):
        g = torch.Generator(device="cuda").manual_seed(100 + i)
        k = torch.randn(batch, HKV, length, D, device="cuda", generator=g, dtype=torch.bfloat16)
        v = torch.randn(batch, HKV, length, D, device="cuda", generator=g, dtype=torch.bfloat16)
        bufs.append((k, v))
    return bufs, n_buf


def step_rows(results: dict, bw: float, configs: dict, ns, ms, batches) -> None:
    from memdb_worker import fused

    model = Model()
    rows = results["rows"]
    plain = {}
    for batch in batches:
        # the model without any prefix (live context only): the memory's lower bound
        bufs, nb = kv_caches(batch, LIVE, LAYERS)

        def attn_live(layer, q, k, v, pos, bufs=bufs, nb=nb):
            kc, vc = bufs[layer % nb]
            kc[:, :, LIVE - 1] = k
            vc[:, :, LIVE - 1] = v
            return F.scaled_dot_product_attention(q, kc, vc, scale=D**-0.5, enable_gqa=True)

        plain[batch] = bench(graphed(make_step(model, batch, attn_live, LIVE - 1)), rep=200)
        log(f"step B={batch}: no prefix {plain[batch] / 1e3:.2f} ms")
        del bufs
        cfg = configs.get(batch, fused.default_config(batch))
        mem_t = {}
        for m in ms:
            mem = make_memory(m, layers=LAYERS, seed=m)
            fls = [fused.prepare_layer(mem, i) for i in range(LAYERS)]
            bufs, nb = kv_caches(batch, LIVE, LAYERS)

            def attn_mem(layer, q, k, v, pos, bufs=bufs, nb=nb, fls=fls, cfg=cfg):
                kc, vc = bufs[layer % nb]
                kc[:, :, LIVE - 1] = k
                vc[:, :, LIVE - 1] = v
                return fused.memory_attention(
                    q, kc, vc, None, pos, fls[layer], model.inv, 1.0, D**-0.5, config=cfg
                )

            mem_t[m] = bench(graphed(make_step(model, batch, attn_mem, LIVE - 1)), rep=200)
            log(f"step B={batch} M={m}: memory {mem_t[m] / 1e3:.2f} ms")
            del mem, fls, bufs
            torch.cuda.empty_cache()
        for n in ns:
            try:
                bufs, nb = kv_caches(batch, n + LIVE, LAYERS)
            except torch.OutOfMemoryError as exc:
                log(f"step B={batch} N={n}: skipped ({exc})")
                continue

            def attn_sdpa(layer, q, k, v, pos, bufs=bufs, nb=nb, n=n):
                kc, vc = bufs[layer % nb]
                kc[:, :, n + LIVE - 1] = k
                vc[:, :, n + LIVE - 1] = v
                return F.scaled_dot_product_attention(q, kc, vc, scale=D**-0.5, enable_gqa=True)

            t = bench(graphed(make_step(model, batch, attn_sdpa, n + LIVE - 1)), rep=200)
            del bufs
            torch.cuda.empty_cache()
            # floor of the memory step: the no-prefix step plus the memory scans at bandwidth
            key_bytes = {m: LAYERS * (H * m * D * 2 + H * m * 4) for m in ms}
            for m in ms:
                floor = plain[batch] + key_bytes[m] / bw * 1e6
                rows.append({
                    "N": n, "M": m, "batch": batch, "scope": "step", "sdpa_us": t,
                    "memory_us": mem_t[m], "floor_us": floor, "no_prefix_us": plain[batch],
                    "kv_buffers": nb, "layers": LAYERS, "speedup": t / mem_t[m],
                    "vs_floor": mem_t[m] / floor,
                })  # fmt: skip
            log(f"step B={batch} N={n}: sdpa {t / 1e3:.2f} ms ({nb} KV buffers), memory M=4K "
                f"{mem_t.get(4096, math.nan) / 1e3:.2f} ms")  # fmt: skip
    torch.cuda.empty_cache()


# -- output --------------------------------------------------------------------------------------


def table(rows, scope) -> str:
    lines = [f"{scope}: N, batch, sdpa_us, then per M: memory_us (speedup, x floor)"]
    keys = sorted({(r["batch"], r["N"]) for r in rows if r["scope"] == scope})
    for b, n in keys:
        rs = sorted((r for r in rows if r["scope"] == scope and r["batch"] == b and r["N"] == n),
                    key=lambda r: r["M"])  # fmt: skip
        cells = "  ".join(
            f"M={r['M'] // 1024}K {r['memory_us']:8.1f} ({r['speedup']:5.2f}x, {r['vs_floor']:.2f})"
            for r in rs
        )
        lines.append(f"N={n // 1024:>4}K B={b:>2} sdpa {rs[0]['sdpa_us']:9.1f}  {cells}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no PNG (run `python -m bench.attention --plot JSON` elsewhere)")
        return
    rows = results["rows"]
    scopes = [s for s in ("layer", "step") if any(r["scope"] == s for r in rows)]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(scopes), len(batches), figsize=(5 * len(batches), 4 * len(scopes)),
                             squeeze=False)  # fmt: skip
    for i, scope in enumerate(scopes):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            rs = [r for r in rows if r["scope"] == scope and r["batch"] == b]
            if not rs:
                continue
            ns = sorted({r["N"] for r in rs})
            sd = [next(r["sdpa_us"] for r in rs if r["N"] == n) for n in ns]
            ax.plot(ns, sd, "k-o", label="SDPA, prefix in KV cache")
            for m, c in zip(sorted({r["M"] for r in rs}), ("C0", "C1", "C2"), strict=False):
                mt = [next(r["memory_us"] for r in rs if r["N"] == n and r["M"] == m) for n in ns]
                fl = [next(r["floor_us"] for r in rs if r["N"] == n and r["M"] == m) for n in ns]
                ax.plot(ns, mt, "-", color=c, label=f"memory M={m // 1024}K")
                ax.plot(ns, fl, ":", color=c, label=f"floor M={m // 1024}K")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("prefix tokens N")
            ax.set_ylabel("µs")
            ax.set_title(f"{scope}, batch {b}")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"decode attention, Llama-3.1-8B shape, C={LIVE} live tokens, {results['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--quick", action="store_true", help="fewer sizes (a smoke run)")
    ap.add_argument("--scopes", default="layer,step")
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--plot", help="only draw the PNG of an existing JSON")
    args = ap.parse_args(argv)
    if args.plot:
        p = Path(args.plot)
        plot(json.loads(p.read_text()), p.with_suffix(".png"))
        return 0
    if not torch.cuda.is_available():
        log("bench.attention needs a CUDA device (use the device tool)")
        return 2
    import triton

    from memdb_worker import fused

    ns = [1024, 8192, 65536] if args.quick else NS
    ms = [4096] if args.quick else MS
    batches = [1, 8] if args.quick else BATCHES
    name = torch.cuda.get_device_name()
    results = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "code_version": os.environ.get("MEMDB_VERSION", "unknown"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "live_context": LIVE,
        "shape": {"heads": H, "kv_heads": HKV, "head_dim": D, "layers": LAYERS},
        "rows": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"attention_{gpu_tag(name)}.json"

    def save():
        path.write_text(json.dumps(results, indent=1))

    t0 = time.time()
    bw = copy_bandwidth()
    results["copy_bandwidth_Bps"] = bw
    log(f"{name}: copy bandwidth {bw / 1e12:.2f} TB/s")
    check(results)
    configs = {} if args.no_tune else tune(results, args.quick)
    results["configs"] = {str(b): c.__dict__ for b, c in configs.items()}
    save()
    scopes = args.scopes.split(",")
    if "layer" in scopes:
        layer_rows(results, bw, configs, ns, ms, batches)
        save()
        log(f"[{time.time() - t0:.0f}s]")
    if "step" in scopes:
        try:
            step_rows(results, bw, configs, ns, ms, batches)
        except Exception as exc:  # noqa: BLE001 - keep the layer results
            log(f"step scope failed: {exc!r}")
            results["step_error"] = repr(exc)
        save()
    log(f"[{time.time() - t0:.0f}s] wrote {path}")
    for scope in ("layer", "step"):
        if any(r["scope"] == scope for r in results["rows"]):
            log(table(results["rows"], scope))
    plot(results, path.with_suffix(".png"))
    _ = fused
    return 0


if __name__ == "__main__":
    sys.exit(main())
