"""The long prefix's options chosen on a validation split: the sink and the chunk mass.

`python -m bench.options_long` writes bench/results/options_long.json (top level `"split":
"validation"`). A prefix longer than the model's context is encoded in chunks (`prefix.py`):
each chunk after the first either after the prefix's first `sink` tokens or alone (sink 0), and
the chunks' attention mass either summed (exact attention over every chunk) or averaged
(`chunk_mass="mean"`, each chunk weighted 1/C as in structured prompting). A memory built from
such a prefix approximates the prefix's exact state (bench.quality's fidelity for the ~7K
prefix: relative error ~0.02 for SmolLM2 at M = 4096; the 32K memory's is not measured), so
the options are compared on the exact chunked prefix itself,
which needs no build: per data set and seed, the validation examples (carved from train,
`protocol.split_validation`; the demonstrations come from the rest of train) are scored by ICL
over cuts of the context-sized first chunk (the best of them is "the best ICL that fits the
context", bench.quality's 32K target) and by the ~32K prefix under every (sink, chunk mass).

A variant's figure of merit is its accuracy minus the best ICL that fits, averaged over data
sets and seeds; the pick is the highest (ties: the first listed). The builder's defaults cite
this file. Knows nothing of memories.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.quality import RESULTS, Task, accuracy, classify, plan_validation, write_json
from bench.quality.methods import encode_long_prefix
from memdb.build_options import CHUNK_MASSES

logger = logging.getLogger("bench.options_long")

RULE = (
    "pick = the (sink, chunk mass) of the highest mean over data sets and seeds of accuracy "
    "minus the best ICL that fits the context (the first chunk or a cut of it); ties: first listed"
)


def variant_name(sink: int, mass: str) -> str:
    return f"sink{sink}_{mass}"


def run_seed(model, task: Task, seed: int, args) -> dict:
    """Accuracies of ICL cuts and of every long-prefix variant for one seed of one data set."""
    from memdb_worker.model.prefix import encode_prefix

    rows_i, plan = plan_validation(
        task,
        seed,
        args.validation_pool,
        args.examples,
        args.prefix_tokens,
        args.prefix32k_tokens,
        0,
    )
    demos, extra = plan.demos, plan.demos32k[len(plan.demos) :]
    rows = [task.train[i] for i in rows_i]
    gold = task.gold(rows)
    ids = task.prefix_ids(demos)
    first = encode_prefix(model, ids, chunk_tokens=len(ids))
    rec: dict = {"seed": seed, "n_validation": len(rows), "validation_rows": rows_i,
                 "prefix_tokens": first.token_count, "icl": {}, "long": {}}  # fmt: skip
    for t in [*args.icl_cuts, first.token_count]:
        t = min(t, first.token_count)
        rec["icl"][str(t)] = accuracy(classify(model, task, rows, first.head(t))[0], gold)
    rec["best_icl"] = max(rec["icl"].values())
    for sink in args.sinks:
        long = encode_long_prefix(model, task, first, extra, args.chunk_tokens, sink)
        rec["prefix32k_tokens"], rec["chunks"] = long.token_count, list(long.chunk_lengths)
        for mass in args.masses:
            src = long.with_chunk_mass(mass)
            a = accuracy(classify(model, task, rows, src)[0], gold)
            rec["long"][variant_name(sink, mass)] = a
            logger.info("%s seed %d sink %d mass %s: %.3f (best ICL %.3f)", task.name, seed,
                        sink, mass, a, rec["best_icl"])  # fmt: skip
        del long
    return rec


def summarise(datasets: dict) -> dict:
    """Per variant: mean gain over the best ICL that fits, and on how many sets it is >= it."""
    out: dict = {}
    names = sorted({v for ds in datasets.values() for r in ds["per_seed"] for v in r["long"]})
    for v in names:
        gains, at_least = [], 0
        for ds in datasets.values():
            recs = [r for r in ds["per_seed"] if v in r["long"]]
            acc = float(np.mean([r["long"][v] for r in recs]))
            best = float(np.mean([r["best_icl"] for r in recs]))
            gains += [r["long"][v] - r["best_icl"] for r in recs]
            at_least += int(acc >= best - 1e-9)
        out[v] = {"mean_gain": float(np.mean(gains)), "sets_at_least_best_icl": at_least,
                  "sets": len(datasets)}  # fmt: skip
    return out


def pick(summary: dict, order: list[str]) -> dict:
    best = max(order, key=lambda v: (summary[v]["mean_gain"], -order.index(v)))
    return {"variant": best, **summary[best]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="*", default=["trec"])
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--examples", type=int, default=70, help="validation examples scored")
    p.add_argument("--validation-pool", type=int, default=200, help="examples carved from train")
    p.add_argument("--icl-cuts", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    p.add_argument("--prefix-tokens", type=int, default=7168, help="the context-sized prefix")
    p.add_argument("--prefix32k-tokens", type=int, default=32768)
    p.add_argument("--chunk-tokens", type=int, default=7168)
    p.add_argument("--sinks", type=int, nargs="*", default=[32, 0])
    p.add_argument("--masses", nargs="*", choices=CHUNK_MASSES, default=list(CHUNK_MASSES))
    p.add_argument("--model", default="default", help="a model name, .gguf file or folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the model runs in float32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "options_long.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    from memdb_worker.model.loading import describe_model, load_model

    model, tok = load_model(args.model)
    model.to(args.device).eval()
    order = [variant_name(s, m) for s in args.sinks for m in args.masses]
    results: dict = {
        "split": "validation",
        "command": " ".join(
            ["python -m bench.options_long", *(sys.argv[1:] if argv is None else argv)]
        ),
        "model": describe_model(args.model),
        "date": time.strftime("%Y-%m-%d"),
        "rule": RULE,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "datasets": {},
    }
    t0 = time.perf_counter()
    with torch.inference_mode():
        for name in args.datasets:
            task = Task(name, tok)
            ds = results["datasets"].setdefault(name, {"per_seed": []})
            for seed in args.seeds:
                ds["per_seed"].append(run_seed(model, task, seed, args))
                results["summary"] = summarise(results["datasets"])
                results["picked"] = pick(results["summary"], order)
                results["wall_s"] = time.perf_counter() - t0
                write_json(args.out, results)
    print(json.dumps({"summary": results["summary"], "picked": results["picked"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
