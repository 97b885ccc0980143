"""BuildOptions as the one source of build options: its checks, the CLI flags made from it, the
shard metadata it writes and reads back, and the README's option table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import numpy as np
import pytest

from memdb import build_options as bo
from memdb.build_options import BuildOptions, specs
from memdb.shards import Shard, decode_shard, encode_shard

README = Path(__file__).resolve().parents[1] / "README.md"

# every field but store_q_mean away from its default (a valid looked-up combination), and
# store_q_mean off (q_mean derived from the key)
CHANGED = BuildOptions(
    key_mode="rope_common", whiten=True, whiten_center=True, common_position=7,
    granularity="head", entry_state="average", lse_correction=True, key_dtype="bfloat16",
    out_dtype="float16", kmeans_iters=3, seed=5, fit_steps=2, fit_ridge=0.5,
    fit_stored_keys=False, chunk_tokens=64, sink_tokens=4, chunk_mass="sum", max_records=99,
    max_tokens_per_trace=3, trace_batch_size=2, holdout=0.2,
)  # fmt: skip
NO_Q_MEAN = BuildOptions(entry_state="average", granularity="head", lse_correction=True,
                         store_q_mean=False)  # fmt: skip


def test_every_field_declares_help_group_and_a_known_type():
    names = [f.name for f in dataclasses.fields(BuildOptions)]
    assert [s.name for s in specs()] == names
    for s in specs():
        assert s.help and s.group in bo.GROUPS and s.kind in (bool, int, float, str)
        assert s.problem(s.default) is None and s.problem(s.absent) is None
    changed = {f for f in names if getattr(CHANGED, f) != getattr(BuildOptions(), f)}
    assert changed | {"store_q_mean"} == set(names) and not NO_Q_MEAN.store_q_mean
    assert bo.CALIBRATION_FIELDS == ("chunk_tokens", "sink_tokens", "chunk_mass", "max_records",
                                     "max_tokens_per_trace", "trace_batch_size")  # fmt: skip


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"key_mode": "rope"}, "key_mode must be one of pre_rope, rope_common, not 'rope'"),
        ({"chunk_mass": "max"}, "chunk_mass must be one of sum, mean, not 'max'"),
        ({"key_dtype": "int8"}, "key_dtype must be one of float32, .*float8_e4m3fn, not 'int8'"),
        ({"kmeans_iters": 0}, "kmeans_iters must be >= 1, not 0"),
        ({"kmeans_iters": True}, "kmeans_iters must be an integer, not True"),
        ({"fit_ridge": -1e-3}, "fit_ridge must be >= 0"),
        ({"fit_ridge": "small"}, "fit_ridge must be a number"),
        ({"whiten": 1}, "whiten must be true or false, not 1"),
        ({"sink_tokens": None}, "sink_tokens must be set, not None"),
        ({"chunk_tokens": 0}, "chunk_tokens must be >= 1, not 0"),
        ({"granularity": "head"}, "entry_state 'fitted' .* pass entry_state='average'"),
        ({"store_q_mean": False}, "store_q_mean=False needs q_mean to equal the entry key"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(bad, message):
    with pytest.raises(ValueError, match=message):
        BuildOptions(**bad)


def test_fit_ridge_takes_an_integer_and_optional_fields_take_none():
    assert BuildOptions(fit_ridge=0).fit_ridge == 0
    assert BuildOptions(chunk_tokens=None, common_position=None).chunk_tokens is None


@pytest.mark.parametrize(
    "options", [BuildOptions(), CHANGED, NO_Q_MEAN], ids=["defaults", "changed", "no_q_mean"]
)
def test_metadata_round_trips_through_a_shard(options):
    meta = options.to_metadata(calibration_records=12, trace_tokens=40)
    shard = Shard(
        keys=np.zeros((1, 2, 4), np.float32),
        out=np.zeros((1, 2, 1, 4), np.float32),
        lse=np.zeros((1, 2, 1), np.float32),
        metadata=meta,
    )
    read = decode_shard(encode_shard(shard)).metadata
    assert BuildOptions.from_metadata(read) == options
    assert bo.build_params(read)["calibration_records"] == 12
    assert read["entry_state"] == options.entry_state
    assert read["lse_correction"] == ("1" if options.lse_correction else "0")
    assert read["group_key"] == options.group_key
    assert read["q_mean"] == ("stored" if options.store_q_mean else "keys")
    with pytest.raises(ValueError, match="are option names"):
        options.to_metadata(seed=1)


def test_a_memory_from_before_an_option_reads_as_such_builds_did():
    params = dataclasses.asdict(BuildOptions())
    for name in ("chunk_mass", "sink_tokens", "fit_stored_keys", "store_q_mean"):
        del params[name]
    got = BuildOptions.from_metadata({"build_params": json.dumps(params)})
    assert (got.chunk_mass, got.sink_tokens, got.fit_stored_keys, got.store_q_mean) == (
        "sum", 0, False, True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="not JSON"):
        BuildOptions.from_metadata({"build_params": "{"})


def test_the_builder_writes_the_options_it_ran_with():
    pytest.importorskip("torch")
    from memdb_worker.build.builder import build_memory
    from tests.tiny import random_traces, small_llama

    options = BuildOptions(entry_state="average", granularity="kv_group", key_dtype="float32",
                           max_records=30, seed=3, chunk_tokens=32, sink_tokens=2)  # fmt: skip
    built = build_memory(small_llama(), None, list(range(3, 43)), random_traces(4, 10, 0), 8,
                         options, progress=False)  # fmt: skip
    for s in built.shards:
        assert BuildOptions.from_metadata(s.metadata) == options
    assert bo.build_params(built.metadata)["calibration_records"] == 30


def test_the_cli_build_flags_are_the_fields():
    from memdb_client.cli_prefix import prefix_append, prefix_build, prefix_insert, prefix_update

    for command in (prefix_build, prefix_insert, prefix_update):
        params = {p.name: p for p in command.params}
        for s in specs():
            p = params[s.name]
            assert p.opts == [f"--{s.flag}"] and p.default is None and s.help in p.help
            if s.kind is bool:
                assert p.secondary_opts == [f"--no-{s.flag}"]
            elif s.choices is not None:
                assert isinstance(p.type, click.Choice) and tuple(p.type.choices) == s.choices
            elif s.min is not None:
                assert p.type.min == s.min
    appended = {p.name for p in prefix_append.params}
    assert "chunk_tokens" in appended and not appended & {"sink_tokens", "chunk_mass", "seed"}


def test_cli_values_make_options_and_bad_ones_a_build_error():
    from memdb.errors import BuildError
    from memdb_client.build import make_options

    assert make_options({"seed": None, "budget": 4}) == BuildOptions()
    assert make_options({"entry_state": "average", "granularity": "head"}).granularity == "head"
    with pytest.raises(BuildError, match="bad build option: entry_state 'fitted'"):
        make_options({"granularity": "head"})


def test_the_readme_option_table_is_current():
    text = README.read_text()
    try:
        want = bo.with_table(text, bo.markdown_table())
    except ValueError as exc:
        pytest.fail(f"README.md: {exc}; place them and run `{bo.WRITE_README}`")
    assert text == want, f"README.md's build option table is stale: run `{bo.WRITE_README}`"


def test_with_table_replaces_only_between_the_markers():
    text = f"a\n{bo.README_BEGIN}\nold\nrows\n{bo.README_END}\nb\n"
    assert bo.with_table(text, "new") == f"a\n{bo.README_BEGIN}\nnew\n{bo.README_END}\nb\n"
    with pytest.raises(ValueError, match="no <!-- build-options:begin -->"):
        bo.with_table("a\nb\n", "new")
