"""Memory decoding on a tiny random Llama: exact memories reproduce full-prefix attention."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memdb.shards import decode_shard, encode_shard
from memdb_worker.attend.attention import bind, current_binding, install
from memdb_worker.build.builder import build_memory
from memdb_worker.memory.memory import DecodeOptions, Memory
from memdb_worker.model.prefix import encode_chunk, encode_prefix
from memdb_worker.model.scoring import next_token_logprobs, score_continuations, score_pairs
from tests.tiny import reference_options, tiny_llama

VOCAB = 256


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(VOCAB)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, VOCAB, (40,), generator=g).tolist()
    trace = (torch.randperm(VOCAB - 3, generator=g)[:14] + 3).tolist()  # distinct tokens
    return prefix, trace


def logits(model, ids, **kw):
    with torch.inference_mode():
        return model(torch.tensor([ids]), **kw).logits[0]


def max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


EXACT_OPTIONS = {
    "paper": (reference_options(), "after_prefix"),
    "zero_positions": (reference_options(), "zero"),
    "kv_group": (reference_options(granularity="kv_group"), "after_prefix"),
    "layer_rope_whiten": (
        reference_options(granularity="layer", key_mode="rope_common", whiten=True),
        "after_prefix",
    ),
    "whiten_centered": (reference_options(whiten=True, whiten_center=True), "zero"),
    "centroid": (reference_options(entry_state="centroid"), "after_prefix"),
    "lse_correction": (reference_options(lse_correction=True), "after_prefix"),
    "float16": (reference_options(key_dtype="float16"), "after_prefix"),
}


@pytest.mark.parametrize("name", list(EXACT_OPTIONS))
def test_exact_memory_reproduces_full_prefix_logits(tiny, data, name):
    options, live_positions = EXACT_OPTIONS[name]
    prefix, trace = data
    full = logits(tiny, prefix + trace)[len(prefix) :]
    plain = logits(tiny, trace)
    # one entry per trace token: budget == recorded tokens, no clustering
    built = build_memory(
        tiny, None, prefix, [trace], budget=len(trace), options=options, progress=False
    )
    memory = built.to_memory()
    with bind(tiny, memory, live_positions=live_positions):
        got = logits(tiny, trace)
    assert max_rel(plain, full) > 1e-2  # the prefix matters, so the test can fail
    assert max_rel(got, full) < 1e-4


def test_exact_prefix_source_equals_prefix_in_prompt(tiny, data):
    prefix, trace = data
    full = logits(tiny, prefix + trace)[len(prefix) :]
    with bind(tiny, encode_prefix(tiny, prefix)):
        got = logits(tiny, trace)
    assert max_rel(got, full) < 1e-5


@pytest.mark.parametrize("mass", ["sum", "mean"])
@pytest.mark.parametrize(
    "sink, chunks, end",
    [(0, [13, 14, 13], 14), (4, [10, 10, 10, 10], 14)],  # 40 tokens in chunks of <= 16
)
def test_chunked_prefix_calibration_matches_chunked_decoding(tiny, data, sink, chunks, end, mass):
    prefix, trace = data
    options = reference_options(chunk_tokens=16, sink_tokens=sink, chunk_mass=mass)
    exact = encode_prefix(tiny, prefix, chunk_tokens=16, sink_tokens=sink).with_chunk_mass(mass)
    assert list(exact.chunk_lengths) == chunks and exact.prefix_length == end
    with bind(tiny, exact):
        ref = logits(tiny, trace)
    built = build_memory(
        tiny, None, prefix, [trace], budget=len(trace), options=options, progress=False
    )
    assert built.metadata["chunk_lengths"] == str(chunks)
    with bind(tiny, built.to_memory()):
        got = logits(tiny, trace)
    assert max_rel(got, ref) < 1e-4


def test_a_later_chunk_after_the_whole_earlier_text_as_sink_equals_one_chunk(tiny, data):
    """encode_chunk at true positions after a sink holding all the text before it gives the
    keys/values of the one-chunk encoding; after a short sink they differ (deeper layers)."""
    prefix, _ = data
    one = encode_prefix(tiny, prefix)
    chunk = encode_chunk(tiny, prefix[20:], prefix[:20], start=20)
    k, v = chunk.keys, chunk.values
    assert chunk.prefix_length == len(prefix) and chunk.token_count == len(prefix) - 20
    for layer in range(one.num_layers):
        torch.testing.assert_close(k[layer], one.keys[layer][:, :, 20:], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v[layer], one.values[layer][:, :, 20:], rtol=1e-4, atol=1e-5)
    k4 = encode_chunk(tiny, prefix[20:], prefix[:4], start=20).keys
    torch.testing.assert_close(k4[0], one.keys[0][:, :, 20:], rtol=1e-4, atol=1e-5)  # layer 0
    assert not torch.allclose(k4[-1], one.keys[-1][:, :, 20:], rtol=1e-3, atol=1e-4)


def test_installed_but_unbound_model_runs_plainly(tiny, data):
    _, trace = data
    ref = LlamaForCausalLM(tiny.config.__class__(**tiny.config.to_dict()))
    ref.load_state_dict(tiny.state_dict())
    ref.eval().set_attn_implementation("sdpa")
    install(tiny)
    assert current_binding(tiny) is None
    assert torch.equal(logits(tiny, trace), logits(ref, trace))


def _left_pad(seqs):
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


GEN = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}


def _generate(model, seqs, **kw):
    ids, mask = _left_pad(seqs)
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **GEN, **kw
        )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1)


def test_generate_batch2_kv_cache_with_exact_prefix_equals_prefix_in_prompt(tiny, data):
    prefix, _ = data
    p1, p2 = [5, 17, 33, 9, 100, 7], [44, 12, 201, 3, 80, 81, 82, 150, 6]
    ref_tok, ref_logits = _generate(tiny, [prefix + p1, prefix + p2])
    with bind(tiny, encode_prefix(tiny, prefix)):
        tok, lg = _generate(tiny, [p1, p2])
    assert torch.equal(tok, ref_tok)
    assert max_rel(lg, ref_logits) < 1e-4


def test_generate_with_memory_same_with_and_without_kv_cache(tiny, data):
    prefix, trace = data
    built = build_memory(tiny, None, prefix, [trace, trace[::-1]], budget=10, progress=False)
    memory = built.to_memory()
    seqs = [trace[:5], trace[3:12]]
    with bind(tiny, memory):
        tok_c, lg_c = _generate(tiny, seqs)
        tok_n, lg_n = _generate(tiny, seqs, use_cache=False)
    plain_tok, plain_lg = _generate(tiny, seqs)
    assert torch.equal(tok_c, tok_n)
    assert max_rel(lg_c, lg_n) < 1e-4
    assert max_rel(lg_c, plain_lg) > 1e-3  # the memory is used


def test_mixed_batch_rows_follow_their_own_source(tiny, data):
    prefix, trace = data
    exact = encode_prefix(tiny, prefix)
    seqs = [trace[:7], trace[2:9]]
    ids = torch.tensor(seqs)
    with torch.inference_mode(), bind(tiny, [exact, None]):
        mixed = tiny(ids).logits
    with torch.inference_mode(), bind(tiny, exact):
        bound = tiny(ids[:1]).logits
    plain = logits(tiny, seqs[1])
    assert max_rel(mixed[0], bound[0]) < 1e-5
    assert max_rel(mixed[1], plain) < 1e-5
    with pytest.raises(ValueError, match="per-row sources"), bind(tiny, [exact]):
        tiny(ids)


def test_memory_round_trips_through_shard_bytes(tiny, data):
    prefix, trace = data
    opts = reference_options(whiten=True)
    built = build_memory(tiny, None, prefix, [trace], budget=6, options=opts, progress=False)
    memory = built.to_memory()
    blobs = [encode_shard(s) for s in memory.to_shards()]
    again = Memory.from_shards([decode_shard(b) for b in blobs])
    for a, b in zip(built.shards, again.to_shards(), strict=True):
        assert (a.keys == b.keys).all() and (a.out == b.out).all() and (a.lse == b.lse).all()
        assert a.metadata == b.metadata and sorted(a.extras) == sorted(b.extras)
    with bind(tiny, memory):
        x = logits(tiny, trace)
    with bind(tiny, again):
        y = logits(tiny, trace)
    assert torch.equal(x, y)


def test_soft_top_k_and_decode_options(tiny, data):
    prefix, trace = data
    plain_build = reference_options(lse_correction=False)  # the last check: a memory without k_bar
    built = build_memory(tiny, None, prefix, [trace], budget=8, options=plain_build, progress=False)
    memory = built.to_memory()
    with bind(tiny, memory):
        top1 = logits(tiny, trace)
    with bind(tiny, memory.with_options(DecodeOptions(top_k=3, temperature=1e-4))):
        sharp = logits(tiny, trace)  # near-zero temperature: the soft top-k is the top-1
    with bind(tiny, memory.with_options(DecodeOptions(top_k=3, temperature=1.0))):
        soft = logits(tiny, trace)
    with bind(tiny, memory.with_options(DecodeOptions(lse_bias=-50.0))):
        off = logits(tiny, trace)  # a huge negative bias switches the memory off
    assert max_rel(sharp, top1) < 1e-4
    assert max_rel(soft, top1) > 1e-4
    with bind(tiny, None):
        plain = logits(tiny, trace)
    assert max_rel(off, plain) < 1e-4
    with bind(tiny, memory.with_options(DecodeOptions(lse_bias=(-50.0, -50.0, -50.0)))):
        assert max_rel(logits(tiny, trace), plain) < 1e-4  # one bias per layer
    with pytest.raises(ValueError, match="lse_bias has 2 values for 3 layers"):
        memory.with_options(DecodeOptions(lse_bias=(0.0, 0.0)))
    with pytest.raises(ValueError, match="lse_correction"):
        memory.with_options(DecodeOptions(lse_correction=True))


def test_memory_must_fit_the_model(tiny, data):
    prefix, trace = data
    built = build_memory(tiny, None, prefix, [trace], budget=4, progress=False)
    other = LlamaForCausalLM(LlamaConfig(**{**tiny.config.to_dict(), "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="does not fit"), bind(other, built.to_memory()):
        pass


def test_score_continuations_matches_full_forward(tiny, data):
    prefix, trace = data
    ctx, conts = trace[:6], [[7, 8], [9], [10, 11, 12]]
    exact = encode_prefix(tiny, prefix)
    got = score_continuations(tiny, ctx, conts, exact)
    for c, s in zip(conts, got.tolist(), strict=True):
        lp = torch.log_softmax(logits(tiny, prefix + ctx + c), -1)
        start = len(prefix) + len(ctx) - 1
        ref = sum(float(lp[start + j, t]) for j, t in enumerate(c))
        assert abs(s - ref) < 1e-4 * max(1.0, abs(ref))


@pytest.mark.parametrize("max_tokens", [8192, 20])  # one packed forward; several small ones
def test_score_pairs_equals_score_continuations_per_context(tiny, data, max_tokens):
    prefix, trace = data
    exact = encode_prefix(tiny, prefix)
    built = build_memory(tiny, None, prefix, [trace], budget=len(trace), progress=False)
    contexts = [trace[:6], trace[2:5], trace[:9]]
    conts = [[7, 8], [9], [10, 11, 12]]
    pairs = [(c, x) for c in contexts for x in conts]
    for source in (None, exact, built.to_memory()):
        got = score_pairs(tiny, pairs, source, max_tokens=max_tokens)
        want = torch.cat([score_continuations(tiny, c, conts, source) for c in contexts])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_next_token_logprobs_equal_a_forward_of_each_context(tiny, data):
    prefix, trace = data
    exact = encode_prefix(tiny, prefix)
    contexts = [trace[:6], trace[2:5], trace[:9]]
    got = next_token_logprobs(tiny, contexts, exact, max_tokens=12)
    for c, row in zip(contexts, got, strict=True):
        want = torch.log_softmax(logits(tiny, prefix + c)[-1], -1)
        torch.testing.assert_close(row, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_averaged_chunk_mass_weights_each_chunks_attention_one_over_c(mode):
    from memdb_worker.memory.prefix_kv import PrefixKV
    from memdb_worker.memory.state import attention_state, merge_states

    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(1, 1, 12, 8, generator=g), torch.randn(1, 1, 12, 8, generator=g)
    pre = PrefixKV(keys=[k], values=[v], scaling=0.4, prefix_length=5, token_count=12,
                      chunk_lengths=(5, 4, 3)).with_chunk_mass(mode)  # fmt: skip
    q = torch.randn(1, 1, 2, 8, generator=g)
    lk, lv = torch.randn(1, 1, 2, 8, generator=g), torch.randn(1, 1, 2, 8, generator=g)
    got = merge_states(attention_state(q, lk, lv, 0.4), pre.state(0, q)).out
    # exact: softmax over live and prefix tokens, every prefix token's weight times 1/C
    c = 3 if mode == "mean" else 1
    w_live = (0.4 * q @ lk.transpose(-1, -2)).exp()
    w = torch.cat([w_live, (0.4 * q @ k.transpose(-1, -2)).exp() / c], -1)
    want = (w / w.sum(-1, keepdim=True)) @ torch.cat([lv, v], dim=2)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="chunk_mass must be one of"):
        pre.with_chunk_mass("max")
