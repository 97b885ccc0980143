"""Worker benchmark on a GPU: tokens/s of the worker's generation engine with an 8B-shaped model,
with and without a memory. `python -m bench.worker_gpu [--concurrency 1,8,32] [--N 8192]
[--M 4096] [--new-tokens 64] [--out bench/results/worker_<gpu>.json]`; on CPU for testing:
`python -m bench.worker_gpu --tiny --device cpu`.

What runs: the worker's own `Scheduler` (worker/memdb_worker/scheduler.py: continuous batching,
one KV cache per batch, per-row memories through `attention.bind`), fed in-process with
`GenerationRequest`s exactly as the HTTP API (`api._generate`) submits them: greedy,
`ignore_eos`, a fixed number of new tokens, events through a sink. No HTTP, server or memory
cache: the model file, faiss, lmdb and the server are not available on a lent GPU machine, so:

- the model is a transformers `LlamaForCausalLM` of Llama-3.1-8B shape (hidden 4096, 32 layers,
  32 heads, 8 KV heads, head_dim 128, MLP 14336, vocab 128256, llama3 RoPE with theta 500000,
  131072 positions) with random weights (normal, std 0.02; norms 1), bf16 on CUDA;
- the memory is synthetic (no calibration, no k-means): per layer and head (the builder's default
  granularity, I = 32 groups) M random entries: keys, out, lse ~ log N, and the `q_mean` /
  `k_bar` extras the default builder stores (float32, as `BuildOptions()` writes them), with the
  metadata `builder._metadata` writes (prefix_length = N, so live tokens sit where they would
  after the real prefix). Its model fingerprint is not the model's hash on the GPU (hashing 16 GB
  takes minutes; nothing in-process checks it: the cache compares it with the server's);
- the tokenizer is a stand-in (`StandInTokenizer`: eos/pad ids and a `decode` that maps ids to
  printable characters), so the scheduler's per-token text path (detokenize, stop strings,
  incremental text) runs as it does with a real tokenizer, at about the cost of a fast one.

Ways, each at every concurrency c (c requests submitted at once, scheduler `max_batch` = c):

- "full prefix":        prompt = N random prefix tokens + a short query (Q tokens); no memory;
- "memory":             prompt = the query; bound to the memory as the default builder makes it
                        (k_bar stored, so the first-order lse correction applies);
- "memory (no k_bar)":  the same entries without q_mean / k_bar (a memory built with
                        `lse_correction=False`): plain hard top-1;
- "neither":            prompt = the query alone.

Which attention path ran is observed, not assumed (`path` in each row): "sdpa" (transformers'
SDPA, unbound rows), "reference" (`Memory.prefix_state` + merge in torch) or "fused" (decode steps
went through `fused.memory_attention`, the Triton kernels; prefill always takes the reference
path). On CUDA the fused kernels run for T = 1 decode steps of a batch bound to one `Memory`
whose options they cover (`fused.supports`: hard top-1; the lse correction only in versions of
fused.py that implement it); `MEMDB_FUSED=0` forces the reference path.

Per row: tokens_per_s = generated tokens / wall time of the round (first submit to last final
event; prefill included), latency_s = mean request latency (submit to final event), ttft_s = mean
time to the first token (the prefill), decode_tokens_per_s = tokens generated after every row had
its first token / the time from then to the end (decode steps only, sampling and text included),
step_ms = mean time between a row's tokens, prefills = prefill forwards the round took (1: all c
rows were prefilled as one batch), peak_gib = peak CUDA memory allocated in the round.

GPU memory (8B shape, bf16): weights 16.06 GB; KV cache 128 KiB per token (32 layers x K, V x
8 heads x 128 x 2 B); the full-prefix prefill of c x (N + Q) tokens holds ~3 MLP activations of
14336 x 2 B plus ~2 hidden states of 4096 x 2 B per token at its peak. At c = 32, N = 8192,
Q = 32, 64 new tokens: 16.1 + 34.8 (KV) + 26.9 (prefill) = 77.7 GB = 72.4 GiB of the H100's 79.6
GiB. `estimate_bytes` computes this; a full-prefix row whose estimate exceeds `--mem-fraction` of
the card has its N halved until it fits (and a round that runs out of memory anyway is retried
with N halved); the row records the N it ran (and `N_requested`). The memory (default M = 4096:
4 float32 tensors of 32 x 4096 x 128 per layer, 8.6 GB) is freed before the full-prefix rows.

Writes {"device", "model", "rows": [{"way", "concurrency", "N", "M", "new_tokens",
"tokens_per_s", "latency_s", ...}], ...} to bench/results/worker_<gpu>.json (`--out`) and prints a
table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.attention import gpu_tag

RESULTS = Path(__file__).resolve().parent / "results"
WAYS = {
    "full": "full prefix",
    "memory": "memory",
    "memory-nokbar": "memory (no k_bar)",
    "neither": "neither",
}
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


class StandInTokenizer:
    """The tokenizer members the scheduler uses (`eos_token_id`, `pad_token_id`, `decode`).

    A stand-in for Llama-3's tokenizer (not available offline): `decode` maps each id to one
    printable ASCII character, so the scheduler detokenizes every row at every token as it does
    with a real tokenizer.
    """

    def __init__(self, eos_token_id: int | None, pad_token_id: int | None = None) -> None:
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(33 + int(i) % 94) for i in ids)


# -- the memory ----------------------------------------------------------------------------------


def synthetic_memory(model, budget: int, prefix_tokens: int, *, dtype: torch.dtype = torch.float32,
                     seed: int = 0):  # fmt: skip
    """A memory of the model's shape as the default builder lays it out (pre-RoPE keys, head
    granularity, q_mean / k_bar extras), random entries, made on the model's device."""
    from memdb_worker.builder import BuildOptions
    from memdb_worker.keys import KeySpace, RopeSpec
    from memdb_worker.memory import Memory, MemoryLayer
    from memdb_worker.model import model_fingerprint

    cfg = model.config
    dev = next(model.parameters()).device
    h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rope = RopeSpec.from_model(model)
    ks = KeySpace("pre_rope", "head", h, hkv, d, common_position=prefix_tokens, rope=rope)
    i, hpg, dk = ks.num_groups, ks.heads_per_group, ks.key_dim
    g = torch.Generator(device=dev).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dtype)

    layers = []
    lse0 = math.log(max(prefix_tokens, 2))  # a query's lse on N tokens of similar scores
    for _ in range(cfg.num_hidden_layers):
        keys = randn(i, budget, dk)
        layers.append(
            MemoryLayer(
                keys=keys,
                inv_norm=keys.float().norm(dim=-1).clamp_min(1e-30).reciprocal(),
                out=randn(i, budget, hpg, d, scale=0.1),
                lse=torch.randn(i, budget, hpg, device=dev, generator=g) * 0.5 + lse0,
                extras={  # float32 whatever dtype, as the builder stores them
                    "q_mean": torch.randn(i, budget, hpg, d, device=dev, generator=g),
                    "k_bar": torch.randn(i, budget, hpg, d, device=dev, generator=g) * 0.1,
                },
            )
        )
    n_params = sum(p.numel() for p in model.parameters())
    fingerprint = model_fingerprint(model) if n_params < 100_000_000 else "sha256:not-computed"
    build = {**asdict(BuildOptions()), "key_dtype": str(dtype).removeprefix("torch."),
             "out_dtype": str(dtype).removeprefix("torch."), "granularity": ks.granularity,
             "lse_correction": True, "synthetic": True}  # fmt: skip
    meta = {
        **ks.metadata(),
        "entry_state": "average",
        "lse_correction": "1",
        "budget": str(budget),
        "num_layers": str(cfg.num_hidden_layers),
        "prefix_length": str(prefix_tokens),
        "token_count": str(prefix_tokens),
        "chunk_lengths": json.dumps([prefix_tokens]),
        "calibration_positions": "after_prefix",
        "model_fingerprint": fingerprint,
        "rope": json.dumps(
            {
                "inv_freq": [float(x) for x in rope.inv_freq.tolist()],
                "attention_scaling": rope.attention_scaling,
            }
        ),  # fmt: skip
        "scaling": repr(float(d**-0.5)),
        "build_params": json.dumps(build, sort_keys=True),
    }
    return Memory(layers, ks, meta)


