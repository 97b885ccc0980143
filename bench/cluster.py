"""Cluster benchmark: Lookup throughput and p99 with 1, 2 and 3 memdb nodes on one etcd + Redis
Cluster, the time for an update to reach every watcher, and a kill -9 of a node under writes.
`python -m bench.cluster [--quick] [--seconds 5] [--clients 8] [--out ...]`.

Starts, on 127.0.0.1: a 3-member etcd cluster and a 3-master + 3-replica Redis Cluster
(memdb_server.cluster_process; `etcd`, `redis-server`, `redis-cli` on PATH, e.g. Debian's packages
unpacked with `dpkg -x` and put on PATH), then 1, 2, 3 memdb-server processes with the cluster
backend. Load: `--clients` client processes, each a MemdbClient over every node (round robin),
each sending Lookups of `--batch` queries against one layer of one memory (M entries, Dk) for
`--seconds`; throughput = query vectors answered / s, p99 over every Lookup. Watch: one Watch
stream per node, `--updates` PutPrefix of a small memory through node 1; the time from the start
of each PutPrefix (so the upload is included: an upper bound) to its event on the slowest
watcher. Failure: a writer updating a memory while node 2 is killed (-9): lost_writes =
acknowledged versions newer than the final current version, partial_versions = Lookups that
saw states of two versions mixed. Bounded: each phase stops by itself. Writes
bench/results/cluster.json and prints a table. Everything shares this machine's cores: the
load generators, the nodes, etcd and Redis.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import multiprocessing as mp
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.server import commit, machine
from memdb.errors import MemdbError
from memdb.shards import Shard
from memdb_client import MemdbClient
from memdb_server.cluster_process import control_and_data_planes, memdb_cluster

RESULTS = Path(__file__).resolve().parent / "results"
FP = "bench-model"
KEY = "bench-root-key"


def make_memory(m: int, dk: int, layers: int, fill: float | None, seed: int = 0) -> list[Shard]:
    rng = np.random.default_rng(seed)
    shards = []
    for _ in range(layers):
        out = rng.standard_normal((1, m, 9, 64)).astype(np.float16)
        if fill is not None:
            out[:] = fill
        shards.append(Shard(keys=rng.standard_normal((1, m, dk)).astype(np.float32), out=out,
                            lse=rng.standard_normal((1, m, 9)).astype(np.float32)))  # fmt: skip
    return shards


def _load(address: str, seconds: float, batch: int, dk: int, seed: int, queue) -> None:
    """One client process: Lookups until `seconds` pass; puts (vectors, latencies) on `queue`."""
    q = np.random.default_rng(seed).standard_normal((batch, dk)).astype(np.float32)
    times = []
    with MemdbClient(address, KEY) as client:
        client.lookup("bench", 0, q, model_fingerprint=FP, k=4)  # warm-up
        end = time.perf_counter() + seconds
        while (t := time.perf_counter()) < end:
            client.lookup("bench", 0, q, model_fingerprint=FP, k=4)
            times.append(time.perf_counter() - t)
    queue.put((len(times) * batch, times))


def bench_lookups(addresses: list[str], args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    target = ",".join(addresses)
    procs = [
        ctx.Process(target=_load, args=(target, args.seconds, args.batch, args.dk, i, queue))
        for i in range(args.clients)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=args.seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    vectors = sum(r[0] for r in results)
    latencies = np.concatenate([np.asarray(r[1]) for r in results])
    return {"lookup_vectors_per_s": round(vectors / args.seconds, 1),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2),
            "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 2),
            "lookups": int(latencies.size)}  # fmt: skip


def bench_watch(addresses: list[str], updates: int) -> list[float]:
    """Seconds from the start of each PutPrefix to its event on the slowest watcher."""
    seen: list[dict[int, float]] = [{} for _ in addresses]
    clients = [MemdbClient(a, KEY) for a in addresses]
    streams = [c.watch(["watched"]) for c in clients]

    def consume(i: int) -> None:
        try:
            for ev in streams[i]:
                seen[i][ev.version] = time.perf_counter()
        except MemdbError:
            pass  # cancelled at the end

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(addresses))]
    for t in threads:
        t.start()
    time.sleep(1.0)
    started: dict[int, float] = {}
    with MemdbClient(addresses[0], KEY) as writer:
        for _ in range(updates):
            t = time.perf_counter()
            info = writer.put_prefix("watched", make_memory(64, 64, 1, None), model_fingerprint=FP,
                                     mode="upsert")  # fmt: skip
            started[info.version] = t
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(len(s) < updates for s in seen):
        time.sleep(0.05)
    for s in streams:
        s.cancel()
    for c in clients:
        c.close()
    return [max(s.get(v, float("inf")) for s in seen) - t for v, t in started.items()]


def bench_kill(nodes, seconds: float) -> tuple[int, int]:
    """(lost acknowledged writes, Lookups that saw two versions mixed) around a kill -9."""
    address = ",".join(n.address for n in nodes)
    client = MemdbClient(address, KEY, timeout=20)
    client.put_prefix("kill", make_memory(256, 64, 2, 0.0), model_fingerprint=FP, mode="upsert")
    acked: list[int] = []
    mixed = [0]
    stop = threading.Event()

    def write() -> None:
        fill = 0.0
        while not stop.is_set():
            fill += 1.0
            memory = make_memory(256, 64, 2, fill)
            try:
                info = client.put_prefix("kill", memory, model_fingerprint=FP, mode="update")
                acked.append(info.version)
            except MemdbError:
                pass  # not acknowledged

    def read() -> None:
        q = np.ones((4, 64), np.float32)
        while not stop.is_set():
            try:
                out = client.lookup("kill", 1, q, model_fingerprint=FP, k=2).out
                mixed[0] += int(not np.all(out == out.flat[0]))
            except MemdbError:
                pass

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for t in threads:
        t.start()
    time.sleep(seconds / 2)
    nodes[1].kill()
    time.sleep(seconds / 2)
    stop.set()
    for t in threads:
        t.join(60)
    current = client.get_prefix("kill").version
    client.close()
    return sum(v > current for v in acked), mixed[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, short phases (smoke test)")
    ap.add_argument("--seconds", type=float, default=10.0, help="load per node count")
    ap.add_argument("--clients", type=int, default=12, help="load-generating processes")
    ap.add_argument("--batch", type=int, default=16, help="queries per Lookup")
    ap.add_argument("--M", type=int, default=8192, help="entries of the memory's layer")
    ap.add_argument("--dk", type=int, default=64)
    ap.add_argument("--updates", type=int, default=50, help="updates timed through Watch")
    ap.add_argument("--out", type=Path, default=RESULTS / "cluster.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.clients, args.M, args.updates = 2.0, 2, 1024, 5
    settings = {k: getattr(args, k) for k in ("seconds", "clients", "batch", "M", "dk", "updates")}
    result: dict = {"machine": machine(), "nodes": {}, "settings": settings}
    with tempfile.TemporaryDirectory() as tmp, control_and_data_planes(Path(tmp)) as (etcd, rc):
        for n in (1, 2, 3):
            with memdb_cluster(Path(tmp) / f"n{n}", etcd, rc, nodes=n, admin_key=KEY,
                               max_workers=32) as nodes:  # fmt: skip
                addresses = [s.address for s in nodes]
                with MemdbClient(addresses[0], KEY) as c:
                    c.put_prefix("bench", make_memory(args.M, args.dk, 1, None),
                                 model_fingerprint=FP)  # fmt: skip
                result["nodes"][str(n)] = bench_lookups(addresses, args)
                print(f"{n} node(s): {result['nodes'][str(n)]}", flush=True)
                if n == 3:
                    delays = np.asarray(bench_watch(addresses, args.updates))
                    result["watch_p99_ms"] = round(float(np.percentile(delays, 99)) * 1e3, 2)
                    result["watch_p50_ms"] = round(float(np.percentile(delays, 50)) * 1e3, 2)
                    lost, partial = bench_kill(nodes, 2 * args.seconds)
                    result["lost_writes"], result["partial_versions"] = lost, partial
    one = result["nodes"]["1"]["lookup_vectors_per_s"]
    result["speedup_3_vs_1"] = round(result["nodes"]["3"]["lookup_vectors_per_s"] / one, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    argv = sys.argv[1:] if argv is None else argv
    result["command"] = " ".join(["python -m bench.cluster", *map(shlex.quote, argv)])
    result["commit"] = commit()
    result["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| nodes | lookup vectors/s | p50 ms | p99 ms |\n|---|---|---|---|")
    for n, row in result["nodes"].items():
        print(f"| {n} | {row['lookup_vectors_per_s']:,.0f} | {row['p50_ms']} | {row['p99_ms']} |")
    print(f"watch p50 {result['watch_p50_ms']} ms, p99 {result['watch_p99_ms']} ms; "
          f"lost writes {result['lost_writes']}, partial versions {result['partial_versions']}; "
          f"3 vs 1 node: {result['speedup_3_vs_1']}x -> {args.out}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
