"""The methods of bench.quality and their figures: classification (zero-shot, ICL cut at T
tokens, ICL full, memory at M, the 32K memory, append vs rebuild) and fidelity against exact
attention. It knows the protocol (`protocol`) but not how results are summarised or shown.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from bench.quality.protocol import Config, SeedPlan, Task
from memdb_worker.memory.formats import kv_bytes

# BuildOptions fields that set a memory's bytes per entry (recorded with each seed)
MEMORY_FORMAT_FIELDS = ("granularity", "key_dtype", "out_dtype", "lse_correction", "store_q_mean")

logger = logging.getLogger("bench.quality")


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
    from memdb_worker.model.scoring import next_token_logprobs, score_pairs

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
    from memdb_worker.attend.attention import bind
    from memdb_worker.memory.state import State, merge_states

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
    from memdb_worker.attend.attention import bind

    with bind(model, exact):
        logits = model(ids, attention_mask=mask).logits.float()
    return torch.log_softmax(logits, -1)[mask.bool()]


def build_options(cfg: Config, **over):
    from memdb_worker.build import BuildOptions

    kw = {"kmeans_iters": cfg.kmeans_iters, "max_records": cfg.max_records, **cfg.build, **over}
    return BuildOptions(**kw)


def decode_options(cfg: Config, **over):
    from memdb_worker.memory.memory import DecodeOptions

    return DecodeOptions(**{**cfg.decode, **over})


def run_seed(model, tok, task: Task, plan: SeedPlan, cfg: Config, seed: int) -> dict:
    """Every method and figure of one seed of one data set."""
    from memdb_worker.build.builder import calibrate, cluster

    t_seed = time.perf_counter()
    rows = [task.test[i] for i in plan.test]
    gold = task.gold(rows)
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
    exact = calib.prefix_kv
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
    cfg_m = model.config
    head_dim = getattr(cfg_m, "head_dim", None) or cfg_m.hidden_size // cfg_m.num_attention_heads
    record_out = {
        "seed": seed,
        "n_test": len(rows),
        "kv_bytes_per_token": kv_bytes(
            num_layers=cfg_m.num_hidden_layers,
            tokens=1,
            num_kv_heads=cfg_m.num_key_value_heads,
            head_dim=head_dim,
        ),
        "memory_format": {k: getattr(opts, k) for k in MEMORY_FORMAT_FIELDS},
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
    from memdb_worker.build.append import append_chunk
    from memdb_worker.build.builder import calibrate, cluster
    from memdb_worker.memory.memory import Memory

    rows = [task.test[i] for i in plan.test]
    gold = task.gold(rows)
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
    from memdb_worker.memory.prefix_kv import PrefixKV
    from memdb_worker.model.prefix import encode_chunk

    sink = list(first.sink_ids[:sink_tokens])
    if len(sink) < sink_tokens:
        raise ValueError(f"the first chunk keeps {len(sink)} sink ids, {sink_tokens} asked")
    lengths = [len(task.demo_ids[extra[j]]) for j in range(len(extra))]
    parts = [first] + [
        encode_chunk(model, task.prefix_ids([extra[j] for j in c]), sink)
        for c in chunk_demos(lengths, chunk_tokens - len(sink))
    ]
    return PrefixKV.join(parts, sink_ids=first.sink_ids)


def run_32k(
    model, tok, task: Task, plan: SeedPlan, exact, cfg: Config, seed: int, sink_tokens: int,
    chunk_mass: str = "sum", icl: bool = True,
) -> dict:  # fmt: skip
    """memory_32k of one seed: build from the ~32K prefix at cfg.budget_32k (its chunks' mass
    summed or averaged, `chunk_mass`), score the seed's test examples, and with cfg.icl_32k and
    `icl` ICL over the whole 32K prefix. Returns the fields to merge into the seed's record."""
    from memdb_worker.build.builder import calibrate, cluster

    rows = [task.test[i] for i in plan.test]
    gold = task.gold(rows)
    t0 = time.perf_counter()
    long = encode_long_prefix(
        model, task, exact, plan.demos32k[len(plan.demos) :], cfg.chunk_tokens, sink_tokens
    )
    encode_s = time.perf_counter() - t0
    traces = [task.trace_ids(task.train[i]) for i in plan.traces]
    traces = traces[: traces_for(traces, cfg.budget_32k, cfg.records_factor_32k)]
    opts = build_options(cfg, seed=seed, sink_tokens=sink_tokens, chunk_mass=chunk_mass)
    calib = calibrate(model, tok, long, traces, opts, progress=False)
    built = cluster(calib, cfg.budget_32k, opts, progress=False)
    mem = built.to_memory(_device(model), options=decode_options(cfg))
    t = time.perf_counter()
    preds = classify(model, task, rows, mem)
    a, an = accuracy(preds[0], gold), accuracy(preds[1], gold)
    logger.info(
        "%s seed %d memory_32k@%d (%d tokens, %d chunks, sink %d, mass %s): acc %.3f (norm %.3f)",
        task.name,
        seed,
        cfg.budget_32k,
        long.token_count,
        len(long.chunk_lengths),
        sink_tokens,
        chunk_mass,
        a,
        an,
    )
    out = {
        "memory_32k": a,
        "memory_32k_norm": an,
        **(icl_over_long_prefix(model, task, plan, rows, gold) if cfg.icl_32k and icl else {}),
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


def icl_over_long_prefix(model, task: Task, plan: SeedPlan, rows, gold) -> dict:
    """ICL over the whole ~32K prefix encoded as one chunk (exact attention; only for a model
    whose context holds it, e.g. Qwen2.5-Coder's 32K): icl_32k and icl_32k_norm."""
    from memdb_worker.model.prefix import encode_prefix

    ids = task.prefix_ids(plan.demos32k)
    context = int(model.config.max_position_embeddings)
    longest = max(len(task.query_ids(r)) + max(len(x) for x in task.label_ids) for r in rows)
    if len(ids) + longest > context:
        raise ValueError(f"--icl-32k: {len(ids)} prefix tokens + {longest} do not fit the "
                         f"model's {context}-token context")  # fmt: skip
    whole = encode_prefix(model, ids, chunk_tokens=len(ids))
    preds = classify(model, task, rows, whole)
    logger.info("%s icl_32k (%d tokens, one chunk): acc %.3f", task.name, len(ids),
                accuracy(preds[0], gold))  # fmt: skip
    return {"icl_32k": accuracy(preds[0], gold), "icl_32k_norm": accuracy(preds[1], gold)}


def traces_for(traces: Sequence[Sequence[int]], budget: int, factor: float) -> int:
    """How many leading traces give at least factor * budget calibration tokens."""
    need, total = factor * budget, 0
    for n, t in enumerate(traces):
        total += len(t)
        if total >= need:
            return n + 1
    return len(traces)
