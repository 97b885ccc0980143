"""The end-to-end demo (the README's main command, `bash scripts/demo.sh`).

Starts a local memdb-server (LMDB in ./memdb-data) and a memdb-worker process (SmolLM2-135M on
CPU, OpenAI-compatible HTTP API), builds a memory from a real many-shot prefix (TREC question
classification demonstrations from ../shared/data) with SmolLM2 in this process, uploads it, and
asks the worker's `/v1/completions` three ways per test question, side by side with the
latencies seen by the HTTP client: the full prefix in the prompt (in-context learning), the
memory (`"memory": name`, the prefix left out of the prompt), and neither.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections import defaultdict
from pathlib import Path

import httpx
import torch

from memdb.process import start_server
from memdb_client import MemdbClient
from memdb_worker.builder import BuildOptions, build_memory
from memdb_worker.model import load_model, model_fingerprint
from memdb_worker.process import WorkerProcess, launch_worker, wait_worker

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
TEMPLATE = "Question: {text}\nType: {label}\n\n"
QUERY = "Question: {text}\nType:"


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def balanced_sample(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    """n rows, round-robin over labels, shuffled."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    for group in by_label.values():
        rng.shuffle(group)
    out: list[dict] = []
    while len(out) < n and any(by_label.values()):
        for label in sorted(by_label):
            if by_label[label] and len(out) < n:
                out.append(by_label[label].pop())
    rng.shuffle(out)
    return out


def answer(worker: WorkerProcess, prompt: str, memory: str | None, max_tokens: int = 4):
    """The worker's greedy answer (first line) and the request's seconds, over HTTP."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": ["\n"]}
    if memory:
        body["memory"] = memory
    start = time.perf_counter()
    r = httpx.post(f"{worker.url}/v1/completions", json=body, timeout=300)
    seconds = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"worker answered {r.status_code}: {r.text}")
    return r.json()["choices"][0]["text"].strip(), seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path("memdb-data"))
    ap.add_argument("--dataset", default="trec")
    ap.add_argument("--shots", type=int, default=128, help="demonstrations in the prefix")
    ap.add_argument("--traces", type=int, default=300, help="calibration examples")
    ap.add_argument("--budget", type=int, default=512, help="memory entries per layer and head")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="worker's torch threads (0: default)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    train = read_jsonl(DATA / args.dataset / "train.jsonl")
    test = read_jsonl(DATA / args.dataset / "test.jsonl")
    demos = balanced_sample(train, args.shots, rng)
    used = {id(r) for r in demos}
    traces = [r for r in rng.sample(train, args.traces + args.shots) if id(r) not in used]
    prefix = "".join(TEMPLATE.format(**r) for r in demos)
    trace_texts = [TEMPLATE.format(**r).rstrip("\n") for r in traces[: args.traces]]
    questions = rng.sample(test, args.questions)

    print(f"== memdb demo: SmolLM2-135M-Instruct, {args.dataset}, data in {args.data_dir}/")
    server = start_server(args.data_dir, admin_key=None)
    launched = None
    try:
        with MemdbClient(server.address, server.admin_key) as client:
            print(f"server: memdb-server on {server.address} (health: {client.health()})")
            # the worker loads its model while this process builds the memory
            launched = launch_worker(
                server.address, server.admin_key, args.data_dir / "worker", threads=args.threads
            )
            name = build_and_upload(args, client, prefix, trace_texts)
            t = time.perf_counter()
            worker = wait_worker(*launched)
            print(f"worker: memdb-worker on {worker.url} (ready {time.perf_counter() - t:.1f} s "
                  "after the upload)\n")  # fmt: skip
            ask(worker, name, prefix, questions)
            health = httpx.get(f"{worker.url}/health").json()
            print(f"\nworker cache: {health['cache']['memories']} "
                  f"({health['cache']['bytes'] / 1e6:.1f} MB on {health['device']})")  # fmt: skip
    finally:
        if launched is not None:
            WorkerProcess(launched[0], launched[2]).stop()
            print("worker stopped")
        server.stop()
        print("server stopped")


def build_and_upload(args, client: MemdbClient, prefix: str, traces: list[str]) -> str:
    t = time.perf_counter()
    model, tokenizer = load_model("default")
    fp = model_fingerprint(model)
    print(f"model: loaded in {time.perf_counter() - t:.1f} s, fingerprint {fp[:23]}")
    built = build_memory(model, tokenizer, prefix, traces, args.budget, BuildOptions(seed=0))
    name = f"{args.dataset}-demo"
    info = client.put_prefix(
        name,
        built.shards,
        model_fingerprint=fp,
        token_count=built.token_count,
        build_params={"dataset": args.dataset, "shots": str(args.shots)},
        mode="upsert",
    )
    kv_bytes = (
        built.token_count
        * model.config.num_hidden_layers
        * 2
        * (model.config.num_key_value_heads * model.config.head_dim * 4)
    )  # float32 K and V of every prefix token
    print(
        f"memory: '{name}' version {info.version}: {info.num_layers} layers x {info.num_groups} "
        f"groups x M={info.budget} entries, {info.bytes / 1e6:.1f} MB stored, built in "
        f"{built.build_seconds:.0f} s from a {built.token_count}-token prefix "
        f"(its KV cache: {kv_bytes / 1e6:.1f} MB)"
    )
    return name


def ask(worker: WorkerProcess, name: str, prefix: str, questions: list[dict]) -> None:
    answer(worker, QUERY.format(text="warm up"), name)  # the worker fetches the memory once
    rows, score = [], defaultdict(int)
    times: dict[str, list[float]] = defaultdict(list)
    for q in questions:
        query = QUERY.format(text=q["text"])
        got = {
            "full prefix": answer(worker, prefix + query, None),
            "memory": answer(worker, query, name),
            "neither": answer(worker, query, None),
        }
        for how, (text, sec) in got.items():
            score[how] += text.split(" ")[0] == q["label"].split(" ")[0]
            times[how].append(sec)
        rows.append((q, got))
    _print_table(rows, score, times, len(questions))


def _print_table(rows, score, times, n: int) -> None:
    hows = ["full prefix", "memory", "neither"]
    print(f"{'question':<48} {'truth':<13} " + " ".join(f"{h:<22}" for h in hows))
    for q, got in rows:
        cells = " ".join(f"{got[h][0][:13]:<13} {got[h][1]:6.2f} s " for h in hows)
        print(f"{q['text'][:47]:<48} {q['label'][:12]:<13} {cells}")
    print("\n" + f"{'':<62}" + " ".join(f"{h:<22}" for h in hows))
    acc = " ".join(f"{score[h]}/{n} correct{'':<11}"[:22] + " " for h in hows)
    lat = " ".join(f"{sum(times[h]) / n:.2f} s per answer{'':<9}"[:22] + " " for h in hows)
    print(f"{'accuracy':<62}{acc}\n{'mean latency':<62}{lat}")


if __name__ == "__main__":
    main()
