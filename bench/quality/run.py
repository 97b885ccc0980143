"""The command `python -m bench.quality`: runs the protocol over data sets and seeds and writes
bench/results/quality.json and quality.png (add `--quick` for a small smoke run).

Every field of the JSON is written here (notes with `--note KEY=TEXT`, the machine detected);
`--merge` joins runs of different seeds, `--rebuild-summary` recomputes the summaries (bytes,
equal_bytes, means) of a results file from its per-seed records without running a model, and
`--table` prints its tables. The protocol is `bench.quality.protocol`'s docstring.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench.quality.methods import build_options, decode_options, run_32k, run_seed
from bench.quality.plot import plot
from bench.quality.protocol import (
    LONG_FIELDS,
    PROTOCOL,
    RESULTS,
    Config,
    Task,
    list_datasets,
    long_variants,
    plan_seed,
)
from bench.quality.protocol import test_slices as slices_of_test
from bench.quality.summary import (
    DEFAULTS_FROM,
    VIEWS,
    dataset_summary,
    drop_long,
    markdown_table,
    merge_results,
    print_table,
    rebuild_summary,
    write_json,
)
from memdb.build_options import CHUNK_MASSES

logger = logging.getLogger("bench.quality")


def machine() -> str:
    """This machine in words: CPU architecture and cores, torch, threads, the GPU if any."""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads{gpu}"
    )


def parse_notes(items: Sequence[str]) -> dict[str, str]:
    """--note KEY=TEXT pairs as a dict (a KEY given twice keeps the last TEXT)."""
    notes = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--note wants KEY=TEXT, got {item!r}")
        notes[key] = text
    return notes


class DatasetRun:
    """Phase-1 results of one data set and what phase 2 (32K) needs."""

    def __init__(self, name: str, tok, cfg: Config) -> None:
        self.task = Task(name, tok)
        per = cfg.per_seed_many_labels if len(self.task.labels) > 20 else cfg.per_seed
        slices = slices_of_test(len(self.task.test), cfg.seeds, per)
        lengths = [len(x) for x in self.task.demo_ids]
        self.plans = {
            seed: plan_seed(
                self.task.train,
                lengths,
                seed,
                cfg.prefix_tokens,
                cfg.prefix32k_tokens,
                cfg.num_traces,
                slices[seed],
            )
            for seed in cfg.seeds
        }
        self.records: dict[int, dict] = {}
        self.exact: dict[int, object] = {}
        self.wall_s = 0.0
        self.last_seed_s = 0.0

    def summary(self, cfg: Config) -> dict:
        recs = [self.records[s] for s in cfg.seeds if s in self.records]
        n_test = sum(r["n_test"] for r in recs)
        out = dataset_summary(recs, cfg.budgets, n_test, {"num_labels": len(self.task.labels)})
        out["wall_s"] = self.wall_s
        return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (trec, 1 seed, 10 tests)")
    p.add_argument("--datasets", nargs="*", default=None)
    p.add_argument("--seeds", type=int, nargs="*", default=None)
    p.add_argument("--seeds-32k", type=int, nargs="*", default=None)
    p.add_argument("--per-seed", type=int, default=None)
    p.add_argument("--per-seed-many-labels", type=int, default=None)
    p.add_argument("--budgets", type=int, nargs="*", default=None)
    p.add_argument("--budget-32k", type=int, default=None)
    p.add_argument("--prefix-tokens", type=int, default=None)
    p.add_argument("--prefix32k-tokens", type=int, default=None)
    p.add_argument("--fidelity-examples", type=int, default=None)
    p.add_argument("--records-factor", type=float, default=None)
    p.add_argument("--records-factor-32k", type=float, default=None)
    p.add_argument("--kmeans-iters", type=int, default=None)
    p.add_argument("--chunk-tokens", type=int, default=None, help="32K prefix chunk size")
    p.add_argument(
        "--icl-32k",
        action="store_true",
        help="also score ICL over the whole 32K prefix (one chunk: needs a 32K-context model)",
    )
    p.add_argument(
        "--deadline",
        default=None,
        help="HH:MM UTC: start no unit of work (a seed of a data set, a 32K build) expected to end "
        "after it (expected: the last such unit's duration)",
    )
    p.add_argument(
        "--append-budgets", type=int, nargs="*", default=None, help="append vs rebuild budgets"
    )
    p.add_argument(
        "--sinks-32k", type=int, nargs="+", default=None, help="sink tokens of the 32K variants"
    )
    p.add_argument(
        "--masses-32k",
        nargs="+",
        choices=CHUNK_MASSES,
        default=None,
        help="chunk_mass of the 32K variants (each with every sink; default: sum); memory_32k "
        "(the first sink, summed) is always measured",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the model runs in float32)")
    p.add_argument(
        "--model",
        default="default",
        help="a model name (default = smollm2-135m, qwen2.5-coder-0.5b), a .gguf file or a folder",
    )
    p.add_argument("--note", action="append", default=[], help="KEY=TEXT into the JSON's notes")
    p.add_argument(
        "--rebuild-summary",
        action="store_true",
        help="recompute the summaries of --out from its per-seed records (no model run)",
    )
    p.add_argument(
        "--estimate-32k",
        type=float,
        default=300.0,
        help="seconds a 32K unit is expected to take until one is measured (the deadline guard)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds from now: no (data set, seed) unit is started that would end after it",
    )
    p.add_argument(
        "--redo-32k",
        action="store_true",
        help="measure this run's 32K memory variants again in --resume'd records (e.g. after a "
        "builder change); their ICL over the 32K prefix, which no builder change moves, is kept",
    )
    p.add_argument("--table", action="store_true", help="print the markdown table of --out only")
    p.add_argument(
        "--merge", type=Path, nargs="*", default=None, help="merge these runs into --out"
    )
    p.add_argument(
        "--resume",
        type=Path,
        nargs="*",
        default=None,
        help="results of earlier runs with the same config: their (data set, seed) units are kept "
        "and not run again",
    )
    args = p.parse_args(argv)
    command = "python -m bench.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    notes = parse_notes(args.note)
    if args.rebuild_summary:
        rebuilt = rebuild_summary(json.loads(args.out.read_text()), command)
        if notes:
            rebuilt["notes"] = {**rebuilt.get("notes", {}), **notes}
        write_json(args.out, rebuilt)
        plot(rebuilt, args.out.with_suffix(".png"))
        print(markdown_table(rebuilt))
        return 0
    if args.merge:
        merged = merge_results([json.loads(f.read_text()) for f in args.merge])
        merged.update(command=command, defaults_from=DEFAULTS_FROM, views=VIEWS)
        if notes:
            merged["notes"] = notes
        write_json(args.out, merged)
        plot(merged, args.out.with_suffix(".png"))
        print(markdown_table(merged))
        return 0
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return 0
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout
    )
    torch.set_num_threads(args.threads)

    cfg = Config()
    if args.quick:
        cfg = replace(
            cfg,
            seeds=(0,),
            seeds_32k=(0,),
            per_seed=8,
            per_seed_many_labels=8,
            budgets=(512, 1024),
            budget_32k=512,
            prefix_tokens=2048,
            prefix32k_tokens=4096,
            chunk_tokens=2048,
            fidelity_examples=4,
            append_budgets=(512,),
            datasets=("trec",),
        )
    over = {
        "seeds": tuple(args.seeds) if args.seeds else None,
        "seeds_32k": tuple(args.seeds_32k) if args.seeds_32k is not None else None,
        "per_seed": args.per_seed,
        "per_seed_many_labels": args.per_seed_many_labels,
        "budgets": tuple(args.budgets) if args.budgets else None,
        "budget_32k": args.budget_32k,
        "prefix_tokens": args.prefix_tokens,
        "prefix32k_tokens": args.prefix32k_tokens,
        "fidelity_examples": args.fidelity_examples,
        "records_factor": args.records_factor,
        "records_factor_32k": args.records_factor_32k,
        "kmeans_iters": args.kmeans_iters,
        "chunk_tokens": args.chunk_tokens,
        "icl_32k": args.icl_32k or None,
        "append_budgets": tuple(args.append_budgets) if args.append_budgets is not None else None,
        "sinks_32k": tuple(args.sinks_32k) if args.sinks_32k else None,
        "masses_32k": tuple(args.masses_32k) if args.masses_32k else None,
        "datasets": tuple(args.datasets) if args.datasets else None,
    }
    cfg = replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if args.deadline:
        hh, mm = (int(x) for x in args.deadline.split(":"))
        now = time.gmtime()
        day = time.mktime(now[:3] + (0, 0, 0, 0, 0, 0)) - time.timezone
        cfg = replace(cfg, deadline=day + hh * 3600 + mm * 60)
    if args.time_budget:
        cfg = replace(cfg, deadline=time.time() + args.time_budget)
    if not set(cfg.append_budgets) <= set(cfg.budgets):
        p.error(f"--append-budgets {cfg.append_budgets} must be among --budgets {cfg.budgets}")
    names = list(cfg.datasets) or list_datasets()

    from memdb_worker.build import BuildOptions
    from memdb_worker.memory.memory import DecodeOptions
    from memdb_worker.model.loading import describe_model, load_model, model_fingerprint

    model, tok = load_model(args.model, device=args.device, dtype=torch.float32)
    results = {
        "model": f"{describe_model(args.model)} (float32, {args.device})",
        "model_fingerprint": model_fingerprint(model),
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "defaults_from": DEFAULTS_FROM,
        "views": VIEWS,
        "notes": notes,
        "config": asdict(cfg),
        "build_options": asdict(build_options(cfg)),
        "decode_options": asdict(decode_options(cfg)),
        "defaults": {"build": asdict(BuildOptions()), "decode": asdict(DecodeOptions())},
        "protocol": PROTOCOL,
        "datasets": {},
    }
    out_png = args.out.with_suffix(".png")
    t0 = time.perf_counter()

    def save() -> None:
        results["wall_s"] = time.perf_counter() - t0
        results["datasets"] = {n: runs[n].summary(cfg) for n in runs if runs[n].records}
        write_json(args.out, results)
        plot(results, out_png)

    # phase 1: every method but memory_32k; seed-major (every data set gets seed 0 first) so
    # that a run cut by the deadline still covers every data set
    runs: dict[str, DatasetRun] = {}
    for name in names:
        runs[name] = DatasetRun(name, tok, cfg)
    for f in args.resume or []:
        if not f.exists():
            continue
        for name, ds in json.loads(f.read_text())["datasets"].items():
            if name in runs:
                for rec in ds["per_seed"]:
                    if rec["seed"] in cfg.seeds and rec["seed"] not in runs[name].records:
                        runs[name].records[rec["seed"]] = rec
                        runs[name].wall_s += rec.get("timings", {}).get("seed_s", 0.0)
                        logger.info("resumed %s seed %d from %s", name, rec["seed"], f)
    if args.redo_32k:  # this run's 32K memories again; ICL over the 32K prefix is kept
        keys = [key for key, _, _ in long_variants(cfg)]
        for run in runs.values():
            run.records = {s: drop_long(rec, keys) for s, rec in run.records.items()}
    for seed in cfg.seeds:
        for name in names:
            run = runs[name]
            if seed in run.records:
                continue
            est = run.last_seed_s or max([r.last_seed_s for r in runs.values()] + [0.0])
            if cfg.deadline is not None and time.time() + est > cfg.deadline:
                logger.info("deadline: skipping %s seed %d (expected %.0f s)", name, seed, est)
                continue
            t = time.perf_counter()
            logger.info("=== %s seed %d", name, seed)
            rec, exact = run_seed(model, tok, run.task, run.plans[seed], cfg, seed)
            run.records[seed], run.exact[seed] = rec, exact
            run.last_seed_s = time.perf_counter() - t
            run.wall_s += run.last_seed_s
            save()
            logger.info("=== %s seed %d done in %.0f s", name, seed, time.perf_counter() - t)
    # phase 2: memory_32k, seed by seed over the data sets, while the deadline allows
    est32 = args.estimate_32k  # a guess until the first 32K build is measured
    for seed in cfg.seeds_32k:
        for name in names:
            if cfg.deadline is not None and time.time() + est32 > cfg.deadline:
                logger.info(
                    "deadline: no 32K work for %s seed %d (expected %.0f s)", name, seed, est32
                )
                continue
            run = runs[name]
            if seed not in run.records:
                continue
            todo = [v for v in long_variants(cfg) if v[0] not in run.records[seed]["acc"]]
            if not todo:  # every variant measured (e.g. a resumed seed)
                continue
            t = time.perf_counter()
            if seed not in run.exact:  # a resumed seed: encode its full prefix again
                from memdb_worker.model.prefix import encode_prefix

                ids = run.task.prefix_ids(run.plans[seed].demos)
                run.exact[seed] = encode_prefix(model, ids, chunk_tokens=len(ids))
            rec = run.records[seed]
            for key, sink, mass in todo:
                args32 = (model, tok, run.task, run.plans[seed], run.exact[seed], cfg, seed)
                r32 = run_32k(*args32, sink, mass, icl="icl_32k" not in rec["acc"])
                rec["acc"][key] = r32.pop("memory_32k")
                rec["acc_norm"][key] = r32.pop("memory_32k_norm")
                if "icl_32k" in r32:
                    rec["acc"]["icl_32k"] = r32.pop("icl_32k")
                    rec["acc_norm"]["icl_32k"] = r32.pop("icl_32k_norm")
                assert set(r32) == set(LONG_FIELDS), sorted(r32)  # what drop_long drops
                tail = key.removeprefix("memory_32k")
                rec.update({f"{k}{tail}": v for k, v in r32.items()})
            est32 = time.perf_counter() - t
            run.wall_s += time.perf_counter() - t
            save()
    save()
    print_table(results)
    return 0
