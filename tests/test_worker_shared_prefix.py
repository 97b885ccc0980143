"""Shared-prefix (cascade) decode attention (worker/memdb_worker/attend/shared_prefix.py).

On CPU: the torch form equals one softmax over [prefix ; live] (state.reference_state, float64)
and the Triton kernels under Triton's interpreter equal the torch form, including a batch that
folds into two chunks of query rows. On CUDA (skipped without a GPU): the kernels equal per-row
SDPA over the prefix concatenated with each row's live KV, at the 8B attention shape.
"""

from __future__ import annotations

import pytest
import torch

from memdb_worker.attend import fused_kernels
from memdb_worker.attend.shared_prefix import shared_reference
from memdb_worker.memory.state import reference_state
from tests.interpreter import run_interpreted


def make_case(batch=3, heads=8, kv_heads=2, d=32, prefix=100, live=37, mask=True, seed=0,
              dtype=torch.float32, device="cpu"):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, d, generator=g)
    pk = torch.randn(1, kv_heads, prefix, d, generator=g)
    pv = torch.randn(1, kv_heads, prefix, d, generator=g)
    k = torch.randn(batch, kv_heads, live, d, generator=g)
    v = torch.randn(batch, kv_heads, live, d, generator=g)
    m = None
    if mask:
        m = torch.rand(batch, live, generator=g) > 0.3
        m[:, -1] = True
    t = lambda x: x.to(dtype).to(device)  # noqa: E731
    return t(q), t(pk), t(pv), t(k), t(v), (None if m is None else m.to(device))


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("mask", [False, True])
def test_torch_form_is_attention_over_prefix_then_live(mask):
    q, pk, pv, k, v, m = make_case(mask=mask)
    scale = 32**-0.5
    got = shared_reference(q, pk, pv, k, v, m, scale)
    masks = None if m is None else [None, m.view(m.shape[0], 1, 1, -1)]
    pkb, pvb = pk.expand(3, -1, -1, -1), pv.expand(3, -1, -1, -1)
    want = reference_state(q, [(pkb, pvb), (k, v)], scale, masks)  # one softmax over both
    assert got.shape == (3, 1, 8, 32)
    assert _rel(got, want.out.transpose(1, 2)) < 1e-5
    # the prefix matters: attention over the live context alone is far off
    alone = reference_state(q, [(k, v)], scale, None if m is None else masks[1:])
    assert _rel(alone.out.transpose(1, 2), want.out.transpose(1, 2)) > 0.1


_INTERPRETER = r"""
import torch
from test_worker_shared_prefix import make_case, _rel
from memdb_worker.attend.shared_prefix import SharedConfig, shared_attention, shared_reference
cfg = SharedConfig(block_n=16, prefix_programs_per_sm=1)
for batch, mask, dtype, live in ((1, False, torch.float32, 37), (3, True, torch.float16, 37),
                                 (40, True, torch.float32, 5)):  # 40 x 4 rows: two chunks
    q, pk, pv, k, v, m = make_case(batch=batch, mask=mask, dtype=dtype, live=live, seed=batch)
    want = shared_reference(q, pk, pv, k, v, m, 32 ** -0.5)
    got = shared_attention(q, pk, pv, k, v, m, 32 ** -0.5, cfg)
    assert got.shape == want.shape and got.dtype == want.dtype
    err = _rel(got, want)
    assert err < 2e-3, (batch, err)
print("OK")
"""


@pytest.mark.skipif(not fused_kernels.HAVE_TRITON, reason="needs triton")
def test_kernels_under_triton_interpreter():
    run_interpreted(_INTERPRETER)


@pytest.mark.skipif(not (torch.cuda.is_available() and fused_kernels.HAVE_TRITON),
                    reason="needs CUDA and Triton")  # fmt: skip
@pytest.mark.parametrize(
    "batch,prefix,live,mask",
    [(1, 8192, 512, False), (8, 8192, 300, True), (32, 4096, 77, False), (40, 1000, 64, True)],
)
def test_kernels_on_cuda_equal_per_row_sdpa(batch, prefix, live, mask):
    from memdb_worker.attend.shared_prefix import shared_attention

    q, pk, pv, k, v, m = make_case(batch, 32, 8, 128, prefix, live, mask, dtype=torch.bfloat16,
                                   device="cuda")  # fmt: skip
    scale = 128**-0.5
    got = shared_attention(q, pk, pv, k, v, m, scale)
    # per-row SDPA: every row gets its own copy of the prefix in front of its live KV
    kk = torch.cat([pk.expand(batch, -1, -1, -1), k], dim=2)
    vv = torch.cat([pv.expand(batch, -1, -1, -1), v], dim=2)
    am = None
    if m is not None:
        am = torch.cat([torch.ones(batch, prefix, dtype=torch.bool, device="cuda"), m], dim=1)
        am = am.view(batch, 1, 1, -1)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, kk, vv, attn_mask=am, scale=scale, enable_gqa=True
    ).transpose(1, 2)
    torch.cuda.synchronize()
    assert got.shape == want.shape and torch.isfinite(got.float()).all()
    assert _rel(got, want) < 1e-2
    assert _rel(got, shared_reference(q, pk, pv, k, v, m, scale)) < 1e-2
