"""Per-tenant write throughput of the cluster: one tenant writing K names against K tenants
writing one name each. `python -m bench.cluster_writes [--quick] [--seconds 10] [--writers 6]`.

Starts, on 127.0.0.1, a 3-member etcd cluster, a 3-master + 3-replica Redis Cluster and 3
memdb-server nodes on the cluster backend (memdb_server.cluster_process). K writer threads,
each with its own MemdbClient over every node and its tenant's writer key, update one name
each with a small memory (2 layers, 64 entries) for `--seconds`; a write counts when it is
acknowledged. Phases: `one_tenant` (K names of one tenant with a byte and prefix quota, so
every write takes the quota reservation path), `one_tenant_no_quota`, `k_tenants` (one name
in each of K tenants, each with the same quota). Figures: acknowledged writes/s, p50/p99 of a
write (the mean of `--rounds` interleaved rounds); `ratio` = one_tenant / k_tenants writes/s
(the issue's target: >= 0.8). Writes
bench/results/cluster_writes.json. Everything shares this machine's cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.cluster import FP, KEY, make_memory
from bench.server import commit, machine
from memdb.errors import MemdbError
from memdb_client import MemdbClient
from memdb_server.cluster_process import control_and_data_planes, memdb_cluster

RESULTS = Path(__file__).resolve().parent / "results"
QUOTA_BYTES = 1 << 30
QUOTA_PREFIXES = 1000


def writer_keys(address: str, tenants: list[str], quota: bool) -> dict[str, str]:
    """A writer key for each tenant (created, with the quota, if it does not exist)."""
    keys = {}
    with MemdbClient(address, KEY) as admin:
        existing = {t.name for t in admin.list_tenants()}
        for tenant in dict.fromkeys(tenants):
            if tenant not in existing:
                admin.create_tenant(tenant, max_bytes=QUOTA_BYTES if quota else 0,
                                    max_prefixes=QUOTA_PREFIXES if quota else 0)  # fmt: skip
            keys[tenant] = admin.create_api_key("writer", tenant=tenant)[0]
    return keys


def run_phase(address: str, tenants: list[str], names: list[str], keys: dict, seconds: float):
    """Writer i updates names[i] of tenants[i] until `seconds` pass."""
    latencies: list[list[float]] = [[] for _ in names]
    errors = [0]
    start = threading.Barrier(len(names) + 1)

    def write(i: int) -> None:
        memory = make_memory(64, 64, 2, None, seed=i)
        with MemdbClient(address, keys[tenants[i]], timeout=30) as client:
            client.put_prefix(names[i], memory, model_fingerprint=FP, mode="upsert")  # warm-up
            start.wait()
            end = time.perf_counter() + seconds
            while (t := time.perf_counter()) < end:
                try:
                    client.put_prefix(names[i], memory, model_fingerprint=FP, mode="update")
                    latencies[i].append(time.perf_counter() - t)
                except MemdbError:
                    errors[0] += 1

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join(seconds + 120)
    flat = np.concatenate([np.asarray(x) for x in latencies])
    return {"writes_per_s": round(flat.size / seconds, 1),
            "p50_ms": round(float(np.percentile(flat, 50)) * 1e3, 1),
            "p99_ms": round(float(np.percentile(flat, 99)) * 1e3, 1),
            "writes": int(flat.size), "errors": errors[0]}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short phases (smoke test)")
    ap.add_argument("--seconds", type=float, default=10.0, help="load per phase")
    ap.add_argument("--writers", type=int, default=6, help="K: concurrent writers")
    ap.add_argument("--rounds", type=int, default=2, help="each phase this often, interleaved")
    ap.add_argument("--out", type=Path, default=RESULTS / "cluster_writes.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds = 2.0
    k = args.writers
    result: dict = {"machine": machine(), "settings": {"seconds": args.seconds, "writers": k,
                    "rounds": args.rounds, "nodes": 3, "memory": "2 layers x 64 entries"},
                    "phases": {}}  # fmt: skip
    phases = {  # k_tenants between the other two, so neither has the emptier cluster
        "one_tenant": (["solo"] * k, True),
        "k_tenants": ([f"t{i}" for i in range(k)], True),
        "one_tenant_no_quota": (["free"] * k, False),
    }
    with tempfile.TemporaryDirectory() as tmp, control_and_data_planes(Path(tmp)) as (etcd, rc):
        with memdb_cluster(Path(tmp) / "nodes", etcd, rc, nodes=3, admin_key=KEY,
                           max_workers=32) as nodes:  # fmt: skip
            address = ",".join(n.address for n in nodes)
            for r in range(args.rounds):
                for phase, (tenants, quota) in phases.items():
                    keys = writer_keys(address, tenants, quota)
                    names = [f"{phase}-{i}" for i in range(k)]
                    row = run_phase(address, tenants, names, keys, args.seconds)
                    result["phases"].setdefault(phase, {"rounds": []})["rounds"].append(row)
                    print(f"round {r + 1} {phase}: {row}", flush=True)
    for row in result["phases"].values():  # the mean over rounds (the machine's load varies)
        row["writes_per_s"] = round(float(np.mean([x["writes_per_s"] for x in row["rounds"]])), 1)
        row["p99_ms"] = round(float(np.mean([x["p99_ms"] for x in row["rounds"]])), 1)
    p = result["phases"]
    result["ratio"] = round(p["one_tenant"]["writes_per_s"] / p["k_tenants"]["writes_per_s"], 2)
    result["ratio_no_quota"] = round(
        p["one_tenant_no_quota"]["writes_per_s"] / p["k_tenants"]["writes_per_s"], 2
    )
    result["command"] = " ".join(["python -m bench.cluster_writes", *map(shlex.quote, argv)])
    result["commit"] = commit()  # the code measured (bench/results/cluster_writes_before.json:
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())  # the code before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"one tenant / {k} tenants: {result['ratio']}x (no quota {result['ratio_no_quota']}x)"
          f" -> {args.out}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
