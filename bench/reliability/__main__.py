"""`python -m bench.reliability [--quick] [--seed N] [--parts kills,fuzz,...] [--out PATH]`

Runs the campaign's parts in turn, each against its own server processes in a temporary
directory, prints each part's figures and writes them with the headline figures to
bench/results/reliability.json (the command and the machine included). --quick is the seeded
sample CI size (about two minutes); the full run is bounded to about 13 minutes on 2 cores.

`fuzz_cluster` (not among the default parts) is the fuzz part against one node on the cluster
backend, over its own real etcd and Redis Cluster. A run of fuzz parts only
(`--parts fuzz,fuzz_cluster`) writes bench/results/fuzz.json instead: per backend its
requests, INTERNAL and UNKNOWN answers, crashes and the node's RSS after the warm-up and at
the end.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (shared cores)

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from bench.reliability import fuzz, history, isolation, kills, neighbours, soak
from bench.reliability.measure import write_results
from bench.server import commit

RESULTS = Path(__file__).resolve().parents[1] / "results"
PARTS = ("kills", "history", "fuzz", "isolation", "neighbours", "soak")
FUZZ_PARTS = {"fuzz": "local", "fuzz_cluster": "cluster"}  # part -> the fuzzed node's backend
CHOICES = (*PARTS, "fuzz_cluster")
SIZES = {
    "quick": {
        "kills": 16,
        "history_s": 10,
        "fuzz": 1000,
        "isolation": 300,
        "phase_s": 4,
        "streams": 100,
        "threads": 2,
        "heavy_q": 1024,
        "soak_s": 20,
        "window_s": 5,
    },
    "full": {
        "kills": 200,
        "history_s": 60,
        "fuzz": 10_000,
        "isolation": 2000,
        "phase_s": 15,
        "streams": 200,
        "threads": 4,
        "heavy_q": 2048,
        "soak_s": 150,
        "window_s": 15,
    },
}


def run_part(part: str, size: dict, seed: int, tmp: Path) -> dict:
    where = tmp / part
    if part == "kills":
        return kills.run(where, kills=size["kills"], seed=seed).as_dict()
    if part == "history":
        return history.run(where, seconds=size["history_s"], seed=seed).as_dict()
    if part in FUZZ_PARTS:
        return fuzz.run(
            where,
            cases_n=size["fuzz"],
            seed_=seed,
            backend=FUZZ_PARTS[part],
            max_seconds=900 if part == "fuzz" else 2400,  # a cluster node's calls are slower
        ).as_dict()
    if part == "isolation":
        return isolation.run(where, ops=size["isolation"], seed=seed).as_dict()
    if part == "neighbours":
        return neighbours.run(
            where,
            phase_s=size["phase_s"],
            streams=size["streams"],
            threads=size["threads"],
            heavy_q=size["heavy_q"],
        ).as_dict()
    return soak.run(where, seconds=size["soak_s"], window_s=size["window_s"], seed=seed).as_dict()


def headline(r: dict) -> dict:
    """The figures issue #11 asks for, from the parts that ran (None for a part not run)."""
    k, h, f = r.get("kills", {}), r.get("history", {}), r.get("fuzz", {})
    i, n, s = r.get("isolation", {}), r.get("neighbours", {}), r.get("soak", {})
    growth = [x for x in (f.get("rss_growth_mb"), s.get("rss_growth_mb")) if x is not None]
    return {
        "kills": k.get("kills"),
        "acked_writes": k.get("acked_writes"),
        "lost_writes": k.get("lost_writes"),
        "partial_writes": None if not k else k["partial_writes"] + k["orphan_records"],
        "mixed_versions": h.get("violations"),
        "fuzz_cases": f.get("cases"),
        "crashes": f.get("crashes"),
        "internal_errors": f.get("internal_errors"),
        "cross_tenant_leaks": i.get("cross_tenant_leaks"),
        "revoked_key_events": i.get("revoked_key_events"),
        "neighbour_p99_ratio": n.get("neighbour_p99_ratio"),
        "rss_growth_mb": max(growth) if growth and not any(map(math.isnan, growth)) else None,
        "soak_p99_ms": s.get("soak_p99_ms"),
    }


def by_backend(r: dict) -> dict:
    """The fuzz parts' figures per backend (bench/results/fuzz.json)."""
    out = {}
    for part, backend in FUZZ_PARTS.items():
        f = r.get(part)
        if f is None or "error" in f:
            out[backend] = f
            continue
        out[backend] = {
            "requests": f["cases"],
            "internal": f["codes"].get("INTERNAL", 0),
            "unknown": f["codes"].get("UNKNOWN", 0),
            "crashes": f["crashes"],
            "unresponsive": f["unresponsive"],
            "rss_mb_after_warmup": f["rss_start_mb"],
            "rss_mb_end": f["rss_end_mb"],
            "rss_mb_every_1000": f["rss_samples_mb"],
            "seconds": f["seconds"],
        }
    return {k: v for k, v in out.items() if v is not None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the seeded CI-sized sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {CHOICES}")
    ap.add_argument("--out", type=Path, help="reliability.json (fuzz.json for fuzz parts only)")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(CHOICES)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {CHOICES}")
    fuzz_only = set(parts) <= set(FUZZ_PARTS)
    out_path = args.out or RESULTS / ("fuzz.json" if fuzz_only else "reliability.json")
    size = SIZES["quick" if args.quick else "full"]
    results: dict[str, dict] = {}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="memdb-reliability-") as tmp:
        for part in parts:
            start = time.monotonic()
            print(f"== {part}", flush=True)
            try:
                results[part] = run_part(part, size, args.seed, Path(tmp))
            except Exception as exc:  # a harness failure: recorded, the other parts still run
                results[part] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            shown = {k: v for k, v in results[part].items() if k not in ("problems", "examples")}
            print(json.dumps(shown), flush=True)
            for line in results[part].get("problems", []) + results[part].get("examples", []):
                print("  ", line[:300], flush=True)
            print(f"   ({time.monotonic() - start:.0f} s)", flush=True)
    summary = headline(results)
    if fuzz_only:
        summary = {"backends": by_backend(results), "commit": commit()}
    out = write_results(
        out_path,
        {
            **summary,
            "parts": results,
            "sizes": {"fuzz": size["fuzz"]} if fuzz_only else size,
            "seed": args.seed,
            "seconds": time.monotonic() - t0,
        },
        "python -m bench.reliability",
        argv,
    )
    print(json.dumps(summary))
    print(f"wrote {out_path}")
    return out


if __name__ == "__main__":
    main()
