"""Worker benchmark: tokens/s of a whole memdb-worker (SmolLM2-135M on CPU) with and without a
memory, over its HTTP API. `python -m bench.worker [--quick]`.

Starts a real memdb-server and a real memdb-worker process on 127.0.0.1, builds a memory from a
TREC many-shot prefix with SmolLM2 in this process and uploads it, then sends completions
(greedy, `ignore_eos`, a fixed number of new tokens) at several concurrencies, three ways: the
full prefix in the prompt, the memory (`"memory": name`, a short prompt) in the builder's default
format (fitted rows), and neither; then a memory of looked-up entries through a second worker in
remote mode (a `Lookup` per layer and step; fitted rows are attended whole on the worker and
cannot be looked up remotely). Both memories come from one calibration; each row names its
`memory_format`. The full
prefix is prefix-cached, as an inference server with prefix caching runs it: the worker's
automatic prefix cache (`memdb_worker.serve.prefix_cache`) encodes the prefix once (at the warm-up
request) and every later request prefills only its question against the cached KV. Reports
generated tokens per second of wall time (prefill included) and mean request latency. Writes
bench/results/worker.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx

from bench.server import machine
from memdb_client import MemdbClient
from memdb_server.process import start_server
from memdb_worker.build import BuildOptions, calibrate, cluster
from memdb_worker.demo import DATA, QUERY, TEMPLATE, balanced_sample, read_jsonl
from memdb_worker.model.loading import load_model, model_fingerprint
from memdb_worker.serve.process import start_worker

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "bench-trec"
ENTRIES_NAME = "bench-trec-entries"
# the remote row's memory: looked-up entries (Eq. 5 averages, bfloat16 keys), not the default
ENTRIES = {"entry_state": "average", "key_dtype": "bfloat16"}


def _round(url: str, prompts: list[str], memory: str | None, new_tokens: int) -> list[float]:
    """Send the prompts concurrently; return each request's seconds."""
    secs = [0.0] * len(prompts)

    def one(i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": new_tokens, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        if memory:
            body["memory"] = memory
        t = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        assert r.json()["usage"]["completion_tokens"] == new_tokens
        secs[i] = time.perf_counter() - t

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return secs


def _measure(url, way, pre, mem, questions, conc, rounds, new_tokens) -> dict:
    secs, wall = [], 0.0
    for r in range(rounds):
        prompts = [pre + q for q in questions[r * conc : (r + 1) * conc]]
        t = time.perf_counter()
        secs += _round(url, prompts, mem, new_tokens)
        wall += time.perf_counter() - t
    n = len(secs)
    row = {
        "way": way, "concurrency": conc, "requests": n, "new_tokens": new_tokens,
        "tokens_per_s": round(n * new_tokens / wall, 2), "latency_s": round(sum(secs) / n, 3),
    }  # fmt: skip
    print(f"{way:<16} concurrency {conc}: {row['tokens_per_s']:7.2f} tokens/s, "
          f"{row['latency_s']:.2f} s per request", flush=True)  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small prefix and memory, few rounds")
    ap.add_argument("--threads", type=int, default=0, help="worker's torch threads (0: default)")
    ap.add_argument("--out", type=Path, default=RESULTS / "worker.json")
    args = ap.parse_args(argv)
    shots, traces_n, budget = (32, 48, 64) if args.quick else (128, 128, 512)
    concurrencies = (1, 4)
    rounds = 1 if args.quick else 3
    new_tokens = 16 if args.quick else 32

    rng = random.Random(0)
    train = read_jsonl(DATA / "trec" / "train.jsonl")
    test = read_jsonl(DATA / "trec" / "test.jsonl")
    demos = balanced_sample(train, shots, rng)
    prefix = "".join(TEMPLATE.format(**r) for r in demos)
    traces = [TEMPLATE.format(**r).rstrip("\n") for r in rng.sample(train, traces_n)]
    questions = [QUERY.format(**q) for q in rng.sample(test, max(concurrencies) * rounds)]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp) / "data")
        try:
            t0 = time.perf_counter()
            model, tok = load_model("default")
            fp = model_fingerprint(model)
            opts = BuildOptions(seed=0)  # the default format: fitted rows
            calib = calibrate(model, tok, prefix, traces, opts)
            built = cluster(calib, budget, opts)
            build_s = time.perf_counter() - t0
            entries = cluster(calib, budget, replace(opts, **ENTRIES))
            with MemdbClient(server.address, server.admin_key) as c:
                for name, b in ((NAME, built), (ENTRIES_NAME, entries)):
                    c.put_prefix(name, b.shards, model_fingerprint=fp,
                                 token_count=b.token_count, mode="upsert")  # fmt: skip
            del model
            fitted = f"fitted ({opts.key_dtype} keys, {opts.out_dtype} values)"
            looked_up = f"entries ({ENTRIES['entry_state']}, {ENTRIES['key_dtype']} keys)"
            runs = [  # mode, {way: (prompt prefix, memory name, memory_format)}
                ("cache", {"full prefix (cached)": (prefix, None, None),
                           "memory": ("", NAME, fitted), "neither": ("", None, None)}),
                ("remote", {"memory (remote)": ("", ENTRIES_NAME, looked_up)}),
            ]  # fmt: skip
            for mode, ways in runs:
                worker = start_worker(server.address, server.admin_key, Path(tmp) / mode,
                                      threads=args.threads, memory_mode=mode)  # fmt: skip
                try:
                    for _, mem, _ in ways.values():  # warm up, fetch the memory
                        if mem:
                            _round(worker.url, [questions[0]], mem, 2)
                    _round(worker.url, [prefix + questions[0]], None, 2)
                    for conc in concurrencies:
                        for way, (pre, mem, fmt) in ways.items():
                            row = _measure(worker.url, way, pre, mem, questions, conc, rounds,
                                           new_tokens)  # fmt: skip
                            rows.append({**row, "memory_format": fmt})
                finally:
                    worker.stop()
        finally:
            server.stop()

    result = {
        "device": f"cpu: {machine()}",
        "model": "SmolLM2-135M-Instruct (float32)",
        "quick": args.quick,
        "prefix_tokens": built.token_count,
        "budget": budget,
        "memory_bytes": built.nbytes(),  # the default memory's (fitted rows)
        "remote_memory_bytes": entries.nbytes(),
        "build_seconds": round(build_s, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nprefix {built.token_count} tokens, memory M={budget} ({built.nbytes() / 1e6:.1f} MB)")
    print(f"{'way':<16} {'conc':>4} {'tokens/s':>9} {'latency':>9}")
    for r in rows:
        print(f"{r['way']:<16} {r['concurrency']:>4} {r['tokens_per_s']:>9.2f} "
              f"{r['latency_s']:>8.2f}s")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
