"""Automatic prefix caching (worker/memdb_worker/serve/prefix_cache.py) and its use by the
scheduler."""

from __future__ import annotations

import torch

from memdb_worker.attend.attention import bind
from memdb_worker.serve.prefix_cache import PrefixCache
from memdb_worker.serve.scheduler import SamplingParams, Scheduler
from tests.tiny import tiny_llama

VOCAB = 256


def _ids(n, seed):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _logits(model, ids, source=None):
    with torch.inference_mode(), bind(model, source):
        return model(torch.tensor([ids])).logits[0, -1]


def test_split_caches_block_aligned_prefixes_and_shares_them():
    model = tiny_llama(VOCAB)
    cache = PrefixCache(model, 1 << 30, block=8, min_tokens=16)
    shared = _ids(21, 0)
    a, b = shared + _ids(10, 1), shared + _ids(7, 2)
    src, rest = cache.split(a)  # miss: the aligned part (24 of 31 tokens) is encoded
    assert cache.stats.misses == 1 and src.token_count == 24 and rest == a[24:]
    src_b, rest_b = cache.split(b)  # hit: 21 common tokens -> the first 16 (block aligned)
    assert cache.stats.hits == 1 and src_b.token_count == 16 and rest_b == b[16:]
    assert cache.split(b)[0] is src_b  # one shared source per (entry, length)
    assert cache.split(_ids(12, 3)) == (None, _ids(12, 3))  # too short to cache
    # bound to the cached prefix, the rest of the prompt gives the whole prompt's logits
    for prompt, s, r in ((a, src, rest), (b, src_b, rest_b)):
        full = _logits(model, prompt)
        assert float((_logits(model, r, s) - full).abs().max() / full.abs().max()) < 1e-5
    assert float((_logits(model, rest_b) - _logits(model, b)).abs().max()) > 1e-3  # it matters


def test_cache_evicts_least_recently_used_beyond_its_budget():
    model = tiny_llama(VOCAB)
    one = PrefixCache(model, 1 << 30, block=8, min_tokens=16)
    one.split(_ids(33, 5))
    per = one.stats.bytes
    cache = PrefixCache(model, int(per * 2.5), block=8, min_tokens=16)
    first, second, third = _ids(33, 5), _ids(33, 6), _ids(33, 7)
    for p in (first, second, third):
        cache.split(p)
    assert cache.stats.entries == 2 and cache.stats.bytes <= int(per * 2.5)
    cache.split(first)  # evicted: encoded again
    assert cache.stats.misses == 4 and cache.stats.hits == 0


def test_scheduler_with_prefix_cache_generates_the_same_tokens():
    model = tiny_llama(VOCAB)
    shared = _ids(40, 8)
    prompts = [shared + _ids(5, 9), shared + _ids(6, 10)]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)

    cache = PrefixCache(model, 1 << 30, block=8, min_tokens=16)
    got_tokens = _generate_ids(model, prompts, params, cache)
    want_tokens = _generate_ids(model, prompts, params, None)
    assert got_tokens == want_tokens
    assert cache.stats.misses == 1 and cache.stats.hits == 1


def _generate_ids(model, prompts, params, cache):
    import queue

    from memdb_worker.serve.scheduler import GenerationRequest

    sched = Scheduler(model, None, max_batch=2, prefix_cache=cache).start()
    out = []
    try:
        for p in prompts:
            events: queue.Queue = queue.Queue()
            sched.submit(GenerationRequest(p, params, events.put))
            ids = []
            while True:
                ev = events.get(timeout=60)
                assert ev.error is None, ev.error
                ids += ev.token_ids
                if ev.final:
                    assert ev.prompt_tokens == len(p)  # usage counts the whole prompt
                    break
            out.append(ids)
    finally:
        sched.stop()
    return out
