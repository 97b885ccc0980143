"""The fused decode path (worker/memdb_worker/attend/fused.py) against the reference path.

On CPU: the torch form of the fused math (`decode_reference`: keys modes folded into the stored
keys, RoPE undone from positions) equals the worker's reference path (Memory.prefix_state +
attention_state + merge_states) for every key mode and granularity, with and without the
first-order lse correction, and the Triton kernels run under Triton's interpreter (when Triton
is installed) equal it too. On CUDA: the compiled kernels equal it to bf16 tolerance, and
decoding through `bind` with the fused path gives the logits of the reference path.

The CUDA tests are skipped without a GPU; on one:
`OMP_NUM_THREADS=1 pytest -q tests/test_worker_fused.py` runs them all.
"""

from __future__ import annotations

import copy

import pytest
import torch

from memdb_worker.attend import fused
from memdb_worker.memory.formats import quantize_keys
from memdb_worker.memory.keys import KeySpace, LayerQuery, RopeSpec, apply_rope, fit_whitening
from memdb_worker.memory.memory import (
    KEY_SCALE,
    DecodeOptions,
    Memory,
    layer_from_tensors,
    lookup_keys,
)
from memdb_worker.memory.state import attention_state, merge_states
from tests.interpreter import run_interpreted

HAS_CUDA = torch.cuda.is_available()


def _rope(d: int, scaling: float = 1.0) -> RopeSpec:
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    return RopeSpec(inv_freq=inv, attention_scaling=scaling)


def make_memory(
    mode="pre_rope",
    granularity="head",
    whiten=False,
    center=False,
    key_dtype=torch.float32,
    out_dtype=torch.float32,
    heads=8,
    kv_heads=2,
    d=32,
    budget=50,
    layers=2,
    scaling=1.0,
    options=None,
    device="cpu",
    seed=0,
    extras_dtype=None,
    kbar_scale=1.0,
    group_key="concat",
) -> Memory:
    """A random memory; with extras_dtype it stores q_mean / k_bar (k_bar ~ kbar_scale * N(0, 1)),
    so the lse correction applies by default. key_dtype float8_e4m3fn stores a per-entry
    key_scale (amax / 448); group_key "mean" keeps one key of the head dim per group."""
    g = torch.Generator().manual_seed(seed)
    rope = _rope(d, scaling)
    ws = wm = None
    if whiten:
        ws, wm = [], []
        for _ in range(layers):
            x = torch.randn(300, heads, d, generator=g) * torch.rand(d, generator=g) + 0.3
            w, mu = fit_whitening(x, center=center)
            ws.append(w.to(device))
            wm.append(mu.to(device))
    ks = KeySpace(mode, granularity, heads, kv_heads, d, common_position=37, rope=rope,
                  whiten=ws, whiten_mean=wm)  # fmt: skip
    i, dk, hpg = ks.num_groups, ks.key_dim, ks.heads_per_group
    if group_key == "mean":
        dk = d
    lays = []
    for _ in range(layers):
        keys, key_scale = quantize_keys(torch.randn(i, budget, dk, generator=g), key_dtype)
        extras = {}
        if extras_dtype is not None:
            q_mean = torch.randn(i, budget, hpg, d, generator=g)
            k_bar = torch.randn(i, budget, hpg, d, generator=g) * kbar_scale
            extras = {"q_mean": q_mean.to(extras_dtype).to(device),
                      "k_bar": k_bar.to(extras_dtype).to(device)}  # fmt: skip
        if key_scale is not None:
            extras[KEY_SCALE] = key_scale.to(device)
        lays.append(
            layer_from_tensors(
                keys.to(device),
                torch.randn(i, budget, hpg, d, generator=g).to(out_dtype).to(device),
                (torch.randn(i, budget, hpg, generator=g) * 2 + 3).to(device),
                extras,
            )
        )
    return Memory(lays, ks, {"prefix_length": "100", "group_key": group_key}, options)


