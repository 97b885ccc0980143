"""Worker benchmark: tokens/s of a whole memdb-worker (SmolLM2-135M on CPU) with and without a
memory, over its HTTP API. `python -m bench.worker [--quick]`.

Starts a real memdb-server and a real memdb-worker process on 127.0.0.1, builds a memory from a
TREC many-shot prefix with SmolLM2 in this process and uploads it, then sends completions
(greedy, `ignore_eos`, a fixed number of new tokens) at several concurrencies, three ways: the
full prefix in the prompt, the memory (`"memory": name`, a short prompt), and neither; then the
memory again through a second worker in remote mode (a `Lookup` per layer and step). The full
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
from pathlib import Path

import httpx

from bench.server import machine
from memdb_client import MemdbClient
from memdb_server.process import start_server
from memdb_worker.build import BuildOptions, build_memory
from memdb_worker.demo import DATA, QUERY, TEMPLATE, balanced_sample, read_jsonl
from memdb_worker.model.loading import load_model, model_fingerprint
from memdb_worker.serve.process import start_worker

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "bench-trec"


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
            # looked-up entries (not the default fitted rows): the remote-mode row looks them
            # up per layer, which fitted rows (attended whole on the worker) do not allow
            opts = BuildOptions(seed=0, entry_state="average", key_dtype="bfloat16")
            built = build_memory(model, tok, prefix, traces, budget, opts)
            build_s = time.perf_counter() - t0
            with MemdbClient(server.address, server.admin_key) as c:
                c.put_prefix(NAME, built.shards, model_fingerprint=fp,
                             token_count=built.token_count, mode="upsert")  # fmt: skip
            del model
            runs = [
                ("cache", {"full prefix (cached)": (prefix, None), "memory": ("", NAME),
                           "neither": ("", None)}),
                ("remote", {"memory (remote)": ("", NAME)}),
            ]  # fmt: skip
            for mode, ways in runs:
                worker = start_worker(server.address, server.admin_key, Path(tmp) / mode,
                                      threads=args.threads, memory_mode=mode)  # fmt: skip
                try:
                    _round(worker.url, [questions[0]], NAME, 2)  # warm up, fetch the memory
                    _round(worker.url, [prefix + questions[0]], None, 2)
                    for conc in concurrencies:
                        for way, (pre, mem) in ways.items():
                            rows.append(_measure(worker.url, way, pre, mem, questions, conc,
                                                 rounds, new_tokens))  # fmt: skip
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
        "memory_bytes": built.nbytes(),
        "build_seconds": round(build_s, 1),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "worker.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nprefix {built.token_count} tokens, memory M={budget} ({built.nbytes() / 1e6:.1f} MB)")
    print(f"{'way':<16} {'conc':>4} {'tokens/s':>9} {'latency':>9}")
    for r in rows:
        print(f"{r['way']:<16} {r['concurrency']:>4} {r['tokens_per_s']:>9.2f} "
              f"{r['latency_s']:>8.2f}s")  # fmt: skip
    print(f"wrote {RESULTS / 'worker.json'}")


if __name__ == "__main__":
    main()
