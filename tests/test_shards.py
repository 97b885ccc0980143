"""memdb.shards and memdb.wire: compact dtypes (bf16, fp16, fp8 e4m3 with key_scale), extra
tensor checks, and wire tensors that cannot be decoded."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from memdb.errors import InvalidArgument
from memdb.shards import Shard, check_consistent, decode_shard, encode_shard
from memdb.v1 import memdb_pb2 as pb
from memdb.wire import decode_tensor, encode_tensor

BF16, FP8 = np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn)
G, M, DK, H, D = 2, 8, 4, 2, 3


def torch_tensors(keys=torch.bfloat16, out=torch.bfloat16, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "keys": torch.randn(G, M, DK, generator=g).to(keys),
        "out": torch.randn(G, M, H, D, generator=g).to(out),
        "lse": torch.randn(G, M, H, generator=g),
        "q_mean": torch.randn(G, M, H, D, generator=g).to(torch.bfloat16),
    }
    if keys == torch.float8_e4m3fn:
        t["key_scale"] = torch.rand(G, M, generator=g) + 0.5
    return t


@pytest.mark.parametrize("keys", [torch.float32, torch.float16, torch.bfloat16,
                                  torch.float8_e4m3fn])  # fmt: skip
def test_torch_written_compact_shards_decode_to_the_same_values(keys):
    tensors = torch_tensors(keys=keys)
    blob = safetensors.torch.save(tensors, metadata={"layer": "0"})
    shard = decode_shard(blob)
    assert shard.keys.dtype.name == str(keys).removeprefix("torch.")
    assert shard.out.dtype == BF16 and shard.extras["q_mean"].dtype == BF16
    assert sorted(shard.extras) == ["q_mean"]  # key_scale is not an extra
    expect_keys = tensors["keys"].float()
    if keys == torch.float8_e4m3fn:
        expect_keys = expect_keys * tensors["key_scale"][..., None]
    np.testing.assert_array_equal(shard.float_keys(), expect_keys.numpy())
    np.testing.assert_array_equal(shard.out.astype(np.float32), tensors["out"].float().numpy())
    again = decode_shard(encode_shard(shard))  # encode_shard is decode_shard's inverse
    for name in ("keys", "out", "lse"):
        a, b = getattr(again, name), getattr(shard, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert again.extras["q_mean"].tobytes() == shard.extras["q_mean"].tobytes()
    assert (again.key_scale is None) == (shard.key_scale is None)


def test_fp8_keys_need_key_scale_and_only_they_have_one():
    t = torch_tensors(keys=torch.float8_e4m3fn)
    with pytest.raises(InvalidArgument, match="need a float32 'key_scale'.*absent"):
        decode_shard(safetensors.torch.save({k: v for k, v in t.items() if k != "key_scale"}))
    t16 = torch_tensors(keys=torch.float16)
    with pytest.raises(InvalidArgument, match="key_scale.*present"):
        decode_shard(safetensors.torch.save({**t16, "key_scale": torch.ones(G, M)}))
    with pytest.raises(InvalidArgument, match=r"'key_scale' has shape \[2, 7\]"):
        decode_shard(safetensors.torch.save({**t, "key_scale": torch.ones(G, M - 1)}))


@pytest.mark.parametrize(
    "name, tensor, message",
    [
        ("out", torch.zeros(G, M, H, D, dtype=torch.float8_e4m3fn), "'out' has dtype float8"),
        ("keys", torch.zeros(G, M, DK, dtype=torch.float8_e5m2), "'keys' has dtype float8_e5m2"),
        ("lse", torch.zeros(G, M, H, dtype=torch.bfloat16), "'lse' has dtype bfloat16"),
        ("k_bar", torch.zeros(G, M, DK, dtype=torch.float64), "'k_bar' has dtype float64"),
        ("k_bar", torch.zeros(G, M - 1, DK), r"'k_bar' has shape \[2, 7, 4\], expected \[2, 8"),
        ("k_bar", torch.zeros(G), r"'k_bar' has shape \[2\], expected"),
        ("k_bar", torch.zeros(G, M, 2, dtype=torch.complex64), "dtype C64"),
    ],
)
def test_bad_dtypes_and_extra_shapes_are_invalid_argument(name, tensor, message):
    blob = safetensors.torch.save({**torch_tensors(), name: tensor})
    with pytest.raises(InvalidArgument, match=message):
        decode_shard(blob)


def shard_with(extras: dict[str, np.ndarray]) -> Shard:
    rng = np.random.default_rng(0)
    return Shard(
        keys=rng.standard_normal((G, M, DK)).astype(np.float32),
        out=rng.standard_normal((G, M, H, D)).astype(BF16),
        lse=rng.standard_normal((G, M, H)).astype(np.float32),
        extras=extras,
    )


def test_extras_must_agree_across_layers():
    a = shard_with({"k_bar": np.zeros((G, M, DK), np.float32)})
    b = shard_with({"k_bar": np.zeros((G, M, DK + 1), np.float32)})
    c = shard_with({"k_bar": np.zeros((G, M, DK), np.float16)})
    assert check_consistent([a, a]).budget == M
    with pytest.raises(
        InvalidArgument, match=r"layer 1: extra tensor 'k_bar' is float32 \[2, 8, 5"
    ):
        check_consistent([a, b])
    with pytest.raises(InvalidArgument, match="layer 1: extra tensor 'k_bar' is float16"):
        check_consistent([a, c])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16, FP8, np.int64])
def test_wire_tensors_round_trip_in_their_dtype(dtype):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4).astype(dtype)
    t = encode_tensor(a)
    back = decode_tensor(t)
    assert t.dtype == np.dtype(dtype).name and back.dtype == a.dtype
    assert back.tobytes() == a.tobytes() and back.shape == a.shape


@pytest.mark.parametrize(
    "shape, data, message",
    [
        ([2**62, 4], b"", "needs 73786976294838206464 bytes, got 0"),  # overflows int64
        ([2**40, 2**40, 2**40], b"", "needs .* bytes, got 0"),
        ([1] * 65, b"\0" * 4, "65 dimensions, at most 8"),
        ([1] * 9, b"\0" * 4, "9 dimensions, at most 8"),
    ],
)
def test_wire_shapes_that_overflow_or_have_too_many_dims_are_invalid(shape, data, message):
    with pytest.raises(InvalidArgument, match=message):
        decode_tensor(pb.Tensor(dtype="float32", shape=shape, data=data), name="queries")


def test_per_layer_whitening_tensors_have_any_shape_and_are_not_entry_extras():
    t = torch_tensors()
    t["whiten"] = torch.eye(DK).expand(3, DK, DK).contiguous()  # [H, d, d]: H != G
    t["whiten_mean"] = torch.zeros(3, DK)
    shard = decode_shard(safetensors.torch.save(t))
    assert sorted(shard.extras) == ["q_mean", "whiten", "whiten_mean"]
    assert shard.entry_extras == ["q_mean"]
    other = decode_shard(safetensors.torch.save({**t, "whiten": torch.zeros(2, DK, DK)}))
    with pytest.raises(InvalidArgument, match="layer 1: extra tensor 'whiten'"):
        check_consistent([shard, other])


def fitted_rows(seed=0) -> Shard:
    """A layer of fitted rows: G KV heads of M rows, one head each (h = 1)."""
    rng = np.random.default_rng(seed)
    return Shard.of_rows(
        keys=rng.standard_normal((G, M, D)).astype(np.float32),
        values=rng.standard_normal((G, M, 1, D)).astype(BF16),
        bias=rng.standard_normal((G, M, 1)).astype(np.float32),
        metadata={"entry_state": "fitted", "layer": "0"},
    )


def test_fitted_rows_are_stored_as_keys_values_bias_and_round_trip():
    rows = fitted_rows()
    blob = encode_shard(rows)
    stored = safetensors.deserialize(blob)
    assert sorted(name for name, _ in stored) == ["bias", "keys", "values"]
    again = decode_shard(blob)
    assert not again.extras and again.tensor_names == ("keys", "values", "bias")
    for name in ("keys", "values", "bias"):
        a, b = getattr(again, name), getattr(rows, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    # looked-up entries keep (keys, out, lse); an entry shard needs them by those names
    entries = shard_with({})
    assert sorted(n for n, _ in safetensors.deserialize(encode_shard(entries))) == [
        "keys", "lse", "out"
    ]  # fmt: skip
    as_entries = {k: torch.from_numpy(v.astype(np.float32)) for k, v in
                  (("keys", rows.keys), ("values", rows.values), ("bias", rows.bias))}  # fmt: skip
    with pytest.raises(InvalidArgument, match="required tensor 'out' is missing"):
        decode_shard(safetensors.torch.save(as_entries))  # no entry_state "fitted"


def test_fitted_rows_stored_under_the_older_out_lse_names_decode_the_same():
    rows = fitted_rows(seed=1)
    older = safetensors.numpy.save(
        {"keys": rows.keys, "out": rows.values.astype(np.float32), "lse": rows.bias},
        metadata={"memdb.format": "1", **rows.metadata},
    )
    got = decode_shard(older)
    assert not got.extras and got.metadata["entry_state"] == "fitted"
    np.testing.assert_array_equal(got.values, rows.values.astype(np.float32))
    np.testing.assert_array_equal(got.bias, rows.bias)
    assert sorted(n for n, _ in safetensors.deserialize(encode_shard(got))) == [
        "bias", "keys", "values"
    ]  # fmt: skip
    with pytest.raises(InvalidArgument, match="tensor 'bias' has shape"):
        encode_shard(Shard.of_rows(rows.keys, rows.values, rows.bias[:, :1], rows.metadata))
