"""Compact memory formats: dtypes bit-exact through numpy and shards, fp8 keys with a scale,
kv_group_mean keys, q_mean left out when it is the key, and the bytes as stored."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from memdb.errors import InvalidArgument
from memdb.shards import decode_shard, encode_shard
from memdb_worker.build import BuildOptions, calibrate, cluster
from memdb_worker.memory.formats import (
    FP8_MAX,
    KEY_DTYPES,
    dequantize_keys,
    keys_as_stored,
    kv_bytes,
    memory_bytes,
    quantize_keys,
    to_numpy,
    to_torch,
)
from memdb_worker.memory.keys import LayerQuery
from memdb_worker.memory.memory import Memory, group_key_of, keyspace_from_metadata
from tests.tiny import lookup_options, tiny_llama

VOCAB = 128
M = 12
# float32, one entry per head, with the lse correction's extras (not the builder's defaults)
F32 = dict(granularity="head", key_dtype="float32", out_dtype="float32", lse_correction=True)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float8_e4m3fn"])
def test_to_numpy_and_to_torch_round_trip_bit_exact(dtype):
    t = (torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 7).to(
        getattr(torch, dtype)
    )
    a = to_numpy(t)
    assert a.dtype.name == dtype and a.shape == (3, 5)
    back = to_torch(a)
    assert back.dtype == t.dtype
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_fp8_keys_scale_each_entry_to_the_format_range():
    keys = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1)) * torch.tensor(
        [0.01, 1.0, 300.0]
    ).repeat(2)[:6].view(1, 6, 1)
    keys[1, 2] = 0.0  # an all-zero key keeps scale 1 (no division by zero)
    q, scale = quantize_keys(keys, "float8_e4m3fn")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (2, 6) and scale.dtype == torch.float32
    amax = keys.abs().amax(-1)
    want = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    torch.testing.assert_close(scale, want)
    back = q.float() * scale[..., None]
    # e4m3: 3 mantissa bits, relative rounding error <= 1/16 (values near the row's amax)
    assert ((back - keys).abs() <= keys.abs() / 16 + amax[..., None] * 2**-9).all()
    assert torch.equal(back[1, 2], torch.zeros(16))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn"])
def test_keys_as_stored_are_what_dequantize_reads_back_after_quantize(dtype):
    keys = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2)) * 3
    stored, scale = quantize_keys(keys, dtype)
    back = dequantize_keys(stored, scale)
    assert back.dtype == torch.float32 and back.shape == keys.shape
    assert (scale is None) == (dtype != "float8_e4m3fn")
    want = (
        keys if dtype == "float32" else stored.float() * (1 if scale is None else scale[..., None])
    )
    torch.testing.assert_close(back, want, rtol=0, atol=0)
    torch.testing.assert_close(keys_as_stored(keys, dtype), back, rtol=0, atol=0)
    tol = {"float32": 0, "bfloat16": 2**-8, "float8_e4m3fn": 2**-4}[dtype]
    assert ((back - keys).abs() <= tol * keys.abs() + 1e-6 * keys.abs().amax()).all()


@pytest.fixture(scope="module")
def calib():
    model = tiny_llama(VOCAB)
    g = torch.Generator().manual_seed(3)
    traces = [torch.randint(3, VOCAB, (10,), generator=g).tolist() for _ in range(6)]
    opts = lookup_options(max_records=60, seed=0, lse_correction=True)
    return calibrate(model, None, list(range(3, 40)), traces, opts, progress=False)


def _query(calib, layer=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, calib.num_heads, 3, calib.head_dim, generator=g) * 2
    return LayerQuery(layer, q, torch.tensor([[50, 51, 52]]), 0.25, calib.rope, calib.num_kv_heads)


def _round_trip(built) -> Memory:
    return Memory.from_shards([decode_shard(encode_shard(s)) for s in built.shards])


FORMATS = [
    dict(key_dtype=k, out_dtype=o, granularity=g)
    for k, o, g in [
        ("float32", "float32", "head"),
        ("float16", "float16", "head"),
        ("bfloat16", "bfloat16", "kv_group_mean"),
        ("float8_e4m3fn", "bfloat16", "head"),
        ("float8_e4m3fn", "float16", "kv_group_mean"),
        ("bfloat16", "float32", "kv_group"),
    ]
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "-".join(f.values()))
@pytest.mark.parametrize("store_q_mean", [True, False])
def test_compact_formats_load_through_shards_with_the_spec_shapes_and_bytes(
    calib, fmt, store_q_mean
):
    if not store_q_mean and fmt["granularity"] == "kv_group_mean":
        with pytest.raises(ValueError, match="store_q_mean=False needs"):
            lookup_options(store_q_mean=False, lse_correction=True, **fmt)
        return
    opts = lookup_options(store_q_mean=store_q_mean, lse_correction=True, **fmt)
    built = cluster(calib, M, opts, progress=False)
    h, hkv, d = calib.num_heads, calib.num_kv_heads, calib.head_dim
    i, hg, dk = {"head": (h, 1, d), "kv_group_mean": (hkv, h // hkv, d),
                 "kv_group": (hkv, h // hkv, h // hkv * d)}[fmt["granularity"]]  # fmt: skip
    memory = _round_trip(built)
    for layer in memory.layers:
        assert tuple(layer.keys.shape) == (i, M, dk)
        assert str(layer.keys.dtype) == f"torch.{fmt['key_dtype']}"
        assert tuple(layer.out.shape) == (i, M, hg, d) and tuple(layer.lse.shape) == (i, M, hg)
        assert str(layer.out.dtype) == f"torch.{fmt['out_dtype']}"
        assert (layer.key_scale is not None) == (fmt["key_dtype"] == "float8_e4m3fn")
        for x in ("q_mean", "k_bar"):
            assert (
                layer.extras[x].shape == layer.out.shape
                and layer.extras[x].dtype == layer.out.dtype
            )
    assert sorted(built.shards[0].extras) == sorted(["k_bar"] + ["q_mean"] * store_q_mean)
    assert (built.shards[0].key_scale is not None) == (fmt["key_dtype"] == "float8_e4m3fn")
    want = memory_bytes(num_layers=calib.num_layers, num_groups=i, heads_per_group=hg,
                        key_dim=dk, head_dim=d, budget=M, key_dtype=fmt["key_dtype"],
                        out_dtype=fmt["out_dtype"], q_mean=store_q_mean, k_bar=True)  # fmt: skip
    assert built.nbytes() == memory.nbytes() == want
    assert memory.device_nbytes() >= memory.nbytes()
    # a compact memory holds the float32 memory's entries, up to its rounding
    ref = _round_trip(cluster(calib, M, dataclasses.replace(opts, key_dtype="float32",
                                                           out_dtype="float32", store_q_mean=True),
                              progress=False))  # fmt: skip
    tol = {"float32": 1e-6, "float16": 2**-10, "bfloat16": 2**-7, "float8_e4m3fn": 2**-3}
    for lay, want_lay in zip(memory.layers, ref.layers, strict=True):
        keys = lay.key_values()
        err = (keys - want_lay.keys).abs().amax(-1) / want_lay.keys.abs().amax(-1)
        assert (err <= tol[fmt["key_dtype"]]).all()
        q_tol = tol[fmt["out_dtype"]] if store_q_mean else tol[fmt["key_dtype"]]  # from the key
        for x, y, t in [(lay.out, want_lay.out, tol[fmt["out_dtype"]]),
                        (lay.extras["k_bar"], want_lay.extras["k_bar"], tol[fmt["out_dtype"]]),
                        (lay.extras["q_mean"], want_lay.extras["q_mean"], q_tol)]:  # fmt: skip
            assert ((x.float() - y).abs() <= t * y.abs().amax(-1, keepdim=True) + 1e-6).all()
        assert torch.equal(lay.lse, want_lay.lse)


def test_q_mean_left_out_is_recovered_from_the_keys_exactly(calib):
    with_q = _round_trip(cluster(calib, M, lookup_options(**F32), progress=False))
    without = _round_trip(
        cluster(calib, M, lookup_options(**F32, store_q_mean=False), progress=False)
    )
    for a, b in zip(with_q.layers, without.layers, strict=True):
        assert torch.equal(a.extras["q_mean"], b.extras["q_mean"])
    sa, sb = with_q.prefix_state(_query(calib)), without.prefix_state(_query(calib))
    assert torch.equal(sa.lse, sb.lse) and torch.equal(sa.out, sb.out)
    assert without.nbytes() < with_q.nbytes() == without.device_nbytes()
    assert "q_mean" not in without.to_shards()[0].extras


def test_kv_group_mean_key_is_the_mean_of_the_group_heads_keys(calib):
    opts = lookup_options(**{**F32, "granularity": "kv_group_mean"})
    built = cluster(calib, M, opts, progress=False)
    for s in built.shards:  # written as main's Memory reads it: kv_group, group_key "mean"
        assert (s.metadata["granularity"], s.metadata["group_key"]) == ("kv_group", "mean")
        q_mean = torch.from_numpy(s.extras["q_mean"])  # [I, M, h, d]
        torch.testing.assert_close(torch.from_numpy(s.keys), q_mean.mean(2))
    memory = _round_trip(built)
    assert memory.group_key == "mean" and memory.key_dim == calib.head_dim


def test_shards_of_older_builds_with_granularity_kv_group_mean_load_as_group_key_mean(calib):
    built = cluster(
        calib, M, lookup_options(**{**F32, "granularity": "kv_group_mean"}), progress=False
    )
    old = [dataclasses.replace(s, metadata={**s.metadata, "granularity": "kv_group_mean"})
           for s in built.shards]  # fmt: skip
    for s in old:
        del s.metadata["group_key"]
    now, before = _round_trip(built), Memory.from_shards(old)
    assert before.group_key == "mean" and before.keyspace.granularity == "kv_group"
    ks = keyspace_from_metadata(old[0].metadata, old)  # as remote lookups and append read it
    assert group_key_of(old[0].metadata, ks) == "mean" and ks.key_dim == 2 * calib.head_dim
    sa, sb = now.prefix_state(_query(calib)), before.prefix_state(_query(calib))
    assert torch.equal(sa.lse, sb.lse) and torch.equal(sa.out, sb.out)


def test_shards_refuse_fp8_keys_without_a_scale_and_a_scale_without_fp8(calib):
    built = cluster(calib, M, BuildOptions(), progress=False)  # the defaults: fp8 fitted rows
    s = built.shards[0]
    with pytest.raises(InvalidArgument, match="'key_scale'.*absent"):
        encode_shard(dataclasses.replace(s, key_scale=None))
    with pytest.raises(InvalidArgument, match="'key_scale'.*present"):
        encode_shard(dataclasses.replace(s, keys=s.keys.astype(np.float32)))


def test_kv_bytes_counts_bf16_keys_and_values_of_every_layer():
    # SmolLM2: 30 layers x 3 KV heads x (k, v) x 64 x 2 bytes = 23,040 bytes per token
    assert kv_bytes(num_layers=30, num_kv_heads=3, head_dim=64, tokens=1) == 23_040
    assert kv_bytes(num_layers=30, num_kv_heads=3, head_dim=64, tokens=7150) == 23_040 * 7150


def test_key_dtypes_are_the_shard_key_dtypes():
    from memdb.shards import ALLOWED_DTYPES

    assert [np.dtype(x).name for x in ALLOWED_DTYPES["keys"]] == list(KEY_DTYPES)


@pytest.mark.parametrize("granularity", ["head", "kv_group", "kv_group_mean"])
def test_every_record_its_own_entry_gives_exact_states(calib, granularity):
    from memdb_worker.memory.keys import apply_rope

    n = calib.num_records
    opts = lookup_options(**{**F32, "granularity": granularity})
    memory = _round_trip(cluster(calib, n, opts, progress=False))
    layer, pos = 1, calib.positions[:5]
    cos, sin = calib.rope.cos_sin(pos)
    q = apply_rope(calib.q_pre[layer][:5], cos[:, None], sin[:, None]).transpose(0, 1)[None]
    query = LayerQuery(layer, q, pos[None], calib.prefix_kv.scaling, calib.rope, calib.num_kv_heads)
    got, want = memory.prefix_state(query), calib.prefix_kv.state(layer, q)
    torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.out, want.out, rtol=0, atol=1e-5)


def test_remote_lookups_refuse_the_correction_of_a_memory_without_q_mean(calib):
    from memdb_worker.memory.memory import DecodeOptions
    from memdb_worker.serve.cache import RemoteMemory

    opts = lookup_options(**F32, store_q_mean=False)
    memory = _round_trip(cluster(calib, M, opts, progress=False))
    kw = dict(budget=M, num_layers=memory.num_layers, extras=["k_bar"])
    args = (lambda: None, "m", 1, "fp", memory.keyspace, memory.metadata)
    with pytest.raises(ValueError, match="Lookup does"):
        RemoteMemory(*args, options=DecodeOptions(lse_correction=True), **kw)
    assert not RemoteMemory(*args, **kw).lse_corrected  # default: answers without it


def test_bfloat16_rows_travel_on_the_wire_bit_exact():
    from memdb.wire import decode_tensor, encode_tensor

    a = to_numpy(torch.randn(4, 3, 8).to(torch.bfloat16))
    back = decode_tensor(encode_tensor(a))
    assert back.dtype == a.dtype and np.array_equal(back.view(np.uint16), a.view(np.uint16))