def without_kbar(memory):
    """The same entries (shared tensors) as a memory built with lse_correction=False."""
    from memdb_worker.memory import Memory, MemoryLayer

    layers = [MemoryLayer(x.keys, x.inv_norm, x.out, x.lse, {}) for x in memory.layers]
    return Memory(layers, memory.keyspace, {**memory.metadata, "lse_correction": "0"})


# -- GPU memory ----------------------------------------------------------------------------------


def estimate_bytes(cfg, weights: int, batch: int, prompt: int, new_tokens: int) -> int:
    """Peak bytes of a batch: weights, the KV cache of prompt + new tokens per row, and the
    prefill's activations at its last layer (3 MLP intermediates + 2 hidden states per token)."""
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    kv = batch * (prompt + new_tokens) * kv_per_token
    act = batch * prompt * (3 * cfg.intermediate_size + 2 * cfg.hidden_size) * 2
    return weights + kv + act


# -- measuring -----------------------------------------------------------------------------------


@dataclass
class _Trace:
    """What one request's sink saw."""

    times: list[float] = field(default_factory=list)  # one per generated token
    done_at: float | None = None
    error: str | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def sink(self, ev) -> None:
        now = time.perf_counter()
        if ev.error is not None:
            self.error = f"{type(ev.error).__name__}: {ev.error}"  # keep no tensors alive
        else:
            self.times.extend([now] * len(ev.token_ids))
        if ev.final:
            self.done_at = now
            self.finished.set()


