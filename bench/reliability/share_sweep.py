"""`python -m bench.reliability.share_sweep`: the noisy-neighbour part at several values of the
server's `tenant_cpu_share`, each repeated, into bench/results/neighbour_shares.json.

What the default of `tenant_cpu_share` (memdb_server.config) is chosen from: for each share, the
other
tenant's p99 ratio (the issue's figure), the idle bystander server's ratio (the machine's floor)
and how many heavy Lookups the noisy tenant still got through. Knows nothing of how the server
applies the share.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench.reliability

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.reliability import neighbours
from bench.reliability.__main__ import RESULTS, SIZES
from bench.reliability.measure import write_results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shares", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.25])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "neighbour_shares.json")
    args = ap.parse_args(argv)
    size = SIZES["full"]
    runs: dict[str, list[dict]] = {str(s): [] for s in args.shares}
    t0 = time.monotonic()
    for _ in range(args.repeats):  # interleaved, so that slow drifts hit every share alike
        for share in args.shares:
            with tempfile.TemporaryDirectory(prefix="memdb-shares-") as tmp:
                r = neighbours.run(
                    Path(tmp),
                    phase_s=size["phase_s"],
                    streams=size["streams"],
                    threads=size["threads"],
                    heavy_q=size["heavy_q"],
                    server_flags={"tenant_cpu_share": share},
                ).as_dict()
            row = {k: r[k] for k in ("neighbour_p99_ratio", "machine_floor_ratio",
                                     "quiet_lookup_p99_ms", "noisy_lookup_p99_ms",
                                     "quiet_health_p99_ms", "noisy_health_p99_ms")}  # fmt: skip
            row["noisy_heavy_lookups"] = r["noisy"].get("heavy_lookups", {})
            runs[str(share)].append(row)
            print(share, json.dumps(row), flush=True)
    summary = {
        share: {
            "median_ratio": statistics.median(x["neighbour_p99_ratio"] for x in rows),
            "max_ratio": max(x["neighbour_p99_ratio"] for x in rows),
            "median_floor": statistics.median(x["machine_floor_ratio"] for x in rows),
            "noisy_ok_lookups": [x["noisy_heavy_lookups"].get("OK", 0) for x in rows],
        }
        for share, rows in runs.items()
    }
    out = write_results(
        args.out,
        {
            "summary": summary,
            "runs": runs,
            "size": {k: size[k] for k in ("phase_s", "streams", "threads", "heavy_q")},
            "seconds": time.monotonic() - t0,
        },
        "python -m bench.reliability.share_sweep",
        argv,
    )
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
