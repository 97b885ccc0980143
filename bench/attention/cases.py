"""The cases of bench.attention (see `bench/attention/__main__.py` for what it measures):
the Llama-3.1-8B attention shape, synthetic memories and inputs, the timed functions of each
way (sdpa, shared, memory), their check against the reference, the layer-scope rows, the table
and the plot. The globals (DEVICE, ACT, shapes) are module state that the CPU smoke test
replaces."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

H, HKV, D = 32, 8, 128
LIVE = 512
DEVICE = "cuda"
ACT = torch.bfloat16  # activations and KV (the CPU smoke test of the bench uses float16)
FORMATS = [
    "fp16/head",
    "f32/head+kbar",
    "bf16/head+kbar",
    "fp8/head+kbar",
    "bf16/kv_group_mean+kbar",
    "fp8/kv_group_mean+kbar",
    "bf16/kv_group_mean",
    "fp8/kv_group_mean",
]
NS = [1024, 4096, 8192, 16384, 32768, 65536, 131072]
MS = [1024, 4096, 8192]
BATCHES = [1, 8, 32]
ROPE_THETA = 500000.0


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
    from memdb_worker.memory.keys import RopeSpec

    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    return RopeSpec(inv_freq=inv, attention_scaling=1.0)


def parse_format(fmt: str) -> dict:
    """ "<keys>/<granularity>[+kbar]" -> key dtype, state dtype, granularity, group key, extras."""
    body, _, extra = fmt.partition("+")
    keys, _, gran = body.partition("/")
    key_dtype = {"f32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                 "fp8": torch.float8_e4m3fn}[keys]  # fmt: skip
    state = {"f32": torch.float32, "fp16": torch.float16}.get(keys, torch.bfloat16)
    if gran not in ("head", "kv_group", "kv_group_mean") or extra not in ("", "kbar"):
        raise ValueError(f"unknown memory format {fmt!r}")
    return {
        "key_dtype": key_dtype,
        "state_dtype": state,
        "granularity": "head" if gran == "head" else "kv_group",
        "group_key": "mean" if gran == "kv_group_mean" else "concat",
        "kbar": extra == "kbar",
    }


def make_memory(budget: int, layers: int = 1, seed: int = 0, fmt: str = "fp16/head"):
    """A random memory of the 8B shape on the device in format `fmt` (see `parse_format`)."""
    from memdb_worker.memory.formats import quantize_keys
    from memdb_worker.memory.keys import KeySpace
    from memdb_worker.memory.memory import KEY_SCALE, Memory, layer_from_tensors

    f = parse_format(fmt)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    ks = KeySpace("pre_rope", f["granularity"], H, HKV, D, rope=rope_spec())
    i, hpg = ks.num_groups, ks.heads_per_group
    dk = D if f["group_key"] == "mean" else ks.key_dim
    sd = f["state_dtype"]

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=DEVICE, generator=g) * scale

    lays = []
    for _ in range(layers):
        keys, key_scale = quantize_keys(randn(i, budget, dk), f["key_dtype"])
        extras = {} if key_scale is None else {KEY_SCALE: key_scale}
        if f["kbar"]:
            extras["q_mean"] = randn(i, budget, hpg, D).to(sd)
            extras["k_bar"] = randn(i, budget, hpg, D, scale=0.1).to(sd)
        out = randn(i, budget, hpg, D).to(sd)
        lse = randn(i, budget, hpg) * 2 + 8
        lays.append(layer_from_tensors(keys, out, lse, extras))
    meta = {"prefix_length": "0", "group_key": f["group_key"]}
    return Memory(lays, ks, meta)


def layer_bytes(fmt: str, budget: int) -> int:
    """Bytes per layer a memory of this format stores (keys, key_scale, out, lse, extras)."""
    from memdb_worker.memory.formats import memory_bytes

    f = parse_format(fmt)
    i = H if f["granularity"] == "head" else HKV
    dk = D if f["granularity"] == "head" or f["group_key"] == "mean" else (H // HKV) * D
    return memory_bytes(num_layers=1, num_groups=i, heads_per_group=H // i, key_dim=dk,
                        head_dim=D, budget=budget, key_dtype=_name(f["key_dtype"]),
                        out_dtype=_name(f["state_dtype"]), q_mean=f["kbar"],
                        k_bar=f["kbar"])  # fmt: skip


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Inputs:
    def __init__(self, batch: int, kv_len: int, seed: int = 1):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        bf = ACT
        self.q = torch.randn(batch, H, 1, D, device=DEVICE, generator=g, dtype=bf)
        self.k = torch.randn(batch, HKV, kv_len, D, device=DEVICE, generator=g, dtype=bf)
        self.v = torch.randn(batch, HKV, kv_len, D, device=DEVICE, generator=g, dtype=bf)
        self.pos = torch.randint(1000, 100000, (batch,), device=DEVICE, generator=g)


class SharedInputs:
    """One prefix's KV [1, Hkv, N, d] shared by the batch, each row's live KV, q."""

    def __init__(self, batch: int, n: int, seed: int = 2):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        bf = ACT
        self.q = torch.randn(batch, H, 1, D, device=DEVICE, generator=g, dtype=bf)
        self.pk = torch.randn(1, HKV, n, D, device=DEVICE, generator=g, dtype=bf)
        self.pv = torch.randn(1, HKV, n, D, device=DEVICE, generator=g, dtype=bf)
        self.k = torch.randn(batch, HKV, LIVE, D, device=DEVICE, generator=g, dtype=bf)
        self.v = torch.randn(batch, HKV, LIVE, D, device=DEVICE, generator=g, dtype=bf)


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
    from memdb_worker.attend import fused

    fl = fused.prepare_layer(mem, layer)
    inv = mem.keyspace.rope.inv_freq.to(DEVICE)
    corr = mem.lse_corrected
    return lambda: fused.memory_attention(
        inp.q, inp.k, inp.v, None, inp.pos, fl, inv, 1.0, D**-0.5, config=config,
        lse_correction=corr,
    )  # fmt: skip


def shared_fn(inp: SharedInputs, config=None):
    """The shared-prefix baseline (Triton): prefix KV once for the batch, live per row."""
    from memdb_worker.attend.shared_prefix import shared_attention

    return lambda: shared_attention(inp.q, inp.pk, inp.pv, inp.k, inp.v, None, D**-0.5, config)


def shared_flash_fn(inp: SharedInputs):
    """The naive shared-prefix form with torch's flash kernel: one call over the folded queries
    (rows x heads of a KV head as query rows) for the prefix, one over each row's live KV, the
    two states merged in torch ops (DESIGN.md section 8's "naive" column)."""
    from memdb_worker.memory.state import State, merge_states

    op = torch.ops.aten._scaled_dot_product_flash_attention
    b, g = inp.q.shape[0], H // HKV

    def fn():
        q = inp.q[:, :, 0].view(b, HKV, g, D)  # [B, Hkv, G, d]
        qf = q.transpose(0, 1).reshape(1, HKV, b * g, D)
        po, plse = op(qf, inp.pk, inp.pv, 0.0, False, False, scale=D**-0.5)[:2]
        lo, llse = op(q, inp.k, inp.v, 0.0, False, False, scale=D**-0.5)[:2]
        pre = State(po.reshape(HKV, b, g, D).transpose(0, 1),
                    plse.reshape(HKV, b, g).transpose(0, 1))  # fmt: skip
        merged = merge_states(pre, State(lo, llse))  # [B, Hkv, G, (d)]
        return merged.out.to(inp.q.dtype).reshape(b, 1, H, D)

    return fn


def reference_fn(mem, inp: Inputs):
    """The worker's reference (unfused) path: torch ops, eager."""
    from memdb_worker.memory.keys import LayerQuery
    from memdb_worker.memory.state import attention_state, merge_states

    def fn():
        lq = LayerQuery(0, inp.q, inp.pos.view(-1, 1), D**-0.5, mem.keyspace.rope, HKV)
        live = attention_state(inp.q, inp.k, inp.v, D**-0.5, None)
        merged = merge_states(live, mem.prefix_state(lq))
        return merged.out.to(inp.q.dtype).transpose(1, 2).contiguous()

    return fn


# -- checks and tuning ------------------------------------------------------------------------


def check(results: dict, formats, m: int = 4096, n: int = 8192, batches=(1, 8, 32)) -> None:
    """The kernels against their torch forms on the benchmark's shapes (recorded, not asserted:
    the CUDA tests assert)."""
    from memdb_worker.attend import fused
    from memdb_worker.attend.shared_prefix import shared_reference

    out = []
    for batch in batches:
        for fmt in formats:
            mem = make_memory(m, seed=batch, fmt=fmt)
            inp = Inputs(batch, LIVE, seed=batch + 10)
            fl = fused.prepare_layer(mem, 0)
            args = (inp.q, inp.k, inp.v, None, inp.pos, fl, mem.keyspace.rope.inv_freq, 1.0,
                    D**-0.5)  # fmt: skip
            corr = mem.lse_corrected
            want, want_ids = fused.decode_reference(*args, lse_correction=corr)
            got, ids = fused.memory_attention(*args, return_ids=True, lse_correction=corr)
            ref = reference_fn(mem, inp)()
            same = ids.long() == want_ids
            sel = same.unsqueeze(-1)
            err = float(((got - want).float() * sel).norm() / (want.float() * sel).norm())
            err_ref = float((want.float() - ref.float()).norm() / ref.float().norm())
            rec = {"batch": batch, "M": m, "memory_format": fmt,
                   "ids_equal": float(same.float().mean()), "rel_err_vs_torch_form": err,
                   "torch_form_vs_reference_path": err_ref}  # fmt: skip
            out.append(rec)
            log("check", rec)
        sh = SharedInputs(batch, n, seed=batch)
        want = shared_reference(sh.q, sh.pk, sh.pv, sh.k, sh.v, None, D**-0.5).float()
        rec = {"batch": batch, "N": n, "shared_rel_err": _rel(shared_fn(sh)(), want)}
        try:
            rec["shared_flash_rel_err"] = _rel(shared_flash_fn(sh)(), want)
        except Exception as exc:  # noqa: BLE001 - the op may be missing in this torch
            rec["shared_flash_error"] = repr(exc)[:200]
        out.append(rec)
        log("check", rec)
    results["checks"] = out


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def layer_rows(results: dict, bw: float, configs: dict, ns, ms, batches, formats,
               shared_configs: dict) -> None:  # fmt: skip
    from memdb_worker.attend import fused
    from memdb_worker.attend import shared_prefix as sp

    rows = results["rows"]
    results["memory_bytes"] = {f: {str(m): layer_bytes(f, m) for m in ms} for f in formats}
    for batch in batches:
        cfg = configs.get(batch, fused.default_config(batch))
        inp = Inputs(batch, LIVE)
        mem_t = {}
        for fmt in formats:
            for m in ms:
                mem = make_memory(m, seed=m, fmt=fmt)
                fn = memory_fn(mem, 0, inp, cfg)
                fl = fused.prepare_layer(mem, 0)
                floor = fused.floor_bytes(fl, batch, H, HKV, LIVE, D,
                                          lse_correction=mem.lse_corrected) / bw * 1e6  # fmt: skip
                nbytes = mem.nbytes()
                assert nbytes == layer_bytes(fmt, m), (fmt, nbytes, layer_bytes(fmt, m))
                mem_t[fmt, m] = (bench(graphed(fn)), bench(fn), floor, nbytes)
                log(f"layer B={batch} M={m} {fmt}: memory {mem_t[fmt, m][0]:.1f} us "
                    f"(eager {mem_t[fmt, m][1]:.1f}), floor {floor:.1f} us, "
                    f"{nbytes / 1e6:.1f} MB")  # fmt: skip
                del mem, fl, fn
        ref_us = None
        if batch in (1, 8):
            ref_us = bench(reference_fn(make_memory(4096, fmt=formats[0]), inp))
        del inp
        scfg = shared_configs.get(batch)
        for n in ns:
            times, sdpa_eager = {}, None
            try:
                kv = Inputs(batch, n + LIVE, seed=n)
                for be in ("flash", "default"):
                    try:
                        times[be] = bench(graphed(sdpa_fn(kv.q, kv.k, kv.v, be)))
                    except Exception as exc:  # noqa: BLE001 - backend refuses the shapes
                        log(f"sdpa {be} failed: {repr(exc)[:160]}")
                if times:
                    be = min(times, key=times.get)
                    sdpa_eager = bench(sdpa_fn(kv.q, kv.k, kv.v, be))
                del kv
            except torch.OutOfMemoryError:
                log(f"layer B={batch} N={n}: per-row KV cache does not fit")
            torch.cuda.empty_cache()
            sh = SharedInputs(batch, n, seed=n)
            shared_us = bench(graphed(shared_fn(sh, scfg)))
            try:
                flash_us = bench(graphed(shared_flash_fn(sh)))
            except Exception as exc:  # noqa: BLE001 - the op may be missing or refuse shapes
                log(f"shared flash failed: {repr(exc)[:160]}")
                flash_us = None
            del sh
            torch.cuda.empty_cache()
            sdpa_us = min(times.values()) if times else None
            shared_floor = sp.floor_bytes(batch, H, HKV, n, LIVE, D) / bw * 1e6
            best = min(t for t in (sdpa_us, shared_us, flash_us) if t is not None)
            for (fmt, m), (mt, mg, floor, nbytes) in mem_t.items():
                row = {
                    "N": n, "M": m, "batch": batch, "scope": "layer", "memory_format": fmt,
                    "memory_bytes": nbytes, "prefix_kv_bytes": prefix_kv_bytes(n),
                    "sdpa_us": sdpa_us, "shared_us": shared_us, "shared_flash_us": flash_us,
                    "memory_us": mt, "floor_us": floor, "shared_floor_us": shared_floor,
                    "sdpa_eager_us": sdpa_eager, "memory_eager_us": mg,
                    "sdpa_backend": min(times, key=times.get) if times else None,
                    "sdpa_floor_us": 2 * batch * HKV * (n + LIVE) * D * 2 / bw * 1e6,
                    "speedup": None if sdpa_us is None else sdpa_us / mt,
                    "speedup_vs_shared": shared_us / mt, "speedup_vs_best": best / mt,
                    "vs_floor": mt / floor, "shared_vs_floor": shared_us / shared_floor,
                }  # fmt: skip
                if m == 4096 and fmt == formats[0] and ref_us is not None:
                    row["reference_path_us"] = ref_us
                rows.append(row)
            fl_txt = "n/a" if flash_us is None else f"{flash_us:.1f}"
            sd_txt = "n/a" if sdpa_us is None else f"{sdpa_us:.1f}"
            log(f"layer B={batch} N={n}: sdpa {sd_txt} us, shared {shared_us:.1f} us "
                f"(floor {shared_floor:.1f}; flash form {fl_txt})")  # fmt: skip
    torch.cuda.empty_cache()


def prefix_kv_bytes(n: int) -> int:
    """Bytes of one layer's KV of an n-token prefix in bf16 (`formats.kv_bytes`)."""
    from memdb_worker.memory.formats import kv_bytes

    return kv_bytes(num_layers=1, num_kv_heads=HKV, head_dim=D, tokens=n)


def table(rows, scope) -> str:
    lines = [f"{scope}: N, batch, sdpa / shared us, then per format and M: memory_us "
             "(x best baseline, x own floor)"]  # fmt: skip
    keys = sorted({(r["batch"], r["N"]) for r in rows if r["scope"] == scope})
    for b, n in keys:
        rs = [r for r in rows if r["scope"] == scope and r["batch"] == b and r["N"] == n]
        rs.sort(key=lambda r: (r["memory_format"], r["M"]))
        sd, sh = rs[0]["sdpa_us"] or math.nan, rs[0]["shared_us"] or math.nan
        lines.append(f"N={n // 1024:>4}K B={b:>2} sdpa {sd:9.1f} shared {sh:8.1f}")
        for r in rs:
            vs_floor = r.get("vs_floor", math.nan)  # step-scope rows have no floor
            lines.append(f"    {r['memory_format']:<24} M={r['M'] // 1024}K {r['memory_us']:8.1f} "
                         f"({r['speedup_vs_best']:5.2f}x, {vs_floor:.2f})")  # fmt: skip
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
            first = {n: next(r for r in rs if r["N"] == n) for n in ns}
            for key, style, label in (("sdpa_us", "k-o", "SDPA per row"),
                                      ("shared_us", "k--s", "shared prefix")):  # fmt: skip
                pts = [(n, first[n][key]) for n in ns if first[n].get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=label)
            m = 4096 if any(r["M"] == 4096 for r in rs) else rs[0]["M"]
            fmts = sorted({r["memory_format"] for r in rs})
            for fmt, c in zip(fmts, [f"C{k}" for k in range(10)], strict=False):
                pts = sorted((r["N"], r["memory_us"]) for r in rs
                             if r["memory_format"] == fmt and r["M"] == m)  # fmt: skip
                ax.plot(*zip(*pts, strict=True), "-", color=c, label=f"{fmt} M={m // 1024}K")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("prefix tokens N")
            ax.set_ylabel("µs")
            ax.set_title(f"{scope}, batch {b}")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    fig.suptitle(f"decode attention, Llama-3.1-8B shape, C={LIVE} live tokens, {results['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]
