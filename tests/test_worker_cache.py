"""The worker's memory cache and scheduler on a tiny random Llama against an in-process server:
LRU eviction by bytes, Watch invalidation, errors, remote mode == cache mode, batching."""

from __future__ import annotations

import dataclasses
import queue
import time

import pytest
import torch

from memdb.errors import FailedPrecondition, NotFound, Unavailable
from memdb_client import MemdbClient
from memdb_server.config import ServerConfig
from memdb_server.server import run_server
from memdb_worker.attend.attention import bind
from memdb_worker.build import BuildOptions, build_memory
from memdb_worker.memory.memory import DecodeOptions, Memory
from memdb_worker.model.loading import model_fingerprint
from memdb_worker.serve.cache import MemoryCache, RemoteMemory
from memdb_worker.serve.scheduler import GenerationRequest, SamplingParams, Scheduler
from tests.tiny import reference_options, tiny_llama

VOCAB = 256
ROOT_KEY = "test-root-key"


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(VOCAB)


@pytest.fixture(scope="module")
def built(tiny):
    """Two memories of the tiny model from different random prefixes (budget 8)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        prefix = torch.randint(3, VOCAB, (40,), generator=g).tolist()
        traces = [torch.randint(3, VOCAB, (12,), generator=g).tolist() for _ in range(3)]
        opts = reference_options(lse_correction=False)  # plain memories (no q_mean / k_bar)
        out.append(build_memory(tiny, None, prefix, traces, 8, opts, progress=False))
    return out


@pytest.fixture(scope="module")
def built_lse(tiny):
    """A memory of the tiny model built with the reference options (looked-up entries): it
    stores q_mean and k_bar for the first-order lse correction."""
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(3, VOCAB, (40,), generator=g).tolist()
    traces = [torch.randint(3, VOCAB, (12,), generator=g).tolist() for _ in range(3)]
    return build_memory(tiny, None, prefix, traces, 8, reference_options(), progress=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = ServerConfig(data_dir=tmp_path_factory.mktemp("data"), listen="127.0.0.1:0",
                       metrics_listen="", admin_key=ROOT_KEY)  # fmt: skip
    with run_server(cfg) as s:
        yield s


@pytest.fixture
def root(server):
    with MemdbClient(server.address, ROOT_KEY) as c:
        yield c


def put(root, name, b, fp):
    return root.put_prefix(name, b.shards, model_fingerprint=fp, token_count=b.token_count,
                           mode="upsert")  # fmt: skip


def make_cache(server, fp, **kw) -> MemoryCache:
    cache = MemoryCache(lambda: MemdbClient(server.address, ROOT_KEY), fp, **kw).start()
    assert cache.wait_connected(10)
    return cache


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_cache_fetches_once_and_evicts_least_recently_used_by_bytes(server, root, tiny, built):
    fp = model_fingerprint(tiny)
    put(root, "lru-a", built[0], fp)
    put(root, "lru-b", built[1], fp)
    one = built[0].to_memory().nbytes()
    with make_cache(server, fp, budget_bytes=int(one * 1.5)) as cache:
        a = cache.get("lru-a")
        assert isinstance(a, Memory) and cache.get("lru-a") is a  # a hit: the same tensors
        assert cache.stats().misses == 1 and cache.stats().hits == 1
        cache.get("lru-b")  # over budget: a (least recently used) goes
        assert list(cache.versions()) == ["lru-b"] and cache.stats().evictions == 1
        assert cache.stats().bytes <= cache.budget_bytes
        cache.get("lru-a")
        assert list(cache.versions()) == ["lru-a"]
    with make_cache(server, fp, budget_bytes=one * 3) as cache:
        cache.get("lru-a"), cache.get("lru-b")
        cache.get("lru-a")  # a becomes most recent
        assert list(cache.versions()) == ["lru-b", "lru-a"] and cache.stats().evictions == 0
    with make_cache(server, fp, budget_bytes=one // 4) as cache:  # too large to cache: remote
        assert isinstance(cache.get("lru-a"), RemoteMemory) and list(cache.versions()) == ["lru-a"]
        assert cache.stats().bytes == 0


def test_watch_drops_updated_and_deleted_memories_within_a_second(server, root, tiny, built):
    fp = model_fingerprint(tiny)
    v1 = put(root, "watched", built[0], fp).version
    with make_cache(server, fp) as cache:
        held = cache.get("watched")  # a request in flight holds this one
        assert cache.versions() == {"watched": v1}
        t0 = time.monotonic()
        v2 = put(root, "watched", built[1], fp).version
        assert wait_for(lambda: "watched" not in cache.versions(), 1.0)
        assert time.monotonic() - t0 < 1.0
        new = cache.get("watched")
        assert cache.versions() == {"watched": v2} and new is not held
        assert torch.equal(held.layers[0].keys, built[0].to_memory().layers[0].keys)  # intact
        root.delete_prefix("watched")
        assert wait_for(lambda: "watched" not in cache.versions(), 1.0)
        with pytest.raises(NotFound):
            cache.get("watched")


def test_errors_unknown_memory_other_model_unreachable_server(server, root, tiny, built):
    fp = model_fingerprint(tiny)
    put(root, "err-mem", built[0], fp)
    with make_cache(server, fp) as cache:
        with pytest.raises(NotFound, match="no-such"):
            cache.get("no-such")
    with make_cache(server, "sha256:another-model") as cache:
        with pytest.raises(FailedPrecondition):
            cache.get("err-mem")
    cache = MemoryCache(lambda: MemdbClient("127.0.0.1:1", ROOT_KEY, timeout=2), fp).start()
    try:
        assert not cache.wait_connected(0.3)
        with pytest.raises(Unavailable):
            cache.get("err-mem")
    finally:
        cache.close()


def test_remote_mode_refuses_a_fitted_memory_that_cache_mode_holds(server, root, tiny):
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(3, VOCAB, (40,), generator=g).tolist()
    traces = [torch.randint(3, VOCAB, (12,), generator=g).tolist() for _ in range(3)]
    fitted = build_memory(tiny, None, prefix, traces, 8, BuildOptions(), progress=False)
    fp = model_fingerprint(tiny)
    put(root, "fitted", fitted, fp)  # the builder's defaults: fitted rows
    with make_cache(server, fp, mode="cache") as cache:
        got = cache.get("fitted")
        assert isinstance(got, Memory) and got.fitted
    with make_cache(server, fp, mode="remote") as cache:
        with pytest.raises(FailedPrecondition, match="fitted entries.*--memory-mode cache"):
            cache.get("fitted")


def test_remote_mode_gives_the_same_tokens_as_cache_mode(server, root, tiny, built):
    fp = model_fingerprint(tiny)
    put(root, "remote-eq", built[0], fp)
    prompt = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    outs = []
    for mode in ("cache", "remote"):
        with make_cache(server, fp, mode=mode) as cache:
            source = cache.get("remote-eq")
            assert isinstance(source, RemoteMemory if mode == "remote" else Memory)
            with bind(tiny, source):
                out = tiny.generate(prompt, attention_mask=torch.ones_like(prompt),
                                    max_new_tokens=8, do_sample=False, pad_token_id=0)  # fmt: skip
            outs.append(out)
            if mode == "remote":
                assert source.lookups >= 8 * tiny.config.num_hidden_layers
    with bind(tiny, None):
        plain = tiny.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                              do_sample=False, pad_token_id=0)  # fmt: skip
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], plain)  # the memory matters, so the test can fail


@pytest.mark.parametrize(
    "options", [None, DecodeOptions(top_k=3, lse_bias=0.25)], ids=["default", "top3-bias"]
)
def test_remote_mode_applies_the_lse_correction_and_options_like_cache_mode(
    server, root, tiny, built_lse, options
):
    fp = model_fingerprint(tiny)
    put(root, "remote-lse", built_lse, fp)
    prompt = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(6))
    gen = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
               pad_token_id=0)  # fmt: skip
    logits, tokens, sources = {}, {}, {}
    for mode in ("cache", "remote"):
        with make_cache(server, fp, mode=mode, decode_options=options) as cache:
            source = sources[mode] = cache.get("remote-lse")
            assert isinstance(source, RemoteMemory if mode == "remote" else Memory)
            assert source.lse_corrected  # a reference build: the lse correction applies
            with bind(tiny, source):
                logits[mode] = tiny(prompt).logits
                tokens[mode] = tiny.generate(prompt, **gen)
    torch.testing.assert_close(logits["remote"], logits["cache"], rtol=0, atol=1e-4)
    assert torch.equal(tokens["remote"], tokens["cache"])
    # the correction moves the logits, so remote mode without it (as before) fails this test
    plain = dataclasses.replace(options or DecodeOptions(), lse_correction=False)
    with bind(tiny, sources["cache"].with_options(plain)):
        uncorrected = tiny(prompt).logits
    assert (uncorrected - logits["cache"]).abs().max() > 100 * 1e-4


def test_scheduler_batches_rows_with_mixed_memories_like_single_requests(tiny, built):
    memory = built[0].to_memory()
    sched = Scheduler(tiny, None, max_batch=8, batch_wait_s=0.2).start()
    try:
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 7, 12)]
        sources = [memory, None, memory, None]
        params = SamplingParams(max_tokens=6)
        alone = []
        for p, s in zip(prompts, sources, strict=True):
            alone.append(_tokens(sched, True, p, s, params)[0])
        together = _tokens(sched, False, prompts, sources, params)
        assert together == alone and all(len(t) == 6 for t in alone)
        assert sched.stats.last_batch_size == 4
    finally:
        sched.stop()


def _tokens(sched, single, prompts, sources, params):
    """Submit requests at once and collect each one's token ids."""
    if single:
        prompts, sources = [prompts], [sources]
    outs = [queue.Queue() for _ in prompts]
    for p, s, q in zip(prompts, sources, outs, strict=True):
        sched.submit(GenerationRequest(p, params, q.put, s))
    result = []
    for q in outs:
        ids = []
        while True:
            ev = q.get(timeout=30)
            assert ev.error is None, ev.error
            ids += ev.token_ids
            if ev.final:
                break
        result.append(ids)
    return result


