"""Scoring continuations (e.g. class labels) after one shared context, in one batched forward.

`score_continuations` runs the context once (KV cache), repeats the cache for the L candidates
and scores them together: the log-likelihood a classifier compares across labels. A state source
(memory, exact prefix, or None for plain) can be bound for both passes, so zero-shot, in-context
(exact prefix) and memory scoring share this code.

This module knows nothing of data sets, prompts or how sources are built.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch

from memdb_worker.attention import LivePositions, StateSource, bind

logger = logging.getLogger(__name__)


@torch.inference_mode()
def score_continuations(
    model: torch.nn.Module,
    context_ids: Sequence[int] | torch.Tensor,
    continuations: Sequence[Sequence[int]],
    source: StateSource | None = None,
    *,
    live_positions: LivePositions = "after_prefix",
) -> torch.Tensor:
    """Sum of token log-probabilities of each continuation after the context: [L] float32.

    context_ids must be non-empty (its last token predicts each continuation's first token).
    """
    ctx = torch.as_tensor(context_ids, dtype=torch.long).flatten()
    if ctx.numel() == 0:
        raise ValueError("the context must hold at least one token")
    conts = [list(map(int, c)) for c in continuations]
    if not conts or any(len(c) == 0 for c in conts):
        raise ValueError("every continuation needs at least one token")
    device = next(model.parameters()).device
    n_ctx, n = ctx.numel(), len(conts)
    width = max(len(c) for c in conts)
    ids = torch.zeros(n, width, dtype=torch.long)
    valid = torch.zeros(n, width, dtype=torch.bool)
    for i, c in enumerate(conts):
        ids[i, : len(c)] = torch.tensor(c)
        valid[i, : len(c)] = True
    ids, valid = ids.to(device), valid.to(device)
    with bind(model, source, live_positions=live_positions):
        first = model(ctx.unsqueeze(0).to(device), use_cache=True, logits_to_keep=1)
        cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
        cache.batch_repeat_interleave(n)
        mask = torch.cat([torch.ones(n, n_ctx, dtype=torch.long, device=device), valid.long()], 1)
        pos = (torch.arange(width, device=device) + n_ctx).unsqueeze(0).expand(n, width)
        rest = model(
            ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{_cache_kwarg(model): cache},
        )
    logits = torch.cat([first.logits[:, -1:].expand(n, 1, -1), rest.logits[:, :-1]], dim=1)
    logp = torch.log_softmax(logits.float(), dim=-1)  # [L, W, V]
    tok = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [L, W]
    return (tok * valid).sum(dim=1).cpu()


def _cache_kwarg(model: torch.nn.Module) -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x); accept both
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
