"""The one attention seam (worker/memdb_worker/attend/source_attention.py): the path it picks
per source, each path pinned to the states reference (the live state merged with the source's
`prefix_state`, computed here from the definitions), and both callers (the transformers path,
the static decode step) going through it."""

from __future__ import annotations

import pytest
import torch

from memdb_worker.attend import attention, fused
from memdb_worker.attend.decode_step import StaticDecoder
from memdb_worker.attend.source_attention import PATHS, SourceAttention
from memdb_worker.build import BuildOptions, build_memory
from memdb_worker.memory.keys import LayerQuery, RopeSpec
from memdb_worker.memory.state import attention_state, merge_states
from memdb_worker.model.prefix import encode_prefix
from tests.test_worker_decode_step import scheduler_tokens, static_tokens
from tests.tiny import lookup_options, tiny_llama

VOCAB = 256
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(VOCAB)
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, VOCAB, (40,), generator=g).tolist()
    traces = [torch.randint(3, VOCAB, (10,), generator=g).tolist() for _ in range(3)]
    entries = build_memory(model, None, prefix, traces, budget=12, options=lookup_options(),
                           progress=False).to_memory()  # fmt: skip
    fitted = build_memory(model, None, prefix, traces, budget=12, options=BuildOptions(),
                          progress=False).to_memory()  # fmt: skip
    sources = {"neither": None, "entries": entries, "fitted": fitted,
               "prefix": encode_prefix(model, prefix),
               "prefix_mean": encode_prefix(model, prefix, chunk_tokens=16).with_chunk_mass(
                   "mean")}  # fmt: skip
    return model, sources


def seam(model, source, **kw) -> SourceAttention:
    return SourceAttention(source, RopeSpec.from_model(model), device=CPU, dtype=torch.float32,
                           **kw)  # fmt: skip


def test_the_path_per_source_with_kernels_on_and_off(setup):
    model, sources = setup
    off = {name: seam(model, s).path for name, s in sources.items()}  # CPU: kernels off
    assert set(off.values()) <= set(PATHS)
    assert off == {"neither": "sdpa", "entries": "entries_torch", "fitted": "states",
                   "prefix": "states", "prefix_mean": "states"}  # fmt: skip
    if fused.HAVE_TRITON:  # forced on (Triton's interpreter would run them on the CPU)
        on = {name: seam(model, s, use_fused=True).path for name, s in sources.items()}
        assert on == {"neither": "sdpa", "entries": "entries_kernel", "fitted": "fitted_kernel",
                      "prefix": "shared_prefix",
                      "prefix_mean": "states"}  # fmt: skip  # chunk weights: no kernel


@pytest.mark.parametrize("name", ["neither", "entries", "fitted", "prefix", "prefix_mean"])
def test_every_path_equals_the_live_state_merged_with_the_sources(setup, name):
    model, sources = setup
    source, cfg = sources[name], model.config
    h, hkv, d, n, b = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 7, 3
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, h, 1, d, generator=g)
    k, v = torch.randn(b, hkv, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
    mask = torch.arange(n).view(1, n) < torch.tensor([7, 4, 1]).view(b, 1)  # ragged rows
    positions = torch.tensor([40, 44, 52])
    s = seam(model, source)
    got = s.decode(1, q, k, v, mask, positions, 0.125)  # [b, 1, H, d]
    rep = h // hkv  # the exact computation, with the KV heads repeated for their query heads
    live = attention_state(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), 0.125,
                           mask.view(b, 1, 1, n))  # fmt: skip
    if source is not None:
        rope = RopeSpec.from_model(model)
        live = merge_states(live, source.prefix_state(
            LayerQuery(1, q, positions.view(b, 1), 0.125, rope, hkv)))  # fmt: skip
    want = live.out.transpose(1, 2)
    assert got.shape == (b, 1, h, d)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_a_chunk_weighted_prefix_decodes_in_the_static_step_as_in_transformers(setup):
    """The chunk mass (log_mass) is part of the prefix's state: the graphed step honours it."""
    model, sources = setup
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    src = sources["prefix_mean"]
    assert src.log_mass != 0.0
    want = scheduler_tokens(model, prompts, src)
    assert static_tokens(StaticDecoder(model, 2, 32, src), prompts) == want
    assert want != scheduler_tokens(model, prompts, sources["prefix"])  # the weights matter


def test_the_transformers_path_and_the_static_step_share_the_seam(setup):
    model, sources = setup
    for source in sources.values():
        with attention.bind(model, source) as binding:
            via_bind = None if binding is None else binding.seam.path
        dec = StaticDecoder(model, 2, 16, source)
        assert isinstance(dec.attention, SourceAttention)
        if via_bind is not None:
            assert via_bind == dec.attention.path
