"""Fitted-row decode attention (worker/memdb_worker/attend/fitted_rows.py) against the reference.

On CPU: the torch form (`fitted_reference`) is one softmax over [rows ; live] with the rows'
biases added (float64, by hand), ragged heads included; the Triton kernels under Triton's
interpreter equal `fitted_state` + `merge_states` for bias extremes, M = 1, an empty live
context, ragged heads and batches that share the rows (one and two chunks of folded queries);
the builder's default memory is taken by `fused.supports`, a memory the kernels cannot take is
refused with one logged reason. On CUDA (skipped without a GPU): the kernels at the 8B shape,
and decoding through `bind` and the static decoder with the kernels gives the reference's
logits.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext

import pytest
import torch

from memdb_worker.attend import fitted_rows, fused, fused_kernels
from memdb_worker.memory.formats import quantize_keys
from memdb_worker.memory.keys import KeySpace, RopeSpec
from memdb_worker.memory.memory import KEY_SCALE, DecodeOptions, Memory, layer_from_tensors
from tests.interpreter import run_interpreted

HAS_CUDA = torch.cuda.is_available()


def make_rows(counts=(7, 7), d=32, key_dtype=torch.float8_e4m3fn, value_dtype=torch.float16,
              bias_scale=1.0, seed=0, device="cpu"):  # fmt: skip
    """Random fitted rows, `counts[g]` rows for KV head g, as the builder stores them (keys
    quantized per row, float32 biases)."""
    g = torch.Generator().manual_seed(seed)
    heads = []
    for m in counts:
        keys, scale = quantize_keys(torch.randn(1, m, d, generator=g) * 2, key_dtype)
        bias = torch.randn(m, generator=g) * bias_scale
        values = torch.randn(m, d, generator=g).to(value_dtype)
        heads.append((keys[0].to(device), None if scale is None else scale[0].to(device),
                      values.to(device), bias.to(device)))  # fmt: skip
    return fitted_rows.rows_of_heads(heads)


def make_live(batch=3, heads=8, kv_heads=2, d=32, live=11, mask=True, dtype=torch.float16,
              seed=1, device="cpu"):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, d, generator=g)
    k = torch.randn(batch, kv_heads, live, d, generator=g)
    v = torch.randn(batch, kv_heads, live, d, generator=g)
    m = None
    if mask and live:
        m = torch.rand(batch, live, generator=g) > 0.3
        m[:, -1] = True
    t = lambda x: x.to(dtype).to(device)  # noqa: E731
    return t(q), t(k), t(v), (None if m is None else m.to(device))


def one_softmax(q, k, v, mask, rows, scale, lse_bias=0.0):
    """[B, 1, H, d] float64: one softmax per head over its KV head's rows (logits plus biases
    plus lse_bias) and the live keys (masked ones left out)."""
    b, h, _, d = q.shape
    g = h // rows.kv_heads
    out = torch.zeros(b, h, d, dtype=torch.float64)
    for hq in range(h):
        keys, values, bias = (x.double() for x in rows.head(hq // g))
        lk, lv = k[:, hq // g].double(), v[:, hq // g].double()  # [B, N, d]
        qd = q[:, hq, 0].double()  # [B, d]
        s_rows = scale * qd @ keys.T + bias + lse_bias  # [B, M]
        s_live = scale * torch.einsum("bd,bnd->bn", qd, lk)
        if mask is not None:
            s_live = s_live.masked_fill(~mask, -math.inf)
        p = torch.cat([s_rows, s_live], 1).softmax(-1)
        out[:, hq] = torch.einsum("bm,bmd->bd", p, torch.cat([values.expand(b, -1, -1), lv], 1))
    return out.unsqueeze(1)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("counts,live", [((7, 7), 11), ((5, 0, 17, 1), 11), ((1, 1), 0)])
def test_torch_form_is_one_softmax_over_rows_with_bias_then_live(counts, live):
    hkv = len(counts)
    rows = make_rows(counts, value_dtype=torch.float32, bias_scale=3.0)
    q, k, v, m = make_live(heads=4 * hkv, kv_heads=hkv, live=live, dtype=torch.float32)
    got = fitted_rows.fitted_reference(q, k, v, m, rows, 0.2, lse_bias=0.5)
    want = one_softmax(q, k, v, m, rows, 0.2, lse_bias=0.5)
    assert got.shape == (3, 1, 4 * hkv, 32)
    assert _rel(got, want) < 1e-5
    if not live:  # one row per head and no live key: the answer is that row's value
        return
    # the biases matter: without them the answer is far off
    flat = fitted_rows.FittedRows(rows.keys, rows.key_scale, rows.values, rows.bias * 0,
                                  rows.offsets, rows.counts)  # fmt: skip
    assert _rel(fitted_rows.fitted_reference(q, k, v, m, flat, 0.2), want) > 0.05


def fitted_memory(key_dtype=torch.float8_e4m3fn, value_dtype=torch.bfloat16, budget=9, layers=2,
                  heads=8, kv_heads=2, d=32, options=None, seed=0) -> Memory:  # fmt: skip
    """A random fitted memory in the builder's layout (keys [Hkv, M, d], values [Hkv, M, 1, d],
    biases [Hkv, M, 1])."""
    g = torch.Generator().manual_seed(seed)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ks = KeySpace("pre_rope", "kv_group", heads, kv_heads, d, rope=RopeSpec(inv, 1.0))
    lays = []
    for _ in range(layers):
        keys, scale = quantize_keys(torch.randn(kv_heads, budget, d, generator=g), key_dtype)
        extras = {} if scale is None else {KEY_SCALE: scale}
        values = torch.randn(kv_heads, budget, 1, d, generator=g).to(value_dtype)
        bias = torch.randn(kv_heads, budget, 1, generator=g)
        lays.append(layer_from_tensors(keys, values, bias, extras))
    meta = {"entry_state": "fitted", "group_key": "mean", "prefix_length": "20"}
    return Memory(lays, ks, meta, options)


def test_the_builders_fitted_rows_are_taken_and_other_rows_refused_with_one_reason(caplog):
    mem = fitted_memory()
    assert fitted_rows.check(mem) == [] and fused.supports(mem)
    rows = fitted_rows.prepare(mem, 1)
    assert fitted_rows.prepare(mem, 1) is rows and rows.counts == (9, 9)
    assert rows.keys.dtype == torch.float8_e4m3fn and rows.key_scale is not None
    # float32 keys do not fit the kernels: the reference path, one reason logged once
    f32 = fitted_memory(key_dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="memdb_worker.attend.fused"):
        assert not fused.supports(f32) and not fused.supports(f32)
    said = [r for r in caplog.records if "fitted" in r.getMessage()]
    assert len(said) == 1 and "float32" in said[0].getMessage(), caplog.text


_INTERPRETER = r"""
import math
import torch
from test_worker_fitted_kernel import make_rows, make_live, _rel
from memdb_worker.attend.fitted_rows import fitted_attention, fitted_reference
from memdb_worker.attend.shared_prefix import SharedConfig
from memdb_worker.memory.fitted import fitted_state
from memdb_worker.memory.state import attention_state, merge_states

