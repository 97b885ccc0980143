"""Held-out errors per layer (worker/memdb_worker/build/heldout.py, `BuildOptions.holdout`):
the split keeps traces out of the fit; a memory that is the prefix KV itself (fitted rows at
M = N, float32) answers held-out queries exactly, so any slip in how queries are rebuilt
(RoPE, positions, scaling) shows; smaller memories show a larger error; the figures reach the
shard metadata, the server's build parameters and the CLI's line."""

from __future__ import annotations

import json

import pytest
import torch

from memdb_client.build import heldout_summary, server_params
from memdb_worker.build import BuildOptions, build_memory
from memdb_worker.build.heldout import METADATA_KEY, split_traces
from tests.tiny import tiny_llama

VOCAB = 256


def test_split_holds_a_seeded_fraction_out_never_every_trace():
    traces = [[i] for i in range(8)]
    fit, held = split_traces(traces, 0.25, seed=1)
    assert len(held) == 2 and sorted(fit + held) == traces
    assert fit == sorted(fit) and held == sorted(held)  # original order kept
    assert split_traces(traces, 0.25, seed=1) == (fit, held)
    assert split_traces(traces, 0.0, seed=1) == (traces, [])
    assert len(split_traces(traces[:2], 0.5, seed=0)[1]) == 1  # at least one left to fit
    assert split_traces(traces[:1], 0.5, seed=0) == (traces[:1], [])


@pytest.fixture(scope="module")
def inputs():
    model = tiny_llama(VOCAB)
    g = torch.Generator().manual_seed(9)
    prefix = torch.randint(3, VOCAB, (40,), generator=g).tolist()
    traces = [torch.randint(3, VOCAB, (10,), generator=g).tolist() for _ in range(8)]
    return model, prefix, traces


def errors_of(built) -> dict:
    return json.loads(built.metadata[METADATA_KEY])


def test_a_memory_equal_to_the_prefix_kv_has_no_held_out_error(inputs):
    model, prefix, traces = inputs
    exact = BuildOptions(key_dtype="float32", out_dtype="float32", holdout=0.25)
    built = build_memory(model, None, prefix, traces, budget=len(prefix), options=exact,
                         progress=False)  # fmt: skip
    got = errors_of(built)
    assert got["traces"] == 2 and got["records"] == 20  # 2 held-out traces of 10 tokens
    assert json.loads(built.metadata["build_params"])["trace_count"] == 6  # the rest were fit
    assert len(got["rel_err"]) == model.config.num_hidden_layers
    assert max(got["rel_err"]) < 1e-4 and max(got["lse_mae"]) < 1e-4, got


def test_a_smaller_memory_shows_its_error_in_the_metadata_and_the_cli_line(inputs):
    model, prefix, traces = inputs
    built = build_memory(model, None, prefix, traces, budget=4,
                         options=BuildOptions(holdout=0.25), progress=False)  # fmt: skip
    got = errors_of(built)
    assert min(got["rel_err"]) > 1e-3 and min(got["lse_mae"]) > 0, got
    assert all(s.metadata[METADATA_KEY] == built.metadata[METADATA_KEY] for s in built.shards)
    assert server_params(built.metadata, {})[METADATA_KEY] == built.metadata[METADATA_KEY]
    line = heldout_summary(built.metadata)
    hardest = max(range(len(got["rel_err"])), key=lambda i: got["rel_err"][i])
    assert line.startswith("held-out error (20 queries of 2 traces)")
    assert f"hardest layer {hardest} {got['rel_err'][hardest]:.3f}" in line
    assert heldout_summary({}) is None


def test_without_holdout_every_trace_is_fitted_and_nothing_is_reported(inputs):
    model, prefix, traces = inputs
    built = build_memory(model, None, prefix, traces, budget=4, progress=False)
    assert METADATA_KEY not in built.metadata
    assert json.loads(built.metadata["build_params"])["trace_count"] == len(traces)


def test_the_budget_check_counts_only_the_traces_left_to_fit():
    from memdb_worker.build.local import Tokenized, check_budget

    tok = Tokenized(prefix=list(range(50)), traces=[[1] * 10 for _ in range(10)])
    assert check_budget(tok, 8, BuildOptions()) == 100
    assert check_budget(tok, 8, BuildOptions(holdout=0.2)) == 80  # 2 of 10 traces held out
