"""Scoring continuations (e.g. class labels) after one shared context, in one batched forward.

`score_continuations` runs the context once (KV cache), repeats the cache for the L candidates
and scores them together: the log-likelihood a classifier compares across labels. A state source
(memory, exact prefix, or None for plain) can be bound for both passes, so zero-shot, in-context
(exact prefix) and memory scoring share this code.

`score_pairs` scores many (context, continuation) pairs, each continuation after its own
context, packed into right-padded batches of whole sequences (no cache): far fewer forwards
when there are many short examples, e.g. a benchmark's test set. The log-softmax is taken only
where a continuation token is predicted. Both give the same numbers up to float rounding.

This module knows nothing of data sets, prompts or how sources are built.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch

from memdb_worker.attend.attention import LivePositions, StateSource, bind

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


@torch.inference_mode()
def score_pairs(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    source: StateSource | None = None,
    *,
    max_tokens: int = 8192,
    live_positions: LivePositions = "after_prefix",
) -> torch.Tensor:
    """Sum of token log-probabilities of each continuation after its context: [P] float32.

    Sequences are sorted by length and packed into forwards of at most `max_tokens` padded
    tokens (a longer single sequence still runs alone).
    """
    pairs = [(list(map(int, c)), list(map(int, x))) for c, x in pairs]
    if any(not c or not x for c, x in pairs):
        raise ValueError("every pair needs a non-empty context and continuation")
    out = torch.zeros(len(pairs), dtype=torch.float32)
    seqs = [c + x for c, x in pairs]
    for rows, hidden in _packed_forwards(model, seqs, source, max_tokens, live_positions):
        at_row, at_pos, targets, owner = [], [], [], []
        for r, i in enumerate(rows):
            ctx, cont = pairs[i]
            at_row += [r] * len(cont)
            at_pos += range(len(ctx) - 1, len(ctx) + len(cont) - 1)  # predicting each token
            targets += cont
            owner += [i] * len(cont)
        logp = _logprobs(model, hidden, at_row, at_pos)  # [K, V]
        tgt = torch.tensor(targets, device=logp.device).unsqueeze(-1)
        out.index_add_(0, torch.tensor(owner), logp.gather(-1, tgt)[:, 0].cpu())
    return out


@torch.inference_mode()
def next_token_logprobs(
    model: torch.nn.Module,
    contexts: Sequence[Sequence[int]],
    source: StateSource | None = None,
    *,
    max_tokens: int = 8192,
    live_positions: LivePositions = "after_prefix",
) -> torch.Tensor:
    """Log-probabilities [C, V] of the token after each context (packed like `score_pairs`)."""
    seqs = [list(map(int, c)) for c in contexts]
    if any(not c for c in seqs):
        raise ValueError("every context needs at least one token")
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for rows, hidden in _packed_forwards(model, seqs, source, max_tokens, live_positions):
        logp = _logprobs(model, hidden, list(range(len(rows))), [len(seqs[i]) - 1 for i in rows])
        for r, i in enumerate(rows):
            out[i] = logp[r].cpu()
    return torch.stack(out)  # type: ignore[arg-type]


def _packed_forwards(model, seqs: list[list[int]], source, max_tokens: int, live_positions):
    """Yield (row -> sequence index, last hidden states [b, W, D]) over length-sorted,
    right-padded batches of at most max_tokens padded tokens."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    start = 0
    while start < len(order):
        width = len(seqs[order[start]])
        rows = order[start : start + max(1, max_tokens // width)]
        start += len(rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, : len(seqs[i])] = 1
        with bind(model, source, live_positions=live_positions):
            hidden = _backbone(model)(ids.to(device), attention_mask=mask.to(device))[0]
        yield rows, hidden


def _logprobs(model, hidden: torch.Tensor, rows: list[int], pos: list[int]) -> torch.Tensor:
    """log-softmax of the LM head at the given (row, position)s only: [K, V] float32."""
    dev = hidden.device
    h = hidden[torch.tensor(rows, device=dev), torch.tensor(pos, device=dev)]
    return torch.log_softmax(model.lm_head(h).float(), dim=-1)


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder under the LM head (transformers' `model.model`)."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(model, "lm_head"):
        raise ValueError("score_pairs needs a causal LM with `.model` and `.lm_head`")
    return inner


def _cache_kwarg(model: torch.nn.Module) -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x); accept both
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