def pinned(q, k, v, m, rows, scale, lse_bias=0.0):
    # fitted_state on uniform rows ([Hkv, M, d]) merged with the live state, as Memory does
    hkv, d = rows.kv_heads, q.shape[-1]
    keys = torch.stack([rows.head(g)[0] for g in range(hkv)])
    values = torch.stack([rows.head(g)[1] for g in range(hkv)])
    bias = torch.stack([rows.head(g)[2] for g in range(hkv)])
    st = fitted_state(q, keys, values, bias, scale)
    m4 = None if m is None else m.view(m.shape[0], 1, 1, -1)
    merged = merge_states(attention_state(q, k, v, scale, m4),
                          type(st)(st.out, st.lse + lse_bias))
    return merged.out.to(q.dtype).transpose(1, 2)

cfg = SharedConfig(block_n=16, prefix_programs_per_sm=1)
cases = [
    # (counts, batch, live, mask, q dtype, value dtype, bias scale, lse_bias)
    ((37, 37), 3, 11, True, torch.float16, torch.bfloat16, 1.0, 0.0),   # the builder's dtypes
    ((1, 1), 1, 5, False, torch.float32, torch.float16, 1.0, 0.3),      # M = 1
    ((20, 20), 2, 0, False, torch.float16, torch.float16, 1.0, 0.0),    # empty live context
    ((24, 24), 3, 7, True, torch.float16, torch.float16, 40.0, -2.0),   # bias extremes
    ((40, 40), 40, 3, True, torch.float16, torch.float16, 1.0, 0.0),    # 40 rows: two chunks
]
for counts, batch, live, mask, dt, vdt, bs, lb in cases:
    rows = make_rows(counts, value_dtype=vdt, bias_scale=bs, seed=batch)
    q, k, v, m = make_live(batch=batch, live=live, mask=mask, dtype=dt, seed=live)
    got = fitted_attention(q, k, v, m, rows, 32 ** -0.5, lb, cfg)
    want = pinned(q, k, v, m, rows, 32 ** -0.5, lb)
    assert got.shape == want.shape and got.dtype == want.dtype
    err = _rel(got, want)
    assert err < 3e-3, (counts, batch, live, err)
