"""The decoding-speed sections: one attention layer on the GPU (`bench.attention`), the worker's
graphed decode step on the GPU (`bench.worker_gpu`) and the serving worker on CPU
(`bench.worker`), and the demo's run."""

from __future__ import annotations

from bench.report.findings import finding
from bench.report.markdown import section, span, table
from bench.report.sources import load, machine, source

ATTENTION = "attention_h200.json"
# the formats the table shows (the JSON has three more: bf16/head+kbar and the +kbar groups)
ATTENTION_FORMATS = ("fp16/head", "f32/head+kbar", "fp8/head+kbar", "bf16/kv_group_mean",
                     "fp8/kv_group_mean")  # fmt: skip
DEFAULT_FORMAT = "bf16/kv_group_mean"  # the looked-up format the builder wrote by default then


def _k(n: int) -> str:
    return f"{n // 1024}K"


def attention() -> str:
    r = load(ATTENTION)
    rows = [x for x in r["rows"] if x["scope"] == "layer" and x["M"] == 4096]
    cells = {(x["batch"], x["N"], x["memory_format"]): x for x in rows}
    out = []
    for b, n in sorted({(x["batch"], x["N"]) for x in rows}):
        first = cells[(b, n, ATTENTION_FORMATS[0])]
        line = [b, _k(n), f"{first['sdpa_us']:.1f}",
                f"{first['shared_us']:.1f} ({first['shared_vs_floor']:.2f}x)"]  # fmt: skip
        for fmt in ATTENTION_FORMATS:
            x = cells[(b, n, fmt)]
            line.append(f"{x['memory_us']:.1f} ({x['speedup_vs_best']:.2f}x; "
                        f"{x['vs_floor']:.1f}x floor)")  # fmt: skip
        out.append(line)
    mb = ", ".join(f"{f} {r['memory_bytes'][f]['4096'] / 1e6:.1f} MB" for f in ATTENTION_FORMATS)
    kv = ", ".join(f"{_k(n)} {x['prefix_kv_bytes'] / 1e6:.1f} MB"
                   for n, x in sorted({x["N"]: x for x in rows}.items()))  # fmt: skip
    d8 = {n: cells[(8, n, DEFAULT_FORMAT)] for n in (8192, 32768, 131072)}
    sh = [x["shared_vs_floor"] for x in rows if x["memory_format"] == DEFAULT_FORMAT]
    sh8k = [x["shared_vs_floor"] for x in rows if x["memory_format"] == DEFAULT_FORMAT
            and x["N"] == 8192]  # fmt: skip
    return section(
        f"### GPU attention on fair terms ({machine(ATTENTION)}, {r['date'][:10]})",
        f"Llama-3.1-8B shape ({r['shape']['heads']} query heads, {r['shape']['kv_heads']} KV "
        f"heads, d = {r['shape']['head_dim']}, bf16 activations), live context "
        f"{r['live_context']}, one decode layer, memory M = 4K entries, medians of "
        "`triton.testing.do_bench` over CUDA-graph replays. The baselines are what a serving "
        "engine with prefix caching runs: **per-row SDPA** over each row's cached prefix KV + "
        "live KV, and **shared** (cascade) attention, the prefix KV read once for the whole "
        "batch (every row's queries folded into one split-KV Triton pass over the prefix, each "
        "row's live KV attended alone, the two merged; `memdb_worker.attend.shared_prefix`, "
        "equal to per-row SDPA to 2.3e-3). Cells: µs per layer (speedup over the better of the "
        "two baselines; time over the format's own floor, its bytes at the measured "
        f"{r['copy_bandwidth_Bps'] / 1e12:.2f} TB/s). Formats: key dtype / granularity (+kbar: "
        "the lse-correction extras stored); `bf16/kv_group_mean` (one head-dim key per KV "
        "group, bf16 states, no extras) is the entries format the builder wrote by default "
        "until rows (which have no fused kernel yet: they decode through the reference path).",
        source(ATTENTION),
        table(["batch", "N", "per-row SDPA", "shared (x its floor)", *ATTENTION_FORMATS], out),
        f"Bytes per layer as stored (M = 4K): {mb}; prefix KV (bf16) {kv}.",
        f"Against the targets of issue 9 (batch 8, {DEFAULT_FORMAT}): "
        f"{d8[32768]['speedup_vs_shared']:.2f}x `shared` at 32K (target 2x: "
        f"{'met' if d8[32768]['speedup_vs_shared'] >= 2 else 'missed'}) and "
        f"{d8[131072]['speedup_vs_shared']:.2f}x at 128K (target 5x: "
        f"{'met' if d8[131072]['speedup_vs_shared'] >= 5 else 'missed'}), never slower than "
        f"`shared` at N >= 8K ({d8[8192]['speedup_vs_shared']:.2f}x at 8K: "
        f"{'met' if d8[8192]['speedup_vs_shared'] >= 1 else 'missed'}); within 1.3x of its own "
        f"floor: **{'met' if d8[8192]['vs_floor'] <= 1.3 else 'missed'}** "
        f"({d8[8192]['vs_floor']:.1f}x: a fixed ~13 µs of two launches and the gather dominates "
        "a scan of only 8.4 MB of keys). The shared baseline itself sits "
        f"{span(sh8k, '.1f')}x over its floor at 8K (too few splits for a short prefix) and "
        f"{span([s for s in sh if s not in sh8k], '.1f')}x at 32K-128K.",
    )  # fmt: skip


