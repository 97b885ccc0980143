"""The fused decode path of a memory (CUDA, Triton): lookup, gather, live attention and merge.

One decode step (T = 1 query per sequence) of one layer, `memory_attention`, runs two kernels
(in `fused_kernels`):

1. `phase1`: two kinds of programs in one launch.
   - scan programs, per (index group, slice of the M entries, block of batch rows): undo RoPE of
     the live queries (position per row), form the lookup keys and scan the slice's keys in tiles
     (cosine = (q . k + bias) / |k|), keeping the best score and entry id per row;
   - live programs, per (batch row, KV head, slice of the live context): flash-style attention of
     the KV head's query heads over the slice (online softmax), a partial state (out, lse).
2. `combine`, per (batch row, KV head): reduce the scan slices to the top-1 entry of each query
   head's group, gather its stored state (out, lse + bias), reduce the live slices, and merge all
   of them with the online-softmax identity; write the output in the query dtype, [B, 1, H, d].
   With the first-order lse correction (`lse_correction=True`) it also gathers the entry's
   `q_mean` / `k_bar` rows, undoes RoPE of the head's query and adds
   `scale * (q_pre - q_mean) . k_bar` to the entry's lse (as `Memory.prefix_state` does); without
   it (a constexpr) none of that is compiled in.

The memory's keys are read once per step whatever the batch (all rows of a block share a tile).
Key modes are folded into the stored keys once per layer (`prepare_layer`): a lookup key is a
linear map of the pre-RoPE query, `key = T q_pre - c` (T = whitening x common rotation,
c = whitening x mean), so `key . k = q_pre . (T^T k) - c . k`: the kernel dots the pre-RoPE query
with `T^T k` (stored in the keys' dtype) and adds the bias `-c . k`. With the pre_rope mode and no
whitening the memory's own keys are used (no copy). Scores of keys in bf16/fp16 are computed as
two half-precision products (the query split into high and low halves, ~16 mantissa bits), of
float32 keys as tf32x3 products (~float32): argmax ties within that rounding may pick another
entry than the float32 reference.

Compact memories (`memory` module doc): float8 e4m3 keys are widened to float16 tiles in the scan
(exact) and their per-entry `key_scale` is folded into the inverse norms (the cosine of the
scaled key from the stored one); with a key-mode transform the folded keys are stored in
float16. bf16 states and extras are read as they are. With group_key "mean" (one key of the
head dim per KV group) the scan forms each group's lookup key as the mean of its heads'
pre-RoPE queries (no whitening: one transform per group), and each head gathers its own state.

Speed (H100, bench/GPU_NOTES.md): batch 1, M = 4K, 512 live tokens: 30 µs per layer (its
bytes take 12 µs at copy bandwidth): the scan streams the keys at ~2 TB/s (one program per SM,
cp.async stages; ncu: shared-memory waits) and ~13 µs are dependent latencies (two launches,
short live programs, the combine's gather). The memory's keys are read once for all rows, so
the gap to SDPA over a cached prefix grows with batch.

The fused path covers hard top-1 (with or without the first-order lse correction, any
lse_bias), groups of at most 512 key dimensions (head and kv_group granularity for head_dim
128), keys in float32 / float16 / bfloat16 / float8 e4m3, T = 1 and a boolean key mask;
everything else goes through the reference path (`Memory.prefix_state` +
`state.merge_states`). A fitted memory (rows attended as a whole, no lookup) takes the kernels
of `fitted_rows` where `fitted_rows.check` finds no reason against it (`supports` logs the
reasons once per memory otherwise). `decode_reference` computes the same function with torch ops
(CPU-testable; it is also what the tests compare the kernels with).
`MEMDB_FUSED=0` in the environment or `set_enabled(False)` forces the reference path in
`attention.memdb_attention`.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from memdb_worker.attend import fitted_rows
from memdb_worker.attend import fused_kernels as fk
from memdb_worker.attend.fused_kernels import HAVE_TRITON
from memdb_worker.attend.launch import pow2, sm_count
from memdb_worker.memory.keys import apply_rope, undo_rope
from memdb_worker.memory.memory import KEY_DTYPES, STATE_DTYPES, correct_lse
from memdb_worker.memory.state import State, attention_state, merge_states

if TYPE_CHECKING:
    from memdb_worker.memory.memory import Memory

logger = logging.getLogger(__name__)

MAX_KEY_DIM = 512  # Dk the scan kernel takes (head_dim 128: head and kv_group granularity)
_ENABLED = os.environ.get("MEMDB_FUSED", "1") != "0"
_ATTR = "_memdb_fused"
_REFUSED = "_memdb_fitted_refused"  # set on a fitted memory once its reasons are logged


def enabled() -> bool:
    """Whether `attention.memdb_attention` may use the fused kernels (CUDA + Triton needed)."""
    return _ENABLED and HAVE_TRITON


def set_enabled(on: bool) -> None:
    global _ENABLED
    _ENABLED = bool(on)


@contextmanager
def disabled():
    """Force the reference path inside the block."""
    prev = _ENABLED
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(prev)


@dataclass
class FusedLayer:
    """One memory layer in the form the kernels read."""

    keys: torch.Tensor  # [I, M, Dk] contiguous: keys in the pre-RoPE query frame (T^T k)
    inv_norm: torch.Tensor  # [I, M] float32, 1 / |k| of the memory's keys (x key_scale: fp8)
    bias: torch.Tensor | None  # [I, M] float32, -c . k (None when c = 0)
    out: torch.Tensor  # [I, M, h, d]
    lse: torch.Tensor  # [I, M, h] float32
    heads_per_group: int
    # the extras of the first-order lse correction, [I, M, h, d] contiguous (their stored dtype),
    # None when the memory has none; used only when a call asks for the correction
    q_mean: torch.Tensor | None = None
    k_bar: torch.Tensor | None = None
    group_mean: bool = False  # lookup key = mean of the group's heads' queries (Dk = d)


def supports(memory: Memory) -> bool:
    """Whether the memory's decode options and shapes fit the fused kernels: a looked-up
    memory `memory_attention`'s, a fitted one `fitted_rows.fitted_attention`'s (where they do
    not, the reason is logged once per memory and the reference path answers)."""
    if memory.fitted:
        reasons = fitted_rows.check(memory)
        if reasons and not getattr(memory, _REFUSED, False):
            setattr(memory, _REFUSED, True)
            logger.info("fitted memory decodes on the reference path: %s", "; ".join(reasons))
        return not reasons
    ks = memory.keyspace
    lay = memory.layers[0]
    return (
        memory.options.top_k == 1
        and (not memory.lse_corrected or _extras_fit(lay))
        and memory.key_dim <= MAX_KEY_DIM
        and ks.head_dim in (16, 32, 64, 128, 256)
        and lay.keys.dtype in KEY_DTYPES
        and lay.out.dtype in STATE_DTYPES
        and not (memory.group_key == "mean" and ks.whiten is not None)
    )


def _extras_fit(lay) -> bool:
    qm, kb = lay.extras.get("q_mean"), lay.extras.get("k_bar")
    return (
        qm is not None
        and kb is not None
        and qm.shape == kb.shape == lay.out.shape
        and qm.is_floating_point()
        and kb.is_floating_point()
    )


def lse_bias(memory: Memory, layer: int) -> float:
    return memory.options.bias_at(layer)


def prepare_layer(memory: Memory, layer: int) -> FusedLayer:
    """The fused form of a memory layer (computed once, kept on the layer object)."""
    lay = memory.layers[layer]
    cached = getattr(lay, _ATTR, None)
    if cached is not None:
        return cached
    ks = memory.keyspace
    i_groups, m, dk = lay.keys.shape
    hpg, d = ks.heads_per_group, ks.head_dim
    mean = memory.group_key == "mean"
    if mean and ks.whiten is not None:
        raise ValueError("the fused path takes group_key 'mean' without whitening only")
    inv_norm = lay.inv_norm.float()
    if ks.mode == "pre_rope" and ks.whiten is None:
        keys, bias = lay.keys.contiguous(), None
        if lay.key_scale is not None:  # cosine of the scaled keys from the stored ones
            inv_norm = inv_norm * lay.key_scale.float()
    else:
        dev = lay.keys.device
        h = ks.num_heads
        eye = torch.eye(d, dtype=torch.float64, device=dev)
        if ks.mode == "rope_common":
            assert ks.rope is not None
            pos = torch.tensor(ks.common_position, device=dev)
            cos, sin = ks.rope.cos_sin(pos, device=dev)
            rot = apply_rope(eye, cos.double(), sin.double()).T  # column j = A e_j
        else:
            rot = eye
        if ks.whiten is not None:
            w = ks.whiten[layer].to(dev, torch.float64)  # [H, d, d]: key = W (x - mu)
            mu = (
                ks.whiten_mean[layer].to(dev, torch.float64)
                if ks.whiten_mean is not None
                else torch.zeros(h, d, dtype=torch.float64, device=dev)
            )
        else:
            w = eye.expand(h, d, d)
            mu = torch.zeros(h, d, dtype=torch.float64, device=dev)
        tmat = (w @ rot).view(i_groups, hpg, d, d)  # key_h = T_h q_pre - c_h
        c = torch.einsum("hed,hd->he", w, mu).view(i_groups, hpg, d)
        if mean:  # key = T mean_j(q_j) - mean_j(c_j): one T per group (no whitening)
            tmat, c = tmat[:, :1], c.mean(dim=1, keepdim=True)
        k = lay.key_values().double().view(i_groups, m, -1, d)
        keys = torch.einsum("imje,ijed->imjd", k, tmat).reshape(i_groups, m, dk)
        fp8 = lay.keys.dtype == torch.float8_e4m3fn  # transformed keys are no longer fp8-exact
        keys = keys.to(torch.float16 if fp8 else lay.keys.dtype).contiguous()
        bias = -torch.einsum("imje,ije->im", k, c).float()
        if not bool(bias.abs().max() > 0):
            bias = None
    extras = _extras_fit(lay)
    fl = FusedLayer(
        keys=keys,
        inv_norm=inv_norm.contiguous(),
        bias=None if bias is None else bias.contiguous(),
        out=lay.out.contiguous(),
        lse=lay.lse.float().contiguous(),
        heads_per_group=hpg,
        q_mean=lay.extras["q_mean"].contiguous() if extras else None,
        k_bar=lay.extras["k_bar"].contiguous() if extras else None,
        group_mean=mean,
    )
    setattr(lay, _ATTR, fl)
    return fl


# -- the reference (torch ops, any device) ---------------------------------------------------


def decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor,
    fl: FusedLayer,
    inv_freq: torch.Tensor,
    rope_scaling: float,
    scale: float,
    lse_bias: float = 0.0,
    lse_correction: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `memory_attention` computes, with torch ops in float32.

    q [B, H, 1, d] post-RoPE, k/v [B, Hkv, N, d] live KV, mask boolean broadcasting to
    [B, 1, 1, N] (True = attend) or None, positions [B] (RoPE positions of q). With
    lse_correction the entry's lse gets `scale * (q_pre - q_mean) . k_bar` (fl must hold them).
    Returns (out [B, 1, H, d] in q's dtype, ids [B, H] the chosen entries).
    """
    b, h, t, d = q.shape
    assert t == 1
    i_groups, m, dk = fl.keys.shape
    hpg = fl.heads_per_group
    inv = inv_freq.to(q.device, torch.float32)
    freqs = positions.view(b, 1).float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * rope_scaling, emb.sin() * rope_scaling  # [B, d]
    q_pre = undo_rope(q[:, :, 0].float(), cos.unsqueeze(1), sin.unsqueeze(1))  # [B, H, d]
    if fl.group_mean:
        keys = q_pre.reshape(b, i_groups, hpg, d).mean(dim=2)
    else:
        keys = q_pre.reshape(b, i_groups, dk)
    sims = torch.einsum("bik,imk->bim", keys, fl.keys.float())
    if fl.bias is not None:
        sims = sims + fl.bias
    sims = sims * fl.inv_norm
    ids = sims.argmax(dim=-1)  # [B, I]
    groups = torch.arange(i_groups, device=q.device).view(1, -1)
    mem_out = fl.out[groups, ids].float().reshape(b, h, 1, -1)  # [B, I, h, d] -> [B, H, 1, d]
    mem_lse = fl.lse[groups, ids]  # [B, I, h]
    if lse_correction:
        if fl.q_mean is None or fl.k_bar is None:
            raise ValueError("lse_correction needs a memory layer with q_mean and k_bar")
        qg = q_pre.view(b, i_groups, hpg, d)
        q_mean = fl.q_mean[groups, ids].unsqueeze(2)  # [B, I, k=1, h, d]
        k_bar = fl.k_bar[groups, ids].unsqueeze(2)
        mem_lse = correct_lse(mem_lse.unsqueeze(2), qg, q_mean, k_bar, scale)[:, :, 0]
    mem_lse = (mem_lse + lse_bias).reshape(b, h, 1)
    live = attention_state(q, k, v, scale, mask)
    merged = merge_states(live, State(mem_out, mem_lse))
    head_ids = ids.repeat_interleave(hpg, dim=1)  # [B, H]
    return merged.out.to(q.dtype).transpose(1, 2).contiguous(), head_ids


