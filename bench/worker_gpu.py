"""Worker decode on a GPU, on fair terms: step time and time to first token of the worker's
static-cache, CUDA-graphed decode step (`memdb_worker.attend.decode_step`), for neither / a memory /
the
full prefix prefix-cached, at several concurrencies and prefix lengths, with the weight floor
measured in the same run. `python -m bench.worker_gpu [--concurrency 1,8,32] [--N 8192,32768]
[--M 4096] [--memory-formats fitted/fp8,fp8/head+kbar] [--steps 32] [--out PATH]`; on CPU for
testing: `python -m bench.worker_gpu --tiny --device cpu` (eager steps, no graphs).

The model is a transformers `LlamaForCausalLM` of Llama-3.1-8B shape (hidden 4096, 32 layers,
32 heads, 8 KV heads, head_dim 128, MLP 14336, vocab 128256, llama3 RoPE, 131072 positions) with
random weights, bf16 (the real weights are not on the lent GPUs). Ways, each for c rows of Q
query tokens (c concurrent requests, one batch padded to its bucket 1/2/4/8/16/32):

- "neither":     the query alone (no prefix, no memory);
- "memory":      bound to a synthetic memory of M rows / entries per KV head or group in the
                 format given, whose prefix_length is N (live tokens sit where they would after
                 the real prefix); decode through the fused kernels, prefill through the
                 reference path. "fitted/fp8" (first by default) is the builder's default:
                 fitted rows (float8 keys with a per-row scale, bf16 values, float32 biases);
                 the others are looked-up entries (`bench.attention.parse_format`, e.g.
                 "f32/head+kbar": q_mean / k_bar stored, so the first-order lse correction runs);
- "full_prefix": the N-token prefix encoded ONCE (`prefix.encode_prefix`; its time is
                 `prefix_encode_s`, paid once per prefix version, not per request: prefix
                 caching), its KV shared by every row: the prefill of a request runs its Q tokens
                 against the cached prefix (`attention.bind` to the `PrefixKV`), decode steps
                 read the prefix KV once per batch (`shared_prefix.shared_attention`).

Per row: ttft_s = wall time of the c rows' prefill (one batch) up to their first tokens on the
host; step_ms = wall time per decode step of `--steps` graph replays, each followed by reading
the sampled tokens on the host (as a server streams them); decode_tok_s = c / step time;
step_eager_ms = the same step launched eagerly (no graph). floor_ms = the weights' bytes over
the device-to-device copy bandwidth measured in the run (a decode step reads every weight once).

Writes {"device", "floor_ms", "rows": [{"way", "c", "N", "step_ms", "decode_tok_s", "ttft_s",
...}], ...} to bench/results/worker_<gpu>.json (`--out`) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch

from bench.attention import gpu_tag, parse_format

RESULTS = Path(__file__).resolve().parent / "results"
WAYS = ("neither", "memory", "full_prefix")
FITTED = "fitted/fp8"  # the builder's default memory format (fitted rows)
GiB = 1 << 30


# -- the model -----------------------------------------------------------------------------------


def llama_config(tiny: bool):
    """Llama-3.1-8B's shape (or a tiny one for CPU tests) as a transformers LlamaConfig."""
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    if tiny:
        rope["original_max_position_embeddings"] = 1024  # below max_position_embeddings
        return LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=4096, rope_parameters=rope, bos_token_id=1,
            eos_token_id=[2], tie_word_embeddings=False,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=131072, rope_parameters=rope, rms_norm_eps=1e-5,
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], tie_word_embeddings=False,
    )  # fmt: skip


def random_model(cfg, device: torch.device, dtype: torch.dtype, seed: int = 0, std: float = 0.02):
    """LlamaForCausalLM(cfg) built directly on `device` in `dtype`, weights ~ N(0, std), norms 1."""
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)
    return model.eval().requires_grad_(False)


# -- the memory ----------------------------------------------------------------------------------