def _worker_cell(x: dict) -> str:
    return f"{x['step_ms']:.2f} ({x['decode_tok_s']:.0f})"


def worker_gpu() -> str:
    r = load("worker_h200.json")
    st = r["settings"]
    rows = {(x["way"], x.get("memory_format"), x["N"], x["c"]): x for x in r["rows"]}
    cs = st["concurrency"]
    keys = [("neither", None, 0)]
    for n in st["N"]:
        keys += [("full_prefix", None, n)] + [("memory", f, n) for f in st["memory_formats"]]
    out = []
    for way, fmt, n in keys:
        xs = [rows[(way, fmt, n, c)] for c in cs]
        out.append([way if fmt is None else f"{way} {fmt}", "-" if n == 0 else _k(n),
                    *(_worker_cell(x) for x in xs),
                    " / ".join(f"{x['ttft_s']:.2f}" for x in xs)])  # fmt: skip
    head = ["way", "N", *(f"c = {c}: step ms (tok/s)" for c in cs),
            "TTFT " + " / ".join(f"c = {c}" for c in cs) + " (s)"]  # fmt: skip

    def vs(way_fmt: str, base: str) -> list[float]:
        return [x["step_ms"] / rows[(base, None, 0 if base == "neither" else x["N"], x["c"])]
                ["step_ms"] for x in r["rows"] if x.get("memory_format") == way_fmt]  # fmt: skip

    def over_prefix(n: int) -> str:
        return " / ".join(
            f"{rows[('memory', DEFAULT_FORMAT, n, c)]['decode_tok_s'] / rows[('full_prefix', None, n, c)]['decode_tok_s']:.2f}"  # noqa: E501
            for c in cs
        )

    neither1 = rows[("neither", None, 0, 1)]
    ttft_mem = [x["ttft_s"] for x in r["rows"] if x["way"] == "memory"
                and x["memory_format"] == DEFAULT_FORMAT]  # fmt: skip
    return section(
        f"### Worker decode step on the GPU ({machine('worker_h200.json')}, 2026-11-30)",
        "The worker's `StaticDecoder` (static KV cache, the whole decode step captured as a CUDA "
        "graph per batch bucket, sampling inside the graph) on a Llama-3.1-8B-shaped model with "
        f"random bf16 weights, {st['query_tokens']}-token queries, memories of M = {st['M']}. "
        "The full prefix is **prefix-cached** (its prefix KV encoded once per prefix version, "
        "not counted in TTFT) and read once per batch (shared attention). Weight floor "
        f"({r['weights_gb']:.0f} GB of weights at the measured copy bandwidth): "
        f"{r['floor_ms']:.2f} ms.",
        source("worker_h200.json"),
        table(head, out),
        f"Against the targets: 'neither' at c = 1 is {neither1['vs_floor']:.2f}x the weight floor "
        "(target 1.25x: **missed**; the graphed step's non-attention work costs ~3.5 ms over the "
        f"weights). The memory step ({DEFAULT_FORMAT}) is "
        f"{span(vs(DEFAULT_FORMAT, 'neither'))}x 'neither' at every c (target 1.05x; "
        f"fp8/head+kbar up to {max(vs('fp8/head+kbar', 'neither')):.2f}x, the float32 format "
        f"with extras up to {max(vs('f32/head+kbar', 'neither')):.2f}x). Memory vs prefix-cached "
        "full prefix, decode tokens/s at c = " + " / ".join(map(str, cs)) + ": "
        + "; ".join(f"N = {_k(n)} {over_prefix(n)}x" for n in st["N"])
        + " (targets: >= 1.0x at 8K; 1.1x at 32K, c = 1; 1.3x at 32K, c = 8 and 32). Time to "
        f"first token stays {span(ttft_mem)} s with a memory; the full prefix's grows with N and "
        "c even with its KV cached: every request's query tokens attend over the whole prefix, "
        "and here through the torch reference path in float32, not a flash prefill kernel, so "
        "these full-prefix TTFTs overstate what a tuned serving engine takes (the decode-step "
        "comparison is the fair one). The static/graphed path is what the scheduler uses when "
        "`static_live_tokens` > 0 (off by default: the HTTP worker on CPU decodes eagerly).",
    )  # fmt: skip


