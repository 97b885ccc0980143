"""Build and decode options chosen on a validation split, per byte (DESIGN.md section 8).

`python -m bench.options` writes bench/results/options.json (top level `"split": "validation"`):
for each data set, examples carved from train (`bench.quality.protocol.split_validation`, never
demonstrations, traces or test examples: the demonstrations and calibration traces of this run
are drawn from the rest of train), scored by ICL cut at several token counts (bytes = the cut's
bfloat16 KV) and by memories of each variant and budget M (bytes as stored), with the fidelity
of bench.quality (rel_err, top1_agree, kl against exact attention over the prefix). One
calibration per data set and seed (recording k_bar) serves every variant.

A cell's figure of merit is its accuracy minus ICL's accuracy at the same bytes (ICL
interpolated between its cuts, `bench.quality.summary.icl_at_bytes`). The pick is a *format*
(the builder's defaults; M is the user's byte budget, not a default): the variant of the highest
gain averaged over the data sets and every budget swept (ties: fewer bytes). The rule until
2026-11-30 picked the single best (variant, M) cell, which rewards a byte size where ICL
happens to be weak rather than a variant (on sst2 every memory scored as ICL over the whole
prefix, 0.475, and the cell whose bytes met ICL's dip to 0.475 won). `--resummarise FILE`
applies the current rule to a finished run's cells. The builder's defaults cite what this file
picked. Sink length is not swept here: a prefix that fits one chunk has no
sink (the sink only changes chunks after the first, i.e. the 32K memory).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.quality import (
    RESULTS,
    Task,
    accuracy,
    classify,
    exact_logp,
    fidelity,
    icl_at_bytes,
    pad,
    plan_validation,
    write_json,
)
from bench.quality.protocol import VALIDATION_SEED

logger = logging.getLogger("bench.options")

BASE_BUILD = {
    "key_mode": "pre_rope",
    "whiten": False,
    "granularity": "head",
    "entry_state": "average",
    "lse_correction": False,
    "key_dtype": "float32",
    "out_dtype": "float32",
    "store_q_mean": True,
}
BASE_DECODE = {"top_k": 1, "lse_correction": False, "lse_bias": 0.0}
COMPACT = {"key_dtype": "float8_e4m3fn", "out_dtype": "bfloat16"}
BF16 = {"key_dtype": "bfloat16", "out_dtype": "bfloat16"}
EXTRAS = {"lse_correction": True, "store_q_mean": False}  # q_mean = the entry key

# name -> (build overrides over BASE_BUILD, decode overrides over BASE_DECODE)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "plain_f32": ({}, {}),
    "f32+lse_corr": ({"lse_correction": True}, {"lse_correction": True}),
    "bf16": (BF16, {}),
    "bf16+lse_corr": ({**BF16, **EXTRAS}, {"lse_correction": True}),
    "fp8_bf16": (COMPACT, {}),
    "fp8_bf16+lse_corr": ({**COMPACT, **EXTRAS}, {"lse_correction": True}),
    "kvg_mean_bf16": ({**BF16, "granularity": "kv_group_mean"}, {}),
    "kvg_mean_fp8_bf16": ({**COMPACT, "granularity": "kv_group_mean"}, {}),
    "kvg_mean_bf16+lse_corr": (
        {**BF16, "granularity": "kv_group_mean", "lse_correction": True},
        {"lse_correction": True},
    ),
    "bf16_rope_common": ({**BF16, "key_mode": "rope_common"}, {}),
    "bf16_top4": (BF16, {"top_k": 4}),
    # fitted key/value rows per KV head (memdb_worker.memory.fitted): a row costs about one
    # token of KV
    "fitted_bf16": ({**BF16, "granularity": "kv_group_mean", "entry_state": "fitted"}, {}),
    "fitted_fp8_bf16": ({**COMPACT, "granularity": "kv_group_mean", "entry_state": "fitted"}, {}),
    # the ablation: biases and values fitted to the float keys, rounded to float8 afterwards
    "fitted_fp8_bf16_floatfit": (
        {
            **COMPACT,
            "granularity": "kv_group_mean",
            "entry_state": "fitted",
            "fit_stored_keys": False,
        },
        {},
    ),
}


def variant_options(name: str, kmeans_iters: int, seed: int):
    """(BuildOptions, DecodeOptions) of a variant."""
    from memdb_worker.build import BuildOptions
    from memdb_worker.memory.memory import DecodeOptions

    build, decode = VARIANTS[name]
    opts = BuildOptions(**{**BASE_BUILD, **build}, kmeans_iters=kmeans_iters, seed=seed)
    return opts, DecodeOptions(**{**BASE_DECODE, **decode})


RULE = (
    "pick = the variant of the highest accuracy gain over ICL at equal bytes (ICL interpolated "
    "between cuts), averaged over data sets and budgets; ties to fewer bytes"
)


def pick(summary: dict) -> dict:
    """The variant of the highest gain over ICL at equal bytes averaged over its cells (every
    data set and budget), ties to fewer bytes; with its per-M cells."""
    by_variant: dict[str, list[dict]] = {}
    for cell in summary.values():
        by_variant.setdefault(cell["variant"], []).append(cell)
    ranked = sorted(
        (-float(np.mean([c["gain_over_icl_equal_bytes"] for c in cells])),
         float(np.mean([c["bytes"] for c in cells])), name)
        for name, cells in by_variant.items()
    )  # fmt: skip
    ranking = [{"variant": v, "mean_gain": -g, "mean_bytes": int(b)} for g, b, v in ranked]
    best = ranking[0]["variant"]
    cells = {f"{best}@{c['M']}": c for c in sorted(by_variant[best], key=lambda c: c["M"])}
    return {"variant": best, "mean_gain": ranking[0]["mean_gain"], "cells": cells,
            "ranking": ranking}  # fmt: skip


def resummarise(path: Path, command: str) -> dict:
    """A finished run's summary and pick again under the current rule (its cells unchanged)."""
    results = json.loads(path.read_text())
    results["summary"] = summarise(results["datasets"])
    results["picked"] = pick(results["summary"])
    results["rule"] = RULE
    results["resummarised_by"] = command
    write_json(path, results)
    return results


