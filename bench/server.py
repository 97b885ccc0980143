"""Server benchmark: Lookup latency and throughput over real gRPC vs in-process FAISS,
FetchMemory and PutPrefix bandwidth. `python -m bench.server [--quick]`.

Starts a real memdb-server process on 127.0.0.1 (LMDB in a temp dir, durable commits) and
drives it with the client from this process, so both share this machine's cores. Writes
bench/results/server.json and prints a table.
"""

from __future__ import annotations

import os

# OpenMP threads sleep when idle: the server process and this one share the cores, and threads
# spinning after one side's search steal the CPU from the other side's (set before FAISS loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from memdb.shards import Shard
from memdb_client import MemdbClient
from memdb_server.index import IndexParams, build_index, search
from memdb_server.process import server_process

RESULTS = Path(__file__).resolve().parent / "results"
FP = "bench-model"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, " + (
        f"Python {platform.python_version()}"
    )


def commit() -> str:
    """Where a result comes from, beside `machine`: the commit the code ran from ("+dirty"
    when tracked files differ from it), or "" outside a git checkout."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        out.check_returncode()
        return out.stdout.strip()

    try:
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "-uno")
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+dirty" if dirty else "")


def make_layer(m: int, dk: int, rng: np.random.Generator) -> Shard:
    """One index group of M entries; states of a whole SmolLM2 layer (9 heads x 64)."""
    return Shard(
        keys=rng.standard_normal((1, m, dk)).astype(np.float32),
        out=rng.standard_normal((1, m, 9, 64)).astype(np.float16),
        lse=rng.standard_normal((1, m, 9)).astype(np.float32),
    )


def timed(fn, repeats: int) -> np.ndarray:
    fn()  # warm-up (loads the index into the server's cache)
    times = np.empty(repeats)
    for i in range(repeats):
        t = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t
    return times


def bench_lookup(client: MemdbClient, ms, batches, dks, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for m in ms:
        for dk in dks:
            shard = make_layer(m, dk, rng)
            name = f"lookup-{m}-{dk}"
            client.put_prefix(name, [shard], model_fingerprint=FP, index_kind="flat")
            index = build_index(shard.keys[0], "flat", "cosine", IndexParams())
            for batch in batches:
                q = rng.standard_normal((batch, 1, dk)).astype(np.float32)
                remote = timed(
                    lambda q=q, name=name: client.lookup(name, 0, q, model_fingerprint=FP), repeats
                )
                local = timed(lambda q=q, ix=index: search(ix, q[:, 0], 1, "cosine"), repeats)
                row = {
                    "M": m, "batch": batch, "dk": dk,
                    "p50_ms": float(np.median(remote) * 1e3),
                    "p99_ms": float(np.percentile(remote, 99) * 1e3),
                    "vectors_per_s": float(batch / np.median(remote)),
                    "inprocess_p50_ms": float(np.median(local) * 1e3),
                }  # fmt: skip
                rows.append(row)
                print(f"lookup M={m:>6} dk={dk:>3} batch={batch:>2}: p50 {row['p50_ms']:.3f} ms "
                      f"p99 {row['p99_ms']:.3f} ms, {row['vectors_per_s']:.0f} vec/s, "
                      f"in-process {row['inprocess_p50_ms']:.3f} ms", flush=True)  # fmt: skip
            client.delete_prefix(name)
    return rows


def bench_bulk(client: MemdbClient, total_mb: int, layers: int = 30) -> tuple[float, float]:
    """PutPrefix and FetchMemory MB/s of one memory of about total_mb MB."""
    rng = np.random.default_rng(1)
    per_layer = total_mb * (1 << 20) // layers
    m = per_layer // (9 * 64 * 2 + 64 * 4 + 9 * 4)  # f16 out + f32 keys + f32 lse per entry
    shards = [
        Shard(keys=rng.standard_normal((1, m, 64)).astype(np.float32),
              out=rng.standard_normal((1, m, 9, 64)).astype(np.float16),
              lse=rng.standard_normal((1, m, 9)).astype(np.float32))
        for _ in range(layers)
    ]  # fmt: skip
    from memdb.shards import encode_shard

    blobs = [encode_shard(s) for s in shards]
    size_mb = sum(len(b) for b in blobs) / 1e6
    t = time.perf_counter()
    client.put_prefix("bulk", blobs, model_fingerprint=FP, index_kind="flat")
    put = size_mb / (time.perf_counter() - t)
    client.fetch_memory_raw("bulk", model_fingerprint=FP)  # warm the page cache
    times = []
    for _ in range(3):
        t = time.perf_counter()
        _, got = client.fetch_memory_raw("bulk", model_fingerprint=FP)
        times.append(time.perf_counter() - t)
    assert sum(len(b) for b in got) == sum(len(b) for b in blobs)
    fetch = size_mb / float(np.median(times))
    print(f"memory of {size_mb:.0f} MB: PutPrefix {put:.0f} MB/s, FetchMemory {fetch:.0f} MB/s")
    client.delete_prefix("bulk")
    return fetch, put


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS / "server.json")
    args = ap.parse_args(argv)
    ms, mb, repeats = ([1024, 8192], 10, 20) if args.quick else ([1024, 8192, 65536], 100, 200)
    with tempfile.TemporaryDirectory() as tmp, server_process(Path(tmp)) as srv:
        with MemdbClient(srv.address, srv.admin_key, timeout=120) as client:
            lookup = bench_lookup(client, ms, [1, 64], [64, 576], repeats)
            fetch, put = bench_bulk(client, mb)
    result = {
        "machine": machine(),
        "lookup": lookup,
        "fetch_mb_per_s": fetch,
        "put_mb_per_s": put,
        "memory_mb": mb,
        "command": " ".join(["python -m bench.server", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
