"""Quality benchmark: many-shot classification with ICL vs the attention-state memory.

`python -m bench.quality` (add `--quick` for a small smoke run) writes bench/results/quality.json
and bench/results/quality.png.

Protocol (also recorded in the JSON under "protocol"):

- Model SmolLM2-135M-Instruct (float32, CPU), data every set in ../shared/data (read in place).
- A demonstration is "{text}\\nLabel: {label}\\n\\n", the query "{text}\\nLabel:", a label is
  scored as the continuation " {label}" by the sum of its token log-probabilities
  (unnormalised; the length-normalised accuracy is recorded too as "*_norm"), all labels of an
  example scored in packed batches of whole (query, label) sequences (`scoring.score_pairs`,
  pinned equal to the shared-context `scoring.score_continuations` by the worker's tests).
- Per seed: demonstrations are drawn from train, balanced over labels (round-robin over
  per-label shuffled pools), enough to fill `prefix_tokens` (the full-context ICL prefix, leaving
  room for the query in SmolLM2's 8K context); the order inside the prefix is shuffled. The 32K
  prefix continues the same round-robin sequence up to `prefix32k_tokens` (encoded in chunks).
  Calibration traces are other training examples (never demonstrations, never test examples)
  formatted exactly as decode-time contexts: query + " " + label.
- Test examples: a seeded permutation of test.jsonl split into disjoint slices, one per seed;
  every method is scored on the same examples within a seed. Accuracies are means over seeds
  (the spread: std and min/max over seeds).
- Methods: zero_shot; icl[M] = the prefix truncated to its first M tokens (ExactPrefix.head);
  icl_full; memory[M] built from the full prefix; memory_32k built from the ~32K prefix at one
  budget (`budget_32k`), its later chunks encoded after the prefix's first 32 tokens (an
  attention sink, `sinks_32k[0]`); memory_32k_sink0 the same with chunks encoded alone, as in
  the paper.
- Append vs rebuild (`append_budgets`): a memory built from the first half of the
  demonstrations ("memory_half"), then the second half appended with
  `memdb_worker.append.append_chunk` ("memory_append", what `memdb-admin prefix append` does),
  against the memory rebuilt from the whole prefix (memory[M]): accuracy and fidelity, both
  against exact attention over the whole prefix.
- Fidelity per budget on held-out test sequences (query + gold label): per layer, the relative
  error ||o_mem - o_exact|| / ||o_exact|| of the merged attention output (all heads of a token
  as one vector) against exact attention over [prefix; context] for the same layer input
  (teacher-forced, via an attention observer), averaged over tokens, then over layers; and the
  next-token top-1 agreement and KL(ICL_full || memory) of the model's distributions.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("bench.quality")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMDB_DATA", REPO.parent / "shared" / "data"))  # ../shared/data
RESULTS = REPO / "bench" / "results"
BUDGETS = (512, 1024, 2048, 4096)


# -- pure pieces (tested without a model) -------------------------------------------------------


def format_demo(text: str, label: str) -> str:
    return f"{text}\nLabel: {label}\n\n"


def format_query(text: str) -> str:
    return f"{text}\nLabel:"


def format_label(label: str) -> str:
    return f" {label}"


def load_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def list_datasets(root: Path = DATA) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "train.jsonl").exists())


def balanced_order(rows: Sequence[dict], seed: int) -> list[int]:
    """Indices of `rows` in round-robin order over labels (each label's pool shuffled with
    `seed`, labels in a seeded order): any prefix of it is balanced as far as pools allow."""
    rng = np.random.default_rng(seed)
    pools: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        pools.setdefault(r["label"], []).append(i)
    labels = sorted(pools)
    rng.shuffle(labels)
    for lab in labels:
        rng.shuffle(pools[lab])
    order: list[int] = []
    depth = 0
    while True:
        added = False
        for lab in labels:
            if depth < len(pools[lab]):
                order.append(pools[lab][depth])
                added = True
        if not added:
            return order
        depth += 1


def take_to_budget(lengths: Sequence[int], budget: int) -> int:
    """How many leading items fit in `budget` tokens."""
    total = 0
    for n, length in enumerate(lengths):
        if total + length > budget:
            return n
        total += length
    return len(lengths)


def test_slices(n_rows: int, seeds: Sequence[int], per_seed: int, shuffle_seed: int = 1234):
    """Disjoint slices of a seeded permutation of the test set, one per seed."""
    perm = np.random.default_rng(shuffle_seed).permutation(n_rows).tolist()
    per_seed = min(per_seed, n_rows // (max(seeds) + 1))
    # slice by seed value, so a run of a subset of seeds scores the same examples per seed
    return {s: perm[s * per_seed : (s + 1) * per_seed] for s in seeds}


@dataclass
class SeedPlan:
    """What one seed uses, as indices into train/test."""

    demos: list[int]  # the full-context prefix, in prompt order
    demos32k: list[int]  # the 32K prefix, in prompt order
    traces: list[int]  # calibration traces (disjoint from every demonstration)
    test: list[int]


def plan_seed(
    train: Sequence[dict],
    demo_lengths: Sequence[int],
    seed: int,
    prefix_tokens: int,
    prefix32k_tokens: int,
    num_traces: int,
    test_idx: list[int],
) -> SeedPlan:
    """Demonstrations (balanced, shuffled), the 32K superset, and calibration traces for a seed."""
    order = balanced_order(train, seed)
    n_full = take_to_budget([demo_lengths[i] for i in order], prefix_tokens)
    n_32k = take_to_budget([demo_lengths[i] for i in order], prefix32k_tokens)
    rng = np.random.default_rng(seed + 7919)
    demos = list(order[:n_full])
    rng.shuffle(demos)
    extra = list(order[n_full:n_32k])
    rng.shuffle(extra)
    demos32k = demos + extra  # the full prefix is the first chunk of the 32K prefix
    used = set(order[:n_32k])
    rest = [i for i in range(len(train)) if i not in used]
    rng.shuffle(rest)
    return SeedPlan(demos, demos32k, rest[:num_traces], list(test_idx))


def mean_std(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=0)),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def dataset_summary(
    per_seed: Sequence[dict], budgets: Sequence[int], n_test: int, extra: dict | None = None
) -> dict:
    """Results of one data set in the required format from per-seed records.

    A per-seed record: {"seed", "n_test", "acc": {"zero_shot", "icl_full", "memory_32k",
    "icl": {M}, "memory": {M}} (and "acc_norm" alike), "fidelity": {M: {...}},
    "bytes": {M: {...}}, "build_s": {M: s}}.
    """

    def acc(rec: dict, key: str, m: int | None = None, which: str = "acc") -> float:
        v = rec[which][key]
        return float(v[str(m)] if m is not None else v)

    out: dict = {"n_test": int(n_test)}
    spread: dict = {}
    with32 = [r for r in per_seed if "memory_32k" in r["acc"]]
    out["memory_32k_seeds"] = [r["seed"] for r in with32]
    out["memory_32k_n_test"] = int(sum(r["n_test"] for r in with32))
    for which, suffix in (("acc", ""), ("acc_norm", "_norm")):
        for key in ("zero_shot", "icl_full", "memory_32k"):
            recs = with32 if key == "memory_32k" else per_seed
            if not recs:
                out[key + suffix] = None  # not measured (time budget); see memory_32k_seeds
                continue
            s = mean_std([acc(r, key, which=which) for r in recs])
            out[key + suffix] = s["mean"]
            spread[key + suffix] = s
        for key in sorted({k for r in with32 for k in r["acc"] if k.startswith("memory_32k_")}):
            vals = [acc(r, key, which=which) for r in with32 if key in r["acc"]]
            out[key + suffix] = float(np.mean(vals))
            spread[key + suffix] = mean_std(vals)
        if with32:  # ICL full on exactly the examples memory_32k was scored on
            s = mean_std([acc(r, "icl_full", which=which) for r in with32])
            out["icl_full_on_32k_seeds" + suffix] = s["mean"]
        for key in ("icl", "memory"):
            out[key + suffix] = {}
            spread[key + suffix] = {}
            for m in budgets:
                s = mean_std([acc(r, key, m, which) for r in per_seed])
                out[key + suffix][str(m)] = s["mean"]
                spread[key + suffix][str(m)] = s
    fid: dict = {}
    for m in budgets:
        recs = [r["fidelity"][str(m)] for r in per_seed]
        fid[str(m)] = {
            k: float(np.mean([x[k] for x in recs])) for k in ("rel_err", "top1_agree", "kl")
        }
        fid[str(m)]["per_layer_rel_err"] = np.mean(
            [x["per_layer_rel_err"] for x in recs], axis=0
        ).tolist()
    out["fidelity"] = fid
    out["bytes"] = {
        str(m): {
            "memory": int(np.mean([r["bytes"][str(m)]["memory"] for r in per_seed])),
            "kv_prefix": int(np.mean([r["bytes"][str(m)]["kv_prefix"] for r in per_seed])),
        }
        for m in budgets
    }
    out["build_s"] = {
        str(m): float(np.mean([r["build_s"][str(m)] for r in per_seed])) for m in budgets
    }
    out["append"] = _append_summary(per_seed)
    out["spread"] = spread
    out["seeds"] = [r["seed"] for r in per_seed]
    out["per_seed"] = list(per_seed)
    if extra:
        out.update(extra)
    return out


def _append_summary(per_seed: Sequence[dict]) -> dict:
    """Append vs rebuild per budget: mean accuracies and fidelity over the seeds that ran it."""
    out: dict = {}
    budgets = sorted({m for r in per_seed for m in r.get("append", {})}, key=int)
    for m in budgets:
        recs = [r["append"][m] for r in per_seed if m in r.get("append", {})]
        row: dict = {"seeds": [r["seed"] for r in per_seed if m in r.get("append", {})]}
        for key in ("half", "append", "rebuilt"):
            accs = [x[f"acc_{key}"] for x in recs if x.get(f"acc_{key}") is not None]
            fids = [x[f"fidelity_{key}"] for x in recs if x.get(f"fidelity_{key}")]
            row[f"acc_{key}"] = float(np.mean(accs)) if accs else None
            row[f"fidelity_{key}"] = {
                k: float(np.mean([f[k] for f in fids])) for k in ("rel_err", "top1_agree", "kl")
            } if fids else None  # fmt: skip
        row["append_s"] = float(np.mean([x["append_s"] for x in recs]))
        out[m] = row
    return out


def write_json(path: Path, obj: dict) -> None:
    """Write atomically (a partial file never replaces a good one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    if not names:
        return
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        r = results["datasets"][name]
        ms = sorted(int(m) for m in r["icl"])
        sp = r.get("spread", {})
        for key, style in (("icl", "o-"), ("memory", "s-")):
            ys = [r[key][str(m)] for m in ms]
            err = [sp.get(key, {}).get(str(m), {}).get("std", 0.0) for m in ms]
            ax.errorbar(ms, ys, yerr=err, fmt=style, capsize=3, label=f"{key} (M)")
        ax.axhline(r["zero_shot"], color="gray", ls=":", label="zero-shot")
        ax.axhline(r["icl_full"], color="k", ls="--", label="ICL full")
        if r.get("memory_32k") is not None:
            ax.axhline(r["memory_32k"], color="tab:red", ls="-.", label="memory 32K")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms)
        ax.set_xticklabels([str(m) for m in ms])
        ax.set_title(f"{name} (n={r['n_test']})")
        ax.set_xlabel("budget M (tokens / entries)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{results['model']}: many-shot ICL (truncated) vs attention-state memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- model-side pieces --------------------------------------------------------------------------


@dataclass
class Config:
    seeds: tuple[int, ...] = (0, 1, 2)
    per_seed: int = 70
    per_seed_many_labels: int = 70  # data sets with > 20 labels
    budgets: tuple[int, ...] = BUDGETS
    budget_32k: int = 2048
    seeds_32k: tuple[int, ...] = (0, 1, 2)
    prefix_tokens: int = 7168  # full-context ICL prefix (8K context minus room for the query)
    prefix32k_tokens: int = 32768
    chunk_tokens: int = 7168  # 32K prefix chunks (at demonstration boundaries)
    num_traces: int = 2000  # candidate traces; as many are used as give records_factor * M tokens
    records_factor: float = 1.25  # calibration tokens >= records_factor * max(budgets)
    records_factor_32k: float = 1.25
    fidelity_examples: int = 8  # test sequences per seed for fidelity
    kmeans_iters: int = 10
    max_records: int = 16384
    sinks_32k: tuple[int, ...] = (32, 0)  # first: memory_32k; others: memory_32k_sink{s}
    append_budgets: tuple[int, ...] = (2048,)  # append vs rebuild (must be among budgets)
    datasets: tuple[str, ...] = ()
    deadline: float | None = None  # unix time: no work is started that would end after it
    build: dict = field(default_factory=dict)  # BuildOptions overrides
    decode: dict = field(default_factory=dict)  # DecodeOptions overrides


class Task:
    """A data set tokenized once: demonstrations, queries, labels."""

    def __init__(self, name: str, tokenizer, root: Path = DATA) -> None:
        self.name = name
        self.train = load_jsonl(root / name / "train.jsonl")
        self.test = load_jsonl(root / name / "test.jsonl")
        self.labels = sorted({r["label"] for r in self.train})
        self.tok = tokenizer
        enc = tokenizer(
            [format_demo(r["text"], r["label"]) for r in self.train], add_special_tokens=False
        )
        self.demo_ids: list[list[int]] = [list(x) for x in enc.input_ids]
        self.label_ids = [self._ids(format_label(lab)) for lab in self.labels]
        self.label_index = {lab: i for i, lab in enumerate(self.labels)}

    def _ids(self, s: str) -> list[int]:
        return list(self.tok(s, add_special_tokens=False).input_ids)

    def prefix_ids(self, demos: Sequence[int]) -> list[int]:
        ids: list[int] = []
        for i in demos:
            ids += self.demo_ids[i]
        return ids

    def query_ids(self, row: dict) -> list[int]:
        return self._ids(format_query(row["text"]))

    def trace_ids(self, row: dict) -> list[int]:
        return self.query_ids(row) + self.label_ids[self.label_index[row["label"]]]


SHORTLIST = 12  # labels scored in full per example when a data set has more labels


def shortlist(first_lp: torch.Tensor, label_ids: Sequence[Sequence[int]], k: int) -> list[int]:
    """Labels whose first-token log-prob is at least the k-th best (ties kept), in label order."""
    s = torch.tensor([float(first_lp[ids[0]]) for ids in label_ids])
    if len(label_ids) <= k:
        return list(range(len(label_ids)))
    kth = s.topk(k).values[-1]
    return torch.nonzero(s >= kth).flatten().tolist()


def classify(
    model, task: Task, rows: Sequence[dict], source, k: int = SHORTLIST, max_tokens: int = 4096
) -> tuple[list[int], list[int]]:
    """Predicted label index per row, by summed and by token-mean log-probability.

    With more than `k` labels, a first pass ranks labels by the log-prob of their first token
    (one forward of the context) and only the best k (ties kept) are scored in full: the same
    rule for every method. A label outside the shortlist has a first-token log-prob below the
    k-th best, so it could only win on the sum if its later tokens beat the others' by that gap.
    Every (example, label) sequence is scored in packed batches (`scoring.score_pairs`).
    """
    from memdb_worker.scoring import next_token_logprobs, score_pairs

    ctxs = [task.query_ids(row) for row in rows]
    cands = [list(range(len(task.labels)))] * len(rows)
    if len(task.labels) > k:
        first = next_token_logprobs(model, ctxs, source, max_tokens=max_tokens)
        cands = [shortlist(first[i], task.label_ids, k) for i in range(len(rows))]
    pairs = [(ctx, task.label_ids[j]) for ctx, cand in zip(ctxs, cands, strict=True) for j in cand]
    lp = score_pairs(model, pairs, source, max_tokens=max_tokens)
    pred, pred_norm, at = [], [], 0
    for cand in cands:
        s = lp[at : at + len(cand)]
        at += len(cand)
        lens = torch.tensor([len(task.label_ids[j]) for j in cand], dtype=torch.float32)
        pred.append(cand[int(s.argmax())])
        pred_norm.append(cand[int((s / lens).argmax())])
    return pred, pred_norm


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    return float(np.mean([p == g for p, g in zip(pred, gold, strict=True)])) if gold else 0.0


@torch.inference_mode()
def fidelity(model, seqs: Sequence[Sequence[int]], memory, exact, ref_logp=None) -> dict:
    """Teacher-forced fidelity of `memory` against the exact prefix on token sequences.

    Returns rel_err (mean over layers of the mean over tokens of ||o_mem - o_exact|| /
    ||o_exact||, o = the merged attention output of all heads of a token), per_layer_rel_err,
    top1_agree and kl (KL(exact || memory) of next-token distributions, nats, mean over tokens).
    `ref_logp` (the exact run's log-probs) can be passed to avoid recomputing it.
    """
    from memdb_worker.attention import bind
    from memdb_worker.state import State, merge_states

    ids, mask = pad(seqs, _device(model))
    valid = mask.bool()
    num_layers = int(model.config.num_hidden_layers)
    errs = [0.0] * num_layers

    def observe(ev) -> None:
        q = ev.query
        st = exact.state(q.layer, q.q)
        ex = merge_states(ev.live, State(st.out, st.lse))
        b, h, t, d = ex.out.shape
        eo = ex.out.transpose(1, 2).reshape(b, t, h * d)
        mo = ev.merged.out.transpose(1, 2).reshape(b, t, h * d)
        r = (mo - eo).norm(dim=-1) / eo.norm(dim=-1).clamp_min(1e-12)
        errs[q.layer] = float(r[valid].mean())

    with bind(model, memory, observers=[observe]):
        logits = model(ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits, -1)[valid]
    if ref_logp is None:
        ref_logp = exact_logp(model, ids, mask, exact)
    agree = float((logp.argmax(-1) == ref_logp.argmax(-1)).float().mean())
    kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
    return {
        "rel_err": float(np.mean(errs)),
        "per_layer_rel_err": errs,
        "top1_agree": agree,
        "kl": kl,
    }


def pad(seqs: Sequence[Sequence[int]], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def exact_logp(model, ids, mask, exact) -> torch.Tensor:
    from memdb_worker.attention import bind

    with bind(model, exact):
        logits = model(ids, attention_mask=mask).logits.float()
    return torch.log_softmax(logits, -1)[mask.bool()]


def build_options(cfg: Config, **over):
    from memdb_worker.builder import BuildOptions

    kw = {"kmeans_iters": cfg.kmeans_iters, "max_records": cfg.max_records, **cfg.build, **over}
    return BuildOptions(**kw)


def decode_options(cfg: Config, **over):
    from memdb_worker.memory import DecodeOptions

    return DecodeOptions(**{**cfg.decode, **over})


def run_seed(model, tok, task: Task, plan: SeedPlan, cfg: Config, seed: int) -> dict:
    """Every method and figure of one seed of one data set."""
    from memdb_worker.builder import calibrate, cluster

    t_seed = time.perf_counter()
    rows = [task.test[i] for i in plan.test]
    gold = [task.label_index[r["label"]] for r in rows]
    acc: dict = {"icl": {}, "memory": {}}
    acc_norm: dict = {"icl": {}, "memory": {}}
    timings: dict = {}

    def record(key: str, m: int | None, preds: tuple[list[int], list[int]]) -> None:
        a, an = accuracy(preds[0], gold), accuracy(preds[1], gold)
        if m is None:
            acc[key], acc_norm[key] = a, an
        else:
            acc[key][str(m)], acc_norm[key][str(m)] = a, an
        logger.info(
            "%s seed %d %s%s: acc %.3f (norm %.3f)",
            task.name,
            seed,
            key,
            "" if m is None else f"@{m}",
            a,
            an,
        )

    t = time.perf_counter()
    record("zero_shot", None, classify(model, task, rows, None))
    timings["zero_shot_s"] = time.perf_counter() - t

    prefix_ids = task.prefix_ids(plan.demos)
    traces = [task.trace_ids(task.train[i]) for i in plan.traces]
    traces = traces[: traces_for(traces, max(cfg.budgets), cfg.records_factor)]
    opts = build_options(cfg, seed=seed)
    calib = calibrate(model, tok, prefix_ids, traces, opts, progress=False)
    n_records = calib.num_records
    exact = calib.prefix
    timings["calibration_s"] = calib.seconds

    t = time.perf_counter()
    record("icl_full", None, classify(model, task, rows, exact))
    timings["icl_full_s"] = time.perf_counter() - t
    for m in cfg.budgets:
        t = time.perf_counter()
        record("icl", m, classify(model, task, rows, exact.head(min(m, exact.token_count))))
        timings[f"icl_{m}_s"] = time.perf_counter() - t

    fid_rows = rows[: cfg.fidelity_examples]
    fid_seqs = [task.trace_ids(r) for r in fid_rows]
    ids, mask = pad(fid_seqs, _device(model))
    ref = exact_logp(model, ids, mask, exact)
    fid, nbytes, build_s = {}, {}, {}
    for m in cfg.budgets:
        t = time.perf_counter()
        built = cluster(calib, m, opts, progress=False)
        build_s[str(m)] = built.build_seconds
        mem = built.to_memory(_device(model), options=decode_options(cfg))
        nbytes[str(m)] = {"memory": int(built.nbytes()), "kv_prefix": int(exact.nbytes())}
        t2 = time.perf_counter()
        record("memory", m, classify(model, task, rows, mem))
        timings[f"memory_{m}_s"] = time.perf_counter() - t2
        fid[str(m)] = fidelity(model, fid_seqs, mem, exact, ref_logp=ref)
        logger.info(
            "%s seed %d fidelity@%d: rel_err %.4f top1 %.3f kl %.4f (cluster %.1fs)",
            task.name,
            seed,
            m,
            fid[str(m)]["rel_err"],
            fid[str(m)]["top1_agree"],
            fid[str(m)]["kl"],
            built.stats.get("cluster_s", 0.0),
        )
        timings[f"total_{m}_s"] = time.perf_counter() - t
        del built, mem
        gc.collect()
    prefix_tokens = exact.token_count
    del calib
    gc.collect()
    appended = {}
    for m in cfg.append_budgets:
        t = time.perf_counter()
        appended[str(m)] = run_append(model, tok, task, plan, cfg, seed, m, traces, exact)
        appended[str(m)]["acc_rebuilt"] = acc["memory"].get(str(m))
        appended[str(m)]["fidelity_rebuilt"] = fid.get(str(m))
        timings[f"append_{m}_s"] = time.perf_counter() - t

    timings["seed_s"] = time.perf_counter() - t_seed
    record_out = {
        "seed": seed,
        "n_test": len(rows),
        "n_demos": len(plan.demos),
        "n_demos_32k": len(plan.demos32k),
        "prefix_tokens": prefix_tokens,
        "n_traces": len(traces),
        "n_records": n_records,
        "acc": acc,
        "acc_norm": acc_norm,
        "fidelity": fid,
        "bytes": nbytes,
        "build_s": build_s,
        "timings": timings,
    }
    if appended:
        record_out["append"] = appended
    return record_out, exact


def run_append(model, tok, task: Task, plan: SeedPlan, cfg: Config, seed: int, m: int,
               traces: Sequence[Sequence[int]], exact) -> dict:  # fmt: skip
    """Append vs rebuild at budget m: build from the first half of the demonstrations, append the
    second half (`append_chunk`), score both against the seed's test examples and measure their
    fidelity against exact attention over the whole prefix."""
    from memdb_worker.append import append_chunk
    from memdb_worker.builder import calibrate, cluster
    from memdb_worker.memory import Memory

    rows = [task.test[i] for i in plan.test]
    gold = [task.label_index[r["label"]] for r in rows]
    half = len(plan.demos) // 2
    first, second = task.prefix_ids(plan.demos[:half]), task.prefix_ids(plan.demos[half:])
    opts = build_options(cfg, seed=seed)
    t0 = time.perf_counter()
    calib = calibrate(model, tok, first, traces, opts, progress=False)
    built = cluster(calib, m, opts, progress=False)
    build_s = time.perf_counter() - t0
    del calib
    t0 = time.perf_counter()
    app = append_chunk(model, tok, built.shards, second, progress=False)
    append_s = time.perf_counter() - t0
    dev, dopts = _device(model), decode_options(cfg)
    fid_seqs = [task.trace_ids(r) for r in rows[: cfg.fidelity_examples]]
    ref = exact_logp(model, *pad(fid_seqs, dev), exact)
    out: dict = {
        "half_tokens": len(first),
        "appended_tokens": len(second),
        "build_half_s": build_s,
        "append_s": append_s,
    }
    for key, shards in (("half", built.shards), ("append", app.shards)):
        mem = Memory.from_shards(shards, device=dev, options=dopts)
        out[f"acc_{key}"] = accuracy(classify(model, task, rows, mem)[0], gold)
        out[f"fidelity_{key}"] = fidelity(model, fid_seqs, mem, exact, ref_logp=ref)
        del mem
    logger.info(
        "%s seed %d append@%d: half %.3f, appended %.3f (rel_err %.4f vs half %.4f), %.1f s",
        task.name,
        seed,
        m,
        out["acc_half"],
        out["acc_append"],
        out["fidelity_append"]["rel_err"],
        out["fidelity_half"]["rel_err"],
        append_s,
    )
    del built, app
    gc.collect()
    return out


def chunk_demos(lengths: Sequence[int], chunk_tokens: int) -> list[list[int]]:
    """Split consecutive demonstrations (positions 0..n-1) into chunks of <= chunk_tokens tokens
    at demonstration boundaries."""
    chunks: list[list[int]] = [[]]
    total = 0
    for i, n in enumerate(lengths):
        if chunks[-1] and total + n > chunk_tokens:
            chunks.append([])
            total = 0
        chunks[-1].append(i)
        total += n
    return [c for c in chunks if c]


def encode_long_prefix(
    model, task: Task, first, extra: Sequence[int], chunk_tokens: int, sink_tokens: int
):
    """The 32K prefix: the already encoded full prefix as first chunk, then the extra
    demonstrations in chunks (at demonstration boundaries), each encoded after the prefix's
    first `sink_tokens` tokens (`prefix.encode_chunk`; 0 = alone, as in the paper)."""
    from memdb_worker.prefix import ExactPrefix, encode_chunk

    sink = list(first.sink_ids[:sink_tokens])
    if len(sink) < sink_tokens:
        raise ValueError(f"the first chunk keeps {len(sink)} sink ids, {sink_tokens} asked")
    lengths = [len(task.demo_ids[extra[j]]) for j in range(len(extra))]
    parts = [first] + [
        encode_chunk(model, task.prefix_ids([extra[j] for j in c]), sink)
        for c in chunk_demos(lengths, chunk_tokens - len(sink))
    ]
    return ExactPrefix.join(parts, sink_ids=first.sink_ids)


def run_32k(
    model, tok, task: Task, plan: SeedPlan, exact, cfg: Config, seed: int, sink_tokens: int
) -> dict:
    """memory_32k of one seed: build from the ~32K prefix at cfg.budget_32k, score the seed's
    test examples. Returns the fields to merge into the seed's record."""
    from memdb_worker.builder import calibrate, cluster

    rows = [task.test[i] for i in plan.test]
    gold = [task.label_index[r["label"]] for r in rows]
    t0 = time.perf_counter()
    long = encode_long_prefix(
        model, task, exact, plan.demos32k[len(plan.demos) :], cfg.chunk_tokens, sink_tokens
    )
    encode_s = time.perf_counter() - t0
    traces = [task.trace_ids(task.train[i]) for i in plan.traces]
    traces = traces[: traces_for(traces, cfg.budget_32k, cfg.records_factor_32k)]
    opts = build_options(cfg, seed=seed, sink_tokens=sink_tokens)
    calib = calibrate(model, tok, long, traces, opts, progress=False)
    built = cluster(calib, cfg.budget_32k, opts, progress=False)
    mem = built.to_memory(_device(model), options=decode_options(cfg))
    t = time.perf_counter()
    preds = classify(model, task, rows, mem)
    a, an = accuracy(preds[0], gold), accuracy(preds[1], gold)
    logger.info(
        "%s seed %d memory_32k@%d (%d tokens, %d chunks, sink %d): acc %.3f (norm %.3f)",
        task.name,
        seed,
        cfg.budget_32k,
        long.token_count,
        len(long.chunk_lengths),
        sink_tokens,
        a,
        an,
    )
    out = {
        "memory_32k": a,
        "memory_32k_norm": an,
        "prefix32k_tokens": long.token_count,
        "chunks_32k": list(long.chunk_lengths),
        "n_traces_32k": len(traces),
        "build_32k_s": encode_s + built.build_seconds,
        "score_32k_s": time.perf_counter() - t,
        "bytes_32k": {"memory": int(built.nbytes()), "kv_prefix": int(long.nbytes())},
    }
    del calib, built, mem, long
    gc.collect()
    return out


def traces_for(traces: Sequence[Sequence[int]], budget: int, factor: float) -> int:
    """How many leading traces give at least factor * budget calibration tokens."""
    need, total = factor * budget, 0
    for n, t in enumerate(traces):
        total += len(t)
        if total >= need:
            return n + 1
    return len(traces)


class DatasetRun:
    """Phase-1 results of one data set and what phase 2 (32K) needs."""

    def __init__(self, name: str, tok, cfg: Config) -> None:
        self.task = Task(name, tok)
        per = cfg.per_seed_many_labels if len(self.task.labels) > 20 else cfg.per_seed
        slices = test_slices(len(self.task.test), cfg.seeds, per)
        lengths = [len(x) for x in self.task.demo_ids]
        self.plans = {
            seed: plan_seed(
                self.task.train,
                lengths,
                seed,
                cfg.prefix_tokens,
                cfg.prefix32k_tokens,
                cfg.num_traces,
                slices[seed],
            )
            for seed in cfg.seeds
        }
        self.records: dict[int, dict] = {}
        self.exact: dict[int, object] = {}
        self.wall_s = 0.0
        self.last_seed_s = 0.0

    def summary(self, cfg: Config) -> dict:
        recs = [self.records[s] for s in cfg.seeds if s in self.records]
        n_test = sum(r["n_test"] for r in recs)
        out = dataset_summary(recs, cfg.budgets, n_test, {"num_labels": len(self.task.labels)})
        out["wall_s"] = self.wall_s
        return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (trec, 1 seed, 10 tests)")
    p.add_argument("--datasets", nargs="*", default=None)
    p.add_argument("--seeds", type=int, nargs="*", default=None)
    p.add_argument("--seeds-32k", type=int, nargs="*", default=None)
    p.add_argument("--per-seed", type=int, default=None)
    p.add_argument("--per-seed-many-labels", type=int, default=None)
    p.add_argument("--budgets", type=int, nargs="*", default=None)
    p.add_argument("--budget-32k", type=int, default=None)
    p.add_argument("--prefix-tokens", type=int, default=None)
    p.add_argument("--prefix32k-tokens", type=int, default=None)
    p.add_argument("--fidelity-examples", type=int, default=None)
    p.add_argument("--records-factor", type=float, default=None)
    p.add_argument("--kmeans-iters", type=int, default=None)
    p.add_argument(
        "--deadline",
        default=None,
        help="HH:MM UTC: start no unit of work (a seed of a data set, a 32K build) expected to end "
        "after it (expected: the last such unit's duration)",
    )
    p.add_argument(
        "--append-budgets", type=int, nargs="*", default=None, help="append vs rebuild budgets"
    )
    p.add_argument(
        "--sinks-32k", type=int, nargs="+", default=None, help="sink tokens of the 32K variants"
    )
    p.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the model runs in float32)")
    p.add_argument("--model", default="default", help="a .gguf file (default: SmolLM2's)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds from now: no (data set, seed) unit is started that would end after it",
    )
    p.add_argument("--table", action="store_true", help="print the markdown table of --out only")
    p.add_argument(
        "--merge", type=Path, nargs="*", default=None, help="merge these runs into --out"
    )
    p.add_argument(
        "--resume",
        type=Path,
        nargs="*",
        default=None,
        help="results of earlier runs with the same config: their (data set, seed) units are kept "
        "and not run again",
    )
    args = p.parse_args(argv)
    if args.merge:
        merged = merge_results([json.loads(f.read_text()) for f in args.merge])
        write_json(args.out, merged)
        plot(merged, args.out.with_suffix(".png"))
        print(markdown_table(merged))
        return 0
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return 0
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout
    )
    torch.set_num_threads(args.threads)

    cfg = Config()
    if args.quick:
        cfg = replace(
            cfg,
            seeds=(0,),
            seeds_32k=(0,),
            per_seed=8,
            per_seed_many_labels=8,
            budgets=(512, 1024),
            budget_32k=512,
            prefix_tokens=2048,
            prefix32k_tokens=4096,
            chunk_tokens=2048,
            fidelity_examples=4,
            append_budgets=(512,),
            datasets=("trec",),
        )
    over = {
        "seeds": tuple(args.seeds) if args.seeds else None,
        "seeds_32k": tuple(args.seeds_32k) if args.seeds_32k is not None else None,
        "per_seed": args.per_seed,
        "per_seed_many_labels": args.per_seed_many_labels,
        "budgets": tuple(args.budgets) if args.budgets else None,
        "budget_32k": args.budget_32k,
        "prefix_tokens": args.prefix_tokens,
        "prefix32k_tokens": args.prefix32k_tokens,
        "fidelity_examples": args.fidelity_examples,
        "records_factor": args.records_factor,
        "kmeans_iters": args.kmeans_iters,
        "append_budgets": tuple(args.append_budgets) if args.append_budgets is not None else None,
        "sinks_32k": tuple(args.sinks_32k) if args.sinks_32k else None,
        "datasets": tuple(args.datasets) if args.datasets else None,
    }
    cfg = replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if args.deadline:
        hh, mm = (int(x) for x in args.deadline.split(":"))
        now = time.gmtime()
        day = time.mktime(now[:3] + (0, 0, 0, 0, 0, 0)) - time.timezone
        cfg = replace(cfg, deadline=day + hh * 3600 + mm * 60)
    if args.time_budget:
        cfg = replace(cfg, deadline=time.time() + args.time_budget)
    if not set(cfg.append_budgets) <= set(cfg.budgets):
        p.error(f"--append-budgets {cfg.append_budgets} must be among --budgets {cfg.budgets}")
    names = list(cfg.datasets) or list_datasets()

    from memdb_worker.builder import BuildOptions
    from memdb_worker.memory import DecodeOptions
    from memdb_worker.model import load_model, model_fingerprint

    model, tok = load_model(args.model, device=args.device, dtype=torch.float32)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    results = {
        "model": f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized, float32, {args.device})",
        "model_fingerprint": model_fingerprint(model),
        "command": "python -m bench.quality "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads" + (f", {gpu}" if gpu else ""),
        "config": asdict(cfg),
        "build_options": asdict(build_options(cfg)),
        "decode_options": asdict(decode_options(cfg)),
        "defaults": {"build": asdict(BuildOptions()), "decode": asdict(DecodeOptions())},
        "protocol": __doc__,
        "datasets": {},
    }
    out_png = args.out.with_suffix(".png")
    t0 = time.perf_counter()

    def save() -> None:
        results["wall_s"] = time.perf_counter() - t0
        results["datasets"] = {n: runs[n].summary(cfg) for n in runs if runs[n].records}
        write_json(args.out, results)
        plot(results, out_png)

    # phase 1: every method but memory_32k; seed-major (every data set gets seed 0 first) so
    # that a run cut by the deadline still covers every data set
    runs: dict[str, DatasetRun] = {}
    for name in names:
        runs[name] = DatasetRun(name, tok, cfg)
    for f in args.resume or []:
        if not f.exists():
            continue
        for name, ds in json.loads(f.read_text())["datasets"].items():
            if name in runs:
                for rec in ds["per_seed"]:
                    if rec["seed"] in cfg.seeds and rec["seed"] not in runs[name].records:
                        runs[name].records[rec["seed"]] = rec
                        runs[name].wall_s += rec.get("timings", {}).get("seed_s", 0.0)
                        logger.info("resumed %s seed %d from %s", name, rec["seed"], f)
    for seed in cfg.seeds:
        for name in names:
            run = runs[name]
            if seed in run.records:
                continue
            est = run.last_seed_s or max([r.last_seed_s for r in runs.values()] + [0.0])
            if cfg.deadline is not None and time.time() + est > cfg.deadline:
                logger.info("deadline: skipping %s seed %d (expected %.0f s)", name, seed, est)
                continue
            t = time.perf_counter()
            logger.info("=== %s seed %d", name, seed)
            rec, exact = run_seed(model, tok, run.task, run.plans[seed], cfg, seed)
            run.records[seed], run.exact[seed] = rec, exact
            run.last_seed_s = time.perf_counter() - t
            run.wall_s += run.last_seed_s
            save()
            logger.info("=== %s seed %d done in %.0f s", name, seed, time.perf_counter() - t)
    # phase 2: memory_32k, seed by seed over the data sets, while the deadline allows
    est32 = 300.0  # a guess until the first 32K build is measured
    for seed in cfg.seeds_32k:
        for name in names:
            if cfg.deadline is not None and time.time() + est32 > cfg.deadline:
                logger.info(
                    "deadline: no 32K work for %s seed %d (expected %.0f s)", name, seed, est32
                )
                continue
            run = runs[name]
            if seed not in run.records:
                continue
            if "memory_32k" in run.records[seed]["acc"]:
                continue
            t = time.perf_counter()
            if seed not in run.exact:  # a resumed seed: encode its full prefix again
                from memdb_worker.prefix import encode_prefix

                ids = run.task.prefix_ids(run.plans[seed].demos)
                run.exact[seed] = encode_prefix(model, ids, chunk_tokens=len(ids))
            rec = run.records[seed]
            for i, sink in enumerate(cfg.sinks_32k):
                args32 = (model, tok, run.task, run.plans[seed], run.exact[seed], cfg, seed)
                r32 = run_32k(*args32, sink)
                key = "memory_32k" if i == 0 else f"memory_32k_sink{sink}"
                rec["acc"][key] = r32.pop("memory_32k")
                rec["acc_norm"][key] = r32.pop("memory_32k_norm")
                rec.update(r32 if i == 0 else {f"{k}_sink{sink}": v for k, v in r32.items()})
            est32 = time.perf_counter() - t
            run.wall_s += time.perf_counter() - t
            save()
    save()
    print_table(results)
    return 0


