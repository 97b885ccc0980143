"""Appending to looked-up memories of the group-mean format (kv_group_mean keys, no q_mean; the
builder's default until 2026-11-30): each head's entry query estimated by `head_queries` (tiny
random Llama; the exact formats and SmolLM2 are in test_admin_cli.py, fitted memories in
test_worker_fitted.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from memdb.shards import Shard, encode_shard
from memdb_worker.attend.attention import bind
from memdb_worker.build import BuildOptions, build_memory, calibrate, cluster
from memdb_worker.build.append import append_chunk, entry_queries
from memdb_worker.memory import head_queries
from memdb_worker.memory.head_queries import HeadQueryFit, QueryStats
from memdb_worker.memory.memory import keyspace_from_metadata
from memdb_worker.model.prefix import encode_chunk
from tests.tiny import LOOKUP, lookup_options, tiny_llama

VOCAB = 128
PREFIX = list(range(3, 83))
CHUNK = [
    int(t) for t in torch.randint(3, VOCAB, (120,), generator=torch.Generator().manual_seed(5))
]
BUDGET = 24
# the group-mean format (kv_group_mean, no lse correction) in float32, so that only the head
# queries differ from the exact path
F32 = {**LOOKUP, "key_dtype": "float32", "out_dtype": "float32"}


def _traces(n: int = 12, length: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(VOCAB)


@pytest.fixture(scope="module")
def tied():
    """A tiny Llama whose second head of each KV group has the query R @ (first head's query):
    there each head's query is a linear function of the group mean, which the fit recovers."""
    model = tiny_llama(VOCAB)
    d, hg = 16, 2
    g = torch.Generator().manual_seed(2)
    for layer in model.model.layers:
        w = layer.self_attn.q_proj.weight  # [H * d, hidden], head j = rows j*d:(j+1)*d
        for grp in range(2):
            first = w[grp * hg * d : (grp * hg + 1) * d]
            r = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)
            w[(grp * hg + 1) * d : (grp + 1) * hg * d] = r @ first
    return model


def _without_q_mean(shards: list[Shard]) -> list[Shard]:
    """The same memory as the group-mean format stores it: no lse-correction extras."""
    return [dataclasses.replace(s, extras={}) for s in shards]


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("key_dtype", ["bfloat16", "float8_e4m3fn"])
def test_a_group_mean_memory_accepts_an_append(tiny, key_dtype):
    # the looked-up format's defaults otherwise; chunks' mass summed, so the lse only grows
    opts = lookup_options(key_dtype=key_dtype, chunk_mass="sum")
    base = build_memory(tiny, None, PREFIX, _traces(), BUDGET, opts, progress=False)
    assert base.shards[0].metadata["group_key"] == "mean" and not base.shards[0].extras
    got = append_chunk(tiny, None, base.shards, CHUNK, progress=False)
    assert got.token_count == len(PREFIX) + len(CHUNK)
    for old, new in zip(base.shards, got.shards, strict=True):
        np.testing.assert_array_equal(old.keys, new.keys)
        if key_dtype == "float8_e4m3fn":  # float8 keys keep their per-entry scale
            np.testing.assert_array_equal(old.key_scale, new.key_scale)
        encode_shard(new)  # the server's validation (dtypes, the scale of float8 keys)
        assert new.out.dtype == old.out.dtype and np.isfinite(new.lse).all()
        assert not np.allclose(old.lse, new.lse)
        assert (new.lse >= old.lse).all()  # more keys: logaddexp only grows


def test_head_queries_are_exact_where_heads_are_linear_in_their_group_mean(tied):
    """On the tied model the ridge-free fit gives back every entry's stored per-head q_mean
    from its group-mean key alone; with the ridge prior the estimates still average to the key
    and beat the mean offsets alone (an infinite prior)."""
    opts = BuildOptions(lse_correction=True, **F32)  # stores q_mean: the exact answer
    calib = calibrate(tied, None, PREFIX, _traces(), opts, progress=False)
    mem = cluster(calib, BUDGET, opts, progress=False)
    ks = keyspace_from_metadata(mem.shards[0].metadata, mem.shards)
    stats = QueryStats(3, 2, 2, 16)
    with torch.inference_mode(), bind(tied, stats, live_positions="zero"):
        encode_chunk(tied, CHUNK, PREFIX[:32], len(PREFIX))
    bare = _without_q_mean(mem.shards)
    for layer in range(3):
        want = torch.from_numpy(mem.shards[layer].extras["q_mean"])  # [I, M, h, d]
        exact = entry_queries(bare[layer], ks, layer, stats.fit(layer, prior=0.0))
        torch.testing.assert_close(exact, want, rtol=1e-4, atol=1e-4)
        ridge = entry_queries(bare[layer], ks, layer, stats.fit(layer))
        torch.testing.assert_close(ridge.mean(2), want.mean(2), rtol=1e-5, atol=1e-5)
        offsets = entry_queries(bare[layer], ks, layer, stats.fit(layer, prior=1e12))
        assert (ridge - want).norm() < 0.5 * (offsets - want).norm()


def _append_errors(model) -> tuple[float, float]:
    """(appended, not appended): the relative error of the group-mean memory's out, after
    appending CHUNK, against the exact-query append (the same entries with q_mean stored)."""
    opts = BuildOptions(lse_correction=True, **F32)
    mem = build_memory(model, None, PREFIX, _traces(), BUDGET, opts, progress=False)
    want = append_chunk(model, None, mem.shards, CHUNK, progress=False).shards
    got = append_chunk(model, None, _without_q_mean(mem.shards), CHUNK, progress=False).shards
    err = np.mean([_rel_err(g.out, w.out) for g, w in zip(got, want, strict=True)])
    stale = np.mean([_rel_err(m.out, w.out) for m, w in zip(mem.shards, want, strict=True)])
    return float(err), float(stale)


def test_group_mean_append_is_exact_where_heads_are_linear_in_their_group_mean(tied, monkeypatch):
    """Without the ridge prior the whole append equals the exact-query one on the tied model;
    with it (the default) it stays close."""
    err, stale = _append_errors(tied)
    assert stale > 0.1  # the appended chunk matters
    assert err < 0.1 * stale
    monkeypatch.setattr(head_queries, "DEFAULT_PRIOR", 0.0)
    exact, _ = _append_errors(tied)
    assert exact < 1e-4


def test_fitted_head_queries_beat_the_group_mean_for_every_head(tiny, monkeypatch):
    """On a model with unrelated random heads the estimate is not exact, but below both the state
    before the append and the naive estimate (the group mean as every head's query: 0.104 here,
    the fit 0.083; SmolLM2's heads are far more predictable, see head_queries)."""
    err, stale = _append_errors(tiny)

    def group_mean_only(self, layer, prior=None):
        fit = original(self, layer, prior)
        return HeadQueryFit(fit.g_mean, 0 * fit.offset, 0 * fit.coef, fit.heads_per_group)

    original = QueryStats.fit
    monkeypatch.setattr(QueryStats, "fit", group_mean_only)
    naive, _ = _append_errors(tiny)
    assert err < 0.9 * naive and naive < stale
