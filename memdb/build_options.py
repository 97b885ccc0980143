"""The options of a memory build (`BuildOptions`): the one source of their CLI flags, checks,
shard metadata and README table.

Every field declares itself with `option(...)` (in `dataclasses.field(metadata=...)`): its help
text, allowed values (`choices`, or a `min`/`max` range), its CLI flag where that is not the
field's name, whether calibration spends it, its group, and what a memory built before the
field existed did (`absent`). From these: `BuildOptions.__post_init__` checks the values,
`memdb_client.cli_prefix` makes the `memdb-admin prefix insert/update/build` flags,
`BuildOptions.to_metadata` / `from_metadata` write and read the shard metadata, and
`python -m memdb.build_options --markdown --write README.md` writes the README's option table.

Shared by the client (flags), the worker's builder (the build) and the server's build jobs.
Knows nothing of models, tensors or clustering: the values are plain strings and numbers (the
worker keeps its own torch dtype tables, keyed by these names).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

KeyMode = Literal["pre_rope", "rope_common"]
Granularity = Literal["head", "kv_group", "layer"]
# "kv_group_mean": the key space's kv_group with one key per group, the mean of its heads' keys
# (written to shards as granularity "kv_group" + group_key "mean", see `memory.lookup_keys`)
BuildGranularity = Literal["head", "kv_group", "layer", "kv_group_mean"]
EntryState = Literal["average", "centroid", "fitted"]
KeyDtype = Literal["float32", "float16", "bfloat16", "float8_e4m3fn"]
OutDtype = Literal["float32", "float16", "bfloat16"]
ChunkMass = Literal["sum", "mean"]

KEY_MODES: tuple[str, ...] = get_args(KeyMode)
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
BUILD_GRANULARITIES: tuple[str, ...] = get_args(BuildGranularity)
ENTRY_STATES: tuple[str, ...] = get_args(EntryState)
KEY_DTYPES: tuple[str, ...] = get_args(KeyDtype)
OUT_DTYPES: tuple[str, ...] = get_args(OutDtype)
CHUNK_MASSES: tuple[str, ...] = get_args(ChunkMass)
DEFAULT_SINK_TOKENS = 32
GROUPS = ("key space", "entries", "fitting", "calibration", "chunking")
README_BEGIN = "<!-- build-options:begin -->"
README_END = "<!-- build-options:end -->"
WRITE_README = "python -m memdb.build_options --markdown --write README.md"


def option(
    default: Any,
    help: str,
    *,
    group: str,
    choices: tuple[str, ...] | None = None,
    min: float | None = None,
    max: float | None = None,
    flag: str | None = None,
    calibration: bool = False,
    absent: Any = MISSING,
) -> Any:
    """A BuildOptions field that describes itself (see the module doc); `absent` defaults to
    `default` (builds before the field did what its default does)."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, not {group!r}")
    meta = {
        "help": help,
        "group": group,
        "choices": choices,
        "min": min,
        "max": max,
        "flag": flag,
        "calibration": calibration,
        "absent": default if absent is MISSING else absent,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Spec:
    """One build option as its field declares it, with its type from the annotation."""

    name: str
    kind: type  # bool, int, float or str
    optional: bool  # None allowed (its help says what None means)
    default: Any
    help: str
    group: str
    choices: tuple[str, ...] | None
    min: float | None
    max: float | None
    flag: str  # the CLI flag's name without dashes: "key-mode"
    calibration: bool
    absent: Any

    def problem(self, value: Any) -> str | None:
        """Why `value` is not allowed for this option (one line), or None."""
        if value is None:
            return None if self.optional else f"{self.name} must be set, not None"
        if self.choices is not None:
            if value in self.choices:
                return None
            return f"{self.name} must be one of {', '.join(self.choices)}, not {value!r}"
        number = isinstance(value, int | float) and not isinstance(value, bool)
        fits = isinstance(value, bool) if self.kind is bool else isinstance(value, self.kind)
        if not (fits and (self.kind in (bool, str) or number) or self.kind is float and number):
            return f"{self.name} must be {_KIND_NAMES[self.kind]}, not {value!r}"
        if self.min is not None and value < self.min:
            return f"{self.name} must be >= {self.min:g}, not {value!r}"
        if self.max is not None and value > self.max:
            return f"{self.name} must be <= {self.max:g}, not {value!r}"
        return None

    @property
    def allowed(self) -> str:
        """The allowed values in words: "pre_rope, rope_common", ">= 1", "on/off"."""
        if self.choices is not None:
            text = ", ".join(self.choices)
        elif self.kind is bool:
            text = "on/off"
        else:
            bounds = [f">= {self.min:g}" if self.min is not None else "",
                      f"<= {self.max:g}" if self.max is not None else ""]  # fmt: skip
            text = " and ".join(b for b in bounds if b) or f"any {self.kind.__name__}"
        return f"{text} (or unset)" if self.optional else text

    @property
    def default_text(self) -> str:
        """The default as a person reads it ("" for None: the help says what it means)."""
        if self.default is None:
            return ""
        if self.kind is bool:
            return "on" if self.default else "off"
        return str(self.default)


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


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
    key_mode: KeyMode = option(
        "pre_rope",
        "Lookup keys: the pre-RoPE query (pre_rope) or the query rotated to one common "
        "position (rope_common).",
        group="key space",
        choices=KEY_MODES,
    )
    whiten: bool = option(False, "Whiten the lookup keys per layer and head.", group="key space")
    whiten_center: bool = option(
        False,
        "Whiten with the covariance (keys centered), not the second moment.",
        group="key space",
    )
    common_position: int | None = option(
        None,
        "rope_common: the common position (unset: the position right after the prefix).",
        group="key space",
        min=0,
    )
    granularity: BuildGranularity = option(
        "kv_group_mean",
        "Index groups: one per head, per KV group (its heads' keys side by side), per layer, or "
        "kv_group_mean: per KV group with one key, the mean of its heads' keys.",
        group="key space",
        choices=BUILD_GRANULARITIES,
    )
    # entries
    entry_state: EntryState = option(
        "fitted",
        "average: Eq. 5 member averages of a cluster of calibration queries; centroid: the "
        "state of the centroid query; fitted: key/value rows per KV head fitted to the "
        "calibration states (--budget rows, at most the prefix's tokens).",
        group="entries",
        choices=ENTRY_STATES,
    )
    lse_correction: bool = option(
        False,
        "Store q_mean and k_bar for the first-order lse correction (looked-up entries).",
        group="entries",
    )
    store_q_mean: bool = option(
        True,
        "Store q_mean (off: it is the entry key, derived when read; pre_rope keys only).",
        group="entries",
    )
    key_dtype: KeyDtype = option(
        "float8_e4m3fn",
        "Stored dtype of the keys (float8 with a per-row scale).",
        group="entries",
        choices=KEY_DTYPES,
    )
    out_dtype: OutDtype = option(
        "bfloat16",
        "Stored dtype of the entries' values (out), q_mean and k_bar.",
        group="entries",
        choices=OUT_DTYPES,
    )
    kmeans_iters: int = option(
        20, "k-means iterations (looked-up entries).", group="entries", min=1
    )
    seed: int = option(0, "Seed of the calibration sample, k-means and the fit.", group="entries")
    # fitted entries (entry_state "fitted", fitted.py)
    fit_steps: int = option(60, "Adam steps of the fitted rows' biases.", group="fitting", min=0)
    fit_ridge: float = option(
        1e-3, "Ridge of the fitted rows' values (least squares).", group="fitting", min=0
    )
    # Validation, bench/results/options_stored_keys_*.json (M = 128 / 512): fidelity better on
    # both models, SmolLM2 (trec, sst2) rel. error 0.068 / 0.027 vs 0.074 / 0.038, Qwen2.5-Coder
    # (agnews) 0.079 / 0.033 vs 0.095 / 0.057 and top-1 0.893 / 0.940 vs 0.872 / 0.932; accuracy
    # gain over equal-byte ICL +0.015 vs +0.009 on SmolLM2 and +0.094 vs +0.107 on Qwen (one
    # example of 40 at M = 128): within noise, so the fidelity decides.
    fit_stored_keys: bool = option(
        True,
        "Fit the biases and values to the keys as stored (float8 rounding included); off: to "
        "the float keys.",
        group="fitting",
        absent=False,  # builds before the option fitted to the float keys
    )
    # calibration: the chunks of a long prefix
    chunk_tokens: int | None = option(
        None,
        "Encode the prefix in independent chunks of at most N tokens, merged exactly (unset: "
        "the model's context minus 1024).",
        group="chunking",
        min=1,
        calibration=True,
    )
    sink_tokens: int = option(
        DEFAULT_SINK_TOKENS,
        "Encode each later chunk (and appended text) after the prefix's first N tokens, an "
        "attention sink (0: chunks alone, as the paper does).",
        group="chunking",
        min=0,
        calibration=True,
        absent=0,  # builds before the sink encoded chunks alone
    )
    # "mean", with the 32-token sink: bench/results/options_long.json ("split": "validation";
    # SmolLM2, 7 sets x 70 examples carved from train, a ~32K prefix in 5 chunks) ranks
    # sink32_mean first by mean accuracy minus the best ICL that fits the context, +0.022 (at
    # least that ICL on 5 of 7 sets), then sink0_mean +0.014, sink0_sum -0.037, sink32_sum
    # -0.051. One chunk: moot.
    chunk_mass: ChunkMass = option(
        "mean",
        "A prefix of C chunks: sum attends to every chunk exactly, mean weights each chunk's "
        "attention 1/C (structured prompting).",
        group="chunking",
        choices=CHUNK_MASSES,
        calibration=True,
        absent="sum",  # builds before the option summed the chunks
    )
    # calibration: the trace tokens recorded
    max_records: int = option(
        16384,
        "Calibration tokens kept (a uniform reservoir sample).",
        group="calibration",
        min=1,
        calibration=True,
    )
    max_tokens_per_trace: int | None = option(
        None,
        "Tokens kept per trace, at random (unset: every token of every trace).",
        group="calibration",
        min=1,
        calibration=True,
    )
    trace_batch_size: int = option(
        32, "Traces run per calibration batch.", group="calibration", min=1, calibration=True
    )
    holdout: float = option(
        0.0,
        "Fraction of the traces held out of the fit; the build reports each layer's error on "
        "them (0: none).",
        group="calibration",
        min=0,
        max=0.5,
    )

    def __post_init__(self) -> None:
        for spec in specs():
            problem = spec.problem(getattr(self, spec.name))
            if problem:
                raise ValueError(problem)
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
        if not self.store_q_mean and not self.q_mean_from_keys:
            raise ValueError(
                "store_q_mean=False needs q_mean to equal the entry key: lse_correction with "
                "average entries, pre_rope keys, no whitening, granularity head, kv_group or layer"
            )

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

    def to_metadata(self, **facts: Any) -> dict[str, str]:
        """These options as shard metadata (strings): "build_params", every field and the
        build's `facts` (e.g. calibration_records) as one JSON object, and the keys a reader of
        the memory needs without the options: entry_state, lse_correction ("1"/"0"),
        group_key, and q_mean ("keys": left out, it is the entry key; else "stored")."""
        params = asdict(self)
        if clash := sorted(set(facts) & set(params)):
            raise ValueError(f"build facts {clash} are option names")
        return {
            "group_key": self.group_key,
            "entry_state": self.entry_state,
            "lse_correction": "1" if self.lse_correction else "0",
            "q_mean": "keys" if self.lse_correction and not self.store_q_mean else "stored",
            "build_params": json.dumps({**params, **facts}, sort_keys=True),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> BuildOptions:
        """The options a memory was built with, from its shard metadata (`to_metadata`). An
        option its build_params lack (a build from before the option) takes what such builds
        did (its `absent`); the build's facts are left out (`build_params` reads them)."""
        params = build_params(metadata)
        return cls(**{s.name: params.get(s.name, s.absent) for s in specs()})


def build_params(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The options and facts of a build from its shard metadata's "build_params" ({} when
    there are none)."""
    try:
        params = json.loads(metadata.get("build_params", "{}"))
    except ValueError:
        raise ValueError("the memory's build_params are not JSON") from None
    if not isinstance(params, dict):
        raise ValueError("the memory's build_params are not a JSON object")
    return params


@cache
def specs() -> tuple[Spec, ...]:
    """The build options, in field order."""
    hints = get_type_hints(BuildOptions)
    out = []
    for f in fields(BuildOptions):
        kind, optional = _kind(hints[f.name])
        m = f.metadata
        flag = m["flag"] or f.name.replace("_", "-")
        out.append(Spec(f.name, kind, optional, f.default, m["help"], m["group"], m["choices"],
                        m["min"], m["max"], flag, m["calibration"], m["absent"]))  # fmt: skip
    return tuple(out)


def spec(name: str) -> Spec:
    """The build option `name`."""
    for s in specs():
        if s.name == name:
            return s
    raise KeyError(name)


def _kind(hint: Any) -> tuple[type, bool]:
    parts = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    kinds = {str if get_origin(p) is Literal else p for p in parts if p is not type(None)}
    if len(kinds) != 1 or not kinds <= set(_KIND_NAMES):
        raise TypeError(f"a build option is one of bool, int, float or str, not {hint}")
    return kinds.pop(), type(None) in parts


CALIBRATION_FIELDS: tuple[str, ...] = tuple(s.name for s in specs() if s.calibration)


def markdown_table() -> str:
    """The options as a markdown table, by group (the README's option table)."""
    rows = ["| Group | Flag | Default | Values | What it does |", "|---|---|---|---|---|"]
    for group in GROUPS:
        for s in specs():
            if s.group == group:
                help_ = s.help.replace("|", "\\|")
                default = f"`{s.default_text}`" if s.default_text else ""
                rows.append(f"| {group} | `--{s.flag}` | {default} | {s.allowed} | {help_} |")
    return "\n".join(rows)


def with_table(text: str, table: str) -> str:
    """`text` with `table` between its README_BEGIN and README_END lines."""
    lines = text.splitlines(keepends=True)
    try:
        begin = next(i for i, x in enumerate(lines) if x.strip() == README_BEGIN)
        end = next(i for i, x in enumerate(lines) if x.strip() == README_END and i > begin)
    except StopIteration:
        raise ValueError(f"no {README_BEGIN} ... {README_END} lines") from None
    return "".join([*lines[: begin + 1], table + "\n", *lines[end:]])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m memdb.build_options", description=__doc__)
    p.add_argument("--markdown", action="store_true", help="print the options' markdown table")
    p.add_argument("--write", metavar="FILE", help="write the table between FILE's markers")
    args = p.parse_args(argv)
    if not args.markdown:
        p.error("nothing to do: pass --markdown")
    table = markdown_table()
    if args.write is None:
        print(table)
        return
    path = Path(args.write)
    try:
        path.write_text(with_table(path.read_text(), table))
    except ValueError as exc:
        sys.exit(f"{path}: {exc}")
    print(f"wrote the build options' table into {path}")


if __name__ == "__main__":
    main()