def test_requests_join_a_running_batch_and_get_the_same_tokens(tiny, built):
    memory = built[0].to_memory()
    sched = Scheduler(tiny, None, max_batch=8, batch_wait_s=0).start()
    try:
        g = torch.Generator().manual_seed(4)
        long_prompt = torch.randint(3, VOCAB, (5,), generator=g).tolist()
        joiners = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (40, 3)]
        long_params, params = SamplingParams(max_tokens=150), SamplingParams(max_tokens=6)
        ref_long = _tokens(sched, True, long_prompt, memory, long_params)[0]
        pairs = zip(joiners, [memory, None], strict=True)
        ref = [_tokens(sched, True, p, s, params)[0] for p, s in pairs]
        steps0 = sched.stats.steps
        long_q: queue.Queue = queue.Queue()
        sched.submit(GenerationRequest(long_prompt, long_params, long_q.put, memory))
        assert wait_for(lambda: sched.stats.steps >= steps0 + 3)
        # one joiner longer than the running batch's cache, one shorter
        got = _tokens(sched, False, joiners, [memory, None], params)
        long_ids = []
        while not (ev := long_q.get(timeout=30)).final:
            long_ids += ev.token_ids
        long_ids += ev.token_ids
        assert got == ref and long_ids == ref_long
        assert sched.stats.batches >= 5  # 3 alone + the long one + the joiners (together)
        assert sched.stats.step_rows > sched.stats.steps  # rows shared decode steps
    finally:
        sched.stop()


def test_a_scheduler_leaves_the_model_config_eos_ids_as_they_are(tiny):
    """The config feeds the model fingerprint: building schedulers must not change it."""
    tok = type("Tok", (), {"eos_token_id": 7, "pad_token_id": None})()
    before = tiny.config.eos_token_id
    tiny.config.eos_token_id = [2]
    try:
        for _ in range(3):
            assert Scheduler(tiny, tok).eos == {2, 7}
        assert tiny.config.eos_token_id == [2]
    finally:
        tiny.config.eos_token_id = before