def make_inputs(memory: Memory, batch=3, live=40, dtype=torch.float32, device="cpu", seed=1,
                mask=False):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    ks = memory.keyspace
    h, hkv, d = ks.num_heads, ks.num_kv_heads, ks.head_dim
    q_pre = torch.randn(batch, h, 1, d, generator=g)
    positions = torch.randint(100, 5000, (batch,), generator=g)
    cos, sin = ks.rope.cos_sin(positions)  # [B, d]
    q = apply_rope(q_pre, cos[:, None, None], sin[:, None, None])
    k = torch.randn(batch, hkv, live, d, generator=g)
    v = torch.randn(batch, hkv, live, d, generator=g)
    m = None
    if mask:
        m = torch.rand(batch, 1, 1, live, generator=g) > 0.3
        m[..., -1] = True  # the current token always sees itself
    t = lambda x: x.to(dtype).to(device)  # noqa: E731
    return t(q), t(k), t(v), (None if m is None else m.to(device)), positions.to(device)


def reference_path(memory: Memory, layer: int, q, k, v, mask, positions, scale):
    """What attention.memdb_attention computes without the fused path."""
    ks = memory.keyspace
    lq = LayerQuery(layer, q, positions.view(-1, 1), scale, ks.rope, ks.num_kv_heads)
    live = attention_state(q, k, v, scale, mask)
    prefix = memory.prefix_state(lq)
    merged = merge_states(live, prefix)
    q_pre = lq.q_pre.transpose(1, 2).reshape(q.shape[0], ks.num_heads, -1)
    _, ids = memory.search(layer, lookup_keys(ks, memory.group_key, q_pre, layer), 1)
    return merged.out.to(q.dtype).transpose(1, 2), ids[..., 0].repeat_interleave(
        ks.heads_per_group, dim=1
    )


def fused_args(memory: Memory, layer: int):
    ks = memory.keyspace
    return (
        fused.prepare_layer(memory, layer),
        ks.rope.inv_freq,
        ks.rope.attention_scaling,
    )


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


MODES = [
    ("pre_rope", "head", False, False),
    ("pre_rope", "kv_group", False, False),
    ("pre_rope", "layer", False, False),
    ("rope_common", "head", False, False),
    ("rope_common", "kv_group", True, False),
    ("pre_rope", "head", True, True),
    ("rope_common", "layer", True, True),
]


@pytest.mark.parametrize("mode,granularity,whiten,center", MODES)
def test_torch_form_equals_reference_path(mode, granularity, whiten, center):
    memory = make_memory(mode, granularity, whiten, center, scaling=1.25,
                         options=DecodeOptions(lse_bias=(0.0, 0.7)))  # fmt: skip
    scale = 32**-0.5
    for layer in (0, 1):
        q, k, v, mask, pos = make_inputs(memory, mask=layer == 1, seed=layer + 3)
        want, want_ids = reference_path(memory, layer, q, k, v, mask, pos, scale)
        got, ids = fused.decode_reference(
            q, k, v, mask, pos, *fused_args(memory, layer), scale, fused.lse_bias(memory, layer)
        )
        assert torch.equal(ids, want_ids)
        assert _rel(got, want) < 1e-5


COMPACT = [  # (key dtype, state dtype, key mode, granularity, group key)
    (torch.bfloat16, torch.bfloat16, "pre_rope", "head", "concat"),
    (torch.float8_e4m3fn, torch.bfloat16, "pre_rope", "head", "concat"),
    (torch.float8_e4m3fn, torch.float32, "rope_common", "head", "concat"),
    (torch.bfloat16, torch.bfloat16, "pre_rope", "kv_group", "mean"),
    (torch.float8_e4m3fn, torch.bfloat16, "pre_rope", "kv_group", "mean"),
    (torch.float32, torch.float32, "rope_common", "kv_group", "mean"),
]


@pytest.mark.parametrize("key_dtype,out_dtype,mode,granularity,group_key", COMPACT)
def test_torch_form_of_compact_formats_equals_reference_path(
    key_dtype, out_dtype, mode, granularity, group_key
):
    memory = make_memory(mode, granularity, key_dtype=key_dtype, out_dtype=out_dtype,
                         group_key=group_key, extras_dtype=out_dtype, scaling=1.25,
                         options=DecodeOptions(lse_bias=(0.0, 0.7)))  # fmt: skip
    assert memory.key_dim == (32 if group_key == "mean" else memory.keyspace.key_dim)
    scale = 32**-0.5
    for layer in (0, 1):
        q, k, v, mask, pos = make_inputs(memory, mask=layer == 1, seed=layer + 3)
        want, want_ids = reference_path(memory, layer, q, k, v, mask, pos, scale)
        got, ids = fused.decode_reference(
            q, k, v, mask, pos, *fused_args(memory, layer), scale, fused.lse_bias(memory, layer),
            lse_correction=True,
        )  # fmt: skip
        assert torch.equal(ids, want_ids)
        assert _rel(got, want) < 1e-5
    assert fused.supports(memory)