def merge_results(parts: Sequence[dict]) -> dict:
    """Merge runs that measured different seeds (same config otherwise): per data set the union
    of per-seed records (a seed measured twice: the record with memory_32k, else the first),
    summarised again. Top-level fields come from the first part; "parts" lists every command."""
    out = {k: v for k, v in parts[0].items() if k != "datasets"}
    out["parts"] = [{"command": p.get("command"), "wall_s": p.get("wall_s")} for p in parts]
    budgets = [int(m) for m in parts[0]["config"]["budgets"]]
    names: list[str] = []
    for p in parts:
        names += [n for n in p["datasets"] if n not in names]
    out["datasets"] = {}
    for name in names:
        by_seed: dict[int, dict] = {}
        extra: dict = {}
        wall = 0.0
        for p in parts:
            ds = p["datasets"].get(name)
            if not ds:
                continue
            extra.setdefault("num_labels", ds.get("num_labels"))
            wall += ds.get("wall_s", 0.0)
            for rec in ds["per_seed"]:
                old = by_seed.get(rec["seed"])
                if old is None or ("memory_32k" in rec["acc"] and "memory_32k" not in old["acc"]):
                    by_seed[rec["seed"]] = rec
        recs = [by_seed[s] for s in sorted(by_seed)]
        summary = dataset_summary(recs, budgets, sum(r["n_test"] for r in recs), extra)
        summary["wall_s"] = wall
        out["datasets"][name] = summary
    return out


