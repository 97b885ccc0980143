"""The cluster fault campaign: `python -m bench.cluster_faults [--quick] [--seed N] [--faults N]
[--max-seconds S] [--out PATH]` (bench.cluster_faults.campaign) on real etcd, Redis and
memdb-server processes on 127.0.0.1; writes bench/results/cluster_faults.json, prints figures."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.cluster_faults.campaign import run
from bench.cluster_faults.faults import FAULTS, SLOTS
from bench.server import commit, machine

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (a few dozen faults)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faults", type=int, default=500, help="stop once this many were injected")
    ap.add_argument("--max-seconds", type=float, default=1500.0, help="bound on the fault phase")
    ap.add_argument("--kinds", help="only these fault kinds (comma-separated; default: all)")
    ap.add_argument("--keep", type=Path, help="keep the run's files (histories, logs) here")
    ap.add_argument("--out", type=Path, default=RESULTS / "cluster_faults.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.faults, args.max_seconds = min(args.faults, 40), min(args.max_seconds, 90.0)
    signal.signal(signal.SIGTERM, _exit)  # stop every child process on the way out
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("bench.cluster_faults").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="cluster-faults-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        result = run(
            root,
            seed=args.seed,
            target_faults=args.faults,
            max_seconds=args.max_seconds,
            slots=_slots(args.kinds),
        )
    argv_used = sys.argv[1:] if argv is None else argv
    result["command"] = "python -m bench.cluster_faults " + shlex.join(argv_used)
    result["machine"] = machine()
    result["commit"] = commit()
    result["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    keys = (
        "faults",
        "lost_acknowledged",
        "unreadable_versions",
        "wrong_answers",
        "ops",
        "reads_checked",
        "ambiguous",
        "stale_reads",
        "bad_reads",
        "usage_mismatches",
    )
    print(json.dumps({k: result[k] for k in keys}), json.dumps(result["fault_kinds"]))
    for p in result["problems"][:15]:
        print("  ", p)
    print(f"-> {args.out}")
    return result


def _slots(kinds: str | None) -> dict | None:
    if not kinds:
        return None
    wanted = set(kinds.split(","))
    unknown = wanted - set(FAULTS)
    if unknown:
        raise SystemExit(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULTS)}")
    slots = {s: {k: w for k, w in ks.items() if k in wanted} for s, ks in SLOTS.items()}
    return {s: ks for s, ks in slots.items() if ks}


def _exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
