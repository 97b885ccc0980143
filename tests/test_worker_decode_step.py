"""The static-cache decode step (worker/memdb_worker/attend/decode_step.py).

On CPU: its eager step generates the tokens the worker's scheduler generates (transformers'
forward with a DynamicCache, `attention.bind`), greedy, for neither / a memory of looked-up
entries / a memory of fitted rows (the builder's defaults) / the exact prefix (prefix-cached),
with the batch padded to a bucket. On CUDA (skipped without a GPU): the graphed step generates
the tokens of the eager step, through the fused memory path and the shared-prefix kernels, at
several buckets.
"""

from __future__ import annotations

import threading

import pytest
import torch

from memdb_worker.attend.decode_step import StaticDecoder, bucket
from memdb_worker.build import BuildOptions, build_memory
from memdb_worker.model.prefix import encode_prefix
from memdb_worker.serve.scheduler import GenerationRequest, SamplingParams, Scheduler
from tests.tiny import lookup_options, tiny_llama

VOCAB = 256
NEW = 6
WAYS = ["neither", "memory", "fitted", "prefix"]  # memory: looked-up entries; fitted: rows


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(VOCAB)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, VOCAB, (48,), generator=g).tolist()
    traces = [torch.randint(3, VOCAB, (12,), generator=g).tolist() for _ in range(4)]
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3)]
    built = build_memory(model, None, prefix, traces, budget=16,
                         options=lookup_options(lse_correction=True), progress=False)  # fmt: skip
    # the builder's defaults: fitted rows (attended as a whole, the reference path on CPU)
    fitted = build_memory(model, None, prefix, traces, budget=16, options=BuildOptions(),
                          progress=False)  # fmt: skip
    assert fitted.to_memory().fitted
    sources = {"neither": None, "memory": built.to_memory(), "fitted": fitted.to_memory(),
               "prefix": encode_prefix(model, prefix)}  # fmt: skip
    return model, prompts, sources


def scheduler_tokens(model, prompts, source) -> list[list[int]]:
    sched = Scheduler(model, None, max_batch=len(prompts), batch_wait_s=0.5).start()
    got = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def sink(i):
        def f(ev):
            assert ev.error is None, ev.error
            got[i].extend(ev.token_ids)
            if ev.final:
                done[i].set()

        return f

    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    try:
        for i, p in enumerate(prompts):
            sched.submit(GenerationRequest(p, params, sink(i), source))
        for e in done:
            assert e.wait(60)
    finally:
        sched.stop()
    assert sched.stats.batches == 1  # one prefill of all rows, as the static decoder does
    return got


def static_tokens(dec: StaticDecoder, prompts, graphed=False) -> list[list[int]]:
    n = len(prompts)
    slots = list(range(n))
    first = dec.prefill(slots, prompts).argmax(dim=-1).tolist()
    dec.set_tokens(slots, first)
    out = [[t] for t in first]
    b = bucket(n)
    for _ in range(NEW - 1):
        nxt = dec.step(b, graphed=graphed).tolist()
        for i in range(n):
            out[i].append(nxt[i])
    return out


@pytest.mark.parametrize("way", WAYS)
def test_static_step_generates_the_schedulers_tokens(setup, way):
    model, prompts, sources = setup
    want = scheduler_tokens(model, prompts, sources[way])
    dec = StaticDecoder(model, max_batch=4, max_live=32, source=sources[way])
    got = static_tokens(dec, prompts)  # 3 rows in bucket 4
    assert got == want
    assert dec.host_lengths[:3] == [len(p) + NEW - 1 for p in prompts]


def test_ways_generate_differently(setup):
    """The sources matter here (so the test above can fail)."""
    model, prompts, sources = setup
    toks = {w: static_tokens(StaticDecoder(model, 4, 32, s), prompts) for w, s in sources.items()}
    assert toks["neither"] != toks["prefix"] and toks["memory"] != toks["neither"]
    assert toks["fitted"] != toks["neither"]


def test_bucket_and_capacity(setup):
    assert [bucket(n) for n in (1, 2, 3, 5, 9, 32)] == [1, 2, 4, 8, 16, 32]
    with pytest.raises(ValueError):
        bucket(33)
    model, prompts, sources = setup
    dec = StaticDecoder(model, max_batch=2, max_live=8, source=None)
    with pytest.raises(ValueError, match="do not fit"):
        dec.prefill([0], [list(range(3, 12))])
    dec.prefill([0], [[5, 6, 7, 8, 9, 10, 11]])
    dec.step(1)
    with pytest.raises(ValueError, match="full"):
        dec.step(1)