def test_float8_keys_look_up_their_scaled_values():
    """A float8 memory finds what a float32 memory of its scaled keys finds (the scale is not
    ignored: entries with a negative scale flip their cosine)."""
    mem8 = make_memory(key_dtype=torch.float8_e4m3fn, layers=1, budget=64)
    lay = mem8.layers[0]
    lay.key_scale[:, ::2] *= -1  # half the entries point the other way
    lay.inv_norm = lay.key_values().norm(dim=-1).reciprocal()
    mem32 = Memory([layer_from_tensors(lay.key_values(), lay.out, lay.lse, {})],
                   mem8.keyspace, mem8.metadata)  # fmt: skip
    q = torch.randn(20, 8, 32)
    s8, i8 = mem8.search(0, q, 1)
    s32, i32 = mem32.search(0, q, 1)
    assert torch.equal(i8, i32) and torch.allclose(s8, s32, atol=1e-6)
    raw = Memory([layer_from_tensors(lay.keys.float(), lay.out, lay.lse, {})],
                 mem8.keyspace, mem8.metadata)  # fmt: skip
    assert not torch.equal(raw.search(0, q, 1)[1], i32)
    fl = fused.prepare_layer(mem8, 0)
    sims = torch.einsum("nik,imk->nim", q, fl.keys.float()) * fl.inv_norm
    assert torch.equal(sims.argmax(-1, keepdim=True), i32)


def test_memory_checks_the_compact_spec():
    with pytest.raises(ValueError, match="key_scale"):
        make_memory(key_dtype=torch.float8_e4m3fn).layers[0].__class__(
            torch.zeros(2, 3, 4, dtype=torch.float8_e4m3fn), torch.ones(2, 3),
            torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1), {},
        ).check()  # fmt: skip
    with pytest.raises(ValueError, match="group_key 'mean' needs granularity"):
        make_memory(granularity="head", group_key="mean")
    mem = make_memory(granularity="kv_group", group_key="mean", whiten=True)
    assert not fused.supports(mem)  # per-head whitening does not fold into one key per group


@pytest.mark.parametrize("extras_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode,granularity,whiten,center", [MODES[0], MODES[1], MODES[4]])
def test_torch_form_with_lse_correction(mode, granularity, whiten, center, extras_dtype):
    memory = make_memory(mode, granularity, whiten, center, scaling=1.25, extras_dtype=extras_dtype,
                         options=DecodeOptions(lse_bias=(0.0, 0.7)))  # fmt: skip
    assert memory.lse_corrected
    scale = 32**-0.5
    for layer in (0, 1):
        q, k, v, mask, pos = make_inputs(memory, mask=layer == 1, seed=layer + 3)
        want, want_ids = reference_path(memory, layer, q, k, v, mask, pos, scale)
        args = (q, k, v, mask, pos, *fused_args(memory, layer), scale)
        bias = fused.lse_bias(memory, layer)
        got, ids = fused.decode_reference(*args, bias, lse_correction=True)
        assert torch.equal(ids, want_ids)
        assert _rel(got, want) < 1e-5
        # the correction matters here: leaving it out is far off the reference
        plain, _ = fused.decode_reference(*args, bias)
        assert _rel(plain, want) > 0.05
        # and with the correction switched off the reference path is the plain form
        off = memory.with_options(DecodeOptions(lse_bias=(0.0, 0.7), lse_correction=False))
        want_off, _ = reference_path(off, layer, q, k, v, mask, pos, scale)
        assert _rel(plain, want_off) < 1e-5


def test_prepare_is_cached_and_shares_plain_keys():
    memory = make_memory()
    fl = fused.prepare_layer(memory, 0)
    assert fused.prepare_layer(memory.with_options(DecodeOptions(lse_bias=1.0)), 0) is fl
    assert fl.keys.data_ptr() == memory.layers[0].keys.data_ptr() and fl.bias is None


