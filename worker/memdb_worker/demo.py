"""The end-to-end demo (the README's main command, `bash scripts/demo.sh`).

Starts a local memdb-server (LMDB in ./memdb-data) and a memdb-worker process (SmolLM2-135M on
CPU, OpenAI-compatible HTTP API), builds a memory with the builder's defaults (chosen on
validation data, bench/results/options.json) from a real many-shot prefix (TREC question
classification demonstrations from ../shared/data) with SmolLM2 in this process, uploads it, and
answers every test question three ways in this process, with the same greedy decoding: the full
prefix with its KV computed once and reused by every question (prefix caching, as an inference
server with a prefix cache would serve it), the memory fetched back from the server (the prefix
left out), and neither. For each way it prints accuracy, bytes held for the prefix (its KV in
bfloat16; the memory as stored) and seconds per answer; then the worker answers the same
questions with the memory over HTTP (`"memory": name`), the service path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from collections import defaultdict
from pathlib import Path

import httpx
import torch

from memdb_client import MemdbClient
from memdb_server.process import start_server
from memdb_worker.build import BuildOptions, calibrate, cluster
from memdb_worker.memory.formats import kv_bytes
from memdb_worker.memory.memory import Memory
from memdb_worker.model.loading import load_model, model_fingerprint
from memdb_worker.model.scoring import next_token_logprobs
from memdb_worker.serve.process import WorkerProcess, launch_worker, wait_worker

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MEMDB_DATA", ROOT.parent / "shared" / "data"))
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
    # 150 traces and M = 256 rows (8% of the prefix's KV) build in under a minute on 2 cores;
    # fitting 512 rows from 300 traces took 92 s there (README, the demo's figures)
    ap.add_argument("--traces", type=int, default=150, help="calibration examples")
    ap.add_argument("--budget", type=int, default=256, help="memory rows per KV head and layer (M)")
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
            name, model, tokenizer, exact = build_and_upload(args, client, prefix, trace_texts)
            fp = model_fingerprint(model)
            fetched = Memory.from_shards(client.fetch_memory(name, model_fingerprint=fp).shards)
            print(f"memory: fetched back from the server ({fetched.nbytes() / 1e6:.1f} MB)\n")
            ways = {"full prefix (cached KV)": exact, "memory": fetched, "neither": None}
            nbytes = {"full prefix (cached KV)": prefix_kv_bytes(model, exact.token_count),
                      "memory": fetched.nbytes(), "neither": 0}  # fmt: skip
            ask_locally(model, tokenizer, ways, nbytes, questions)
            t = time.perf_counter()
            worker = wait_worker(*launched)
            print(f"\nworker: memdb-worker on {worker.url} (ready {time.perf_counter() - t:.1f} s "
                  "after the local answers)")  # fmt: skip
            ask_worker(worker, name, questions)
            health = httpx.get(f"{worker.url}/health").json()
            print(f"\nworker cache: {health['cache']['memories']} "
                  f"({health['cache']['bytes'] / 1e6:.1f} MB on {health['device']})")  # fmt: skip
    finally:
        if launched is not None:
            WorkerProcess(launched[0], launched[2]).stop()
            print("worker stopped")
        server.stop()
        print("server stopped")


def build_and_upload(args, client: MemdbClient, prefix: str, traces: list[str]):
    """Build the memory with the default options, upload it; returns (name, model, tokenizer,
    the encoded prefix) (the prefix's KV, computed once, serves the full-prefix answers)."""
    t = time.perf_counter()
    model, tokenizer = load_model("default")
    fp = model_fingerprint(model)
    print(f"model: loaded in {time.perf_counter() - t:.1f} s, fingerprint {fp[:23]}")
    opts = BuildOptions(seed=0)
    calib = calibrate(model, tokenizer, prefix, traces, opts, progress=False)
    built = cluster(calib, args.budget, opts, progress=False)
    name = f"{args.dataset}-demo"
    info = client.put_prefix(
        name,
        built.shards,
        model_fingerprint=fp,
        token_count=built.token_count,
        build_params={"dataset": args.dataset, "shots": str(args.shots)},
        mode="upsert",
    )
    kv = prefix_kv_bytes(model, built.token_count)
    print(
        f"memory: '{name}' version {info.version}: {info.num_layers} layers x {info.num_groups} "
        f"{'KV heads' if opts.fitted else 'groups'} x M={info.budget} "
        f"{'rows' if opts.fitted else 'entries'} ({opts.entry_state}, keys {opts.key_dtype}, "
        f"{'values' if opts.fitted else 'states'} {opts.out_dtype}), "
        f"{built.nbytes() / 1e6:.1f} MB stored, built in "
        f"{built.build_seconds:.0f} s from a {built.token_count}-token prefix "
        f"(its KV cache in bfloat16: {kv / 1e6:.1f} MB)"
    )
    return name, model, tokenizer, calib.prefix_kv


def prefix_kv_bytes(model, tokens: int) -> int:
    """The KV cache of `tokens` prefix tokens in bfloat16 (as a GPU server keeps it)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return kv_bytes(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                    head_dim=head_dim, tokens=tokens)  # fmt: skip


def greedy(model, tokenizer, prompt: str, source, max_tokens: int = 4) -> str:
    """Greedy answer (first line) to `prompt` with the prefix given by `source` (None: no
    prefix); the source's prefix state is reused, never re-encoded."""
    ids = list(tokenizer(prompt, add_special_tokens=source is None).input_ids)
    newline = set(tokenizer("\n", add_special_tokens=False).input_ids)
    out: list[int] = []
    for _ in range(max_tokens):
        nxt = int(next_token_logprobs(model, [ids + out], source)[0].argmax())
        if nxt in newline or nxt == tokenizer.eos_token_id:
            break
        out.append(nxt)
    return tokenizer.decode(out).split("\n")[0].strip()


def ask_locally(model, tokenizer, ways: dict, nbytes: dict[str, int], questions) -> None:
    greedy(model, tokenizer, QUERY.format(text="warm up"), None)
    rows, score = [], defaultdict(int)
    times: dict[str, list[float]] = defaultdict(list)
    for q in questions:
        query = QUERY.format(text=q["text"])
        got = {}
        for how, source in ways.items():
            t = time.perf_counter()
            text = greedy(model, tokenizer, query, source)
            got[how] = (text, time.perf_counter() - t)
            score[how] += _correct(text, q["label"])
            times[how].append(got[how][1])
        rows.append((q, got))
    _print_table(rows, score, times, len(questions), nbytes)


def ask_worker(worker: WorkerProcess, name: str, questions: list[dict]) -> None:
    answer(worker, QUERY.format(text="warm up"), name)  # the worker fetches the memory once
    right, seconds = 0, 0.0
    for q in questions:
        text, sec = answer(worker, QUERY.format(text=q["text"]), name)
        right += _correct(text, q["label"])
        seconds += sec
    n = len(questions)
    print(f"worker over HTTP with the memory: {right}/{n} correct, "
          f"{seconds / n:.2f} s per answer")  # fmt: skip


def _correct(text: str, label: str) -> bool:
    return text.split(" ")[0] == label.split(" ")[0]


def _print_table(rows, score, times, n: int, nbytes: dict[str, int]) -> None:
    hows = list(nbytes)
    print(f"{'question':<48} {'truth':<13} " + " ".join(f"{h[:22]:<23}" for h in hows))
    for q, got in rows:
        cells = " ".join(f"{got[h][0][:13]:<13} {got[h][1]:6.2f} s  " for h in hows)
        print(f"{q['text'][:47]:<48} {q['label'][:12]:<13} {cells}")
    print("\n" + f"{'':<62}" + " ".join(f"{h[:22]:<23}" for h in hows))
    acc = " ".join(f"{score[h]}/{n} correct{'':<12}"[:23] + " " for h in hows)
    byt = " ".join(f"{nbytes[h] / 1e6:.1f} MB{'':<16}"[:23] + " " for h in hows)
    lat = " ".join(f"{sum(times[h]) / n:.2f} s per answer{'':<9}"[:23] + " " for h in hows)
    print(f"{'accuracy':<62}{acc}\n{'bytes held for the prefix':<62}{byt}")
    print(f"{'mean time per answer':<62}{lat}")


if __name__ == "__main__":
    main()
