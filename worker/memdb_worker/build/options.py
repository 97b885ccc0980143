"""The options of a memory build (`BuildOptions`): one frozen, validated dataclass read by
`calibration` (the calibration fields) and `builder` (the rest). Knows nothing of models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from memdb_worker.memory.formats import KEY_DTYPES, OUT_DTYPES
from memdb_worker.memory.keys import GRANULARITIES, KEY_MODES, Granularity, KeyMode
from memdb_worker.model.prefix import CHUNK_MASSES, DEFAULT_SINK_TOKENS, ChunkMass

EntryState = Literal["average", "centroid", "fitted"]
# "kv_group_mean": the key space's kv_group with one key per group, the mean of its heads' keys
# (written to shards as granularity "kv_group" + group_key "mean", see `memory.lookup_keys`)
BuildGranularity = Granularity | Literal["kv_group_mean"]
BUILD_GRANULARITIES: tuple[str, ...] = (*GRANULARITIES, "kv_group_mean")
# BuildOptions fields spent by `calibrate` (the others are read by `cluster`; `seed` by both)
CALIBRATION_FIELDS = (
    "chunk_tokens",
    "sink_tokens",
    "chunk_mass",
    "max_records",
    "max_tokens_per_trace",
    "trace_batch_size",
)


@dataclass(frozen=True)
class BuildOptions:
    """Every choice of a build. The defaults are the format validation picked per byte:
    bench/results/options.json ("split": "validation"; trec and sst2, 40 examples each carved
    from train, a 2K-token prefix, SmolLM2, M = 128 and 512) ranks "fitted_fp8_bf16" first by
    accuracy gain over ICL at equal bytes averaged over data sets and budgets: +0.009, against
    fitted_bf16 -0.011, kvg_mean_bf16 -0.040 (the previous default) and kvg_mean_fp8_bf16
    -0.059. Fitted rows (fitted.py) also have 3-8x lower fidelity error there: rel. error 0.074
    / 0.038 and top-1 0.910 / 0.944 at M = 128 / 512, against 0.225 / 0.201 and 0.812 / 0.848
    for kvg_mean_bf16. Hence one row per KV head (kv_group_mean key space), float8 keys with a
    per-row scale and bfloat16 values. Two data sets and 40 examples: accuracy differences under
    ~0.08 are within noise; the fidelity gap is not."""

    # lookup keys (keys.py)
    key_mode: KeyMode = "pre_rope"
    whiten: bool = False
    whiten_center: bool = False  # whiten with the covariance (keys centered) not the 2nd moment
    common_position: int | None = None  # rope_common: None = the position right after the prefix
    granularity: BuildGranularity = "kv_group_mean"
    # entries
    # Eq. 5 member averages, recomputed at the centroid, or fitted key/value rows (fitted.py)
    entry_state: EntryState = "fitted"
    lse_correction: bool = False  # store q_mean and k_bar for the first-order lse correction
    store_q_mean: bool = True  # False: leave q_mean out where it equals the entry key
    key_dtype: Literal["float32", "float16", "bfloat16", "float8_e4m3fn"] = "float8_e4m3fn"
    out_dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"  # out, q_mean, k_bar
    # clustering
    kmeans_iters: int = 20
    seed: int = 0
    # fitted entries (entry_state "fitted", fitted.py): Adam steps of the biases, values' ridge
    fit_steps: int = 60
    fit_ridge: float = 1e-3
    # biases and values fitted to the keys as stored (float8 rounding included), not to the
    # float keys (False, the ablation). Validation, bench/results/options_stored_keys_*.json
    # (M = 128 / 512): fidelity better on both models, SmolLM2 (trec, sst2) rel. error 0.068 /
    # 0.027 vs 0.074 / 0.038, Qwen2.5-Coder (agnews) 0.079 / 0.033 vs 0.095 / 0.057 and top-1
    # 0.893 / 0.940 vs 0.872 / 0.932; accuracy gain over equal-byte ICL +0.015 vs +0.009 on
    # SmolLM2 and +0.094 vs +0.107 on Qwen (one example of 40 at M = 128): within noise, so the
    # fidelity decides.
    fit_stored_keys: bool = True
    # calibration
    chunk_tokens: int | None = None  # None: the model's context minus 1024 positions
    sink_tokens: int = DEFAULT_SINK_TOKENS  # prefix tokens encoded before later chunks/appends
    # a prefix of C chunks: each chunk's attention mass summed or averaged (prefix.py). "mean",
    # with the 32-token sink: bench/results/options_long.json ("split": "validation"; SmolLM2,
    # 7 sets x 70 examples carved from train, a ~32K prefix in 5 chunks) ranks sink32_mean first
    # by mean accuracy minus the best ICL that fits the context, +0.022 (at least that ICL on 5
    # of 7 sets), then sink0_mean +0.014, sink0_sum -0.037, sink32_sum -0.051. One chunk: moot.
    chunk_mass: ChunkMass = "mean"
    max_records: int = 16384  # trace tokens kept (reservoir sample)
    max_tokens_per_trace: int | None = None  # None: every token of every trace
    trace_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.key_mode not in KEY_MODES:
            raise ValueError(f"key_mode must be one of {KEY_MODES}, not {self.key_mode!r}")
        if self.granularity not in BUILD_GRANULARITIES:
            raise ValueError(f"granularity must be one of {BUILD_GRANULARITIES}")
        if self.entry_state not in ("average", "centroid", "fitted"):
            raise ValueError("entry_state must be 'average', 'centroid' or 'fitted'")
        if self.fitted and (
            self.granularity != "kv_group_mean"
            or self.key_mode != "pre_rope"
            or self.whiten
            or self.lse_correction
        ):
            raise ValueError(
                "entry_state 'fitted' (the default) keeps key/value rows per KV head: "
                "granularity, key_mode, whiten and lse_correction are options of looked-up "
                "entries; pass entry_state='average' (CLI: --entry-state average) with them"
            )
        if self.fit_steps < 0 or self.fit_ridge < 0:
            raise ValueError("fit_steps and fit_ridge must be >= 0")
        if self.key_dtype not in KEY_DTYPES:
            raise ValueError(f"key_dtype must be one of {KEY_DTYPES}, not {self.key_dtype!r}")
        if self.out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, not {self.out_dtype!r}")
        if not self.store_q_mean and not self.q_mean_from_keys:
            raise ValueError(
                "store_q_mean=False needs q_mean to equal the entry key: lse_correction with "
                "average entries, pre_rope keys, no whitening, granularity head, kv_group or layer"
            )
        if self.sink_tokens < 0:
            raise ValueError("sink_tokens must be >= 0")
        if self.chunk_mass not in CHUNK_MASSES:
            raise ValueError(f"chunk_mass must be one of {CHUNK_MASSES}, not {self.chunk_mass!r}")
        if self.max_records < 1 or self.trace_batch_size < 1 or self.kmeans_iters < 1:
            raise ValueError("max_records, trace_batch_size and kmeans_iters must be >= 1")

    @property
    def fitted(self) -> bool:
        """Whether entries are fitted key/value rows (fitted.py), not states of clusters."""
        return self.entry_state == "fitted"

    @property
    def keyspace_granularity(self) -> Granularity:
        """The key space's granularity (kv_group_mean is kv_group with group_key "mean")."""
        return "kv_group" if self.granularity == "kv_group_mean" else self.granularity

    @property
    def group_key(self) -> str:
        """The memory's group key: "mean" for kv_group_mean, else "concat"."""
        return "mean" if self.granularity == "kv_group_mean" else "concat"

    @property
    def q_mean_from_keys(self) -> bool:
        """Whether an entry's q_mean is its key (member averages of unwhitened pre-RoPE
        queries, concatenated per group), so that it need not be stored."""
        return (
            self.lse_correction
            and self.entry_state == "average"
            and self.key_mode == "pre_rope"
            and not self.whiten
            and self.granularity in ("head", "kv_group", "layer")
        )