# rows of -inf bias are left out; a head whose every row has -inf bias answers from live only
rows = make_rows((16, 16), seed=5)
rows.bias[3:9] = -math.inf
rows.bias[16:] = -math.inf
q, k, v, m = make_live(batch=2, live=6, dtype=torch.float32)
got = fitted_attention(q, k, v, m, rows, 32 ** -0.5, 0.0, cfg)
assert torch.isfinite(got).all()
assert _rel(got, fitted_reference(q, k, v, m, rows, 32 ** -0.5)) < 1e-4
# ragged heads: different numbers of rows per KV head (one with none), no padding
rows = make_rows((5, 0, 33, 2), seed=7)
q, k, v, m = make_live(batch=3, heads=16, kv_heads=4, live=9, dtype=torch.float16)
got = fitted_attention(q, k, v, m, rows, 32 ** -0.5, 0.1, cfg)
assert _rel(got, fitted_reference(q, k, v, m, rows, 32 ** -0.5, 0.1)) < 3e-3
print("OK")
"""


@pytest.mark.skipif(not fused_kernels.HAVE_TRITON, reason="needs triton")
def test_kernels_under_triton_interpreter_equal_fitted_state_merged_with_live():
    run_interpreted(_INTERPRETER)


_INTERPRETER_BUILD = r"""
# what the builder writes by default (fitted rows: float8 keys + scale, bfloat16 values, float32
# biases), through shards, in the kernels, against the worker's reference path
import torch
from memdb.shards import decode_shard, encode_shard
from memdb_worker.attend import fitted_rows, fused
from memdb_worker.build import BuildOptions, calibrate, cluster
from memdb_worker.memory.keys import LayerQuery
from memdb_worker.memory.memory import DecodeOptions, Memory
from memdb_worker.memory.state import attention_state, merge_states
from test_worker_fitted_kernel import make_live, _rel
from tiny import tiny_llama

model = tiny_llama(128)
g = torch.Generator().manual_seed(3)
traces = [torch.randint(3, 128, (10,), generator=g).tolist() for _ in range(6)]
calib = calibrate(model, None, list(range(3, 40)), traces, BuildOptions(max_records=60, seed=0),
                  progress=False)
built = cluster(calib, 24, BuildOptions(), progress=False)
mem = Memory.from_shards([decode_shard(encode_shard(s)) for s in built.shards],
                         options=DecodeOptions(lse_bias=0.25))
lay = mem.layers[0]
assert mem.fitted and lay.keys.dtype == torch.float8_e4m3fn and lay.out.dtype == torch.bfloat16
assert fused.supports(mem)
ks = mem.keyspace
for layer in range(mem.num_layers):
    q, k, v, m = make_live(batch=3, heads=ks.num_heads, kv_heads=ks.num_kv_heads,
                           d=ks.head_dim, live=8, dtype=torch.float16, seed=layer)
    scale = ks.head_dim ** -0.5
    lq = LayerQuery(layer, q, torch.full((3, 1), 40), scale, ks.rope, ks.num_kv_heads)
    live = attention_state(q, k, v, scale, m.view(3, 1, 1, -1))
    want = merge_states(live, mem.prefix_state(lq)).out.to(q.dtype).transpose(1, 2)
    got = fitted_rows.fitted_attention(q, k, v, m, fitted_rows.prepare(mem, layer), scale,
                                       fused.lse_bias(mem, layer))
    assert _rel(got, want) < 3e-3, (layer, _rel(got, want))