def summarise(datasets: dict) -> dict:
    """Per (variant, M): means over data sets and seeds of accuracy, gain, bytes, fidelity."""
    out: dict = {}
    keys = {k for ds in datasets.values() for k in ds["cells"]}
    for key in sorted(keys):
        cells = [ds["cells"][key] for ds in datasets.values() if key in ds["cells"]]
        out[key] = {
            f: float(np.mean([c[f] for c in cells]))
            for f in (
                "acc",
                "icl_equal_bytes",
                "gain_over_icl_equal_bytes",
                "rel_err",
                "top1_agree",
                "kl",
                "bytes",
            )  # fmt: skip
        }
        out[key]["bytes"] = int(out[key]["bytes"])
        out[key].update(variant=cells[0]["variant"], M=cells[0]["M"])
    return out


def run_dataset(model, tok, name: str, args, results: dict) -> None:
    from memdb_worker.build import BuildOptions, calibrate, cluster
    from memdb_worker.memory.formats import kv_bytes

    task = Task(name, tok)
    cfg = model.config
    per_token = kv_bytes(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                         head_dim=cfg.hidden_size // cfg.num_attention_heads, tokens=1)  # fmt: skip
    ds: dict = {"seeds": args.seeds, "icl": {}, "cells": {}, "per_seed": []}
    results["datasets"][name] = ds
    for seed in args.seeds:
        rows_i, plan = plan_validation(
            task,
            seed,
            args.validation_pool,
            args.examples,
            args.prefix_tokens,
            args.prefix_tokens,
            args.traces,
        )
        demos, traces_i = plan.demos, plan.traces
        rows = [task.train[i] for i in rows_i]
        gold = task.gold(rows)
        traces = [task.trace_ids(task.train[i]) for i in traces_i]
        calib_opts = BuildOptions(**{**BASE_BUILD, "lse_correction": True},
                                  kmeans_iters=args.kmeans_iters, seed=seed)  # fmt: skip
        calib = calibrate(model, tok, task.prefix_ids(demos), traces, calib_opts, progress=False)
        exact = calib.prefix_kv
        seqs = [task.trace_ids(r) for r in rows[: args.fidelity_examples]]
        ref = exact_logp(model, *pad(seqs, next(model.parameters()).device), exact)
        rec: dict = {"seed": seed, "n_validation": len(rows), "prefix_tokens": exact.token_count,
                     "n_traces": len(traces), "n_records": calib.num_records, "icl": {},
                     "cells": {}, "validation_rows": rows_i}  # fmt: skip
        points = [(0.0, accuracy(classify(model, task, rows, None)[0], gold))]
        rec["zero_shot"] = points[0][1]
        for t in [*args.icl_cuts, exact.token_count]:
            t = min(t, exact.token_count)
            a = accuracy(classify(model, task, rows, exact.head(t))[0], gold)
            rec["icl"][str(t)] = {"acc": a, "bytes": per_token * t}
            points.append((float(per_token * t), a))
            logger.info("%s seed %d ICL@%d (%.1f MB): %.3f", name, seed, t, per_token * t / 1e6, a)
        for vname in args.variants:
            for m in args.budgets:
                t0 = time.perf_counter()
                bopts, dopts = variant_options(vname, args.kmeans_iters, seed)
                built = cluster(calib, m, bopts, progress=False)
                mem = built.to_memory(next(model.parameters()).device, options=dopts)
                a = accuracy(classify(model, task, rows, mem)[0], gold)
                fid = fidelity(model, seqs, mem, exact, ref_logp=ref)
                icl_eq, how = icl_at_bytes(points, built.nbytes())
                cell = {"variant": vname, "M": m, "acc": a, "bytes": int(built.nbytes()),
                        "icl_equal_bytes": icl_eq, "icl_how": how,
                        "gain_over_icl_equal_bytes": a - icl_eq,
                        "rel_err": fid["rel_err"], "top1_agree": fid["top1_agree"],
                        "kl": fid["kl"], "seconds": time.perf_counter() - t0}  # fmt: skip
                rec["cells"][f"{vname}@{m}"] = cell
                logger.info("%s seed %d %s@%d: acc %.3f (ICL at %.1f MB: %.3f) rel_err %.3f "
                            "top1 %.3f kl %.3f, %.0f s", name, seed, vname, m, a,
                            cell["bytes"] / 1e6, icl_eq, fid["rel_err"], fid["top1_agree"],
                            fid["kl"], cell["seconds"])  # fmt: skip
                ds["per_seed"] = [*[r for r in ds["per_seed"] if r["seed"] != seed], rec]
                ds["cells"] = _mean_cells(ds["per_seed"])
                results["summary"] = summarise(results["datasets"])
                results["picked"] = pick(results["summary"])
                write_json(args.out, results)
                del built, mem


def _mean_cells(per_seed: list[dict]) -> dict:
    keys = {k for r in per_seed for k in r["cells"]}
    out = {}
    for key in keys:
        cells = [r["cells"][key] for r in per_seed if key in r["cells"]]
        out[key] = {**cells[0], **{f: float(np.mean([c[f] for c in cells])) for f in (
            "acc", "icl_equal_bytes", "gain_over_icl_equal_bytes", "rel_err", "top1_agree",
            "kl", "bytes")}}  # fmt: skip
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="*", default=["trec"])
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--budgets", type=int, nargs="*", default=[128, 256, 512])
    p.add_argument("--icl-cuts", type=int, nargs="*", default=[128, 256, 512, 1024])
    p.add_argument("--prefix-tokens", type=int, default=2048)
    p.add_argument("--examples", type=int, default=40, help="validation examples scored")
    p.add_argument("--validation-pool", type=int, default=200, help="examples carved from train")
    p.add_argument("--traces", type=int, default=300)
    p.add_argument("--fidelity-examples", type=int, default=8)
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--model", default="default", help="a model name, .gguf file or folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the model runs in float32)")
    p.add_argument("--out", type=Path, default=RESULTS / "options.json")
    p.add_argument(
        "--resummarise",
        type=Path,
        default=None,
        help="apply the current pick rule to this finished run's JSON (rewrites it)",
    )
    args = p.parse_args(argv)
    if args.resummarise is not None:
        cmd = "python -m bench.options " + " ".join(sys.argv[1:] if argv is None else argv)
        _print_pick(resummarise(args.resummarise, cmd))
        return 0
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout
    )
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))

    from bench.quality.run import machine
    from memdb_worker.model.loading import describe_model, load_model

    model, tok = load_model(args.model, device=args.device, dtype=torch.float32)
    t0 = time.perf_counter()
    results = {
        "split": "validation",
        "validation": {"seed": VALIDATION_SEED, "pool": args.validation_pool,
                       "examples": args.examples, "carved_by": "bench.quality.protocol."
                       "split_validation (disjoint from this run's demonstrations and traces)"},
        "command": "python -m bench.options " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": describe_model(args.model),
        "machine": machine(),
        "prefix_tokens": args.prefix_tokens,
        "budgets": args.budgets,
        "rule": RULE,
        "base": {"build": BASE_BUILD, "decode": BASE_DECODE},
        "variants": {k: {"build": VARIANTS[k][0], "decode": VARIANTS[k][1]} for k in args.variants},
        "datasets": {},
    }  # fmt: skip
    for name in args.datasets:
        run_dataset(model, tok, name, args, results)
    results["wall_s"] = time.perf_counter() - t0
    write_json(args.out, results)
    print(f"\n{'cell':<28}{'acc':>7}{'ICL=B':>7}{'gain':>7}{'MB':>8}{'err':>7}{'top1':>7}{'kl':>7}")
    for key, c in sorted(
        results["summary"].items(), key=lambda kv: -kv[1]["gain_over_icl_equal_bytes"]
    ):
        print(f"{key:<28}{c['acc']:7.3f}{c['icl_equal_bytes']:7.3f}"
              f"{c['gain_over_icl_equal_bytes']:7.3f}{c['bytes'] / 1e6:8.1f}{c['rel_err']:7.3f}"
              f"{c['top1_agree']:7.3f}{c['kl']:7.3f}")  # fmt: skip
    _print_pick(results)
    return 0


def _print_pick(results: dict) -> None:
    for r in results["picked"]["ranking"]:
        mb = r["mean_bytes"] / 1e6
        print(f"{r['variant']:<24} mean gain {r['mean_gain']:+.3f} ({mb:.1f} MB)")
    print(f"picked: {results['picked']['variant']}")


if __name__ == "__main__":
    raise SystemExit(main())