class RoundFailed(RuntimeError):
    pass


def run_round(sched, prompts: list[list[int]], source, new_tokens: int) -> dict:
    """Submit the prompts at once, wait for every final event; the round's timings."""
    from memdb_worker.scheduler import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    traces = [_Trace() for _ in prompts]
    prefills = sched.stats.batches
    start = time.perf_counter()
    reqs = [sched.submit(GenerationRequest(p, params, t.sink, source))
            for p, t in zip(prompts, traces, strict=True)]  # fmt: skip
    for t in traces:
        if not t.finished.wait(timeout=900):
            raise RoundFailed("a request did not finish within 900 s")
    errors = [t.error for t in traces if t.error]
    if errors:
        raise RoundFailed(errors[0])
    for t in traces:
        if len(t.times) != new_tokens:
            raise RoundFailed(f"a request generated {len(t.times)} tokens, not {new_tokens}")
    end = max(t.done_at for t in traces)
    first = max(t.times[0] for t in traces)
    decode_tokens = sum(1 for t in traces for x in t.times if x > first)
    return {
        "wall_s": end - start,
        "latency": [t.done_at - r.submitted_at for t, r in zip(traces, reqs, strict=True)],
        "ttft": [t.times[0] - r.submitted_at for t, r in zip(traces, reqs, strict=True)],
        "step": [(t.times[-1] - t.times[0]) / max(1, new_tokens - 1) for t in traces],
        "tokens": sum(len(t.times) for t in traces),
        "decode_tokens": decode_tokens,
        "decode_s": end - first,
        "prefills": sched.stats.batches - prefills,
    }


@contextmanager
def count_fused():
    """Count the calls of the fused decode kernels (`fused.memory_attention`) in the block."""
    from memdb_worker import fused

    calls = [0]
    original = fused.memory_attention

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    fused.memory_attention = counted
    try:
        yield calls
    finally:
        fused.memory_attention = original


