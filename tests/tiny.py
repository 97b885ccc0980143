"""A tiny random Llama for unit tests (the shape of the worker's real models, seconds to run)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(vocab: int, **config) -> LlamaForCausalLM:
    """A seeded, frozen, eval-mode Llama: 3 layers, 4 heads, 2 KV heads, hidden 64 (override
    any LlamaConfig field with `config`)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        **{
            "vocab_size": vocab,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "initializer_range": 0.1,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            **config,
        }
    )
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


# the looked-up entries' format (the builder's default until 2026-11-30): Eq. 5 member averages
# per cluster of calibration queries, bfloat16 keys; pass it (or entry_state "average") where a
# test is about lookups (search, fused kernels, lse correction, granularities, key modes, q_mean)
LOOKUP = {"entry_state": "average", "key_dtype": "bfloat16"}


def reference_options(**over):
    """BuildOptions of the float32 reference recipe (one entry per head, float32 keys and
    states, the lse correction's extras): what the exactness tests compare; `over` on top."""
    from memdb_worker.build import BuildOptions

    base = {"entry_state": "average", "granularity": "head", "key_dtype": "float32",
            "out_dtype": "float32", "lse_correction": True}  # fmt: skip
    return BuildOptions(**{**base, **over})


def lookup_options(**over):
    """BuildOptions of the looked-up entries' format (`LOOKUP`), `over` on top."""
    from memdb_worker.build import BuildOptions

    return BuildOptions(**{**LOOKUP, **over})


SMALL_VOCAB = 128


def small_llama() -> LlamaForCausalLM:
    """The builder tests' smaller tiny Llama: 2 layers, hidden 32, vocab SMALL_VOCAB."""
    return tiny_llama(SMALL_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      max_position_embeddings=128, pad_token_id=None)  # fmt: skip


def random_traces(n: int, length: int, seed: int, vocab: int = SMALL_VOCAB) -> list[list[int]]:
    """n seeded random token sequences (ids 3.. vocab-1) of `length` tokens."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]
