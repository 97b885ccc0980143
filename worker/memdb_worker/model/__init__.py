"""memdb_worker.model: the transformers model and what runs it over text.

Owns loading a model (SmolLM2 or Qwen2.5-Coder from GGUF, or a transformers folder) and its
fingerprint (`loading`), encoding prefix text into prefix KV, in chunks past the context
(`prefix`), and the batched log-likelihood decode loop that the demo and the quality benchmark
score with (`scoring`).

Knows nothing of memories' formats, building or serving: it runs the model, bound to whatever
state source `memdb_worker.attend.bind` is given.
"""

from memdb_worker.model.loading import LoadedModel, describe_model, load_model, model_fingerprint
from memdb_worker.model.prefix import default_chunk_tokens, encode_chunk, encode_prefix
from memdb_worker.model.scoring import next_token_logprobs, score_continuations, score_pairs

__all__ = [
    "LoadedModel", "default_chunk_tokens", "describe_model", "encode_chunk", "encode_prefix",
    "load_model", "model_fingerprint", "next_token_logprobs", "score_continuations", "score_pairs",
]  # fmt: skip
