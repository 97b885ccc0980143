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


def reference_options(**over):
    """BuildOptions of the float32 reference recipe (one entry per head, float32 keys and
    states, the lse correction's extras): what the exactness tests compare; `over` on top."""
    from memdb_worker.builder import BuildOptions

    base = {"entry_state": "average", "granularity": "head", "key_dtype": "float32",
            "out_dtype": "float32", "lse_correction": True}  # fmt: skip
    return BuildOptions(**{**base, **over})
