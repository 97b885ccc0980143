"""memdb_worker.attend: attention over a state source plus the live KV.

Owns the one attention seam (`source_attention.SourceAttention`: the path a decode step takes
over its source, for both callers below), the transformers integration (`attention`: the
`memdb` attention function and `bind`, which binds a batch to a memory, a prefix KV, or one
source per row), the fused Triton kernels of looked-up memories (`fused`, `fused_kernels`) and
of fitted rows (`fitted_rows`, `fitted_kernels`), shared-prefix (cascade) attention over one
prefix KV read once per batch (`shared_prefix`), and the static-cache, CUDA-graphed decode step
(`decode_step`).
Every fast path is pinned equal to the reference (`memory.state`) by the tests.

Knows nothing of how memories are built, stored or fetched, nor of HTTP or scheduling.
"""

from memdb_worker.attend.attention import StateSource, bind, current_binding, install
from memdb_worker.attend.decode_step import StaticDecoder
from memdb_worker.attend.shared_prefix import SharedConfig, shared_attention, shared_reference
from memdb_worker.attend.source_attention import SourceAttention

__all__ = [
    "SharedConfig", "SourceAttention", "StateSource", "StaticDecoder", "bind", "current_binding",
    "install", "shared_attention", "shared_reference",
]  # fmt: skip
