"""Memory decoding on CUDA (skipped without a GPU): Llama-3.1-8B-shaped layers, random weights."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memdb_worker.attend.attention import bind
from memdb_worker.build.builder import build_memory
from memdb_worker.memory.memory import DecodeOptions
from memdb_worker.model.prefix import encode_prefix
from tests.tiny import lookup_options, reference_options

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

VOCAB = 1024


def _model(dtype, layers=2, **shape):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=shape.get("hidden", 4096),
        intermediate_size=shape.get("inter", 14336),
        num_hidden_layers=layers,
        num_attention_heads=shape.get("heads", 32),
        num_key_value_heads=shape.get("kv", 8),
        head_dim=shape.get("head_dim", 128),
        max_position_embeddings=8192,
        rope_theta=500000.0,
        pad_token_id=0,
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def llama8b_shaped():
    return _model(torch.bfloat16)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, VOCAB, (512,), generator=g).tolist()
    trace = (torch.randperm(VOCAB - 3, generator=g)[:64] + 3).tolist()
    return prefix, trace


def _logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids], device="cuda")).logits[0].float()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_float32_exact_memory_on_cuda(data):
    model = _model(torch.float32, layers=3, hidden=256, inter=512, heads=8, kv=2, head_dim=32)
    prefix, trace = data
    full = _logits(model, prefix + trace)[len(prefix) :]
    built = build_memory(model, None, prefix, [trace], budget=len(trace),
                         options=reference_options(), progress=False)  # fmt: skip
    memory = built.to_memory("cuda")
    assert memory.device.type == "cuda"
    with bind(model, memory):
        got = _logits(model, trace)
    assert float((got - full).abs().max() / full.abs().max()) < 1e-4


def test_bf16_exact_memory_8b_shape(llama8b_shaped, data):
    model = llama8b_shaped
    prefix, trace = data
    full = _logits(model, prefix + trace)[len(prefix) :]
    plain = _logits(model, trace)
    opts = reference_options(granularity="kv_group", key_mode="rope_common", whiten=True)
    built = build_memory(
        model, None, prefix, [trace], budget=len(trace), options=opts, progress=False
    )
    with bind(model, built.to_memory("cuda")):
        got = _logits(model, trace)
    with bind(model, encode_prefix(model, prefix)):
        exact = _logits(model, trace)
    # bf16 rounding only: far closer to full attention than the model without the prefix
    assert _rel(exact, full) < 2e-2 and _rel(got, full) < 2e-2
    assert _rel(plain, full) > 5 * _rel(got, full)


def test_bf16_generate_batch2_with_cache(llama8b_shaped, data):
    model = llama8b_shaped
    prefix, trace = data
    built = build_memory(model, None, prefix, [trace, trace[::-1]], budget=len(trace),
                         options=lookup_options(), progress=False)  # fmt: skip
    memory = built.to_memory("cuda", DecodeOptions(top_k=2))  # top-k: looked-up entries
    p1, p2 = trace[:7], trace[10:22]
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0, 5:], mask[0, 5:] = torch.tensor(p1), 1
    ids[1], mask[1] = torch.tensor(p2), 1
    gen = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    kw = {"output_logits": True, "return_dict_in_generate": True, **gen}
    with torch.inference_mode(), bind(model, memory):
        cached = model.generate(ids.cuda(), attention_mask=mask.cuda(), **kw)
        uncached = model.generate(ids.cuda(), attention_mask=mask.cuda(), use_cache=False, **kw)
    a = torch.stack(cached.logits, 1).float()
    b = torch.stack(uncached.logits, 1).float()
    assert cached.sequences.shape == (2, 17)
    assert _rel(a, b) < 2e-2


def test_kmeans_build_on_cuda(llama8b_shaped, data):
    pytest.importorskip("faiss")
    model = llama8b_shaped
    prefix, trace = data
    built = build_memory(model, None, prefix, [trace, trace[::-1]], budget=16,
                         options=lookup_options(), progress=False)  # fmt: skip
    # the looked-up format: one head-dim key per KV group (8 of them), bf16
    assert built.shards[1].keys.shape == (8, 16, 128)
    assert built.shards[1].keys.dtype.name == "bfloat16"
    with bind(model, built.to_memory("cuda")):
        assert torch.isfinite(_logits(model, trace)).all()


def test_fitted_build_on_cuda(llama8b_shaped, data):
    model = llama8b_shaped
    prefix, trace = data
    built = build_memory(model, None, prefix, [trace, trace[::-1]], budget=16, progress=False)
    # the defaults: 16 fitted rows per KV head (8), float8 keys, bf16 values, a bias per row
    s = built.shards[1]
    assert s.keys.shape == (8, 16, 128) and s.keys.dtype.name == "float8_e4m3fn"
    assert s.values.shape == (8, 16, 1, 128) and s.bias.shape == (8, 16, 1)
    memory = built.to_memory("cuda")
    assert memory.fitted
    plain = _logits(model, trace)
    with bind(model, memory):
        got = _logits(model, trace)
    assert torch.isfinite(got).all() and not torch.equal(got, plain)