def test_supports():
    assert fused.supports(make_memory())
    corrected = make_memory(extras_dtype=torch.float16)
    assert fused.supports(corrected) and corrected.lse_corrected
    plain = corrected.with_options(DecodeOptions(lse_correction=False))
    assert fused.supports(plain) and not plain.lse_corrected
    assert not make_memory().lse_corrected
    fl = fused.prepare_layer(corrected, 0)
    assert fl.q_mean is not None and fl.k_bar is not None and fl.k_bar.dtype == torch.float16
    assert fused.prepare_layer(make_memory(), 0).k_bar is None
    assert not fused.supports(make_memory(options=DecodeOptions(top_k=2)))
    assert not fused.supports(make_memory(heads=32, kv_heads=8, d=128, granularity="layer",
                                          budget=4, layers=1))  # fmt: skip
    assert not fused.memory_ok(make_memory(), torch.zeros(1, 8, 1, 32))  # CPU query


_IMPORTS = """
import torch
from test_worker_fused import make_memory, make_inputs, fused_args, _rel
from memdb_worker.attend import fused
"""

_INTERPRETER_CASE = r"""
cases = [
    dict(mode="pre_rope", granularity="head", key_dtype=torch.float16, out_dtype=torch.float16),
    dict(mode="rope_common", granularity="kv_group", whiten=True, key_dtype=torch.float32),
]
cfg = fused.Config(block_m=16, block_n=16, scan_programs_per_sm=2, live_programs_per_sm=1)
for i, kw in enumerate(cases):
    mem = make_memory(**kw, budget=70, layers=1, seed=i)
    # (float32 and float16 here; bf16 keys: the lookup-build case below, and on CUDA)
    for batch, mask, dtype in ((3, False, torch.float32), (2, True, torch.float16),
                               (70, True, torch.float32)):
        q, k, v, m, pos = make_inputs(mem, batch=batch, live=37, dtype=dtype, mask=mask)
        args = (q, k, v, m, pos, *fused_args(mem, 0), 32 ** -0.5, 0.25)
        want, want_ids = fused.decode_reference(*args)
        got, ids = fused.memory_attention(*args, config=cfg, return_ids=True)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(ids.long(), want_ids), (kw, batch)
        err = _rel(got, want)
        assert err < 1e-3, (kw, batch, err)
print("OK")
"""


_INTERPRETER_LSE_CORRECTION_CASE = r"""
# the lse correction in the kernels against the torch forms (small: the interpreter is slow)
cases = [
    dict(mode="pre_rope", granularity="head", key_dtype=torch.float16, out_dtype=torch.float16,
         extras_dtype=torch.float32),
    dict(mode="rope_common", granularity="kv_group", whiten=True, key_dtype=torch.float32,
         extras_dtype=torch.float16, scaling=1.25),
]
cfg = fused.Config(block_m=16, block_n=16, scan_programs_per_sm=2, live_programs_per_sm=1)
scale = 32 ** -0.5
for i, kw in enumerate(cases):
    mem = make_memory(**kw, budget=40, layers=1, seed=i + 5, kbar_scale=1.5,
                      options=DecodeOptions(lse_bias=0.25))
    assert mem.lse_corrected
    for batch, mask, dtype in ((3, False, torch.float32), (2, True, torch.float16)):
        q, k, v, m, pos = make_inputs(mem, batch=batch, live=21, dtype=dtype, mask=mask)
        args = (q, k, v, m, pos, *fused_args(mem, 0), scale, 0.25)
        want, want_ids = fused.decode_reference(*args, lse_correction=True)
        path, path_ids = reference_path(mem, 0, q, k, v, m, pos, scale)
        plain, _ = fused.decode_reference(*args)
        got, ids = fused.memory_attention(*args, config=cfg, return_ids=True,
                                          lse_correction=True)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(ids.long(), want_ids) and torch.equal(ids.long(), path_ids), (kw, batch)
        err = _rel(got, want)
        assert err < 1e-3, (kw, batch, err)
        assert _rel(got, path) < 1e-3, (kw, batch, _rel(got, path))
        # a kernel that dropped the correction would be this far off
        assert _rel(plain, want) > 0.05, (kw, batch, _rel(plain, want))
        # the uncorrected kernels on the same memory stay the plain form
        got0 = fused.memory_attention(*args, config=cfg)
        assert _rel(got0, plain) < 1e-3, (kw, batch, _rel(got0, plain))
print("OK")
"""


