"""Fitted-row cases of bench.attention (`--fitted`): one decode attention layer over the default
memory format next to the prefix-cached full prefix, each captured in a CUDA graph.

The memory is fitted rows as the builder stores them (per KV head M rows of float8 e4m3 keys
with a per-row float32 scale, bfloat16 values, float32 biases), M = N/8 and M = 4096, for a
prefix of N = 8K / 32K / 128K tokens, batch 1 / 8 / 32, `live` tokens of live KV per row, the
Llama-3.1-8B attention shape. Side by side, per (N, M, batch, live):

- memory:    the fused fitted-row kernels (`fitted_rows.fitted_attention`, two launches), with
             the launch shape the sweep (`sweep`) picked for its batch and M;
- reference: today's fitted-row path (`Memory.prefix_state`: `fitted_state` over dequantized
             keys, the live state and `merge_states` in torch ops), the same function;
- shared:    the prefix-cached full prefix (`shared_prefix.shared_attention`: the N-token prefix
             KV read once for the batch), and `shared_rows_us`: the same kernel over M bf16
             rows without bias (what the rows would cost as plain KV);
- floors:    the bytes each must move over the copy bandwidth measured in the same run (memory:
             the rows once, every row's live KV, q and the output; shared: the prefix KV once,
             the live KV, q and the output).

Rows carry memory_format "fitted/fp8", floor_us / vs_floor (memory), reference_us,
shared_us / shared_floor_us / shared_vs_floor, speedup_vs_shared and the kernel's relative
error against the reference. The globals of `cases` (DEVICE, ACT, shapes) are replaced by the
CPU smoke test.
"""

from __future__ import annotations

import torch

from bench.attention import cases as A

NS = [8192, 32768, 131072]
LIVES = [64, 512]  # 64: the live context of issue 21's figures; 512: the rest of bench.attention
FIXED_BUDGET = 4096
FORMAT = "fitted/fp8"