def measure(model, tokenizer, way: str, conc: int, prompts_for, source, args, dev) -> dict:
    """One row: warm up, then `args.rounds` rounds of `conc` concurrent requests."""
    from memdb_worker.scheduler import Scheduler

    sched = Scheduler(model, tokenizer, max_batch=conc, batch_wait_s=args.batch_wait_ms / 1000)
    sched.start()
    try:
        # a whole round as warm-up (every kernel specialization compiled before timing); one
        # row for the full prefix, whose c-row prefill costs seconds
        warm = 1 if way == "full prefix" else conc
        run_round(sched, prompts_for(warm, -1), source, args.new_tokens)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rounds = []
        with count_fused() as fused_calls:
            for r in range(args.rounds):
                rounds.append(run_round(sched, prompts_for(conc, r * conc), source,
                                        args.new_tokens))  # fmt: skip
    finally:
        sched.stop()
    wall = sum(x["wall_s"] for x in rounds)
    tokens = sum(x["tokens"] for x in rounds)
    latency = [v for x in rounds for v in x["latency"]]
    ttft = [v for x in rounds for v in x["ttft"]]
    step = [v for x in rounds for v in x["step"]]
    decode_s = sum(x["decode_s"] for x in rounds)
    path = "sdpa" if source is None else ("fused" if fused_calls[0] else "reference")
    return {
        "way": way,
        "concurrency": conc,
        "requests": len(latency),
        "new_tokens": args.new_tokens,
        "prompt_tokens": len(prompts_for(1, 0)[0]),
        "tokens_per_s": round(tokens / wall, 2),
        "latency_s": round(sum(latency) / len(latency), 4),
        "ttft_s": round(sum(ttft) / len(ttft), 4),
        "decode_tokens_per_s": round(sum(x["decode_tokens"] for x in rounds) / decode_s, 2)
        if decode_s > 0
        else None,
        "step_ms": round(1e3 * sum(step) / len(step), 3),
        "prefills": sum(x["prefills"] for x in rounds),
        "path": path,
        "peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 2)
        if dev.type == "cuda"
        else None,
    }


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
    ap.add_argument("--N", type=int, default=None, help="prefix tokens (default 8192; tiny 128)")
    ap.add_argument("--M", type=int, default=None, help="memory budget (default 4096; tiny 16)")
    ap.add_argument("--query-tokens", type=int, default=None, help="short query (32; tiny 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated (64; tiny 4)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of c requests per row")
    ap.add_argument("--ways", default=",".join(WAYS), help=f"comma list of {list(WAYS)}")
    ap.add_argument("--memory-dtype", choices=["float32", "float16"], default="float32",
                    help="keys and entry outputs (the builder's default: float32)")  # fmt: skip
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="the worker's default: 5")
    ap.add_argument("--mem-fraction", type=float, default=0.92,
                    help="cut N of a full-prefix row estimated above this of the card")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    small = {"concurrency": "1,2", "N": 128, "M": 16, "query_tokens": 8, "new_tokens": 4}
    big = {"concurrency": "1,8,32", "N": 8192, "M": 4096, "query_tokens": 32, "new_tokens": 64}
    for k, v in (small if args.tiny else big).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    ways = [w.strip() for w in args.ways.split(",")]
    unknown = [w for w in ways if w not in WAYS]
    if unknown:
        ap.error(f"unknown ways {unknown}; choose from {list(WAYS)}")
    if args.out is None:
        tag = gpu_tag(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else "cpu"
        args.out = RESULTS / f"worker_{tag}{'_tiny' if args.tiny else ''}.json"

    torch.manual_seed(args.seed)
    cfg = llama_config(args.tiny)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = random_model(cfg, dev, dtype, seed=args.seed)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {weights / 1e9:.2f} GB of {dtype} weights on {dev} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip
    eos = cfg.eos_token_id[-1] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    tokenizer = StandInTokenizer(eos)

    g = torch.Generator().manual_seed(args.seed + 1)
    hi = min(cfg.vocab_size, 128000)  # no special ids
    prefix = torch.randint(3, hi, (args.N,), generator=g).tolist()
    warm_at = max(concurrencies) * args.rounds  # the warm-up's queries come after the rounds'
    queries = torch.randint(3, hi, (warm_at + max(concurrencies), args.query_tokens),
                            generator=g).tolist()  # fmt: skip

    def prompts(pre: list[int]):
        return lambda n, at: [pre + queries[(warm_at if at < 0 else at) + i] for i in range(n)]

    capacity = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    rows: list[dict] = []
    memory = src = None
    t_build = 0.0

    def record(row: dict, n: int, m: int, n_requested: int | None = None) -> None:
        row.update(N=n, M=m)
        if n_requested is not None and n_requested != n:
            row["N_requested"] = n_requested
        rows.append(row)
        decode = row["decode_tokens_per_s"] or 0
        print(f"{row['way']:<18} c={row['concurrency']:<3} N={n:<6} M={m:<5} "
              f"{row['tokens_per_s']:>10.1f} tok/s  decode {decode:>10.1f} tok/s  "
              f"latency {row['latency_s']:.3f} s  ttft {row['ttft_s']:.3f} s  "
              f"path {row['path']}", flush=True)  # fmt: skip

    order = [w for w in ("neither", "memory", "memory-nokbar", "full") if w in ways]
    for key in order:
        way = WAYS[key]
        if key.startswith("memory") and memory is None:
            t = time.perf_counter()
            mdtype = getattr(torch, args.memory_dtype)
            memory = synthetic_memory(model, args.M, args.N, dtype=mdtype, seed=args.seed)
            t_build = time.perf_counter() - t
            print(f"memory: M={args.M}, {memory.nbytes() / 1e9:.2f} GB ({t_build:.1f} s)")
        if key == "full" and memory is not None:
            memory = src = None  # room for the prefix's KV cache
            _free(dev)
            if dev.type == "cuda":
                print(f"memory freed: {torch.cuda.memory_allocated() / GiB:.2f} GiB allocated")
        for conc in concurrencies:
            if key == "neither":
                record(measure(model, tokenizer, way, conc, prompts([]), None, args, dev), 0, 0)
            elif key.startswith("memory"):
                src = memory if key == "memory" else without_kbar(memory)
                record(measure(model, tokenizer, way, conc, prompts([]), src, args, dev),
                       args.N, args.M)  # fmt: skip
            else:
                n = args.N
                if capacity is not None:
                    while (
                        n > 256
                        and estimate_bytes(
                            cfg, weights, conc, n + args.query_tokens, args.new_tokens
                        )
                        > args.mem_fraction * capacity
                    ):
                        n //= 2
                while True:
                    try:
                        row = measure(model, tokenizer, way, conc, prompts(prefix[:n]), None,
                                      args, dev)  # fmt: skip
                        break
                    except RoundFailed as exc:
                        if "out of memory" not in str(exc).lower() or n <= 256:
                            raise
                        print(f"c={conc} N={n}: out of memory; retrying with N={n // 2}")
                        n //= 2
                        _free(dev)
                record(row, n, 0, args.N)
            _free(dev)

    est = [
        {"concurrency": c, "N": args.N,
         "full_prefix_gib": round(estimate_bytes(cfg, weights, c, args.N + args.query_tokens,
                                                 args.new_tokens) / GiB, 2)}
        for c in concurrencies
    ]  # fmt: skip
    result = {
        "device": device_name(dev),
        "model": (
            "tiny Llama (random weights)"
            if args.tiny
            else "Llama-3.1-8B shape, random weights (std 0.02)"
        )
        + f", {dtype}",  # fmt: skip
        "tokenizer": "stand-in (bench.worker_gpu.StandInTokenizer)",
        "settings": {
            "N": args.N,
            "M": args.M,
            "query_tokens": args.query_tokens,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "memory_dtype": args.memory_dtype,
            "batch_wait_ms": args.batch_wait_ms,
            "mem_fraction": args.mem_fraction,
            "fused_env": os.environ.get("MEMDB_FUSED"),
        },  # fmt: skip
        "weights_gb": round(weights / 1e9, 3),
        "memory_build_s": round(t_build, 2),
        "memory_estimate": est,
        "capacity_gib": round(capacity / GiB, 2) if capacity else None,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n{result['device']}\n{result['model']}")
    print(f"{'way':<18} {'c':>3} {'N':>6} {'M':>5} {'tok/s':>10} {'decode tok/s':>13} "
          f"{'latency s':>10} {'ttft s':>8} {'step ms':>8}  path")  # fmt: skip
    for r in rows:
        print(f"{r['way']:<18} {r['concurrency']:>3} {r['N']:>6} {r['M']:>5} "
              f"{r['tokens_per_s']:>10.1f} {r['decode_tokens_per_s'] or 0:>13.1f} "
              f"{r['latency_s']:>10.3f} {r['ttft_s']:>8.3f} {r['step_ms']:>8.2f}  "
              f"{r['path']}")  # fmt: skip
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