@dataclass(frozen=True)
class Config:
    """Launch shape of the kernels (bench/attention.py sweeps them; see `default_config`)."""

    block_m: int = 128  # entries per scan tile
    scan_programs_per_sm: int = 1  # scan slices: about this many programs per SM over all groups
    live_programs_per_sm: int = 1
    block_n: int = 64  # live keys per tile
    num_warps: int = 8
    num_stages: int = 3
    combine_warps: int = 4
    keys_a: bool = True  # scan: the key tile as the large (M-side) operand of the products
    live_t: bool = False  # live attention: keys / values as the large operands
    gemv_max_batch: int = 0  # up to this many rows the scan uses float32 FMAs (slower on H100)


def default_config(batch: int) -> Config:
    """The shapes the H100 sweep of bench/attention.py chose (GPU_NOTES.md, run 3)."""
    if batch <= 4:
        return Config(block_m=128, num_warps=8, live_programs_per_sm=2)
    if batch <= 16:
        return Config(block_m=128, num_warps=4)
    return Config(block_m=64, num_warps=8)


DEFAULT_CONFIG = Config()
_DEVICE_COPIES: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _on_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x as contiguous float32 on `device`, copied once per (tensor, device)."""
    if x.device == device and x.dtype == torch.float32 and x.is_contiguous():
        return x
    key = (id(x), device)
    hit = _DEVICE_COPIES.get(key)
    if hit is None or hit[0] is not x:
        hit = (x, x.detach().to(device, torch.float32).contiguous())
        _DEVICE_COPIES[key] = hit
    return hit[1]


def memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor,
    fl: FusedLayer,
    inv_freq: torch.Tensor,
    rope_scaling: float,
    scale: float,
    lse_bias: float = 0.0,
    config: Config | None = None,
    return_ids: bool = False,
    _only: str | None = None,
    lse_correction: bool = False,
):
    """The fused decode layer: `decode_reference`'s function with two kernel launches.

    q [B, H, 1, d] post-RoPE, k/v [B, Hkv, N, d] live KV (last dim contiguous), mask boolean
    broadcasting to [B, 1, 1, N] or None, positions [B] int; lse_correction adds the
    first-order lse correction (fl must hold q_mean / k_bar). Returns out [B, 1, H, d] in q's
    dtype (and the chosen entry per head [B, H] with return_ids).
    """
    if not HAVE_TRITON:
        raise RuntimeError("the fused memory path needs Triton")
    b, h, t, d = q.shape
    if t != 1:
        raise ValueError("the fused memory path decodes one token per sequence (T = 1)")
    hkv, n = k.shape[1], k.shape[2]
    g = h // hkv
    i_groups, m, dk = fl.keys.shape
    hpg = fl.heads_per_group
    if dk != (d if fl.group_mean else hpg * d) or i_groups * hpg != h:
        raise ValueError(f"memory keys {list(fl.keys.shape)} do not fit {h} heads of dim {d}")
    if lse_correction and (fl.q_mean is None or fl.k_bar is None):
        raise ValueError("lse_correction needs a memory layer with q_mean and k_bar")
    dev = q.device
    if config is None:
        config = default_config(b)
    q2 = q[:, :, 0]
    if q2.stride(-1) != 1:
        q2 = q2.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    pos = positions.reshape(-1)
    if pos.numel() == 1 and b > 1:
        pos = pos.expand(b)
    pos = pos.contiguous()
    inv = _on_device(inv_freq, dev)
    sms = sm_count(dev)

    # scan grid: groups x slices of M x blocks of rows
    gemv = b <= config.gemv_max_batch
    if gemv:
        block_b = pow2(b)
        block_m = min(config.block_m, 16384 // (dk * block_b))  # [BLOCK_M, BLOCK_B, Dk] products
    else:
        block_b = 16 if b <= 16 else (32 if b <= 32 else 64)
        block_m = config.block_m if dk <= 128 else min(config.block_m, 32)
    nb = -(-b // block_b)
    tiles = -(-m // block_m)
    want = max(1, (config.scan_programs_per_sm * sms) // (i_groups * nb))
    tps = -(-tiles // min(tiles, want))
    s = -(-tiles // tps)
    # live grid: rows x KV heads x slices of the live context
    block_n = config.block_n
    want_l = max(1, (config.live_programs_per_sm * sms) // (b * hkv))
    ntiles = max(1, -(-n // block_n))
    per = -(-ntiles // min(ntiles, want_l))
    live_split = per * block_n
    sl = max(1, -(-n // live_split))

    f32 = torch.float32
    best_s = torch.empty(s, b, i_groups, dtype=f32, device=dev)
    best_i = torch.empty(s, b, i_groups, dtype=torch.int32, device=dev)
    lo = torch.empty(sl, b, h, d, dtype=f32, device=dev)
    ll = torch.empty(sl, b, h, dtype=f32, device=dev)
    out = torch.empty(b, 1, h, d, dtype=q.dtype, device=dev)
    ids = torch.empty(b, h, dtype=torch.int32, device=dev)
    if mask is not None:
        mk = mask.reshape(mask.shape[0], mask.shape[-1]) if mask.dim() != 2 else mask
        if mk.shape[0] == 1 and b > 1:
            mk = mk.expand(b, -1)
        if mk.dtype != torch.bool:
            raise ValueError("the fused memory path takes a boolean mask")
        sm_b, sm_n = mk.stride(0), mk.stride(1)
    else:
        mk, sm_b, sm_n = best_i, 0, 0  # unused
    bias = fl.bias if fl.bias is not None else fl.inv_norm  # unused without HAS_BIAS
    n_scan = i_groups * s * nb
    n_live = b * hkv * sl
    if _only == "scan":  # (timing breakdown in bench/attention.py: one kind of program alone)
        n_live = 0
    elif _only == "live":
        n_scan = 0
    gp = max(16, pow2(g))
    fk.phase1[(n_scan + n_live,)](
        n_scan, q2, q2.stride(0), q2.stride(1), pos, inv, float(rope_scaling),
        fl.keys, fl.inv_norm, bias, m, best_s, best_i, b, i_groups, s, tps,
        k, k.stride(0), k.stride(1), k.stride(2), v, v.stride(0), v.stride(1), v.stride(2),
        mk, sm_b, sm_n, n, h, hkv, sl, live_split, float(scale), lo, ll,
        HAS_BIAS=fl.bias is not None, KEY_F32=fl.keys.dtype == torch.float32,
        KEY_FP8=fl.keys.dtype == torch.float8_e4m3fn, DK=dk, QH=hpg if fl.group_mean else 1,
        HAS_MASK=mask is not None, IEEE=q.dtype == torch.float32,
        KEYS_A=config.keys_a, LIVE_T=config.live_t, GEMV=gemv,
        D=d, HPG=hpg, G=g, GP=gp, BLOCK_B=block_b, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if _only is not None:
        return out
    mo, ml = fl.out, fl.lse
    if lse_correction:
        qm, kb = fl.q_mean, fl.k_bar
        assert qm is not None and kb is not None
        qm_st, kb_st = qm.stride()[:3], kb.stride()[:3]
    else:
        qm = kb = ml  # unused without CORRECT
        qm_st = kb_st = (0, 0, 0)
    fk.combine[(b * hkv,)](
        best_s, best_i, s, b, i_groups, mo, mo.stride(0), mo.stride(1), mo.stride(2),
        ml, ml.stride(0), ml.stride(1), float(lse_bias),
        q2, q2.stride(0), q2.stride(1), pos, inv, float(rope_scaling),
        qm, *qm_st, kb, *kb_st, float(scale), lo, ll, sl,
        out, out.stride(0), out.stride(2), ids, h, hkv,
        D=d, HPG=hpg, G=g, GP=max(2, pow2(g)), SP=max(2, pow2(s)), SLP=max(2, pow2(sl)),
        CORRECT=bool(lse_correction), num_warps=config.combine_warps,
    )  # fmt: skip
    if return_ids:
        return out, ids
    return out


def floor_bytes(fl: FusedLayer, batch: int, heads: int, kv_heads: int, live: int, d: int,
                dtype_bytes: int = 2, lse_correction: bool = False) -> int:  # fmt: skip
    """The fewest bytes a fused decode layer moves: the keys once, the live KV, q, the gathered
    states (and q_mean / k_bar rows with the lse correction) and the output."""
    keys = fl.keys.numel() * fl.keys.element_size() + fl.inv_norm.numel() * 4
    if fl.bias is not None:
        keys += fl.bias.numel() * 4
    kv = 2 * batch * kv_heads * live * d * dtype_bytes
    io = 2 * batch * heads * d * dtype_bytes
    gathered = batch * heads * (d * fl.out.element_size() + 4)
    if lse_correction and fl.q_mean is not None and fl.k_bar is not None:
        gathered += batch * heads * d * (fl.q_mean.element_size() + fl.k_bar.element_size())
    return keys + kv + io + gathered


def memory_ok(memory: Memory, query: torch.Tensor) -> bool:
    """Whether `attention.memdb_attention` may take the fused path for this memory and query."""
    return (
        enabled()
        and query.is_cuda
        and query.shape[2] == 1
        and memory.device == query.device
        and supports(memory)
    )


__all__ = [
    "Config",
    "DEFAULT_CONFIG",
    "default_config",
    "FusedLayer",
    "decode_reference",
    "disabled",
    "enabled",
    "floor_bytes",
    "lse_bias",
    "memory_attention",
    "memory_ok",
    "prepare_layer",
    "set_enabled",
    "supports",
]
