"""Fitted entries (memdb_worker.memory.fitted): the fit's parts against exact computations, the
builder's
fitted memories on a tiny random Llama (exact with every prefix token kept, shards that round-trip
through the server's encoding), and on the real SmolLM2 against the paper's entries."""

from __future__ import annotations

import math

import pytest
import safetensors
import torch

from memdb.shards import decode_shard, encode_shard, save_tensors
from memdb_worker.attend.attention import bind
from memdb_worker.build import BuildOptions, build_memory, calibrate, cluster, fitting
from memdb_worker.memory import fitted
from memdb_worker.memory.memory import DecodeOptions, Memory
from memdb_worker.memory.state import attention_state
from memdb_worker.model.prefix import encode_prefix
from tests.tiny import random_traces, small_llama

VOCAB = 128
PREFIX = list(range(3, 43))
FITTED = {"entry_state": "fitted", "key_dtype": "float32", "out_dtype": "float32"}


@pytest.fixture(scope="module")
def tiny():
    return small_llama()


def _traces(n, length, seed):
    return random_traces(n, length, seed, VOCAB)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_fitted_state_is_attention_with_the_bias_added_to_the_scores():
    q = _rand(2, 4, 3, 8, seed=1)  # [B, H, T, d], 2 KV heads
    keys, values, bias = _rand(2, 5, 8, seed=2), _rand(2, 5, 8, seed=3), _rand(2, 5, seed=4)
    st = fitted.fitted_state(q, keys, values, bias, 0.3)
    kh = keys.repeat_interleave(2, dim=0)  # [H, M, d]
    scores = 0.3 * torch.einsum("bhtd,hmd->bhtm", q, kh) + bias.repeat_interleave(2, 0)[:, None]
    want_out = torch.einsum("bhtm,hmd->bhtd", scores.softmax(-1), values.repeat_interleave(2, 0))
    torch.testing.assert_close(st.lse, scores.logsumexp(-1))
    torch.testing.assert_close(st.out, want_out)


def test_every_prefix_key_kept_is_exact_attention():
    k, v, q = _rand(12, 8, seed=1), _rand(12, 8, seed=2), _rand(30, 8, seed=3)
    exact = attention_state(q[None, None], k[None, None], v[None, None], 0.35)
    keys, values, bias = fitting.fit_group(k, v, q, exact.out[0, 0], exact.lse[0, 0], 12, 0.35)
    st = fitted.fitted_state(q[None, None], keys[None], values[None], bias[None], 0.35)
    torch.testing.assert_close(st.out, exact.out)
    torch.testing.assert_close(st.lse, exact.lse)


def test_biases_and_values_are_fitted_to_the_keys_as_stored():
    # keys read back coarsely (to 0.5), with a large component shared by keys and queries (as
    # Qwen2's key bias): a key's rounding moves its score by about the same for every query,
    # which the biases absorb when fitted on the stored keys, not when the keys are rounded
    # after the fit
    big = torch.zeros(16)
    big[0] = 1.0
    k, v = _rand(64, 16, seed=1) + 40 * big, _rand(64, 16, seed=2)
    q, held = _rand(400, 16, seed=3) + 8 * big, _rand(100, 16, seed=4) + 8 * big
    exact = attention_state(q[None, None], k[None, None], v[None, None], 0.25)
    want = attention_state(held[None, None], k[None, None], v[None, None], 0.25)

    def coarse(x):
        return (x * 2).round() / 2

    errs = {}
    for name, stored in (("stored", coarse), ("float", None)):
        keys, values, bias = fitting.fit_group(k, v, q, exact.out[0, 0], exact.lse[0, 0], 32,
                                              0.25, stored=stored)  # fmt: skip
        if stored is not None:
            assert torch.equal(keys, coarse(keys))  # the keys returned are the stored ones
        st = fitted.fitted_state(held[None, None], coarse(keys)[None], values[None], bias[None],
                                 0.25)  # fmt: skip
        errs[name] = float(((st.out - want.out).norm(dim=-1) / want.out.norm(dim=-1)).mean())
    assert errs["stored"] < 0.5 * errs["float"], errs