WORKER_WAYS = {
    "full prefix (cached)": "full prefix in the prompt, prefix-cached by the worker",
    "memory": "memory (cached on the device)",
    "neither": "neither",
    "memory (remote)": "memory, remote mode (a Lookup per layer and step)",
}


def worker_cpu() -> str:
    r = load("worker.json")
    rows = {(x["way"], x["concurrency"]): x for x in r["rows"]}
    cs = sorted({x["concurrency"] for x in r["rows"]})
    out = [[label, *(f"{rows[(way, c)]['tokens_per_s']:.2f} ({rows[(way, c)]['latency_s']:.2f} s)"
                     for c in cs)] for way, label in WORKER_WAYS.items()]  # fmt: skip
    x0 = r["rows"][0]
    ratio = [rows[("memory", c)]["tokens_per_s"] / rows[("full prefix (cached)", c)]
             ["tokens_per_s"] for c in cs]  # fmt: skip
    return section(
        f"### Worker on CPU: tokens/s with and without a memory ({machine('worker.json')})",
        f"{r['model']}, torch 2 threads; real memdb-server and memdb-worker processes, "
        f"completions over HTTP, greedy, {x0['new_tokens']} new tokens per request, "
        f"{x0['requests'] // x0['concurrency']} rounds; TREC prefix text of "
        f"{r['prefix_tokens']:,} tokens, memory M = {r['budget']} per layer and head, "
        f"{r['memory_bytes'] / 1e6:.0f} MB.",
        source("worker.json"),
        "The memory of this run is looked-up entries (entry_state average, bfloat16 keys): "
        "`bench.worker` built that format for every row until it measured the default (fitted "
        "rows) in its own rows; the default's figures are the next table.",
        table(["way", *(f"concurrency {c}: tokens/s (latency)" for c in cs)], out),
        "The full prefix is prefix-cached as a serving engine with prefix caching runs it: the "
        "worker's automatic prefix cache (`memdb_worker.serve.prefix_cache`) encodes the "
        "prompt's leading blocks once (at the warm-up request) and later requests prefill only "
        "their question against that prefix KV. Against that fair baseline the memory is "
        + " and ".join(f"{x:.2f}x at concurrency {c}" for x, c in zip(ratio, cs, strict=True))
        + " on this CPU (memory and full prefix rows of one run; the remote rows vary more "
        "between runs).",
    )  # fmt: skip


def worker_cpu_default() -> str:
    """bench.worker's rows that name their memory format: the default memory (fitted rows)."""
    name = "worker_cpu_quick.json"
    r = load(name)
    x0 = r["rows"][0]
    out = [[WORKER_WAYS[x["way"]], x["memory_format"] or "-", x["concurrency"],
            f"{x['tokens_per_s']:.2f}", f"{x['latency_s']:.2f} s"] for x in r["rows"]]  # fmt: skip
    return section(
        f"### Worker on CPU with the default memory format, quick run ({machine(name)})",
        f"{r['model']}; as above with `--quick`: {x0['new_tokens']} new tokens per request, "
        f"{x0['requests'] // x0['concurrency']} round; TREC prefix text of "
        f"{r['prefix_tokens']:,} tokens, memory M = {r['budget']} per layer and KV head, "
        f"{r['memory_bytes'] / 1e6:.1f} MB as fitted rows (the remote row's looked-up entries: "
        f"{r['remote_memory_bytes'] / 1e6:.1f} MB). One round per cell: a smoke-sized "
        "measurement, not a replacement for the full run above.",
        source(name),
        table(["way", "memory format", "concurrency", "tokens/s", "latency"], out),
    )  # fmt: skip