print("OK")
"""


@pytest.mark.skipif(not fused_kernels.HAVE_TRITON, reason="needs triton")
def test_kernels_read_the_builders_default_memory_under_triton_interpreter():
    run_interpreted(_INTERPRETER_BUILD)


cuda = pytest.mark.skipif(not (HAS_CUDA and fused.HAVE_TRITON), reason="needs CUDA and Triton")


@cuda
@pytest.mark.parametrize("counts", [(4096,) * 8, (1,) * 8, (300, 0, 4096, 17, 1, 900, 64, 2)])
@pytest.mark.parametrize("batch,live,mask", [(1, 512, False), (8, 64, True), (33, 0, False)])
def test_kernels_on_cuda_8b_shape(counts, batch, live, mask):
    rows = make_rows(counts, d=128, value_dtype=torch.bfloat16, bias_scale=2.0, device="cuda")
    q, k, v, m = make_live(batch=batch, heads=32, kv_heads=8, d=128, live=live, mask=mask,
                           dtype=torch.bfloat16, device="cuda")  # fmt: skip
    got = fitted_rows.fitted_attention(q, k, v, m, rows, 128**-0.5, 0.2)
    want = fitted_rows.fitted_reference(q, k, v, m, rows, 128**-0.5, 0.2)
    torch.cuda.synchronize()
    assert got.shape == want.shape and torch.isfinite(got.float()).all()
    assert _rel(got, want) < 1e-2


@cuda
def test_kernels_are_captured_in_a_cuda_graph():
    rows = make_rows((1000,) * 8, d=128, value_dtype=torch.bfloat16, device="cuda")
    q, k, v, m = make_live(batch=8, heads=32, kv_heads=8, d=128, live=64, dtype=torch.bfloat16,
                           device="cuda")  # fmt: skip
    fn = lambda: fitted_rows.fitted_attention(q, k, v, m, rows, 128**-0.5)  # noqa: E731
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert _rel(out, fitted_rows.fitted_reference(q, k, v, m, rows, 128**-0.5)) < 1e-2


@cuda
def test_bind_and_the_static_decoder_decode_fitted_rows_with_the_kernels():
    from memdb_worker.attend import attention
    from memdb_worker.attend.decode_step import StaticDecoder
    from tests.tiny import tiny_llama

    model = tiny_llama(128).cuda()
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    mem = fitted_memory(heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, d=d,
                        layers=cfg.num_hidden_layers, budget=50,
                        options=DecodeOptions(lse_bias=0.1))  # fmt: skip
    mem = Memory([_to_cuda(lay) for lay in mem.layers], mem.keyspace, mem.metadata, mem.options)
    assert fused.supports(mem)
    ids = torch.tensor([[5, 9, 17, 33, 2]], device="cuda")
    calls = []
    real = fitted_rows.fitted_attention

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    logits = {}
    for name, on in (("fused", True), ("reference", False)):
        fitted_rows.fitted_attention = spy
        try:
            with fused.disabled() if not on else nullcontext(), attention.bind(model, mem):
                out = model(ids, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                logits[name] = model(nxt, past_key_values=out.past_key_values).logits[:, -1]
        finally:
            fitted_rows.fitted_attention = real
        if on:
            assert calls, "the decode step did not take the fitted kernels"
    assert _rel(logits["fused"], logits["reference"]) < 1e-3
    dec = StaticDecoder(model, 2, 16, mem)
    ref = StaticDecoder(model, 2, 16, mem, use_fused=False)
    for d_ in (dec, ref):
        d_.set_tokens([0, 1], d_.prefill([0, 1], [[5, 9, 17], [4, 4, 8, 1]]).argmax(-1).tolist())
    assert dec.attention.path == "fitted_kernel" and ref.attention.path == "states"
    assert torch.equal(dec.step(2, graphed=True).clone(), ref.step(2))


def _to_cuda(lay):
    from memdb_worker.memory.memory import MemoryLayer

    return MemoryLayer(
        lay.keys.cuda(),
        lay.inv_norm.cuda(),
        lay.out.cuda(),
        lay.lse.cuda(),
        {},
        key_scale=None if lay.key_scale is None else lay.key_scale.cuda(),
    )