def test_values_solve_the_ridge_least_squares_in_any_row_blocks(monkeypatch):
    q, keys = _rand(50, 6, seed=1), _rand(7, 6, seed=2)
    out, bias, prior = _rand(50, 4, seed=3), _rand(7, seed=4), _rand(7, 4, seed=5)
    p = torch.softmax(0.4 * q @ keys.T + bias, -1).double()  # [n, M]
    lam = 0.1 * 50 / 7
    want = torch.linalg.solve(p.T @ p + lam * torch.eye(7, dtype=torch.float64),
                              p.T @ out.double() + lam * prior.double())  # fmt: skip
    monkeypatch.setattr(fitting, "ROW_BLOCK", 8)  # 7 blocks, the last one short
    got = fitting.fit_values(q, out, keys, bias, prior, 0.4, ridge=0.1)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_values_of_states_made_by_known_rows_are_recovered():
    q, keys, values = _rand(200, 6, seed=1), _rand(5, 6, seed=2), _rand(5, 4, seed=3)
    out = torch.softmax(0.5 * q @ keys.T, -1) @ values
    got = fitting.fit_values(q, out, keys, torch.zeros(5), torch.zeros(5, 4), 0.5, ridge=0.0)
    torch.testing.assert_close(got, values, rtol=1e-4, atol=1e-4)


def test_biases_carry_the_mass_of_keys_left_out():
    # every key twice in the prefix: half of them with bias log 2 is the same attention
    q, keys = _rand(300, 6, seed=1), _rand(8, 6, seed=2)
    lse = torch.logsumexp(0.5 * q @ keys.T + math.log(2.0), -1)
    bias = fitting.fit_biases(q, lse, keys, 0.5, steps=300, lr=0.05)
    torch.testing.assert_close(bias, torch.full((8,), math.log(2.0)), rtol=0, atol=0.02)


def test_the_keys_kept_are_those_the_queries_attend_most():
    u = torch.nn.functional.normalize(_rand(6, seed=5), dim=0)
    q = 0.3 * _rand(40, 6, seed=1) + 2 * u
    keys = _rand(10, 6, seed=2)
    keys[3] = 3 * u  # every query's favourite
    mass = fitting.attention_mass(q, keys, 0.5)
    torch.testing.assert_close(mass.sum(), torch.tensor(40.0))
    k_sel, _, _ = fitting.fit_group(keys, _rand(10, 4, seed=3), q, _rand(40, 4, seed=4),
                                   torch.zeros(40), 1, 0.5)  # fmt: skip
    torch.testing.assert_close(k_sel[0], keys[3])


def test_a_fitted_budget_past_the_prefix_or_a_lookup_option_is_a_clear_error(tiny):
    for lookup_only in ({"granularity": "head"}, {"key_mode": "rope_common"}, {"whiten": True},
                        {"lse_correction": True}):  # fmt: skip
        with pytest.raises(ValueError, match="pass entry_state='average'"):
            BuildOptions(**lookup_only)  # the defaults are fitted
        assert BuildOptions(entry_state="average", **lookup_only).entry_state == "average"
    with pytest.raises(ValueError, match="exceeds the prefix's 40 tokens"):
        build_memory(tiny, None, PREFIX, _traces(8, 15, 0), budget=41,
                     options=BuildOptions(**FITTED), progress=False)  # fmt: skip
    built = build_memory(tiny, None, PREFIX, _traces(8, 15, 0), budget=8,
                         options=BuildOptions(**FITTED), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="top_k and lse_correction do not apply"):
        built.to_memory(options=DecodeOptions(top_k=2))


