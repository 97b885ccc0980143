"""Automatic prefix caching: the KV of a long prompt's leading tokens computed once and shared.

What an inference server with prefix caching does for requests that repeat a long prefix (a
manual, many-shot demonstrations) in their prompt: the prefix's keys/values are computed once
and every later request that starts with it prefills only its own tail, attending to the cached
KV. Here the cached KV is an `memory.PrefixKV` (one chunk, positions 0..n-1), a state source
for `attention.bind`: a request whose prompt starts with n cached tokens runs bound to the
prefix's first n tokens (live positions after it, which reproduces the whole prompt exactly) with
only `prompt[n:]` as its prompt.

`PrefixCache.split(prompt_ids)` returns (source, rest): the longest cached block-aligned prefix of
the prompt (at least `min_tokens`, leaving at least one token to prefill), or on a miss, when
the prompt's aligned part is long enough, encodes that part (one forward: the prefill it
replaces), caches it and returns it. The same (entry, length) always gives the same source
object, so rows of a batch that share it are folded into one attention over its KV. Entries are
evicted least recently used beyond `budget_bytes`.

Runs on the scheduler's thread (it runs the model); knows nothing of requests or memories.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from memdb_worker.memory.prefix_kv import PrefixKV
from memdb_worker.model.prefix import encode_prefix

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    ids: tuple[int, ...]
    prefix: PrefixKV
    heads: dict[int, PrefixKV] = field(default_factory=dict)  # length -> shared head view

    def head(self, n: int) -> PrefixKV:
        if n == len(self.ids):
            return self.prefix
        if n not in self.heads:
            self.heads[n] = self.prefix.head(n)
        return self.heads[n]


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0  # prompts long enough whose prefix was encoded and cached
    bytes: int = 0
    entries: int = 0


class PrefixCache:
    """LRU of encoded prompt prefixes (see the module doc)."""

    def __init__(
        self,
        model: torch.nn.Module,
        budget_bytes: int,
        *,
        block: int = 64,
        min_tokens: int = 256,
    ) -> None:
        if block < 1 or min_tokens < 1:
            raise ValueError("block and min_tokens must be >= 1")
        self.model = model
        self.budget_bytes = budget_bytes
        self.block = block
        self.min_tokens = min_tokens
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self.stats = PrefixCacheStats()

    def split(self, prompt_ids: Sequence[int]) -> tuple[PrefixKV | None, list[int]]:
        """(cached prefix source or None, the prompt tokens left to prefill)."""
        ids = list(prompt_ids)
        limit = (len(ids) - 1) // self.block * self.block  # leave >= 1 token to prefill
        if limit < self.min_tokens or self.budget_bytes <= 0:
            return None, ids
        best, best_n = None, 0
        for entry in self._entries.values():
            n = min(_common(entry.ids, ids), limit) // self.block * self.block
            if n > best_n:
                best, best_n = entry, n
        if best is not None and best_n >= self.min_tokens:
            self._entries.move_to_end(best.ids)
            self.stats.hits += 1
            return best.head(best_n), ids[best_n:]
        key = tuple(ids[:limit])
        prefix = encode_prefix(self.model, list(key), chunk_tokens=limit)
        entry = _Entry(key, prefix)
        self._entries[key] = entry
        self.stats.misses += 1
        self._evict()
        return entry.prefix, ids[limit:]

    def _evict(self) -> None:
        total = sum(e.prefix.nbytes() for e in self._entries.values())
        while total > self.budget_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            total -= old.prefix.nbytes()
        self.stats.bytes, self.stats.entries = total, len(self._entries)


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


__all__ = ["PrefixCache", "PrefixCacheStats"]