def test_a_slot_emptied_by_compact_never_fills_the_bucket_before_its_rows(setup):
    model, prompts, sources = setup
    dec = StaticDecoder(model, max_batch=2, max_live=8, source=None)
    dec.prefill([0, 1], [[5, 6], [5, 6, 7, 8, 9, 10]])  # slot 1 is nearly full
    dec.compact([0])  # its row left: slot 1 pads the bucket from now on
    assert dec.host_lengths == [2, 0] and dec.lengths.tolist() == [2, 0]
    for _ in range(5):  # the row in slot 0 decodes on; the padding slot never fills first
        dec.step(2)
    assert dec.host_lengths == [7, 5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("way", ["neither", "memory", "prefix"])
def test_graphed_step_generates_the_eager_tokens_on_cuda(way):
    from tests.tiny import tiny_llama as make

    model = make(VOCAB, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=512)  # fmt: skip
    model = model.to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(3, VOCAB, (200,), generator=g).tolist()
    source = None
    if way == "memory":  # random entries of the model's shape (no faiss needed on the device)
        from tests.test_worker_fused import make_memory

        source = make_memory(heads=4, kv_heads=2, d=64, budget=64, layers=3, device="cuda",
                             key_dtype=torch.float16, out_dtype=torch.float16,
                             extras_dtype=torch.float16)  # fmt: skip
    elif way == "prefix":
        source = encode_prefix(model, prefix)
    for n in (1, 3, 8):
        prompts = [torch.randint(3, VOCAB, (4 + i,), generator=g).tolist() for i in range(n)]
        eager = static_tokens(StaticDecoder(model, 8, 64, source), prompts)
        dec = StaticDecoder(model, 8, 64, source)
        graphed = static_tokens(dec, prompts, graphed=True)
        assert bucket(n) in dec.graphs
        assert graphed == eager, (way, n)
        if way == "memory":
            assert dec.attention.path == "entries_kernel"  # the fused kernels ran in the graph


def run_scheduler(model, prompts, maxes, source, static_live, **sampling):
    """Tokens of each request through the scheduler: the last request is submitted when the
    first one has its first token (it joins the running batch); rows finish at their own
    max_tokens (a static batch compacts its slots)."""
    sched = Scheduler(model, None, max_batch=4, batch_wait_s=0.3, static_live=static_live)
    sched.start()
    got = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def request(i):
        def sink(ev):
            assert ev.error is None, ev.error
            got[i].extend(ev.token_ids)
            if i == 0 and len(got[0]) == 1 and ev.token_ids:
                sched.submit(request(len(prompts) - 1))
            if ev.final:
                done[i].set()

        params = SamplingParams(max_tokens=maxes[i], ignore_eos=True,
                                **{"temperature": 0.0, **sampling})  # fmt: skip
        return GenerationRequest(prompts[i], params, sink, source)

    try:
        for i in range(len(prompts) - 1):
            sched.submit(request(i))
        for e in done:
            assert e.wait(60)
    finally:
        sched.stop()
    return got, sched


@pytest.mark.parametrize("way", WAYS)
def test_scheduler_static_batches_generate_the_eager_tokens(setup, way, monkeypatch):
    from memdb_worker.serve.static_batch import StaticBatch

    model, prompts, sources = setup
    maxes = [7, 2, 4]  # the second row leaves first, the third joins late
    want, eager = run_scheduler(model, prompts, maxes, sources[way], static_live=0)
    running = []  # rows of the static batch when rows were admitted
    admit = StaticBatch.admit

    def spy(self, rows, sample):
        running.append(len(self.rows))
        return admit(self, rows, sample)

    monkeypatch.setattr(StaticBatch, "admit", spy)
    got, static = run_scheduler(model, prompts, maxes, sources[way], static_live=32)
    assert running[0] == 0 and running[1] >= 1  # the late request joined the running batch
    assert [len(t) for t in got] == maxes
    assert got == want
    assert len(static.static._decoders) == 1  # the static path ran
    assert static.stats.batches == eager.stats.batches == 2  # a prefill, then one join


SAMPLED = {"temperature": 1.3, "top_p": 0.9, "top_k": 40, "seed": 7}


@pytest.mark.parametrize("way", ["neither", "fitted"])
def test_seeded_sampling_draws_the_same_tokens_in_static_and_eager_batches(setup, way):
    """One sampler (attend.sampling): a seeded request at temperature > 0 with top_p and top_k
    gets the same tokens whichever path decodes it, and its seed decides them."""
    model, prompts, sources = setup
    maxes = [7, 2, 4]
    want, _ = run_scheduler(model, prompts, maxes, sources[way], static_live=0, **SAMPLED)
    got, static = run_scheduler(model, prompts, maxes, sources[way], static_live=32, **SAMPLED)
    assert len(static.static._decoders) == 1  # the static path ran (top_p < 1 included)
    assert got == want
    greedy, _ = run_scheduler(model, prompts, maxes, sources[way], static_live=0)
    other, _ = run_scheduler(model, prompts, maxes, sources[way], static_live=0,
                             **{**SAMPLED, "seed": 8})  # fmt: skip
    assert want != greedy and want != other  # the draw and its seed matter here
