"""Build and decode options against the paper's plain recipe (DESIGN.md section 1, issue 3 part 5).

`python -m bench.options` writes bench/results/options.json: for each option (one change from
the plain default at a time, then the best combination), accuracy on test examples and the
fidelity of bench.quality (rel_err, top1_agree, kl) at one budget. One calibration per data set
and seed serves every option (it records k_bar so the lse correction can be built from it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.quality import (
    RESULTS,
    Task,
    accuracy,
    classify,
    exact_logp,
    fidelity,
    pad,
    plan_seed,
    test_slices,
    write_json,
)

logger = logging.getLogger("bench.options")

PLAIN_BUILD = {
    "key_mode": "pre_rope",
    "whiten": False,
    "granularity": "head",
    "entry_state": "average",
    "lse_correction": False,
    "key_dtype": "float32",
}
PLAIN_DECODE = {"top_k": 1, "lse_correction": False, "lse_bias": 0.0}

# name -> (build overrides, decode overrides)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "plain": ({}, {}),
    "pre_rope+whiten": ({"whiten": True}, {}),
    "rope_common": ({"key_mode": "rope_common"}, {}),
    "rope_common+whiten": ({"key_mode": "rope_common", "whiten": True}, {}),
    "kv_group": ({"granularity": "kv_group"}, {}),
    "soft_top4": ({}, {"top_k": 4}),
    "soft_top16": ({}, {"top_k": 16}),
    "entry_centroid": ({"entry_state": "centroid"}, {}),
    "lse_correction": ({"lse_correction": True}, {"lse_correction": True}),
    "lse_bias+0.5": ({}, {"lse_bias": 0.5}),
    "lse_bias-0.5": ({}, {"lse_bias": -0.5}),
    "key_float16": ({"key_dtype": "float16"}, {}),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="*", default=["trec"])
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--prefix-tokens", type=int, default=4096)
    p.add_argument("--tests", type=int, default=60)
    p.add_argument("--traces", type=int, default=300)
    p.add_argument("--fidelity-examples", type=int, default=12)
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--variants", nargs="*", default=None)
    p.add_argument("--combo", nargs="*", default=None, help="variant names to combine at the end")
    p.add_argument("--out", type=Path, default=RESULTS / "options.json")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout
    )
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))

    from memdb_worker.builder import BuildOptions, calibrate, cluster
    from memdb_worker.memory import DecodeOptions
    from memdb_worker.model import load_model

    model, tok = load_model("default", device="cpu", dtype=torch.float32)
    variants = dict(VARIANTS)
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants or k == "plain"}
    if args.combo:
        b, d = {}, {}
        for name in args.combo:
            b.update(VARIANTS[name][0])
            d.update(VARIANTS[name][1])
        variants["combo:" + "+".join(args.combo)] = (b, d)
    results = {
        "command": "python -m bench.options "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget": args.budget,
        "prefix_tokens": args.prefix_tokens,
        "plain": {"build": PLAIN_BUILD, "decode": PLAIN_DECODE},
        "variants": {k: {"build": v[0], "decode": v[1]} for k, v in variants.items()},
        "datasets": {},
    }
    for name in args.datasets:
        task = Task(name, tok)
        slices = test_slices(len(task.test), args.seeds, args.tests)
        res: dict = {}
        for seed in args.seeds:
            plan = plan_seed(
                task.train,
                [len(x) for x in task.demo_ids],
                seed,
                args.prefix_tokens,
                args.prefix_tokens,
                args.traces,
                slices[seed],
            )
            rows = [task.test[i] for i in plan.test]
            gold = [task.label_index[r["label"]] for r in rows]
            traces = [task.trace_ids(task.train[i]) for i in plan.traces]
            base = BuildOptions(**PLAIN_BUILD, kmeans_iters=args.kmeans_iters, seed=seed)
            calib = calibrate(
                model,
                tok,
                task.prefix_ids(plan.demos),
                traces,
                BuildOptions(**{**asdict(base), "lse_correction": True}),
                progress=False,
            )
            exact = calib.prefix
            seqs = [task.trace_ids(r) for r in rows[: args.fidelity_examples]]
            ids, mask = pad(seqs)
            ref = exact_logp(model, ids, mask, exact)
            icl_m = accuracy(
                classify(model, task, rows, exact.head(min(args.budget, exact.token_count)))[0],
                gold,
            )
            icl_full = accuracy(classify(model, task, rows, exact)[0], gold)
            res.setdefault("icl_at_budget", []).append(icl_m)
            res.setdefault("icl_full", []).append(icl_full)
            logger.info(
                "%s seed %d: icl@%d %.3f icl_full %.3f", name, seed, args.budget, icl_m, icl_full
            )
            built_cache: dict = {}
            for vname, (bo, do) in variants.items():
                bopts = BuildOptions(**{**asdict(base), **bo})
                key = tuple(sorted(asdict(bopts).items()))
                t = time.perf_counter()
                if key not in built_cache:
                    built_cache[key] = cluster(calib, args.budget, bopts, progress=False)
                built = built_cache[key]
                mem = built.to_memory(options=DecodeOptions(**{**PLAIN_DECODE, **do}))
                preds = classify(model, task, rows, mem)
                fid = fidelity(model, seqs, mem, exact, ref_logp=ref)
                r = res.setdefault(
                    vname,
                    {
                        "acc": [],
                        "acc_norm": [],
                        "rel_err": [],
                        "top1_agree": [],
                        "kl": [],
                        "per_layer_rel_err": [],
                        "bytes": [],
                        "seconds": [],
                    },
                )
                r["acc"].append(accuracy(preds[0], gold))
                r["acc_norm"].append(accuracy(preds[1], gold))
                for k in ("rel_err", "top1_agree", "kl", "per_layer_rel_err"):
                    r[k].append(fid[k])
                r["bytes"].append(int(built.nbytes()))
                r["seconds"].append(time.perf_counter() - t)
                logger.info(
                    "%s seed %d %-20s acc %.3f rel_err %.4f top1 %.3f kl %.4f",
                    name,
                    seed,
                    vname,
                    r["acc"][-1],
                    fid["rel_err"],
                    fid["top1_agree"],
                    fid["kl"],
                )
            results["datasets"][name] = {"n_test_per_seed": len(rows), "seeds": args.seeds, **res}
            write_json(args.out, results)
    print(f"\n{'variant':<34}" + "".join(f"{n:>40}" for n in results["datasets"]))
    for vname in variants:
        line = f"{vname:<34}"
        for name in results["datasets"]:
            r = results["datasets"][name][vname]
            m = {k: sum(r[k]) / len(r[k]) for k in ("acc", "rel_err", "top1_agree", "kl")}
            line += (
                f"   acc {m['acc']:.3f} err {m['rel_err']:.4f} top1 {m['top1_agree']:.3f}"
                f" kl {m['kl']:.4f}"
            )
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