def test_a_fitted_memory_of_the_whole_prefix_decodes_as_the_prefix(tiny):
    traces = _traces(8, 15, 1)
    built = build_memory(tiny, None, PREFIX, traces, budget=len(PREFIX),
                         options=BuildOptions(**FITTED), progress=False)  # fmt: skip
    ids = torch.tensor(_traces(2, 12, 5))
    with bind(tiny, built.to_memory()):
        got = tiny(ids).logits
    with bind(tiny, encode_prefix(tiny, PREFIX)):
        want = tiny(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fitted_shards_round_trip_through_the_server_encoding(tiny):
    built = build_memory(tiny, None, PREFIX, _traces(8, 15, 2), budget=10,
                         options=BuildOptions(entry_state="fitted"), progress=False)  # fmt: skip
    s = built.shards[0]
    assert s.keys.shape == (2, 10, 8) and s.values.shape == (2, 10, 1, 8)
    assert s.bias.shape == (2, 10, 1)
    blobs = [encode_shard(x) for x in built.shards]
    names = sorted(n for n, _ in safetensors.deserialize(blobs[0]))
    assert names == ["bias", "key_scale", "keys", "values"]  # the defaults: float8 keys
    # fitted shards stored before the rows had their own names hold values/biases as out/lse
    older = [
        save_tensors({"keys": x.keys, "key_scale": x.key_scale, "out": x.values, "lse": x.bias},
                     metadata={"memdb.format": "1", **x.metadata})
        for x in built.shards
    ]  # fmt: skip
    mem = built.to_memory()
    ids = torch.tensor(_traces(1, 10, 6))
    with bind(tiny, mem):
        a = tiny(ids).logits
    for stored in (blobs, older):
        again = Memory.from_shards([decode_shard(b) for b in stored])
        assert again.fitted and again.nbytes() == mem.nbytes() == built.nbytes()
        for x, y in zip(again.layers, mem.layers, strict=True):
            assert all(map(torch.equal, x.rows(), y.rows()))
        with bind(tiny, again):
            b = tiny(ids).logits
        torch.testing.assert_close(a, b)


def test_fitted_rows_fit_the_calibration_better_than_the_prefix_cut_to_as_many_tokens(tiny):
    traces = _traces(24, 15, 3)
    calib = calibrate(tiny, None, PREFIX, traces, BuildOptions(**FITTED), progress=False)
    mem = cluster(calib, 10, BuildOptions(**FITTED), progress=False).to_memory()
    cut = calib.prefix_kv.head(10)
    ids = torch.tensor(_traces(4, 12, 7))
    with bind(tiny, calib.prefix_kv):
        want = tiny(ids).logits.log_softmax(-1)
    errs = []
    for source in (mem, cut):
        with bind(tiny, source):
            got = tiny(ids).logits.log_softmax(-1)
        errs.append(float((got - want).abs().mean()))
    assert errs[0] < 0.5 * errs[1], errs


@pytest.mark.parametrize("key_dtype", ["float32", "float8_e4m3fn"])
def test_appending_to_a_fitted_memory_adds_the_chunk_rows_exactly(tiny, key_dtype):
    from memdb_worker.build.append import append_chunk
    from memdb_worker.memory.prefix_kv import PrefixKV
    from memdb_worker.model.prefix import encode_chunk

    opts = BuildOptions(**{**FITTED, "key_dtype": key_dtype})
    built = build_memory(tiny, None, PREFIX, _traces(8, 15, 4), budget=len(PREFIX),
                         options=opts, progress=False)  # fmt: skip
    more = list(range(50, 70))
    app = append_chunk(tiny, None, built.shards, more, progress=False)
    mem = Memory.from_shards(app.shards)
    assert mem.budget == len(PREFIX) + len(more) and mem.token_count == len(PREFIX) + len(more)
    first = encode_prefix(tiny, PREFIX)
    want = PrefixKV.join([first, encode_chunk(tiny, more, list(first.sink_ids), len(PREFIX))])
    assert mem.prefix_length == want.prefix_length
    ids = torch.tensor(_traces(2, 10, 8))
    with bind(tiny, mem):
        got = tiny(ids).logits
    with bind(tiny, want):
        exact = tiny(ids).logits
    tol = 1e-4 if key_dtype == "float32" else 0.1
    torch.testing.assert_close(got, exact, rtol=tol, atol=tol)


def test_a_fitted_memory_adds_the_layers_lse_bias_and_nothing_else(tiny):
    from memdb_worker.memory.keys import LayerQuery, RopeSpec

    built = build_memory(tiny, None, PREFIX, _traces(8, 15, 9), budget=12,
                         options=BuildOptions(**FITTED), progress=False)  # fmt: skip
    mem = built.to_memory()
    q = LayerQuery(layer=1, q=_rand(1, 4, 3, 8, seed=6), positions=torch.arange(3)[None] + 40,
                   scaling=0.35, rope=RopeSpec.from_model(tiny), num_kv_heads=2)  # fmt: skip
    base = mem.prefix_state(q)
    biased = mem.with_options(DecodeOptions(lse_bias=(0.0, 0.7))).prefix_state(q)
    torch.testing.assert_close(biased.lse, base.lse + 0.7)
    torch.testing.assert_close(biased.out, base.out)


def test_a_fitted_memory_of_the_whole_prefix_follows_its_averaged_chunk_mass(tiny):
    # a prefix of 2 chunks with chunk_mass "mean": every row kept is exact attention over both
    # chunks, each weighted 1/2 (memory.PrefixKV.with_chunk_mass)
    opts = BuildOptions(**FITTED, chunk_tokens=24, sink_tokens=4, chunk_mass="mean")
    built = build_memory(tiny, None, PREFIX, _traces(8, 15, 10), budget=len(PREFIX),
                         options=opts, progress=False)  # fmt: skip
    exact = encode_prefix(tiny, PREFIX, chunk_tokens=24, sink_tokens=4)
    assert len(exact.chunk_lengths) == 2
    ids = torch.tensor(_traces(2, 12, 11))
    got = {}
    for name, source in (("memory", built.to_memory()), ("mean", exact.with_chunk_mass("mean")),
                         ("sum", exact)):  # fmt: skip
        with bind(tiny, source):
            got[name] = tiny(ids).logits
    torch.testing.assert_close(got["memory"], got["mean"], rtol=1e-4, atol=1e-4)
    assert (got["mean"] - got["sum"]).abs().max() > 1e-2  # the weighting changes the logits


def test_appending_past_the_context_to_averaged_chunks_weighs_every_chunk_alike(tiny):
    # a prefix of 2 chunks averaged (1/2 each), then text appended past the context: it restarts
    # after the sink as a third chunk and every chunk weighs 1/3, exactly
    from memdb_worker.build.append import append_chunk
    from memdb_worker.memory.prefix_kv import PrefixKV
    from memdb_worker.model.prefix import encode_chunk

    opts = BuildOptions(**FITTED, chunk_tokens=24, sink_tokens=4, chunk_mass="mean")
    built = build_memory(tiny, None, PREFIX, _traces(8, 15, 12), budget=len(PREFIX),
                         options=opts, progress=False)  # fmt: skip
    more = list(range(50, 66))
    app = append_chunk(tiny, None, built.shards, more, chunk_tokens=24, progress=False)
    assert app.metadata["log_mass"] == repr(-math.log(3))
    exact = encode_prefix(tiny, PREFIX, chunk_tokens=24, sink_tokens=4)
    third = encode_chunk(tiny, more, list(exact.sink_ids[:4]))
    want = PrefixKV.join([exact, third], sink_ids=exact.sink_ids).with_chunk_mass("mean")
    assert len(want.chunk_lengths) == 3
    ids = torch.tensor(_traces(2, 10, 13))
    with bind(tiny, Memory.from_shards(app.shards)):
        got = tiny(ids).logits
    with bind(tiny, want):
        ref = tiny(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_chunk_weights_of_an_append_follow_the_memorys_chunk_mass():
    from memdb_worker.build.append import chunk_weights

    mean = {"build_params": '{"chunk_mass": "mean"}'}
    assert chunk_weights({**mean, "log_mass": "0.0"}, True, 1) == pytest.approx(
        (math.log(1 / 2), -math.log(2), -math.log(2)))  # fmt: skip
    two = {**mean, "log_mass": repr(-math.log(2))}
    assert chunk_weights(two, True, 2) == pytest.approx(
        (math.log(2 / 4), -math.log(4), -math.log(4)))  # fmt: skip
    # continuing a chunk at its true positions: the new text weighs as that chunk
    assert chunk_weights(two, False, 1) == pytest.approx((0.0, -math.log(2), -math.log(2)))
    summed = {"build_params": '{"chunk_mass": "sum"}', "log_mass": "0.0"}
    assert chunk_weights(summed, True, 3) == (0.0, 0.0, 0.0)
    assert chunk_weights({}, True, 1) == (0.0, 0.0, 0.0)  # memories from before chunk_mass


@pytest.mark.parametrize("fit_stored_keys", [True, False])
def test_the_builder_fits_to_the_stored_keys_unless_told_not_to(tiny, monkeypatch,
                                                                  fit_stored_keys):  # fmt: skip
    import memdb_worker.build.builder as builder
    from memdb_worker.memory.formats import keys_as_stored

    seen = []

    def spy(*args, stored=None, **kw):
        seen.append(stored)
        return fitting.fit_group(*args, stored=stored, **kw)

    monkeypatch.setattr(builder, "fit_group", spy)
    opts = BuildOptions(key_dtype="float8_e4m3fn", fit_stored_keys=fit_stored_keys)
    build_memory(tiny, None, PREFIX, _traces(4, 10, 13), budget=8, options=opts, progress=False)
    assert seen and all((s is not None) == fit_stored_keys for s in seen)
    if fit_stored_keys:
        k = _rand(3, 8, seed=14)
        torch.testing.assert_close(seen[0](k), keys_as_stored(k, "float8_e4m3fn"), rtol=0, atol=0)


def test_the_builder_warms_the_solver_before_fitting_layers_in_threads(tiny, monkeypatch):
    # torch.linalg.solve sets up its CUDA backend lazily and not thread-safely: the builder's
    # layer threads raced on it on an H200 ("lazy wrapper should be called at most once")
    import threading

    import memdb_worker.build.builder as builder

    calls = []
    monkeypatch.setattr(builder, "_cluster_workers", lambda n: 2)
    monkeypatch.setattr(builder, "warm_solver", lambda dev: calls.append(("warm", dev)))

    def spy(*args, **kw):
        calls.append(("fit", threading.current_thread() is threading.main_thread()))
        return fitting.fit_group(*args, **kw)

    monkeypatch.setattr(builder, "fit_group", spy)
    build_memory(tiny, None, PREFIX, _traces(4, 10, 13), budget=8, progress=False)
    assert calls[0] == ("warm", torch.device("cpu"))  # once, before any fit, in this thread
    assert [c for c in calls if c[0] == "warm"] == [calls[0]]
    assert {c for c in calls[1:]} == {("fit", False)}  # the fits ran in the pool's threads