_INTERPRETER_COMPACT_CASE = r"""
# compact formats in the kernels: float8 keys with a per-entry scale, group-mean keys, bf16
# states (bf16 keys: the lookup-build case below)
cases = [
    dict(key_dtype=torch.float8_e4m3fn, out_dtype=torch.float16, extras_dtype=torch.float16),
    dict(granularity="kv_group", group_key="mean", key_dtype=torch.float16,
         out_dtype=torch.float32, extras_dtype=torch.float32),
    dict(granularity="kv_group", group_key="mean", key_dtype=torch.float8_e4m3fn,
         mode="rope_common", out_dtype=torch.float16),
]
cfg = fused.Config(block_m=16, block_n=16, scan_programs_per_sm=2, live_programs_per_sm=1)
scale = 32 ** -0.5
for i, kw in enumerate(cases):
    mem = make_memory(**kw, budget=40, layers=1, seed=i + 9)
    corr = mem.lse_corrected
    for batch, mask, dtype in ((3, False, torch.float32), (2, True, torch.float16)):
        q, k, v, m, pos = make_inputs(mem, batch=batch, live=21, dtype=dtype, mask=mask)
        args = (q, k, v, m, pos, *fused_args(mem, 0), scale, 0.25)
        want, want_ids = fused.decode_reference(*args, lse_correction=corr)
        got, ids = fused.memory_attention(*args, config=cfg, return_ids=True, lse_correction=corr)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(ids.long(), want_ids), (kw, batch)
        err = _rel(got, want)
        assert err < 1e-3, (kw, batch, err)
print("OK")
"""


_INTERPRETER_LOOKUP_BUILD_CASE = r"""
# exactly what the builder writes for looked-up entries with the lookup defaults (LOOKUP, the
# builder's default until 2026-11-30: bfloat16 keys and states, one group-mean key per KV group,
# no lse-correction extras), through shards, in the kernels, against the worker's torch
# reference path (Memory.prefix_state + live attention, merged)
from memdb.shards import decode_shard, encode_shard
from memdb_worker.build import BuildOptions, calibrate, cluster
from memdb_worker.memory.memory import Memory
from test_worker_fused import reference_path
from tiny import LOOKUP, tiny_llama

model = tiny_llama(128)
g = torch.Generator().manual_seed(3)
traces = [torch.randint(3, 128, (10,), generator=g).tolist() for _ in range(6)]
opts = BuildOptions(**LOOKUP, max_records=60, seed=0)
calib = calibrate(model, None, list(range(3, 40)), traces, opts, progress=False)
# the builder's defaults (fitted rows, attended as a whole) take the fitted-row kernels, not
# these (tests/test_worker_fitted_kernel.py)
fitted = cluster(calib, 24, BuildOptions(), progress=False).to_memory()
assert fitted.fitted and fused.supports(fitted)
built = cluster(calib, 24, opts, progress=False)
mem = Memory.from_shards([decode_shard(encode_shard(s)) for s in built.shards])
lay = mem.layers[0]
assert lay.keys.dtype == torch.bfloat16 and lay.out.dtype == torch.bfloat16
assert mem.group_key == "mean" and mem.key_dim == calib.head_dim
assert not lay.extras and lay.key_scale is None and not mem.lse_corrected
assert fused.supports(mem)
cfg = fused.Config(block_m=16, block_n=16, scan_programs_per_sm=2, live_programs_per_sm=1)
scale = calib.head_dim ** -0.5
for layer in range(mem.num_layers):
    for batch, mask, dtype in ((3, False, torch.float32), (2, True, torch.float16)):
        q, k, v, m, pos = make_inputs(mem, batch=batch, live=21, dtype=dtype, mask=mask,
                                      seed=layer + 1)
        args = (q, k, v, m, pos, *fused_args(mem, layer), scale, fused.lse_bias(mem, layer))
        path, path_ids = reference_path(mem, layer, q, k, v, m, pos, scale)
        got, ids = fused.memory_attention(*args, config=cfg, return_ids=True)
        assert got.shape == path.shape and got.dtype == path.dtype
        assert torch.equal(ids.long(), path_ids), (layer, batch)
        err = _rel(got, path)
        assert err < 2e-3, (layer, batch, err)
print("OK")
"""


def _run_under_interpreter(code: str) -> None:
    run_interpreted(_IMPORTS + code)


@pytest.mark.skipif(not fused.HAVE_TRITON, reason="needs triton")
def test_kernels_under_triton_interpreter():
    _run_under_interpreter(_INTERPRETER_CASE)


