"""Small memories whose every stored value names the write that made them.

`tagged_memory(tag, ...)` builds the safetensors shards of one write: keys are fixed by the
shape (so queries find entries in every version), `out` and `lse` hold the float `tag` in every
cell. An answer (Lookup rows, fetched shards) then tells which write it came from, and a
mixture of writes shows as more than one value. Tags are small positive integers, exact in
float32 and float16. Knows nothing of servers or of what the checks conclude.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memdb.shards import Shard, decode_shard, encode_shard

FP = "reliability-model"


@dataclass(frozen=True)
class Shape:
    layers: int = 2
    groups: int = 1
    m: int = 16  # entries per group
    dk: int = 8
    h: int = 1
    d: int = 4


def keys_of(shape: Shape, layer: int) -> np.ndarray:
    """The keys [I, M, Dk] of a layer: the same for every tag of a shape."""
    rng = np.random.default_rng([shape.groups, shape.m, shape.dk, layer])
    return rng.standard_normal((shape.groups, shape.m, shape.dk)).astype(np.float32)


def tagged_memory(tag: int, shape: Shape, extras: tuple[str, ...] = ()) -> list[bytes]:
    """One safetensors blob per layer; out [I, M, h, d] and lse [I, M, h] all equal `tag`."""
    blobs = []
    for layer in range(shape.layers):
        i, m = shape.groups, shape.m
        out = np.full((i, m, shape.h, shape.d), tag, np.float32)
        shard = Shard(
            keys=keys_of(shape, layer),
            out=out,
            lse=np.full((i, m, shape.h), tag, np.float32),
            extras={name: out.astype(np.float16) for name in extras},
            metadata={"layer": str(layer), "tag": str(tag)},
        )
        blobs.append(encode_shard(shard))
    return blobs


def queries_of(shape: Shape, layer: int, count: int) -> np.ndarray:
    """`count` stored keys of a layer as queries [Q, I, Dk] (each finds its own entry)."""
    rows = np.arange(count) % shape.m
    return keys_of(shape, layer)[:, rows, :].transpose(1, 0, 2).copy()


def tag_of(*arrays: np.ndarray) -> int | None:
    """The one tag every cell of `arrays` holds, or None if they hold several (a mixture)."""
    values = np.unique(np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays]))
    if len(values) != 1 or values[0] != int(values[0]):
        return None
    return int(values[0])


def tag_of_blobs(blobs: list[bytes]) -> int | None:
    """The tag of fetched shards (every layer's out and lse), None for a mixture."""
    shards = [decode_shard(b) for b in blobs]
    return tag_of(*[s.out for s in shards], *[s.lse for s in shards])