def budgets(n: int) -> list[int]:
    """The fitted budgets measured for an n-token prefix: M = n / 8 and M = 4096."""
    return sorted({n // 8, FIXED_BUDGET})


def random_rows(hkv: int, budget: int, d: int, generator: torch.Generator,
                value_scale: float = 1.0):  # fmt: skip
    """One layer of random fitted rows in the builder's stored format, on the generator's
    device: per KV head `budget` rows of float8 e4m3 keys with a per-row scale, bfloat16
    values (~ N(0, value_scale^2)), float32 biases (~ N(0, 4))."""
    from memdb_worker.memory.formats import quantize_keys
    from memdb_worker.memory.memory import KEY_SCALE, layer_from_tensors

    dev = generator.device
    keys, scale = quantize_keys(torch.randn(hkv, budget, d, device=dev, generator=generator),
                                torch.float8_e4m3fn)  # fmt: skip
    values = torch.randn(hkv, budget, 1, d, device=dev, generator=generator) * value_scale
    bias = torch.randn(hkv, budget, 1, device=dev, generator=generator) * 2
    return layer_from_tensors(keys, values.to(torch.bfloat16), bias, {KEY_SCALE: scale})


def make_fitted(budget: int, seed: int = 0):
    """A random fitted memory of the 8B shape, one layer, in the builder's stored format."""
    from memdb_worker.memory.keys import KeySpace
    from memdb_worker.memory.memory import Memory

    g = torch.Generator(device=A.DEVICE).manual_seed(seed)
    ks = KeySpace("pre_rope", "kv_group", A.H, A.HKV, A.D, rope=A.rope_spec())
    meta = {"entry_state": "fitted", "group_key": "mean", "prefix_length": "0"}
    return Memory([random_rows(A.HKV, budget, A.D, g)], ks, meta)


def kernel_fn(mem, inp, config):
    from memdb_worker.attend import fitted_rows

    rows = fitted_rows.prepare(mem, 0)
    return lambda: fitted_rows.fitted_attention(inp.q, inp.k, inp.v, None, rows, A.D**-0.5, 0.0,
                                                config)  # fmt: skip


def sweep(results: dict, batches, lives, ms, grid=None) -> dict:
    """The launch shape (`SharedConfig`) per (batch, M) of the fitted kernels, graph replays
    at the smallest live context."""
    from memdb_worker.attend.shared_prefix import SharedConfig

    grid = grid or [SharedConfig(block_n=bn, prefix_programs_per_sm=pp, num_warps=w,
                                 num_stages=st)
                    for bn in (64, 128) for w in (4, 8) for st in (2, 3)
                    for pp in (1, 2, 4)]  # fmt: skip
    best, rows = {}, []
    for batch in batches:
        inp = A.Inputs(batch, min(lives))
        for m in ms:
            mem = make_fitted(m)
            times = []
            for cfg in grid:
                try:
                    t = A.bench(A.graphed(kernel_fn(mem, inp, cfg)), rep=20)
                except Exception as exc:  # noqa: BLE001 - a shape that fails to compile
                    A.log("fitted config failed", cfg, repr(exc)[:300])
                    continue
                times.append((t, cfg))
                rows.append({"batch": batch, "M": m, "config": cfg.__dict__, "us": t})
            times.sort(key=lambda x: x[0])
            best[batch, m] = times[0][1]
            dflt = _default_time(rows, batch, m)
            A.log(f"sweep fitted B={batch} M={m}: best {times[0][0]:.1f} us {times[0][1]}, "
                  f"default {dflt:.1f}, worst {times[-1][0]:.1f}")  # fmt: skip
    results["fitted_sweep"] = rows
    results["fitted_configs"] = {f"{b}/{m}": c.__dict__ for (b, m), c in best.items()}
    return best


def _default_time(rows, batch, m) -> float:
    from memdb_worker.attend.shared_prefix import SharedConfig

    want = SharedConfig().__dict__
    hit = [r["us"] for r in rows if r["batch"] == batch and r["M"] == m and r["config"] == want]
    return hit[0] if hit else float("nan")


def reference_fn(mem, inp):
    """Today's fitted-row path: the memory's reference state merged with the live state."""
    return A.reference_fn(mem, inp)


def fitted_rows_cases(results: dict, bw: float, ns, batches, lives, configs: dict) -> None:
    """The layer rows of every (N, M, batch, live): memory, reference and shared side by side."""
    from memdb_worker.attend import fitted_rows
    from memdb_worker.attend import shared_prefix as sp

    out = results["rows"]
    ms = sorted({m for n in ns for m in budgets(n)})
    for batch in batches:
        for live in lives:
            inp = A.Inputs(batch, live, seed=batch + live)
            mems = {m: make_fitted(m, seed=m) for m in ms}
            mem_t = {}
            for m, mem in mems.items():
                cfg = configs.get((batch, m))
                fn = kernel_fn(mem, inp, cfg)
                ref = reference_fn(mem, inp)
                err = A._rel(fn(), ref())
                rows = fitted_rows.prepare(mem, 0)
                floor = fitted_rows.floor_bytes(rows, batch, A.H, A.HKV, live, A.D) / bw * 1e6
                t_mem, t_ref = A.bench(A.graphed(fn)), A.bench(A.graphed(ref))
                t_eager = A.bench(fn)
                sh = _rows_as_prefix(mem, inp)
                t_rows = A.bench(A.graphed(A.shared_fn(sh)))
                mem_t[m] = (t_mem, t_ref, t_eager, t_rows, floor, err, rows.nbytes(), cfg)
                A.log(f"fitted B={batch} live={live} M={m}: kernel {t_mem:.1f} us (floor "
                      f"{floor:.1f}, x{t_mem / floor:.2f}; eager {t_eager:.1f}), reference "
                      f"{t_ref:.1f}, rows as plain KV {t_rows:.1f}, rel err {err:.1e}")  # fmt: skip
            for n in ns:
                sh = A.SharedInputs(batch, n, seed=n)
                sh.q, sh.k, sh.v = inp.q, inp.k, inp.v  # the same queries and live KV
                t_sh = A.bench(A.graphed(A.shared_fn(sh)))
                sh_floor = sp.floor_bytes(batch, A.H, A.HKV, n, live, A.D) / bw * 1e6
                del sh
                if A.DEVICE == "cuda":
                    torch.cuda.empty_cache()
                for m in budgets(n):
                    t_mem, t_ref, t_eager, t_rows, floor, err, nbytes, cfg = mem_t[m]
                    out.append({
                        "N": n, "M": m, "batch": batch, "scope": "layer", "live_context": live,
                        "memory_format": FORMAT, "memory_bytes": nbytes,
                        "prefix_kv_bytes": A.prefix_kv_bytes(n),
                        "memory_us": t_mem, "floor_us": floor, "vs_floor": t_mem / floor,
                        "memory_eager_us": t_eager, "reference_us": t_ref,
                        "reference_vs_floor": t_ref / floor, "speedup_vs_reference": t_ref / t_mem,
                        "shared_us": t_sh, "shared_floor_us": sh_floor,
                        "shared_vs_floor": t_sh / sh_floor, "speedup_vs_shared": t_sh / t_mem,
                        "shared_rows_us": t_rows, "rel_err_vs_reference": err,
                        "config": None if cfg is None else cfg.__dict__,
                    })  # fmt: skip
                A.log(f"fitted B={batch} live={live} N={n}: shared {t_sh:.1f} us "
                      f"(floor {sh_floor:.1f})")  # fmt: skip
            del mems, inp


def _rows_as_prefix(mem, inp):
    """SharedInputs whose prefix is the memory's M rows as bf16 KV (keys dequantized), with the
    benchmark's queries and live KV."""
    lay = mem.layers[0]
    sh = A.SharedInputs.__new__(A.SharedInputs)
    sh.q, sh.k, sh.v = inp.q, inp.k, inp.v
    sh.pk = lay.key_values().to(A.ACT).unsqueeze(0)  # [1, Hkv, M, d]
    sh.pv = lay.out[:, :, 0].to(A.ACT).unsqueeze(0)
    return sh


def table(rows) -> str:
    lines = ["fitted rows: N, batch, live: shared us (x floor); per M: kernel us (x floor), "
             "reference us, x faster than shared"]  # fmt: skip
    rs = [r for r in rows if r["memory_format"] == FORMAT]
    for b, live, n in sorted({(r["batch"], r["live_context"], r["N"]) for r in rs}):
        sel = [r for r in rs if (r["batch"], r["live_context"], r["N"]) == (b, live, n)]
        lines.append(f"N={n // 1024:>4}K B={b:>2} live={live:>3} shared {sel[0]['shared_us']:8.1f} "
                     f"(x{sel[0]['shared_vs_floor']:.2f})")  # fmt: skip
        for r in sorted(sel, key=lambda r: r["M"]):
            ref, vs = r["reference_us"], r["speedup_vs_shared"]
            lines.append(f"    M={r['M']:>6} {r['memory_us']:8.1f} (x{r['vs_floor']:.2f}) "
                         f"reference {ref:9.1f} x{vs:.2f}")  # fmt: skip
    return "\n".join(lines)


__all__ = ["FORMAT", "budgets", "fitted_rows_cases", "make_fitted", "sweep", "table"]