@pytest.mark.skipif(not fused.HAVE_TRITON, reason="needs triton")
def test_kernels_with_lse_correction_under_triton_interpreter():
    code = (
        "from test_worker_fused import reference_path\n"
        "from memdb_worker.memory.memory import DecodeOptions\n"
    )
    _run_under_interpreter(code + _INTERPRETER_LSE_CORRECTION_CASE)


# -- CUDA --------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not (HAS_CUDA and fused.HAVE_TRITON), reason="needs CUDA and Triton")


@cuda
@pytest.mark.parametrize(
    "kw",
    [
        dict(key_dtype=torch.float16, out_dtype=torch.float16),
        dict(key_dtype=torch.bfloat16, out_dtype=torch.bfloat16, granularity="kv_group"),
        dict(key_dtype=torch.float32, mode="rope_common", whiten=True),
    ],
)
@pytest.mark.parametrize("batch,live,mask", [(1, 512, False), (8, 300, True), (33, 77, False)])
def test_kernels_on_cuda_8b_shape(kw, batch, live, mask):
    mem = make_memory(**kw, heads=32, kv_heads=8, d=128, budget=4096, layers=1, device="cuda")
    q, k, v, m, pos = make_inputs(mem, batch=batch, live=live, dtype=torch.bfloat16,
                                  device="cuda", mask=mask)  # fmt: skip
    args = (q, k, v, m, pos, *fused_args(mem, 0), 128**-0.5, 0.1)
    want, want_ids = fused.decode_reference(*args)
    got, ids = fused.memory_attention(*args, return_ids=True)
    _check_cuda(mem, q, pos, got, ids, want, want_ids)


@cuda
@pytest.mark.parametrize("extras_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "kw",
    [
        dict(key_dtype=torch.float16, out_dtype=torch.float16),
        dict(key_dtype=torch.bfloat16, out_dtype=torch.bfloat16, granularity="kv_group"),
        dict(key_dtype=torch.float32, mode="rope_common", whiten=True, scaling=1.25),
    ],
)
@pytest.mark.parametrize("batch,live,mask", [(1, 512, False), (8, 300, True), (33, 77, False)])
def test_kernels_on_cuda_lse_correction(kw, batch, live, mask, extras_dtype):
    mem = make_memory(**kw, heads=32, kv_heads=8, d=128, budget=4096, layers=1, device="cuda",
                      extras_dtype=extras_dtype, kbar_scale=1.5)  # fmt: skip
    q, k, v, m, pos = make_inputs(mem, batch=batch, live=live, dtype=torch.bfloat16,
                                  device="cuda", mask=mask)  # fmt: skip
    scale = 128**-0.5
    args = (q, k, v, m, pos, *fused_args(mem, 0), scale, 0.1)
    want, want_ids = fused.decode_reference(*args, lse_correction=True)
    got, ids = fused.memory_attention(*args, return_ids=True, lse_correction=True)
    _check_cuda(mem, q, pos, got, ids, want, want_ids)
    # the torch form is the worker's reference path (bias 0.1 as a memory option) ...
    opt = mem.with_options(DecodeOptions(lse_bias=0.1))
    path, path_ids = reference_path(opt, 0, q, k, v, m, pos, scale)
    assert torch.equal(path_ids, want_ids) and _rel(want, path) < 1e-2
    # ... and dropping the correction would be far outside the tolerance
    plain, _ = fused.decode_reference(*args)
    assert _rel(plain, want) > 0.05


@cuda
@pytest.mark.parametrize("key_dtype,out_dtype,mode,granularity,group_key", COMPACT)
@pytest.mark.parametrize("batch,live,mask", [(1, 512, False), (8, 300, True)])
def test_kernels_on_cuda_compact_formats(
    key_dtype, out_dtype, mode, granularity, group_key, batch, live, mask
):
    mem = make_memory(mode, granularity, key_dtype=key_dtype, out_dtype=out_dtype,
                      group_key=group_key, extras_dtype=out_dtype, heads=32, kv_heads=8, d=128,
                      budget=4096, layers=1, device="cuda", kbar_scale=1.5)  # fmt: skip
    assert fused.supports(mem)
    q, k, v, m, pos = make_inputs(mem, batch=batch, live=live, dtype=torch.bfloat16,
                                  device="cuda", mask=mask)  # fmt: skip
    scale = 128**-0.5
    args = (q, k, v, m, pos, *fused_args(mem, 0), scale, 0.1)
    want, want_ids = fused.decode_reference(*args, lse_correction=True)
    got, ids = fused.memory_attention(*args, return_ids=True, lse_correction=True)
    _check_cuda(mem, q, pos, got, ids, want, want_ids)
    opt = mem.with_options(DecodeOptions(lse_bias=0.1))
    path, path_ids = reference_path(opt, 0, q, k, v, m, pos, scale)
    same = (path_ids == want_ids).unsqueeze(-1)  # [B, H, 1]: near-ties may pick another entry
    assert float(same.float().mean()) > 0.98
    assert _rel(want[:, 0] * same, path[:, 0] * same) < 2e-2