def check_format(fmt: str) -> None:
    """ValueError unless `fmt` is FITTED or a looked-up format of `parse_format`."""
    if fmt != FITTED:
        parse_format(fmt)


def synthetic_memory(model, budget: int, prefix_tokens: int, fmt: str = "f32/head+kbar",
                     seed: int = 0):  # fmt: skip
    """A memory of the model's shape in format `fmt` (random rows or entries, pre-RoPE keys),
    made on the model's device with the metadata the builder writes (prefix_length =
    prefix_tokens)."""
    from memdb_worker.memory.formats import quantize_keys
    from memdb_worker.memory.keys import KeySpace, RopeSpec
    from memdb_worker.memory.memory import KEY_SCALE, Memory, layer_from_tensors

    if fmt == FITTED:
        return _synthetic_fitted(model, budget, prefix_tokens, seed)
    f = parse_format(fmt)
    cfg = model.config
    dev = next(model.parameters()).device
    h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rope = RopeSpec.from_model(model)
    ks = KeySpace("pre_rope", f["granularity"], h, hkv, d, common_position=prefix_tokens,
                  rope=rope)  # fmt: skip
    i, hpg = ks.num_groups, ks.heads_per_group
    dk = d if f["group_key"] == "mean" else ks.key_dim
    g = torch.Generator(device=dev).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, generator=g) * scale

    lse0 = float(torch.log(torch.tensor(float(max(prefix_tokens, 2)))))  # ~ N similar scores
    layers = []
    for _ in range(cfg.num_hidden_layers):
        keys, key_scale = quantize_keys(randn(i, budget, dk), f["key_dtype"])
        extras = {} if key_scale is None else {KEY_SCALE: key_scale}
        if f["kbar"]:
            extras["q_mean"] = randn(i, budget, hpg, d).to(f["state_dtype"])
            extras["k_bar"] = randn(i, budget, hpg, d, scale=0.1).to(f["state_dtype"])
        out = randn(i, budget, hpg, d, scale=0.1).to(f["state_dtype"])
        lse = randn(i, budget, hpg, scale=0.5) + lse0
        layers.append(layer_from_tensors(keys, out, lse, extras))
    rope_meta = {"inv_freq": [float(x) for x in rope.inv_freq.tolist()],
                 "attention_scaling": rope.attention_scaling}  # fmt: skip
    meta = {**ks.metadata(), "prefix_length": str(prefix_tokens), "budget": str(budget),
            "token_count": str(prefix_tokens), "num_layers": str(cfg.num_hidden_layers),
            "lse_correction": "1" if f["kbar"] else "0", "rope": json.dumps(rope_meta),
            "scaling": repr(float(d**-0.5)), "group_key": f["group_key"],
            "memory_format": fmt, "synthetic": "1"}  # fmt: skip
    return Memory(layers, ks, meta)


def _synthetic_fitted(model, budget: int, prefix_tokens: int, seed: int):
    """Fitted rows of the model's shape as the builder stores them (`bench.attention.fitted.
    random_rows`: float8 keys with a per-row scale, bf16 values, float32 biases), per layer."""
    from bench.attention.fitted import random_rows
    from memdb_worker.memory.keys import KeySpace, RopeSpec
    from memdb_worker.memory.memory import Memory

    cfg = model.config
    dev = next(model.parameters()).device
    h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rope = RopeSpec.from_model(model)
    ks = KeySpace("pre_rope", "kv_group", h, hkv, d, common_position=prefix_tokens, rope=rope)
    g = torch.Generator(device=dev).manual_seed(seed)
    layers = [random_rows(hkv, budget, d, g, value_scale=0.1) for _ in range(cfg.num_hidden_layers)]
    rope_meta = {"inv_freq": [float(x) for x in rope.inv_freq.tolist()],
                 "attention_scaling": rope.attention_scaling}  # fmt: skip
    meta = {**ks.metadata(), "prefix_length": str(prefix_tokens), "budget": str(budget),
            "token_count": str(prefix_tokens), "num_layers": str(cfg.num_hidden_layers),
            "lse_correction": "0", "rope": json.dumps(rope_meta), "entry_state": "fitted",
            "scaling": repr(float(d**-0.5)), "group_key": "mean", "memory_format": FITTED,
            "synthetic": "1"}  # fmt: skip
    return Memory(layers, ks, meta)


