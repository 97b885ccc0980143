"""`python -m bench.reliability [--quick] [--seed N] [--parts kills,fuzz,...] [--out PATH]`

Runs the campaign's parts in turn, each against its own server processes in a temporary
directory, prints each part's figures and writes them with the headline figures to
bench/results/reliability.json (the command and the machine included). --quick is the seeded
sample CI size (about two minutes); the full run is bounded to about 13 minutes on 2 cores.
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

RESULTS = Path(__file__).resolve().parents[1] / "results"
PARTS = ("kills", "history", "fuzz", "isolation", "neighbours", "soak")
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
    if part == "fuzz":
        return fuzz.run(where, cases_n=size["fuzz"], seed_=seed).as_dict()
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the seeded CI-sized sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {PARTS}")
    ap.add_argument("--out", type=Path, default=RESULTS / "reliability.json")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
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
    out = write_results(
        args.out,
        {
            **headline(results),
            "parts": results,
            "sizes": size,
            "seed": args.seed,
            "seconds": time.monotonic() - t0,
        },
        "python -m bench.reliability",
        argv,
    )
    print(json.dumps(headline(results)))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
