"""Attention-state math: the merged path equals one softmax over the concatenated keys."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from memdb_worker.memory import state as st
from memdb_worker.memory.state import (
    State,
    aggregate_states,
    attention_state,
    attention_state_and_key_mean,
    combine_states,
    empty_state,
    merge_states,
    reference_state,
)

SCALE = 0.125


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def qkv(b, h, hkv, t, n, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    return q, k, v


def merged_blocks(q, k, v, cuts, masks=None):
    states = []
    for i, (a, z) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        m = None if masks is None else masks[i]
        states.append(attention_state(q, k[:, :, a:z], v[:, :, a:z], SCALE, m))
    return functools.reduce(merge_states, states)  # merging is associative


@pytest.mark.parametrize("h,hkv", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("cuts", [[0, 37], [0, 10, 25, 37], [0, 0, 20, 20, 37], [0, 1, 37]])
def test_merge_of_blocks_equals_one_softmax(h, hkv, cuts):
    q, k, v = qkv(2, h, hkv, 5, 37)
    got = merged_blocks(q, k, v, cuts)
    blocks = [(k[:, :, a:z], v[:, :, a:z]) for a, z in zip(cuts[:-1], cuts[1:], strict=True)]
    ref = reference_state(q, blocks, SCALE)
    assert got.out.dtype == torch.float32 and got.lse.dtype == torch.float32
    assert rel_err(got.out, ref.out) < 1e-5
    assert rel_err(got.lse, ref.lse) < 1e-5


def test_masked_blocks_and_queries_that_see_nothing():
    q, k, v = qkv(2, 6, 2, 4, 12)
    # block A: keys 0..5, causal-ish pattern; block B: keys 6..11, row 0 of batch 1 sees nothing
    ma = torch.ones(2, 1, 4, 6, dtype=torch.bool).tril(diagonal=1)
    mb = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    mb[1, :, 0] = False
    ma[1, :, 0] = False  # query 0 of batch 1 sees no key at all
    got = merged_blocks(q, k, v, [0, 6, 12], [ma, mb])
    ref = reference_state(
        q, [(k[:, :, :6], v[:, :, :6]), (k[:, :, 6:], v[:, :, 6:])], SCALE, [ma, mb]
    )
    assert torch.isneginf(got.lse[1, :, 0]).all() and (got.out[1, :, 0] == 0).all()
    assert torch.isfinite(got.out).all()
    keep = torch.isfinite(ref.lse)
    assert rel_err(got.out, ref.out) < 1e-5
    assert rel_err(got.lse[keep], ref.lse[keep]) < 1e-5


def test_float_bias_mask_is_additive():
    q, k, v = qkv(1, 4, 2, 3, 9)
    bias = torch.randn(1, 1, 3, 9)
    got = attention_state(q, k, v, SCALE, bias)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = torch.einsum("bhtd,bhnd->bhtn", q, kk) * SCALE + bias
    assert rel_err(got.lse, torch.logsumexp(scores, -1)) < 1e-6
    assert rel_err(got.out, torch.softmax(scores, -1) @ vv) < 1e-5


def test_single_key_and_empty_block():
    q, k, v = qkv(1, 2, 2, 3, 1)
    one = attention_state(q, k, v, SCALE)
    assert torch.allclose(one.out, v.expand(1, 2, 3, 16), atol=1e-6)
    assert torch.allclose(one.lse, (q * k).sum(-1) * SCALE, atol=1e-6)
    empty = attention_state(q, k[:, :, :0], v[:, :, :0], SCALE)
    assert torch.isneginf(empty.lse).all() and (empty.out == 0).all()


def test_merge_with_minus_inf_sides_is_exact():
    q, k, v = qkv(1, 2, 2, 3, 5)
    s = attention_state(q, k, v, SCALE)
    e = empty_state(1, 2, 3, 16)
    for m in (merge_states(s, e), merge_states(e, s)):
        assert torch.equal(m.out, s.out) and torch.equal(m.lse, s.lse)
    both = merge_states(e, e)
    assert torch.isneginf(both.lse).all() and (both.out == 0).all()
    # a -inf on one side for some queries only
    part = State(s.out.clone(), s.lse.clone())
    part.lse[0, 0, 1] = -math.inf
    m = merge_states(part, s)
    assert torch.allclose(m.out[0, 0, 1], s.out[0, 0, 1]) and m.lse[0, 0, 1] == s.lse[0, 0, 1]


def test_merge_is_associative_and_commutative():
    q, k, v = qkv(1, 4, 2, 3, 30)
    a, b, c = (
        attention_state(q, k[:, :, i : i + 10], v[:, :, i : i + 10], SCALE) for i in (0, 10, 20)
    )
    left = merge_states(merge_states(a, b), c)
    right = merge_states(a, merge_states(c, b))
    assert rel_err(left.out, right.out) < 1e-6 and rel_err(left.lse, right.lse) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    q, k, v = qkv(2, 6, 3, 4, 50, dtype=dtype)
    got = merged_blocks(q, k, v, [0, 20, 50])
    ref = reference_state(q.float(), [(k.float(), v.float())], SCALE)
    assert got.out.dtype == torch.float32
    assert rel_err(got.out, ref.out) < 1e-5 and rel_err(got.lse, ref.lse) < 1e-5


def test_query_chunking_gives_the_same_state(monkeypatch):
    q, k, v = qkv(2, 6, 2, 9, 20)
    mask = torch.ones(2, 1, 9, 20, dtype=torch.bool).tril(diagonal=11)
    whole, kb_whole = attention_state_and_key_mean(q, k, v, SCALE, mask)
    monkeypatch.setattr(st, "_MAX_SCORE_ELEMENTS", 2 * 6 * 20 * 2)  # 2 queries per chunk
    parts, kb_parts = attention_state_and_key_mean(q, k, v, SCALE, mask)
    assert rel_err(parts.out, whole.out) < 1e-6 and rel_err(parts.lse, whole.lse) < 1e-6
    assert rel_err(kb_parts, kb_whole) < 1e-6


def test_key_mean_is_the_lse_gradient():
    q, k, v = qkv(1, 4, 2, 3, 11)
    _, k_bar = attention_state_and_key_mean(q, k, v, SCALE)
    qq = q.double().requires_grad_(True)
    lse = torch.logsumexp(
        torch.einsum("bhtd,bhnd->bhtn", qq, k.double().repeat_interleave(2, 1)) * SCALE, -1
    )
    (grad,) = torch.autograd.grad(lse.sum(), qq)
    assert rel_err(SCALE * k_bar, grad) < 1e-5


def test_aggregate_is_eq5_and_stable_for_large_lse():
    g = torch.Generator().manual_seed(1)
    p, h, e, c = 40, 3, 8, 5
    lse = torch.randn(p, h, generator=g) * 4 + 500.0  # exp(lse) overflows float32
    out = torch.randn(p, h, e, generator=g)
    cid = torch.arange(p) % c
    got_lse, got_out = aggregate_states(lse, out, cid, c)
    for j in range(c):
        members = cid == j
        lz = lse[members].double()
        ref_lse = torch.logsumexp(lz, 0) - math.log(int(members.sum()))
        w = torch.softmax(lz, 0).unsqueeze(-1)
        ref_out = (w * out[members].double()).sum(0)
        assert rel_err(got_lse[j], ref_lse) < 1e-6
        assert rel_err(got_out[j], ref_out) < 1e-5
    # combine_states with uniform weights is the same Eq. 5 for one cluster
    members = cid == 0
    n = int(members.sum())
    c_lse, c_out = combine_states(
        lse[members], out[members], torch.full((n, 1), -math.log(n)), dim=0
    )
    assert rel_err(c_lse, got_lse[0]) < 1e-6 and rel_err(c_out, got_out[0]) < 1e-5


def test_aggregate_empty_cluster_is_neutral():
    lse, out = torch.zeros(2, 1), torch.ones(2, 1, 4)
    got_lse, got_out = aggregate_states(lse, out, torch.tensor([0, 0]), 2)
    assert torch.isneginf(got_lse[1]).all() and (got_out[1] == 0).all()
    assert torch.allclose(got_lse[0], torch.zeros(1)) and torch.allclose(got_out[0], out[0])


@pytest.mark.parametrize(
    "b,kb,h,hkv,t,n,dtype",
    [
        (1, 1, 9, 3, 7, 2500, torch.float32),  # SmolLM2's GQA on a long prefix
        (4, 1, 6, 2, 5, 33, torch.float32),  # keys shared by the batch (folded)
        (3, 3, 4, 4, 6, 40, torch.float32),  # keys per row
        (2, 2, 6, 3, 3, 50, torch.bfloat16),
    ],
)
def test_the_fused_cpu_path_equals_the_scores_path(monkeypatch, b, kb, h, hkv, t, n, dtype):
    assert st._CPU_FLASH is not None  # the pinned torch has the fused kernel
    g = torch.Generator().manual_seed(7)
    q = torch.randn(b, h, t, 16, generator=g).to(dtype)
    k = torch.randn(kb, hkv, n, 16, generator=g).to(dtype)
    v = torch.randn(kb, hkv, n, 16, generator=g).to(dtype)
    fused = attention_state(q, k, v, SCALE)
    monkeypatch.setattr(st, "_CPU_FLASH", None)
    scores = attention_state(q, k, v, SCALE)
    ref = reference_state(q.float(), [(k.float(), v.float())], SCALE)
    assert fused.out.shape == scores.out.shape and fused.lse.shape == scores.lse.shape
    assert rel_err(fused.out, scores.out) < 1e-5 and rel_err(fused.lse, scores.lse) < 1e-6
    assert rel_err(scores.out, ref.out) < 1e-5 and rel_err(scores.lse, ref.lse) < 1e-6


def test_keys_shared_by_the_batch():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 6, 4, 16, generator=g)
    k, v = torch.randn(1, 2, 21, 16, generator=g), torch.randn(1, 2, 21, 16, generator=g)
    got, k_bar = attention_state_and_key_mean(q, k, v, SCALE)
    ref = reference_state(q, [(k, v)], SCALE)
    assert rel_err(got.out, ref.out) < 1e-5 and rel_err(got.lse, ref.lse) < 1e-5
    for row in range(3):
        one, kb = attention_state_and_key_mean(q[row : row + 1], k, v, SCALE)
        assert rel_err(one.out[0], got.out[row]) < 1e-6 and rel_err(kb[0], k_bar[row]) < 1e-6