def _check_cuda(mem, q, pos, got, ids, want, want_ids):
    torch.cuda.synchronize()
    assert torch.isfinite(got.float()).all()
    same = ids.long() == want_ids  # [B, H]
    # a different entry only on a near-tie of the float32 cosines
    if not bool(same.all()):
        fl = fused.prepare_layer(mem, 0)
        q_pre = _q_pre(mem, q, pos)
        sims = _sims(fl, q_pre)  # [B, I, M]
        hpg = fl.heads_per_group
        grp = torch.arange(q.shape[1], device="cuda") // hpg
        s_got = sims[:, grp].gather(-1, ids.long().unsqueeze(-1))[..., 0]
        s_want = sims[:, grp].gather(-1, want_ids.unsqueeze(-1))[..., 0]
        assert float((s_want - s_got).abs().max()) < 1e-3
        assert float(same.float().mean()) > 0.98
    sel = same.unsqueeze(-1)  # compare heads that chose the same entry
    a = got[:, 0].float() * sel
    b = want[:, 0].float() * sel
    assert _rel(a, b) < 1e-2


def _q_pre(mem, q, pos):
    cos, sin = mem.keyspace.rope.cos_sin(pos)
    from memdb_worker.memory.keys import undo_rope

    return undo_rope(q[:, :, 0].float(), cos[:, None], sin[:, None])


def _sims(fl, q_pre):
    b = q_pre.shape[0]
    i, m, dk = fl.keys.shape
    keys = q_pre.reshape(b, i, -1, dk).mean(2) if fl.group_mean else q_pre.reshape(b, i, dk)
    s = torch.einsum("bik,imk->bim", keys, fl.keys.float())
    if fl.bias is not None:
        s = s + fl.bias
    return s * fl.inv_norm


@cuda
@pytest.mark.parametrize("extras_dtype", [None, torch.float16])
def test_bind_decode_uses_fused_path_and_matches_reference(extras_dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from memdb_worker.attend.attention import bind

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2048,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=128, max_position_embeddings=8192, pad_token_id=0)  # fmt: skip
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    mem = make_memory(heads=8, kv_heads=2, d=128, budget=1000, layers=2, device="cuda",
                      key_dtype=torch.float16, out_dtype=torch.float16,
                      extras_dtype=extras_dtype)  # fmt: skip
    assert mem.lse_corrected == (extras_dtype is not None)
    ids = torch.randint(3, 512, (2, 9), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    nxt = torch.randint(3, 512, (2, 1), device="cuda")
    mask2 = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    calls = []
    orig = fused.memory_attention

    def spy(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    fused.memory_attention = spy
    try:
        with torch.inference_mode(), bind(model, mem):
            cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
            assert not calls  # the prompt (T > 1) takes the reference path
            a = model(nxt, attention_mask=mask2, past_key_values=copy.deepcopy(cache)).logits
            assert len(calls) == 2  # one fused call per layer
            with fused.disabled():
                b = model(nxt, attention_mask=mask2, past_key_values=copy.deepcopy(cache)).logits
            assert len(calls) == 2
    finally:
        fused.memory_attention = orig
    assert _rel(a, b) < 2e-2


@pytest.mark.skipif(not fused.HAVE_TRITON, reason="needs triton")
def test_kernels_with_compact_formats_under_triton_interpreter():
    _run_under_interpreter(_INTERPRETER_COMPACT_CASE)


@pytest.mark.skipif(not fused.HAVE_TRITON, reason="needs triton")
def test_kernels_read_the_builders_lookup_format_under_interpreter():
    _run_under_interpreter(_INTERPRETER_LOOKUP_BUILD_CASE)