# -- measuring -----------------------------------------------------------------------------------


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(model, source, conc: int, queries: list[list[int]], args, dev) -> dict:
    """TTFT of the c rows' prefill and the decode step time (graphed on CUDA, eager too)."""
    from memdb_worker.attend.decode_step import StaticDecoder, bucket

    b = bucket(conc)
    q = len(queries[0])
    max_live = -(-(q + args.steps + 16) // 64) * 64
    dec = StaticDecoder(model, b, max_live, source)
    slots = list(range(conc))
    graphed = dev.type == "cuda"
    # warm-up: a prefill and a captured step (compiles every kernel specialization)
    dec.set_tokens(slots, dec.prefill(slots, queries).argmax(-1).tolist())
    if graphed:
        dec.graph(b)
    dec.step(b)
    _sync(dev)
    t0 = time.perf_counter()
    first = dec.prefill(slots, queries).argmax(-1).tolist()
    ttft = time.perf_counter() - t0
    dec.set_tokens(slots, first)
    for _ in range(2):  # eager steps
        dec.step(b)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(2):
        dec.step(b).tolist()
    eager = (time.perf_counter() - t0) / 2
    if graphed:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            dec.step(b, graphed=True).tolist()  # the host reads the tokens, as a server does
        step = (time.perf_counter() - t0) / args.steps
    else:
        step = eager
    return {"c": conc, "bucket": b, "step_ms": round(1e3 * step, 3),
            "decode_tok_s": round(conc / step, 1), "ttft_s": round(ttft, 4),
            "step_eager_ms": round(1e3 * eager, 3), "graphed": graphed}  # fmt: skip


def weight_floor_ms(model, dev: torch.device) -> tuple[float | None, float | None]:
    """(floor ms, copy bytes/s): the weights' bytes over the copy bandwidth of this device."""
    if dev.type != "cuda":
        return None, None
    from bench.attention import copy_bandwidth

    bw = copy_bandwidth()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 1e3 * weights / bw, bw


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return f"{p.name} ({p.total_memory / GiB:.1f} GiB), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"cpu: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama, small N/M (CPU tests)")
    ap.add_argument("--concurrency", default=None, help="comma list (default 1,8,32; tiny 1,2)")
    ap.add_argument("--N", default=None, help="prefix tokens, comma list (8192,32768; tiny 128)")
    ap.add_argument("--M", type=int, default=None, help="memory budget (default 4096; tiny 16)")
    ap.add_argument("--memory-formats", default=f"{FITTED},fp8/head+kbar",
                    help="the default (fitted rows) first, then looked-up entries")  # fmt: skip
    ap.add_argument("--query-tokens", type=int, default=None, help="query tokens (32; tiny 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (32; tiny 3)")
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds; prefix lengths not started within it are skipped")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    small = {"concurrency": "1,2", "N": "128", "M": 16, "query_tokens": 8, "steps": 3}
    big = {"concurrency": "1,8,32", "N": "8192,32768", "M": 4096, "query_tokens": 32,
           "steps": 32}  # fmt: skip
    for k, v in (small if args.tiny else big).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    ns = [int(n) for n in args.N.split(",")]
    ways = [w.strip() for w in args.ways.split(",")]
    formats = [f for f in args.memory_formats.split(",") if f]
    for f in formats:
        check_format(f)
    if any(w not in WAYS for w in ways):
        ap.error(f"ways are {list(WAYS)}")
    if args.out is None:
        tag = gpu_tag(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else "cpu"
        args.out = RESULTS / f"worker_{tag}{'_tiny' if args.tiny else ''}.json"

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    cfg = llama_config(args.tiny)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = random_model(cfg, dev, dtype, seed=args.seed)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    floor, bw = weight_floor_ms(model, dev)
    print(f"model: {weights / 1e9:.2f} GB of {dtype} weights on {dev}; weight floor "
          f"{floor if floor is None else round(floor, 3)} ms", flush=True)  # fmt: skip
    g = torch.Generator().manual_seed(args.seed + 1)
    hi = min(cfg.vocab_size, 128000)
    prefix = torch.randint(3, hi, (max(ns),), generator=g).tolist()
    queries = torch.randint(3, hi, (max(concurrencies), args.query_tokens), generator=g).tolist()
    rows: list[dict] = []

    def record(row: dict, way: str, n: int, **extra) -> None:
        row = {"way": way, "N": n, **row, **extra}
        if floor is not None:
            row["vs_floor"] = round(row["step_ms"] / floor, 3)
        rows.append(row)
        fmt = extra.get("memory_format", "")
        print(f"{way:<12} {fmt:<22} N={n:<7} c={row['c']:<3} step {row['step_ms']:8.2f} ms "
              f"({row['decode_tok_s']:9.1f} tok/s; eager {row['step_eager_ms']:.1f} ms)  "
              f"ttft {row['ttft_s']:.3f} s", flush=True)  # fmt: skip

    if "neither" in ways:
        for c in concurrencies:
            record(measure(model, None, c, queries[:c], args, dev), "neither", 0)
    for n in ns:
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            print(f"N={n}: skipped (time budget of {args.time_budget} s spent)", flush=True)
            continue
        if "memory" in ways:
            for fmt in formats:
                mem = synthetic_memory(model, args.M, n, fmt, seed=args.seed)
                for c in concurrencies:
                    record(measure(model, mem, c, queries[:c], args, dev), "memory", n,
                           M=args.M, memory_format=fmt,
                           memory_bytes=mem.nbytes())  # fmt: skip
                del mem
                _free(dev)
        if "full_prefix" in ways:
            from memdb_worker.model.prefix import encode_prefix

            try:
                _sync(dev)
                t0 = time.perf_counter()
                exact = encode_prefix(model, prefix[:n], chunk_tokens=n)
                _sync(dev)
                enc = time.perf_counter() - t0
                for c in concurrencies:
                    record(measure(model, exact, c, queries[:c], args, dev), "full_prefix", n,
                           prefix_encode_s=round(enc, 3),
                           prefix_kv_bytes=exact.nbytes())  # fmt: skip
            except torch.OutOfMemoryError as exc:
                print(f"full_prefix N={n}: out of memory ({exc})", flush=True)
            exact = None
            _free(dev)

    result = {
        "device": device_name(dev),
        "model": ("tiny Llama" if args.tiny else "Llama-3.1-8B shape") + f", random, {dtype}",
        "floor_ms": None if floor is None else round(floor, 4),
        "copy_bandwidth_Bps": bw,
        "weights_gb": round(weights / 1e9, 3),
        "settings": {
            "N": ns,
            "M": args.M,
            "query_tokens": args.query_tokens,
            "steps": args.steps,
            "memory_formats": formats,
            "concurrency": concurrencies,
        },  # fmt: skip
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['device']}; floor {result['floor_ms']} ms")
    for n in ns:
        for c in concurrencies:
            fp = next((r for r in rows if r["way"] == "full_prefix" and r["N"] == n
                       and r["c"] == c), None)  # fmt: skip
            for r in rows:
                if r["way"] == "memory" and r["N"] == n and r["c"] == c and fp is not None:
                    print(f"N={n} c={c} {r['memory_format']}: memory / full prefix decode "
                          f"{r['decode_tok_s'] / fp['decode_tok_s']:.2f}x, ttft "
                          f"{r['ttft_s']:.3f} vs {fp['ttft_s']:.3f} s")  # fmt: skip
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
