"""The protocol of bench.quality: data, prompts, seeds, splits, and the Task of a data set.

This module owns what is measured on which examples (recorded in the JSON under "protocol");
the methods (`methods`), summaries (`summary`), plot and command live beside it.

Protocol:

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
- Methods: zero_shot; icl[M] = the prefix truncated to its first M tokens (PrefixKV.head);
  icl_full; memory[M] built from the full prefix; memory_32k built from the ~32K prefix at one
  budget (`budget_32k`), its later chunks encoded after the prefix's first 32 tokens (an
  attention sink, `sinks_32k[0]`); memory_32k_sink0 the same with chunks encoded alone, as in
  the paper. These sum the chunks' attention mass; `masses_32k` adds memory_32k_sink{s}_mean,
  the chunks' mass averaged (BuildOptions.chunk_mass, structured prompting) — `long_key`.
- Append vs rebuild (`append_budgets`): a memory built from the first half of the
  demonstrations ("memory_half"), then the second half appended with
  `memdb_worker.build.append.append_chunk` ("memory_append", what `memdb-admin prefix append` does),
  against the memory rebuilt from the whole prefix (memory[M]): accuracy and fidelity, both
  against exact attention over the whole prefix.
- Fidelity per budget on held-out test sequences (query + gold label): per layer, the relative
  error ||o_mem - o_exact|| / ||o_exact|| of the merged attention output (all heads of a token
  as one vector) against exact attention over [prefix; context] for the same layer input
  (teacher-forced, via an attention observer), averaged over tokens, then over layers; and the
  next-token top-1 agreement and KL(ICL_full || memory) of the model's distributions.
- Bytes: ICL given T tokens keeps the KV of T prefix tokens in bfloat16, as a GPU server keeps
  it (layers x kv_heads x 2 x head_dim x T x 2 bytes); a memory counts its bytes as stored
  (keys, key scales, states, extras, in their dtypes). "Memory vs ICL" is judged at equal
  bytes: ICL accuracy at the memory's bytes is interpolated linearly in bytes between the
  measured ICL cuts (zero-shot at 0 bytes, ICL full at the whole prefix's bytes; a memory larger
  than the whole prefix's KV is compared with ICL full). The per-M cells (M tokens vs M
  entries) are kept as a secondary, count-equal view.
- Validation split (bench.options): `VALIDATION_PER_DATASET` training examples carved out by a
  seeded permutation (`VALIDATION_SEED`), never demonstrations, traces or test examples of an
  options run; options and defaults are chosen on them, the test split only feeds this table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PROTOCOL = __doc__
REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MEMDB_DATA", REPO.parent / "shared" / "data"))  # ../shared/data
RESULTS = REPO / "bench" / "results"
BUDGETS = (512, 1024, 2048, 4096)
VALIDATION_SEED = 20261130  # the permutation of train that carves the validation split
VALIDATION_PER_DATASET = 200  # examples carved per data set (options runs use a prefix of them)


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


def split_validation(
    n_train: int, n_val: int = VALIDATION_PER_DATASET, seed: int = VALIDATION_SEED
) -> tuple[list[int], list[int]]:
    """(validation, rest): a seeded permutation of range(n_train) cut after n_val indices.

    Fixed per data set (it does not depend on the options run's seeds); an options run draws
    its demonstrations and traces from `rest` only, so validation examples never serve as
    either (tests/test_bench_quality.py checks the disjointness)."""
    if n_val >= n_train:
        raise ValueError(f"cannot carve {n_val} validation examples from {n_train} training rows")
    perm = np.random.default_rng(seed).permutation(n_train).tolist()
    return sorted(perm[:n_val]), sorted(perm[n_val:])


def plan_validation(
    task, seed: int, n_val: int, n_examples: int, prefix_tokens: int, prefix32k_tokens: int,
    num_traces: int,
) -> tuple[list[int], SeedPlan]:  # fmt: skip
    """A validation run's plan, as indices into task.train: the first n_examples of the
    validation examples (`split_validation`) and a SeedPlan (demonstrations, the 32K superset,
    traces) drawn from the rest of train only, so validation rows are never any of them."""
    val, rest = split_validation(len(task.train), n_val)
    pool = [task.train[i] for i in rest]
    plan = plan_seed(pool, [len(task.demo_ids[i]) for i in rest], seed, prefix_tokens,
                     prefix32k_tokens, num_traces, [])  # fmt: skip
    back = [rest[i] for i in plan.demos], [rest[i] for i in plan.demos32k]
    plan = SeedPlan(*back, traces=[rest[i] for i in plan.traces], test=[])
    rows = val[:n_examples]
    assert not set(rows) & set(plan.demos32k + plan.traces)
    assert not set(plan.demos32k) & set(plan.traces)
    return rows, plan


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
    icl_32k: bool = False  # also ICL over the whole 32K prefix (a model with a 32K context)
    sinks_32k: tuple[int, ...] = (32, 0)  # first: memory_32k; others: memory_32k_sink{s}
    masses_32k: tuple[str, ...] = ("sum",)  # chunk_mass of the 32K variants (`long_key`)
    append_budgets: tuple[int, ...] = (2048,)  # append vs rebuild (must be among budgets)
    datasets: tuple[str, ...] = ()
    deadline: float | None = None  # unix time: no work is started that would end after it
    build: dict = field(default_factory=dict)  # BuildOptions overrides
    decode: dict = field(default_factory=dict)  # DecodeOptions overrides


def long_key(i: int, sink: int, mass: str) -> str:
    """The result key of a 32K variant: the first sink (i = 0) summed is memory_32k, others
    memory_32k_sink{sink}, with "_mean" where the chunks' mass is averaged."""
    if mass == "sum":
        return "memory_32k" if i == 0 else f"memory_32k_sink{sink}"
    return f"memory_32k_sink{sink}_{mass}"


# a 32K variant's per-seed fields besides its accuracy (run_32k), each suffixed by the tail of
# the variant's key (memory_32k_sink0 -> build_32k_s_sink0)
LONG_FIELDS = ("prefix32k_tokens", "chunks_32k", "n_traces_32k", "build_32k_s", "score_32k_s",
               "bytes_32k")  # fmt: skip


def long_variants(cfg: Config) -> list[tuple[str, int, str]]:
    """(key, sink, chunk mass) of every 32K variant a run measures: memory_32k (the first sink,
    summed) always, since the summaries key on it, then every sink x mass."""
    out = [("memory_32k", cfg.sinks_32k[0], "sum")]
    for i, sink in enumerate(cfg.sinks_32k):
        for mass in cfg.masses_32k:
            if long_key(i, sink, mass) != "memory_32k":
                out.append((long_key(i, sink, mass), sink, mass))
    return out


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

    def gold(self, rows: Sequence[dict]) -> list[int]:
        """The label index of each row."""
        return [self.label_index[r["label"]] for r in rows]

    def trace_ids(self, row: dict) -> list[int]:
        return self.query_ids(row) + self.label_ids[self.label_index[row["label"]]]
