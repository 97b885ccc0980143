"""memdb_server.index: building, (de)serializing and searching FAISS indices; loaded layers; the
LRU."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from memdb.errors import InvalidArgument
from memdb.shards import Shard, encode_shard
from memdb_server.index import (
    IndexCache,
    IndexParams,
    LoadedLayer,
    build_index,
    build_layer_indices,
    deserialize_index,
    load_layer,
    resolve_kind,
    search,
    serialize_index,
    set_threads,
)

PARAMS = IndexParams(nlist=8, nprobe=8, hnsw_m=16, ef_search=64)


def random_keys(m: int = 512, dk: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((m, dk)).astype(np.float32)


def random_shard(i: int = 2, m: int = 64, dk: int = 16, h: int = 3, d: int = 8) -> Shard:
    rng = np.random.default_rng(1)
    return Shard(
        keys=rng.standard_normal((i, m, dk)).astype(np.float32),
        out=rng.standard_normal((i, m, h, d)).astype(np.float16),
        lse=rng.standard_normal((i, m, h)).astype(np.float32),
    )


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_stored_key_is_its_own_top_hit_with_cosine_one(kind):
    keys = random_keys()
    index = build_index(keys, kind, "cosine", PARAMS)
    rows = np.array([0, 17, 255, 511])
    scores, ids = search(index, keys[rows] * 3.0, 1, "cosine")  # scale must not matter
    assert ids[:, 0].tolist() == rows.tolist()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_inner_product_metric_scores_raw_dot_products():
    keys = random_keys(m=64)
    index = build_index(keys, "flat", "ip", PARAMS)
    q = random_keys(m=5, seed=3)
    scores, ids = search(index, q, 4, "ip")
    expected = q @ keys.T
    np.testing.assert_array_equal(ids, np.argsort(-expected, axis=1)[:, :4])
    np.testing.assert_allclose(scores, np.sort(expected, axis=1)[:, ::-1][:, :4], rtol=1e-5)


def test_float16_keys_and_queries_are_accepted():
    keys = random_keys(m=32).astype(np.float16)
    index = build_index(keys, "flat", "cosine", PARAMS)
    scores, ids = search(index, keys[:3], 1, "cosine")
    assert ids[:, 0].tolist() == [0, 1, 2]
    assert scores.dtype == np.float32 and ids.dtype == np.int64


def test_search_does_not_modify_the_queries():
    keys = random_keys(m=32)
    q = keys[:2] * 5.0
    before = q.copy()
    search(build_index(keys, "flat", "cosine", PARAMS), q, 1, "cosine")
    np.testing.assert_array_equal(q, before)


def test_k_beyond_the_entries_pads_with_minus_one_and_minus_inf():
    keys = random_keys(m=3)
    scores, ids = search(build_index(keys, "flat", "cosine", PARAMS), keys[:1], 5, "cosine")
    assert sorted(ids[0, :3].tolist()) == [0, 1, 2]
    assert ids[0, 3:].tolist() == [-1, -1]
    assert np.isneginf(scores[0, 3:]).all()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_serialize_deserialize_round_trip_gives_the_same_results(kind):
    keys = random_keys()
    index = build_index(keys, kind, "cosine", PARAMS)
    q = random_keys(m=20, seed=7)
    s1, i1 = search(index, q, 5, "cosine")
    again = deserialize_index(serialize_index(index), PARAMS)
    s2, i2 = search(again, q, 5, "cosine")
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


def test_deserialize_reapplies_search_parameters():
    keys = random_keys()
    ivf = deserialize_index(
        serialize_index(build_index(keys, "ivf", "cosine", PARAMS)), IndexParams(nprobe=3)
    )
    assert ivf.nprobe == 3
    hnsw = deserialize_index(
        serialize_index(build_index(keys, "hnsw", "cosine", PARAMS)), IndexParams(ef_search=77)
    )
    assert hnsw.hnsw.efSearch == 77


def test_deserialize_garbage_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="not a valid FAISS index"):
        deserialize_index(b"not an index", PARAMS)


def test_auto_kind_switches_to_hnsw_at_the_threshold():
    params = IndexParams(kind="auto", auto_threshold=100)
    assert resolve_kind(params, 99) == "flat"
    assert resolve_kind(params, 100) == "hnsw"
    assert resolve_kind(IndexParams(kind="ivf"), 5) == "ivf"
    index = build_index(random_keys(m=100), "auto", "cosine", params)
    assert type(index).__name__ == "IndexHNSWFlat"


def test_unknown_kind_and_metric_are_invalid_argument():
    with pytest.raises(InvalidArgument, match="index kind 'lsh'"):
        resolve_kind(IndexParams(kind="lsh"), 10)
    with pytest.raises(InvalidArgument, match="metric 'l2'"):
        build_index(random_keys(m=4), "flat", "l2", PARAMS)


def test_query_dimension_mismatch_is_invalid_argument():
    index = build_index(random_keys(m=4, dk=8), "flat", "cosine", PARAMS)
    with pytest.raises(InvalidArgument, match=r"\[Q, 8\]"):
        search(index, random_keys(m=2, dk=9), 1, "cosine")


def test_build_layer_indices_gives_one_index_per_group():
    shard = random_shard(i=3)
    blobs = build_layer_indices(shard, "flat", "cosine", PARAMS)
    assert len(blobs) == 3
    for g, blob in enumerate(blobs):
        _, ids = search(deserialize_index(blob, PARAMS), shard.keys[g, 5:6], 1, "cosine")
        assert ids[0, 0] == 5


# ---------------------------------------------------------------- LoadedLayer


def loaded(shard: Shard, version: int = 1) -> LoadedLayer:
    blobs = build_layer_indices(shard, "flat", "cosine", PARAMS)
    return load_layer(version, encode_shard(shard), blobs, PARAMS)


def test_loaded_layer_search_returns_exact_shapes_and_gathered_states():
    shard = random_shard(i=2, m=64, h=3, d=8)
    layer = loaded(shard, version=4)
    rows = np.array([[3, 10], [60, 0], [7, 7]])  # [Q, I]: query q of group g is key rows[q, g]
    queries = np.stack([shard.keys[g, rows[:, g]] for g in range(2)], axis=1)  # [Q, I, Dk]
    ids, scores, out, lse = layer.search(queries, 2, "cosine", include_states=True)
    assert layer.version == 4
    assert ids.shape == scores.shape == (3, 2, 2)
    assert out.shape == (3, 2, 2, 3, 8) and out.dtype == np.float16
    assert lse.shape == (3, 2, 2, 3) and lse.dtype == np.float32
    np.testing.assert_array_equal(ids[:, :, 0], rows)
    np.testing.assert_allclose(scores[:, :, 0], 1.0, atol=1e-5)
    for q in range(3):
        for g in range(2):
            for j in range(2):
                np.testing.assert_array_equal(out[q, g, j], shard.out[g, ids[q, g, j]])
                np.testing.assert_array_equal(lse[q, g, j], shard.lse[g, ids[q, g, j]])


def test_loaded_layer_without_states_returns_none():
    layer = loaded(random_shard())
    ids, scores, out, lse = layer.search(np.zeros((1, 2, 16), np.float32) + 1, 1, "ip", False)
    assert ids.shape == (1, 2, 1) and out is None and lse is None


def test_loaded_layer_broadcasts_a_2d_query_to_every_group():
    shard = random_shard(i=2)
    ids, _, _, _ = loaded(shard).search(shard.keys[1, 9:10], 1, "cosine", False)
    assert ids.shape == (1, 2, 1) and ids[0, 1, 0] == 9


def test_loaded_layer_missing_hits_give_zero_states():
    shard = random_shard(i=1, m=2)
    ids, scores, out, lse = loaded(shard).search(shard.keys[0, :1], 4, "cosine", True)
    assert ids[0, 0, 2:].tolist() == [-1, -1]
    assert not out[0, 0, 2:].any() and not lse[0, 0, 2:].any()
    np.testing.assert_array_equal(out[0, 0, 0], shard.out[0, 0])


def test_loaded_layer_rejects_queries_of_the_wrong_shape():
    with pytest.raises(InvalidArgument, match=r"\[Q, 2, 16\] or \[Q, 16\]"):
        loaded(random_shard()).search(np.zeros((1, 3, 16), np.float32), 1, "cosine", False)


def test_load_layer_counts_bytes_and_checks_index_count():
    shard = random_shard()
    layer = loaded(shard)
    assert layer.nbytes > shard.out.nbytes + shard.lse.nbytes
    with pytest.raises(InvalidArgument, match="stores 1 indices for 2 groups"):
        load_layer(1, encode_shard(shard), [b"x"], PARAMS)


# ---------------------------------------------------------------- IndexCache


def fake_layer(nbytes: int, version: int = 1) -> LoadedLayer:
    return LoadedLayer(version, [], np.zeros(0), np.zeros(0), nbytes)


def test_cache_counts_hits_and_misses():
    cache = IndexCache(max_bytes=1000)
    calls = []
    loader = lambda: calls.append(1) or fake_layer(100)  # noqa: E731
    a = cache.get(("t", "p", 1, 0), loader)
    b = cache.get(("t", "p", 1, 0), loader)
    assert a is b and len(calls) == 1
    assert (cache.hits, cache.misses, cache.nbytes) == (1, 1, 100)


def test_cache_evicts_least_recently_used_under_the_byte_budget():
    cache = IndexCache(max_bytes=250)
    for layer in range(2):
        cache.get(("t", "p", 1, layer), lambda: fake_layer(100))
    cache.get(("t", "p", 1, 0), lambda: fake_layer(100))  # layer 0 is now most recent
    cache.get(("t", "p", 1, 2), lambda: fake_layer(100))  # evicts layer 1
    assert cache.nbytes == 200 and len(cache) == 2
    reloaded = []
    cache.get(("t", "p", 1, 1), lambda: reloaded.append(1) or fake_layer(100))
    cache.get(("t", "p", 1, 2), lambda: reloaded.append(2) or fake_layer(100))
    assert reloaded == [1]  # layer 1 was gone, layer 2 was kept


def test_cache_returns_but_does_not_keep_an_entry_larger_than_the_budget():
    cache = IndexCache(max_bytes=50)
    assert cache.get(("t", "p", 1, 0), lambda: fake_layer(100)).nbytes == 100
    assert len(cache) == 0 and cache.nbytes == 0


def test_cache_invalidate_drops_only_that_prefix_or_tenant():
    cache = IndexCache(max_bytes=1000)
    for key in [("t", "a", 1, 0), ("t", "a", 2, 0), ("t", "b", 1, 0), ("u", "a", 1, 0)]:
        cache.get(key, lambda: fake_layer(10))
    cache.invalidate("t", "a")
    assert len(cache) == 2 and cache.nbytes == 20
    cache.invalidate_tenant("t")
    assert len(cache) == 1 and cache.nbytes == 10


def test_cache_does_not_keep_a_load_that_overlapped_an_invalidate():
    cache = IndexCache(max_bytes=1000)

    def loader():
        cache.invalidate("t", "a")  # the prefix changes while it loads
        return fake_layer(10)

    assert cache.get(("t", "a", 1, 0), loader).nbytes == 10
    assert len(cache) == 0


def test_cache_loads_a_key_once_for_concurrent_misses():
    cache = IndexCache(max_bytes=1000)
    calls = []

    def slow_loader():
        calls.append(1)
        time.sleep(0.05)
        return fake_layer(10)

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get(("t", "a", 1, 0), slow_loader)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4
    assert all(r is results[0] for r in results)


def test_cache_loader_errors_propagate_and_are_not_cached():
    cache = IndexCache(max_bytes=1000)

    def failing():
        raise InvalidArgument("boom")

    with pytest.raises(InvalidArgument):
        cache.get(("t", "a", 1, 0), failing)
    assert cache.get(("t", "a", 1, 0), lambda: fake_layer(5)).nbytes == 5


def test_set_threads_accepts_the_default_and_rejects_negative():
    set_threads(1)
    with pytest.raises(InvalidArgument):
        set_threads(-1)
    set_threads()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_loaded_layer_estimates_its_bytes_when_not_given(kind):
    keys = random_keys(m=256, dk=16)
    index = build_index(keys, kind, "cosine", PARAMS)
    out, lse = np.zeros((1, 256, 2, 4), np.float16), np.zeros((1, 256, 2), np.float32)
    layer = LoadedLayer(1, [index], out, lse, model_fingerprint="fp")
    assert layer.nbytes >= keys.nbytes + out.nbytes + lse.nbytes
    assert layer.model_fingerprint == "fp"
