"""The builder (tiny random Llama, then the real SmolLM2) and the model fingerprint."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from memdb.shards import check_consistent, decode_shard, encode_shard
from memdb_worker.build import BuildOptions, build_memory, calibrate, cluster
from memdb_worker.model.loading import model_fingerprint
from memdb_worker.model.scoring import score_continuations
from tests.tiny import lookup_options, random_traces, small_llama

VOCAB = 128


@pytest.fixture(scope="module")
def tiny():
    return small_llama()


def _traces(n, length, seed):
    return random_traces(n, length, seed, VOCAB)


PREFIX = list(range(3, 43))


def test_budget_larger_than_calibration_or_prefix_is_a_clear_error(tiny):
    # looked-up entries: at most one per calibration token
    with pytest.raises(ValueError, match="exceeds the 20 calibration tokens"):
        build_memory(tiny, None, PREFIX, _traces(2, 10, 0), budget=21, options=lookup_options(),
                     progress=False)  # fmt: skip
    # fitted rows (the defaults): at most one per prefix token
    with pytest.raises(ValueError, match="exceeds the prefix's 40 tokens"):
        build_memory(tiny, None, PREFIX, _traces(2, 10, 0), budget=41, progress=False)
    with pytest.raises(ValueError, match="no calibration traces"):
        build_memory(tiny, None, PREFIX, [[]], budget=1, progress=False)


def _same(a, b):
    return all(
        np.array_equal(x.keys, y.keys)
        and np.array_equal(x.out, y.out)
        and np.array_equal(x.lse, y.lse)
        for x, y in zip(a.shards, b.shards, strict=True)
    )


# the builder's defaults (fitted rows) and looked-up entries (k-means clusters)
ENTRY_FORMATS = pytest.mark.parametrize("fmt", [{}, {"entry_state": "average"}],
                                        ids=["fitted", "average"])  # fmt: skip


@ENTRY_FORMATS
def test_builder_is_deterministic_for_a_seed(tiny, fmt):
    traces = _traces(12, 15, 1)
    opts = BuildOptions(max_records=100, max_tokens_per_trace=12, seed=3, trace_batch_size=5,
                        **fmt)  # fmt: skip
    a = build_memory(tiny, None, PREFIX, traces, budget=16, options=opts, progress=False)
    b = build_memory(tiny, None, PREFIX, traces, budget=16, options=opts, progress=False)
    other = dataclasses.replace(opts, seed=4)
    c = build_memory(tiny, None, PREFIX, traces, budget=16, options=other, progress=False)
    assert _same(a, b) and a.metadata == b.metadata
    assert not _same(a, c)


@ENTRY_FORMATS
def test_layers_clustered_in_parallel_equal_one_at_a_time(tiny, monkeypatch, fmt):
    from memdb_worker.build import builder

    traces = _traces(12, 15, 1)
    opts = BuildOptions(max_records=100, max_tokens_per_trace=12, seed=3, trace_batch_size=5,
                        **fmt)  # fmt: skip
    calib = calibrate(tiny, None, PREFIX, traces, opts, progress=False)
    monkeypatch.setattr(builder, "_cluster_workers", lambda n: 1)
    serial = cluster(calib, 16, opts, progress=False)
    monkeypatch.setattr(builder, "_cluster_workers", lambda n: 3)
    parallel = cluster(calib, 16, opts, progress=False)
    assert _same(serial, parallel) and serial.metadata == parallel.metadata


def test_reservoir_caps_records_and_shards_validate(tiny):
    traces = _traces(10, 20, 2)
    calib = calibrate(
        tiny,
        None,
        PREFIX,
        traces,
        BuildOptions(max_records=50, max_tokens_per_trace=8),
        progress=False,
    )
    assert calib.num_records == 50 and calib.trace_tokens == 200
    assert calib.q_pre[0].shape == (50, 4, 8) and calib.lse[1].shape == (50, 4)
    assert (calib.positions >= len(PREFIX)).all() and (calib.positions < len(PREFIX) + 20).all()
    for opts, (i, h, dk) in [
        (BuildOptions(), (2, 1, 8)),  # the defaults: fitted rows per KV head
        (lookup_options(), (2, 2, 8)),  # looked-up entries: kv_group_mean
        (lookup_options(granularity="head"), (4, 1, 8)),
        (
            lookup_options(granularity="kv_group", key_dtype="float16", out_dtype="float16"),
            (2, 2, 16),
        ),
        (
            lookup_options(granularity="layer", entry_state="centroid", lse_correction=True),
            (1, 4, 32),
        ),
        (lookup_options(key_mode="rope_common", whiten=True, granularity="head"), (4, 1, 8)),
    ]:
        built = cluster(calib, 12, opts, progress=False)
        shape = check_consistent(built.shards)
        assert (shape.num_groups, shape.budget, shape.heads_per_group, shape.key_dim) == (
            i,
            12,
            h,
            dk,
        )
        blobs = [encode_shard(s) for s in built.shards]  # validates dtypes and finiteness
        again = decode_shard(blobs[1])
        assert again.metadata["layer"] == "1" and again.metadata["budget"] == "12"
        assert again.metadata["entry_state"] == opts.entry_state
        params = json.loads(again.metadata["build_params"])
        assert params["granularity"] == opts.granularity and params["calibration_records"] == 50
        # the defaults' keys are float8 with a float32 scale per row [I, M]
        fp8 = opts.key_dtype == "float8_e4m3fn"
        assert (again.keys.dtype.name == "float8_e4m3fn") == fp8
        assert (again.key_scale.shape if fp8 else again.key_scale) == ((i, 12) if fp8 else None)


def test_fingerprint_is_stable_across_loads_and_sees_a_changed_weight(tiny, tmp_path):
    fp = model_fingerprint(tiny)
    assert fp.startswith("sha256:") and fp == model_fingerprint(tiny)
    tiny.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert model_fingerprint(loaded) == fp
    assert model_fingerprint(loaded.to(torch.bfloat16)) == fp  # dtype-independent
    changed = copy.deepcopy(tiny)
    with torch.no_grad():
        changed.model.layers[1].mlp.up_proj.weight[3, 5] += 0.01
    assert model_fingerprint(changed) != fp


# -- the real model -------------------------------------------------------------------------------

SECRET_PREFIX = (
    "Remember this: the password is zebra. Whenever someone asks for the password, "
    "the answer is zebra.\n" + "Q: What is the password? A: zebra\n" * 6
)
SECRET_TRACES = [
    "Q: What is the password? A: zebra\n",
    "Q: Tell me the password. A: zebra\n",
    "Q: Which word is the password? A: zebra\n",
    "Q: Password, please? A: zebra\n",
    "Q: What was the password again? A: zebra\n",
]


@pytest.fixture(scope="module")
def smol_built(smollm2):
    model, tok = smollm2
    return build_memory(model, tok, SECRET_PREFIX, SECRET_TRACES, budget=16, progress=False)


@pytest.mark.model
def test_smollm2_shards_have_the_model_shapes(smollm2, smol_built):
    model, _ = smollm2
    assert len(smol_built.shards) == 30
    for s in smol_built.shards:
        # the defaults: 16 fitted rows per KV head (3): float8 keys with a float32 scale per
        # row, bfloat16 values, a float32 bias per row (lse)
        assert s.keys.shape == (3, 16, 64) and s.keys.dtype.name == "float8_e4m3fn"
        assert s.key_scale.shape == (3, 16) and s.key_scale.dtype.name == "float32"
        assert s.out.shape == (3, 16, 1, 64) and s.lse.shape == (3, 16, 1)
        assert s.out.dtype.name == "bfloat16" and not s.extras
        assert np.isfinite(s.out.astype(np.float32)).all() and np.isfinite(s.lse).all()
    meta = smol_built.metadata
    assert meta["model_fingerprint"] == model_fingerprint(model)
    assert meta["entry_state"] == "fitted" and meta["key_mode"] == "pre_rope"
    assert meta["granularity"] == "kv_group" and meta["group_key"] == "mean"
    assert smol_built.token_count == int(meta["prefix_length"]) > 50


@pytest.mark.model
def test_smollm2_memory_moves_the_output_toward_the_prefix(smollm2, smol_built):
    model, tok = smollm2
    ctx = tok("Q: What is the secret password? A:", add_special_tokens=False).input_ids
    words = [" zebra", " apple", " banana"]
    conts = [tok(w, add_special_tokens=False).input_ids for w in words]
    plain = score_continuations(model, ctx, conts)
    mem = score_continuations(model, ctx, conts, smol_built.to_memory())
    # without the prefix the model has no reason to say zebra; with the memory it must
    assert int(plain.argmax()) != 0
    assert int(mem.argmax()) == 0
    assert mem[0] - plain[0] > 5.0


@pytest.mark.model
def test_smollm2_kv_group_build(smollm2):
    model, tok = smollm2
    opts = lookup_options(granularity="kv_group", key_mode="rope_common", whiten=True)
    built = build_memory(
        model, tok, SECRET_PREFIX, SECRET_TRACES[:2], budget=8, options=opts, progress=False
    )
    s = built.shards[7]
    assert s.keys.shape == (3, 8, 192) and s.out.shape == (3, 8, 3, 64) and s.lse.shape == (3, 8, 3)
    assert s.extras["whiten"].shape == (9, 64, 64)


def test_more_centroids_than_distinct_queries_leaves_no_empty_entry(tiny):
    trace = _traces(1, 10, 5)[0]
    calib = calibrate(tiny, None, PREFIX, [trace] * 5, progress=False)  # 50 records, 10 distinct
    built = cluster(calib, 20, lookup_options(seed=1, granularity="head"), progress=False)
    for layer, s in enumerate(built.shards):
        encode_shard(s)  # finite everywhere
        distinct = calib.lse[layer][:10]  # [10, H]; records repeat every 10
        lse = torch.from_numpy(s.lse[:, :, 0])  # [I, M]; head granularity: group i = head i
        # an entry's lse is a log-mean-exp of members' lse: within their range
        assert (lse <= distinct.max(0).values[:, None] + 1e-5).all()
        assert (lse >= distinct.min(0).values[:, None] - 1e-5).all()
    assert json.loads(built.metadata["build_params"])["max_records"] == calib.options.max_records
