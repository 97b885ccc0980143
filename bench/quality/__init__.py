"""Quality benchmark: many-shot classification with ICL vs the attention-state memory, on
equal bytes. `python -m bench.quality` (see `run`); the protocol is `protocol`'s docstring.

Modules: `protocol` (data, prompts, seeds, splits), `methods` (classification and fidelity of
every method), `summary` (means, bytes, equal bytes, merges, tables), `plot`, `run` (the
command). The names below are what other benchmarks and the tests use.
"""

from bench.quality.methods import (
    accuracy,
    classify,
    exact_logp,
    fidelity,
    pad,
    traces_for,
)
from bench.quality.plot import plot
from bench.quality.protocol import (
    DATA,
    RESULTS,
    Config,
    SeedPlan,
    Task,
    balanced_order,
    format_demo,
    format_label,
    format_query,
    list_datasets,
    load_jsonl,
    plan_seed,
    plan_validation,
    split_validation,
    take_to_budget,
    test_slices,
)
from bench.quality.summary import (
    bytes_summary,
    dataset_summary,
    equal_bytes,
    icl_at_bytes,
    markdown_table,
    merge_results,
    rebuild_summary,
    write_json,
)

__all__ = [
    "DATA",
    "RESULTS",
    "Config",
    "SeedPlan",
    "Task",
    "accuracy",
    "balanced_order",
    "bytes_summary",
    "classify",
    "dataset_summary",
    "equal_bytes",
    "exact_logp",
    "fidelity",
    "format_demo",
    "format_label",
    "format_query",
    "icl_at_bytes",
    "list_datasets",
    "load_jsonl",
    "markdown_table",
    "merge_results",
    "pad",
    "plan_seed",
    "plan_validation",
    "plot",
    "rebuild_summary",
    "split_validation",
    "take_to_budget",
    "test_slices",
    "traces_for",
    "write_json",
]
