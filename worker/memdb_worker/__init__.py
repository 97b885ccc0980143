"""memdb_worker: attention-state memories on a transformers model.

- `state`      attention states (out, lse), their exact merge, Eq. 5 aggregation
- `keys`       RoPE undoing, lookup key modes, whitening, index groups
- `prefix`     exact prefix keys/values (chunked encoding), an exact state source
- `memory`     the in-device memory built from shards, its lookup (a state source)
- `attention`  the `memdb` attention function for transformers, `bind` sequences to sources
- `builder`    calibration over traces, clustering, shards
- `model`      loading SmolLM2 (GGUF) and the model fingerprint
- `scoring`    batched log-likelihood of continuations after a shared context

Import the submodules directly; this package imports nothing heavy by itself.
"""
