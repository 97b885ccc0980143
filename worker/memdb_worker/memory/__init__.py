"""memdb_worker.memory: what a memory is, as math on tensors.

Owns attention states and their exact merge (`state`), queries and lookup keys (RoPE, key
modes, whitening, index groups: `keys`), the stored formats and their bytes (`formats`), fitted
rows and their state (`fitted`), the prefix KV as an exact state source (`prefix_kv`), per-head
queries of group-mean memories (`head_queries`), and the in-device `Memory` built from shards,
a state source for `memdb_worker.attend.bind`.

Does no I/O and knows nothing of models, transformers, building, kernels or servers: shards
come in as `memdb.shards.Shard` objects, tensors go out.
"""

from memdb_worker.memory.fitted import fitted_state
from memdb_worker.memory.formats import keys_as_stored, kv_bytes, memory_bytes, quantize_keys
from memdb_worker.memory.keys import KeySpace, LayerQuery, RopeSpec, apply_rope, undo_rope
from memdb_worker.memory.memory import DecodeOptions, Memory, MemoryLayer
from memdb_worker.memory.prefix_kv import PrefixKV
from memdb_worker.memory.state import State, attention_state, empty_state, merge_states

__all__ = [
    "DecodeOptions", "KeySpace", "LayerQuery", "Memory", "MemoryLayer", "PrefixKV", "RopeSpec",
    "State",
    "apply_rope", "attention_state", "empty_state", "fitted_state", "keys_as_stored", "kv_bytes",
    "memory_bytes", "merge_states", "quantize_keys", "undo_rope",
]  # fmt: skip