def demo() -> str:
    """The demo's run: its figures are the demo's printed output (it writes no JSON)."""
    return section(
        "### The demo (`bash scripts/demo.sh`, x86_64, 2 CPU cores, 2026-11-30)",
        finding("demo"),
    )  # fmt: skip


FITTED = "attention_fitted_h100.json"  # python -m bench.attention --fitted
FITTED_HEAD = ("live", "batch", "N", "M", "kernel (x floor)", "floor", "reference",
               "shared (x floor)", "vs shared")  # fmt: skip


def fitted_attention() -> str:
    """The default memory format (fitted rows) through its fused kernel, next to today's
    reference path and the prefix-cached full prefix (`bench.attention --fitted`)."""
    r = load(FITTED)
    rows = sorted(r["rows"], key=lambda x: (x["live_context"], x["batch"], x["N"], x["M"]))
    out = [[x["live_context"], x["batch"], _k(x["N"]), _k(x["M"]),
            f"{x['memory_us']:.1f} ({x['vs_floor']:.2f}x)", f"{x['floor_us']:.1f}",
            f"{x['reference_us']:.0f}",
            f"{x['shared_us']:.1f} ({x['shared_vs_floor']:.2f}x)",
            f"{x['speedup_vs_shared']:.2f}x"] for x in rows]  # fmt: skip
    b8 = [x for x in rows if x["batch"] == 8]
    met = [x for x in b8 if x["memory_us"] <= max(1.3 * x["floor_us"], 10.0)]
    missed = ", ".join(f"live {x['live_context']} N {_k(x['N'])} M {_k(x['M'])} "
                       f"{x['memory_us']:.1f} µs ({x['vs_floor']:.2f}x of {x['floor_us']:.1f})"
                       for x in b8 if x not in met)  # fmt: skip
    errs = [x["rel_err_vs_reference"] for x in rows]
    launch = r.get("graph_launch_us")
    intercept = "" if launch is None else (
        f" A graph of one one-element op measures {launch:.1f} µs the same way: the smallest "
        "time any cell can show.")  # fmt: skip
    return section(
        f"### GPU attention over fitted rows, the default memory ({machine(FITTED)}, "
        f"{r['date'][:10]})",
        f"Llama-3.1-8B shape ({r['shape']['heads']} query heads, {r['shape']['kv_heads']} KV "
        f"heads, d = {r['shape']['head_dim']}, bf16 activations), one decode layer captured in "
        "a CUDA graph. The memory is fitted rows as the builder stores them (per KV head M rows "
        "of float8 keys with a per-row scale, bfloat16 values, float32 biases), M = N/8 and "
        "M = 4K; **kernel**: `memdb_worker.attend.fitted_rows.fitted_attention` (the batch's "
        "queries of a KV head folded into one split pass over its rows, the live KV and the "
        "merge in the same two launches); **reference**: the path fitted memories took before "
        "it (`Memory.prefix_state` in torch ops, merged with the live state); **shared**: the "
        "prefix-cached full prefix (`shared_attention`, the N-token prefix KV read once per "
        "batch). Cells: µs (time over the path's own byte floor at the measured "
        f"{r['copy_bandwidth_Bps'] / 1e12:.2f} TB/s); floor in µs; kernel speedup over shared. "
        f"Kernel against the reference: relative error {span(errs, '.1e')}." + intercept,
        source(FITTED),
        table(FITTED_HEAD, out),
        f"Against issue 21's target (batch 8: within 1.3x of the floor, or 10 µs where the "
        f"floor is a few µs, at every N and M): {len(met)} of {len(b8)} cells "
        + ("**met**." if not missed else f"met; missed: {missed}."),
    )
