"""Decode attention with a memory versus the prefix in the KV cache (GPU; device tool).

    python -m bench.attention [--out bench/results] [--quick] [--formats fp16/head,...]

Llama-3.1-8B-shaped attention (32 query heads, 8 KV heads, head dim 128, bf16, random weights),
live context C = 512 tokens, batch in {1, 8, 32}, prefix N in {1K ... 128K}, memory budget
M in {1K, 4K, 8K}, pre-RoPE keys, in the memory formats of `FORMATS` ("<keys>/<granularity>",
"+kbar" when q_mean / k_bar are stored and the first-order lse correction runs: e.g.
"bf16/kv_group_mean" is the looked-up format the builder wrote by default until fitted rows
(one key of the head dim per KV group, bf16 keys and states; fitted rows have no fused
kernel), "fp8/kv_group_mean+kbar" the same with float8 keys with a per-entry scale and the lse
correction's extras). Side by side, in one run:

- sdpa:   torch SDPA (FlashAttention backend where it is faster) over the cached prefix plus
          the live context, N + C keys per row (each row its own copy of the prefix);
- shared: the fair baseline when the batch shares one prefix (DESIGN.md section 8): the
          prefix KV read once for the batch (`memdb_worker.attend.shared_prefix.shared_attention`:
          folded queries, split-KV Triton programs, per-row live programs, one merge), and
          `shared_flash`: the same with torch's flash kernel (one call over the folded queries,
          one per row over the live KV, merged in torch ops: the naive form);
- memory: the worker's fused path (`memdb_worker.attend.fused.memory_attention`: RoPE undone, lookup
          over the M keys, top-1 gather, attention over the C live keys, merge), two launches;
- floor:  the bytes each path must move over the device-to-device copy bandwidth measured in
          the same run (memory: its keys once, the live KV, q, gathered states, output;
          shared: the prefix KV once, every row's live KV; sdpa: every row's KV).

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

`--fitted` measures instead the default memory format, fitted rows (float8 keys with a per-row
scale, bfloat16 values, float32 biases), through its fused kernels and today's reference path,
next to the prefix-cached full prefix (`fitted` says how): writes
bench/results/attention_fitted_<gpu>.json.

Writes bench/results/attention_<gpu>.json ({"device", "rows": [{"N", "M", "batch", "scope",
"memory_format", "memory_bytes" (per layer as stored), "prefix_kv_bytes" (per layer, bf16),
"sdpa_us", "shared_us", "memory_us", "floor_us", "shared_floor_us", ...}]}) and a PNG beside it.
The cases are in `cases`, the step scope in `step`, the launch sweeps in `tune`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench.attention.cases import (
    BATCHES,
    FORMATS,
    HKV,
    LIVE,
    MS,
    NS,
    D,
    H,
    bench,
    check,
    copy_bandwidth,
    gpu_tag,
    graphed,
    layer_rows,
    log,
    parse_format,
    plot,
    table,
)
from bench.attention.fitted import LIVES as FITTED_LIVES
from bench.attention.step import LAYERS, step_rows
from bench.attention.tune import tune, tune_shared


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "results"))
    ap.add_argument("--quick", action="store_true",
                    help="N 8K/32K/128K, M 4K, no launch sweep of the memory kernels, step "
                         "scope at N 8K/32K for three formats (minutes)")  # fmt: skip
    ap.add_argument("--scopes", default="layer,step")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--step-formats", default="fp16/head,fp8/head+kbar,bf16/kv_group_mean")
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--plot", help="only draw the PNG of an existing JSON")
    ap.add_argument(
        "--fitted",
        action="store_true",
        help="only the fitted-row cases (`fitted`): attention_fitted_<gpu>.json",
    )
    ap.add_argument("--fitted-lives", default=",".join(map(str, FITTED_LIVES)),
                    help="live tokens per row of the fitted-row cases")  # fmt: skip
    args = ap.parse_args(argv)
    if args.plot:
        p = Path(args.plot)
        plot(json.loads(p.read_text()), p.with_suffix(".png"))
        return 0
    if not torch.cuda.is_available():
        log("bench.attention needs a CUDA device (use the device tool)")
        return 2
    import triton

    formats = args.formats.split(",")
    for f in formats + args.step_formats.split(","):
        parse_format(f)
    ns = [8192, 32768, 131072] if args.quick else NS
    step_ns = [8192, 32768] if args.quick else NS
    ms = [4096] if args.quick else MS
    batches = BATCHES
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
        "quick": args.quick,
        "rows": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.fitted:
        lives = [int(x) for x in args.fitted_lives.split(",")]
        path = out / f"attention_fitted_{gpu_tag(name)}.json"
        return run_fitted(results, path, batches, lives, not args.no_tune)
    path = out / f"attention_{gpu_tag(name)}.json"

    def save():
        path.write_text(json.dumps(results, indent=1))

    t0 = time.time()
    bw = copy_bandwidth()
    results["copy_bandwidth_Bps"] = bw
    log(f"{name}: copy bandwidth {bw / 1e12:.2f} TB/s")
    check(results, formats)
    save()
    configs = {} if (args.no_tune or args.quick) else tune(results, args.quick)
    results["configs"] = {str(b): c.__dict__ for b, c in configs.items()}
    shared_configs = tune_shared(results, batches, args.quick)
    save()
    log(f"[{time.time() - t0:.0f}s] checks and tuning done")
    scopes = args.scopes.split(",")
    if "layer" in scopes:
        layer_rows(results, bw, configs, ns, ms, batches, formats, shared_configs)
        save()
        log(f"[{time.time() - t0:.0f}s] layer scope done")
    if "step" in scopes:
        try:
            step_rows(results, bw, configs, step_ns, ms, batches, args.step_formats.split(","),
                      shared_configs)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - keep the layer results
            log(f"step scope failed: {exc!r}")
            results["step_error"] = repr(exc)
        save()
    log(f"[{time.time() - t0:.0f}s] wrote {path}")
    for scope in ("layer", "step"):
        if any(r["scope"] == scope for r in results["rows"]):
            log(table(results["rows"], scope))
    plot(results, path.with_suffix(".png"))
    return 0


def run_fitted(results: dict, path: Path, batches, lives, tune_on: bool) -> int:
    """The fitted-row cases alone (`fitted`), written to `path`."""
    from bench.attention import fitted

    t0 = time.time()
    results["live_context"] = lives
    results["command"] = "python -m bench.attention --fitted"
    results["machine"] = f"{results['device']}, {os.cpu_count()} cores"
    bw = copy_bandwidth()
    results["copy_bandwidth_Bps"] = bw
    log(f"{results['device']}: copy bandwidth {bw / 1e12:.2f} TB/s")
    one = torch.zeros(1, device="cuda")
    results["graph_launch_us"] = bench(graphed(lambda: one.add_(1)))  # the timing's intercept
    ms = sorted({m for n in fitted.NS for m in fitted.budgets(n)})
    configs = fitted.sweep(results, batches, lives, ms) if tune_on else {}
    path.write_text(json.dumps(results, indent=1))
    log(f"[{time.time() - t0:.0f}s] fitted sweep done")
    fitted.fitted_rows_cases(results, bw, fitted.NS, batches, lives, configs)
    path.write_text(json.dumps(results, indent=1))
    log(f"[{time.time() - t0:.0f}s] wrote {path}")
    log(fitted.table(results["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
