"""memdb_worker: attention-state memories on a transformers model.

The packages, from the math up (each imports only those above it):

- `memory`  what a memory is: attention states and their merge, keys, stored formats, fitted
            rows, the prefix KV, the in-device `Memory` (math on tensors, no I/O)
- `attend`  attention over a state source plus the live KV: `bind` for transformers, the fused
            kernels, shared-prefix attention, the CUDA-graphed decode step
- `model`   loading the model and its fingerprint, encoding prefix text, the scoring loop
- `build`   calibration, fitting, the builder, appending, the local build of `memdb-admin`
- `serve`   the worker process: memory cache, prefix cache, scheduler, HTTP API, CLI

Decoding with a memory from one's own transformers code is `bind` around `model.generate`:

    model, tokenizer = load_model()
    memory = Memory.from_shards(shards, device=model.device)  # e.g. MemdbClient.fetch_memory
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with bind(model, memory):
        out = model.generate(**ids, max_new_tokens=32)

The names below are this package's API; they load on first use, so `import memdb_worker` stays
cheap.
"""

from __future__ import annotations

import importlib

_HOME = {  # name -> the package that defines it
    **dict.fromkeys(("DecodeOptions", "Memory", "PrefixKV"), "memdb_worker.memory"),
    "bind": "memdb_worker.attend",
    **dict.fromkeys(("encode_prefix", "load_model", "model_fingerprint"), "memdb_worker.model"),
    **dict.fromkeys(("BuildOptions", "append_chunk", "build_memory"), "memdb_worker.build"),
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'memdb_worker' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