def markdown_table(results: dict) -> str:
    """The README table: accuracy (mean ± std over seeds) per method and data set."""

    def f(r: dict, key: str, m: str | None = None) -> str:
        v = r.get(key) if m is None else r.get(key, {}).get(m)
        if v is None:
            return "n/a"
        sp = r.get("spread", {}).get(key, {})
        sp = sp.get(m, {}) if m is not None else sp
        return f"{v:.3f}" + (f" ± {sp['std']:.3f}" if "std" in sp else "")

    names = list(results["datasets"])
    ms = sorted({m for r in results["datasets"].values() for m in r["icl"]}, key=int)
    head = (
        "| data set | n | zero-shot | "
        + " | ".join([f"ICL@{m} | memory@{m}" for m in ms] + ["ICL full", "memory 32K"])
        + " |"
    )
    lines = [head, "|" + "---|" * (3 + 2 * len(ms) + 2)]
    for name in names:
        r = results["datasets"][name]
        cells = [name, str(r["n_test"]), f(r, "zero_shot")]
        for m in ms:
            cells += [f(r, "icl", m), f(r, "memory", m)]
        cells += [f(r, "icl_full"), f(r, "memory_32k")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| data set | " + " | ".join(f"M={m}: rel err / top-1 / KL" for m in ms) + " |"]
    lines.append("|" + "---|" * (1 + len(ms)))
    for name in names:
        fid = results["datasets"][name]["fidelity"]
        cells = [
            f"{fid[m]['rel_err']:.3f} / {fid[m]['top1_agree']:.3f} / {fid[m]['kl']:.3f}" for m in ms
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(results: dict) -> None:
    for name, r in results["datasets"].items():
        ms = list(r["icl"])
        sp = r["spread"]
        print(f"\n{name} (n={r['n_test']}, labels={r.get('num_labels')})")
        m32 = r.get("memory_32k")
        m32s = "n/a" if m32 is None else f"{m32:.3f}±{sp['memory_32k']['std']:.3f}"
        print(
            f"  zero-shot {r['zero_shot']:.3f}  icl_full {r['icl_full']:.3f}"
            f"±{sp['icl_full']['std']:.3f}  memory_32k {m32s} (seeds {r['memory_32k_seeds']})"
        )
        for m in ms:
            f = r["fidelity"][m]
            print(
                f"  M={m:>5}: icl {r['icl'][m]:.3f}±{sp['icl'][m]['std']:.3f}  memory "
                f"{r['memory'][m]:.3f}±{sp['memory'][m]['std']:.3f}  rel_err {f['rel_err']:.3f} "
                f"top1 {f['top1_agree']:.3f} kl {f['kl']:.4f}"
            )


if __name__ == "__main__":
    raise SystemExit(main())
