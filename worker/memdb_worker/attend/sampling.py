"""The one sampler of every decode path (the scheduler's eager batches, the static step, its
CUDA graphs): the next token of each row from its logits.

A row at temperature 0 takes the argmax. Otherwise it draws from softmax(logits / temperature)
restricted to its top-k tokens (top_k = 0: all) and to its nucleus (the most probable tokens
whose mass before them is <= top_p; the most probable token always stays), renormalized. The draw
is Gumbel-max: argmax over the kept tokens of logits / temperature + G, where G = -log(-log(u))
and u is a counter-based hash of (the row's seed, the row's step, the token id), not a
generator's state. So a row's draws depend only on its seed and how many tokens it has sampled:
the same seeded request gets the same tokens on the eager path and in a CUDA graph, and
`sample` is tensor ops only (no host sync, no generator), safe to capture.

Shapes: logits [B, V] float32; temps, top_p [B] float32; top_k, seeds, steps [B] int64.
Returns tokens [B] int64. Knows nothing of requests or models.
"""

from __future__ import annotations

import random

import torch

_MASK24 = (1 << 24) - 1
# splitmix64's constants, as the int64 values of their bits (torch multiplies int64 modulo 2**64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_STEP = 0xD1B54A32D192ED03 - (1 << 64)


def new_seed() -> int:
    """A seed for a request that names none (drawn from the OS's entropy)."""
    return random.SystemRandom().randrange(1 << 62)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> keeps the sign)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer: every output bit depends on every input bit."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """u in (0, 1) per (row, token id): [B, V] float32, a hash of (seed, step, token id)."""
    row = _mix(seeds * _GOLDEN + steps * _STEP)  # [B]
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _shr(_mix(row.view(-1, 1) + ids.view(1, -1) * _GOLDEN), 40) & _MASK24  # 24 bits
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


def sample(
    logits: torch.Tensor,
    temps: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    *,
    truncate: bool = True,
) -> torch.Tensor:
    """The next token of each row (module doc). `truncate=False`, a shortcut for the eager
    path when no row has top_p < 1 or top_k > 0 (a CUDA graph keeps the default), skips the
    sort and draws the same token."""
    greedy = logits.argmax(dim=-1)
    b, v = logits.shape
    scaled = logits / temps.clamp_min(1e-6).view(b, 1)
    if not truncate:  # every token kept: the argmax needs no order
        drawn = (scaled - torch.log(-torch.log(uniform(seeds, steps, v)))).argmax(dim=-1)
        return torch.where(temps > 0, drawn, greedy)
    ordered, order = scaled.sort(dim=-1, descending=True)  # [B, V]
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # the mass of the more probable tokens
    rank = torch.arange(v, device=logits.device).view(1, v)
    keep = (before <= top_p.view(b, 1)) & ((top_k.view(b, 1) <= 0) | (rank < top_k.view(b, 1)))
    keep[:, 0] = True
    u = uniform(seeds, steps, v).gather(1, order)  # each token id keeps its own noise
    gumbel = -torch.log(-torch.log(u))
    score = torch.where(keep, ordered + gumbel, torch.full_like(ordered, float("-inf")))
    drawn = order.gather(1, score.argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(temps > 0, drawn, greedy)


__all__ = ["new_seed", "sample", "uniform"]
