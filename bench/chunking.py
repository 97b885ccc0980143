"""Chunked prefix encoding: how far chunks encoded apart are from one encoding of the prefix.

`python -m bench.chunking` writes bench/results/chunking.json. SmolLM2 on CPU, a TREC prefix of
~2K tokens (seed 0 demonstrations) split in two halves; the second half is encoded
(`prefix.encode_chunk`) after a sink of s of the prefix's first tokens (s = 0: alone, as in the
paper), either restarting at position s or at its true positions after the first half (what
`append` does). Each variant is an exact state source; against the one-chunk encoding it gets
the next-token KL, top-1 agreement and the merged attention output's relative error on held-out
test sequences (`bench.quality.fidelity`, teacher-forced). No memory, no clustering: this is
the error of chunking alone. With restarted positions the live tokens also sit at other
positions than after the whole prefix (`prefix_length` is the longest chunk's end), which the
relative error counts too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench import quality as q
from memdb_worker.memory.prefix_kv import PrefixKV
from memdb_worker.model.loading import load_model
from memdb_worker.model.prefix import encode_chunk, encode_prefix

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix-tokens", type=int, default=2048)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--sinks", type=int, nargs="+", default=[0, 4, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "chunking.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model("default", device="cpu", dtype=torch.float32)
    task = q.Task("trec", tok)
    plan = q.plan_seed(task.train, [len(x) for x in task.demo_ids], 0, args.prefix_tokens,
                       args.prefix_tokens, 0, list(range(args.sequences)))  # fmt: skip
    half = len(plan.demos) // 2
    first, second = task.prefix_ids(plan.demos[:half]), task.prefix_ids(plan.demos[half:])
    whole = encode_prefix(model, first + second)
    seqs = [task.trace_ids(task.test[i]) for i in plan.test]
    ref = q.exact_logp(model, *q.pad(seqs), whole)
    head = encode_chunk(model, first)
    rows = []
    for sink in args.sinks:
        for true_positions in (False, True):
            start = len(first) if true_positions else sink
            tail = encode_chunk(model, second, first[:sink], start)
            chunked = PrefixKV.join([head, tail])
            f = q.fidelity(model, seqs, chunked, whole, ref_logp=ref)
            row = {"sink": sink, "true_positions": true_positions,
                   **{k: round(f[k], 4) for k in ("rel_err", "top1_agree", "kl")}}  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    out = {"model": "SmolLM2-135M-Instruct (float32, CPU)", "prefix_tokens": len(first + second),
           "chunks": [len(first), len(second)], "sequences": len(seqs), "rows": rows}  # fmt: skip
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
