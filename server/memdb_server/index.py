"""FAISS indices over shard keys, and the in-memory LRU of loaded layers.

This module owns: choosing an index kind (flat / IVF / HNSW) for a number of entries, building
one index per index group of a layer, (de)serializing indices, batched search with the
cosine or inner-product metric, gathering the stored `out`/`lse` (and extra) rows of the hits,
and the byte-budgeted, thread-safe cache of loaded layers (`IndexCache`).

It does not know LMDB, gRPC, tenants or auth: it takes keys as numpy arrays and indices as
bytes, and hands back numpy arrays. Ids are always the entry rows 0..M-1 of a group.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

import faiss
import numpy as np

from memdb.errors import InvalidArgument
from memdb.shards import Shard, decode_shard, holds_fitted_rows

log = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw")
METRICS = ("cosine", "ip")

# Threads per search, measured on the 2-core dev machine (faiss-cpu 1.15.1, flat IP index,
# M = 8192, Dk = 64, k = 1; medians of 15 interleaved runs of 30 searches, ms per batch):
#
#   batch        1      8      16     32     64
#   1 thread   0.063  0.444  0.897  1.852  3.743
#   2 threads  0.064  0.228  0.454  0.926  1.909
#
# Batch 1 gains nothing from a second thread, batches of 8+ run ~2x faster, and with 4
# concurrent callers the throughput at batch 64 was the same or better with 2 threads
# (41.5K vs 38.0K vectors/s), so 2 threads (capped at the CPU count) is the default.
# Lowering faiss.cvar.distance_compute_blas_threshold to send batches to BLAS was measured too
# and rejected: 5x slower at batch 1, and throughput collapses (to ~2K vectors/s) when several
# callers search at once, as OpenBLAS threads fight over the cores.
DEFAULT_THREADS = 2


@dataclass(frozen=True)
class IndexParams:
    """How to build and search indices. `kind` "auto" is resolved per layer by entry count."""

    kind: str = "auto"  # auto | flat | ivf | hnsw
    auto_threshold: int = 100_000  # auto: flat below this many entries, else hnsw
    nlist: int = 0  # ivf: 0 = about 4*sqrt(M)
    nprobe: int = 16  # ivf: lists scanned per query
    hnsw_m: int = 32  # hnsw: neighbours per node
    ef_search: int = 128  # hnsw: search beam width
    use_gpu: bool = False  # move flat indices to the GPU when gpu_available()


def resolve_kind(params: IndexParams, num_entries: int) -> str:
    """The concrete index kind for a group of `num_entries` keys."""
    if params.kind == "auto":
        return "flat" if num_entries < params.auto_threshold else "hnsw"
    check_kind(params.kind)
    return params.kind


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InvalidArgument(f"index kind '{kind}' is unknown; use auto, {', '.join(KINDS)}")


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise InvalidArgument(f"metric '{metric}' is unknown; use {' or '.join(METRICS)}")


# ---------------------------------------------------------------- build, (de)serialize


def build_index(keys: np.ndarray, kind: str, metric: str, params: IndexParams) -> faiss.Index:
    """An index over `keys` [M, Dk]; ids are the rows 0..M-1."""
    check_metric(metric)
    kind = resolve_kind(params, len(keys)) if kind == "auto" else kind
    check_kind(kind)
    if keys.ndim != 2 or min(keys.shape) == 0:
        raise InvalidArgument(f"keys must be a non-empty [M, Dk] array, got {list(keys.shape)}")
    x = _as_search_input(keys, metric)
    m, dk = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dk)
    elif kind == "ivf":
        index = _new_ivf(dk, _nlist(params, m), metric)
        index.train(x)
    else:
        index = faiss.IndexHNSWFlat(dk, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    return _apply_params(index, params)


def _new_ivf(dk: int, nlist: int, metric: str) -> faiss.Index:
    quantizer = faiss.IndexFlatIP(dk)
    index = faiss.IndexIVFFlat(quantizer, dk, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = metric == "cosine"
    return index


def _nlist(params: IndexParams, num_entries: int) -> int:
    nlist = params.nlist or round(4 * math.sqrt(num_entries))
    return max(1, min(nlist, num_entries))


def serialize_index(index: faiss.Index) -> bytes:
    """The bytes of an index (a GPU index is copied back to the CPU first)."""
    if _is_gpu(index):
        index = faiss.index_gpu_to_cpu(index)
    return faiss.serialize_index(index).tobytes()


def deserialize_index(blob: bytes, params: IndexParams) -> faiss.Index:
    """An index from `serialize_index` bytes, with this server's search parameters applied."""
    try:
        index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    except RuntimeError as exc:
        raise InvalidArgument(f"stored index is not a valid FAISS index ({exc})") from None
    return _apply_params(index, params)


def _apply_params(index: faiss.Index, params: IndexParams) -> faiss.Index:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(params.nprobe, ivf.nlist)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = params.ef_search
    if params.use_gpu and isinstance(index, faiss.IndexFlat) and gpu_available():
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    return index


def build_layer_indices(shard: Shard, kind: str, metric: str, params: IndexParams) -> list[bytes]:
    """One serialized index per index group of a layer, over its `keys` [I, M, Dk]."""
    kind = resolve_kind(params, shard.keys.shape[1]) if kind == "auto" else kind
    cpu = dataclasses.replace(params, use_gpu=False)
    return [serialize_index(build_index(g, kind, metric, cpu)) for g in shard.keys]


# ---------------------------------------------------------------- search


def search(
    index: faiss.Index, queries: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of `queries` [Q, Dk]: scores float32 [Q, k], ids int64 [Q, k].

    Where the index holds fewer than k entries the ids are -1 and the scores -inf.
    Cosine scores are cosine similarities of the queries with the stored keys.
    """
    check_metric(metric)
    if k < 1:
        raise InvalidArgument(f"k must be at least 1, got {k}")
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise InvalidArgument(
            f"queries must be [Q, {index.d}] for this index, got {list(queries.shape)}"
        )
    x = _as_search_input(queries, metric)
    if _is_gpu(index):
        with _GPU_LOCK:
            scores, ids = index.search(x, k)
    else:
        scores, ids = index.search(x, k)
    scores[ids < 0] = -np.inf
    return scores, ids


def _as_search_input(x: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous, and L2-normalized for cosine (a fresh copy: never the input)."""
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    if metric == "cosine":
        faiss.normalize_L2(out)
    return out


# ---------------------------------------------------------------- loaded layers


@dataclass
class LoadedLayer:
    """Everything a lookup needs for one (tenant, name, version, layer), from one snapshot."""

    version: int
    indices: list[faiss.Index]  # one per group
    out: np.ndarray  # [I, M, h, d]
    lse: np.ndarray  # [I, M, h]
    nbytes: int = 0  # 0 = estimate from the arrays and indices
    model_fingerprint: str = ""
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [I, M, ...]
    fitted: bool = False  # shards.holds_fitted_rows: rows attended whole, never looked up

    def __post_init__(self) -> None:
        if not self.nbytes:
            held = sum(_index_nbytes(index) for index in self.indices)
            arrays = self.out.nbytes + self.lse.nbytes + sum(a.nbytes for a in self.extras.values())
            self.nbytes = arrays + held

    def search(
        self, queries: np.ndarray, k: int, metric: str, include_states: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Top-k per query and group: ids [Q, I, k], scores [Q, I, k], out, lse.

        `queries` is [Q, I, Dk], or [Q, Dk] to send the same query to every group
        (InvalidArgument otherwise). With `include_states`, out [Q, I, k, h, d] and
        lse [Q, I, k, h] are the stored rows of the hits; rows whose id is -1 (fewer than k
        entries) are zeros.
        """
        queries = self._check_queries(queries)
        q, num_groups = queries.shape[0], len(self.indices)
        ids = np.empty((q, num_groups, k), dtype=np.int64)
        scores = np.empty((q, num_groups, k), dtype=np.float32)
        for g, index in enumerate(self.indices):
            scores[:, g], ids[:, g] = search(index, queries[:, g], k, metric)
        if not include_states:
            return ids, scores, None, None
        out, lse = self.gather(ids)
        return ids, scores, out, lse

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The stored out [Q, I, k, h, d] and lse [Q, I, k, h] of `ids` [Q, I, k] (-1 -> 0)."""
        return _gather(self.out, ids), _gather(self.lse, ids)

    def gather_extras(self, ids: np.ndarray, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The stored rows [Q, I, k, ...] of `ids` [Q, I, k] of the named extra tensors (-1 -> 0).

        Names must be extras of this layer (KeyError otherwise): callers check them first.
        """
        return {name: _gather(self.extras[name], ids) for name in names}

    def answer_bytes(self, q: int, k: int, states: bool, extras: Iterable[str] = ()) -> int:
        """Exact tensor bytes of the answer to `q` queries: ids int64 + scores float32
        [Q, I, k], with `states` out [Q, I, k, h, d] + lse [Q, I, k, h] as stored, and the
        named extras [Q, I, k, ...] as stored."""
        per_hit = 8 + 4
        if states:
            per_hit += _row_bytes(self.out) + _row_bytes(self.lse)
        per_hit += sum(_row_bytes(self.extras[name]) for name in extras)
        return q * len(self.indices) * k * per_hit

    def work_per_query(self) -> int:
        """About the search work of one query: over every group, the keys it scans times the key
        dim (every key for flat, nprobe of nlist lists for IVF, ef_search x neighbours for HNSW)."""
        return sum(_scanned(index) * index.d for index in self.indices)

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        """Queries as [Q, I, Dk] (a [Q, Dk] query is sent to every group); the one shape check
        of Lookup's queries."""
        num_groups, dk = len(self.indices), self.indices[0].d
        if queries.ndim == 2 and queries.shape[1] == dk:
            return np.broadcast_to(queries[:, None, :], (queries.shape[0], num_groups, dk))
        if queries.ndim == 3 and queries.shape[1:] == (num_groups, dk):
            return queries
        raise InvalidArgument(
            f"queries must be [Q, {num_groups}, {dk}] or [Q, {dk}] (the same query for every "
            f"group) for this layer ({num_groups} groups, key dim {dk}), got {list(queries.shape)}"
        )


def _gather(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows [Q, I, k, ...] of `table` [I, M, ...] at `ids` [Q, I, k]; zeros where an id is -1."""
    groups = np.arange(ids.shape[1])[None, :, None]
    missing = ids < 0
    rows = table[groups, np.where(missing, 0, ids)]
    if missing.any():
        rows[missing] = 0
    return rows


def _row_bytes(table: np.ndarray) -> int:
    """Bytes of one entry's row of `table` [I, M, ...]."""
    return math.prod(table.shape[2:]) * table.itemsize


def _scanned(index: faiss.Index) -> int:
    """Keys one query of `index` compares with (an upper estimate for IVF and HNSW)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return ivf.nlist + math.ceil(index.ntotal * min(ivf.nprobe, ivf.nlist) / ivf.nlist)
    if isinstance(index, faiss.IndexHNSW):
        return min(index.ntotal, index.hnsw.efSearch * index.hnsw.nb_neighbors(0))
    return index.ntotal


def _index_nbytes(index: faiss.Index) -> int:
    """About the RAM an index holds: its vectors, plus HNSW links or IVF ids."""
    n = index.ntotal * index.d * 4
    if isinstance(index, faiss.IndexHNSW):
        n += index.ntotal * index.hnsw.nb_neighbors(0) * 4 * 2  # level 0 plus upper levels
    elif faiss.try_extract_index_ivf(index) is not None:
        n += index.ntotal * 8 + index.nlist * index.d * 4
    return n


def load_layer(
    version: int,
    shard_blob: bytes,
    index_blobs: list[bytes],
    params: IndexParams,
    model_fingerprint: str = "",
) -> LoadedLayer:
    """A LoadedLayer from one layer's stored shard and index bytes (read in one snapshot)."""
    shard = decode_shard(shard_blob, where=f"stored shard of version {version}")
    if len(index_blobs) != shard.keys.shape[0]:
        raise InvalidArgument(
            f"version {version} stores {len(index_blobs)} indices for "
            f"{shard.keys.shape[0]} groups; re-upload the prefix"
        )
    indices = [deserialize_index(b, params) for b in index_blobs]
    return LoadedLayer(
        version,
        indices,
        shard.out,
        shard.lse,
        model_fingerprint=model_fingerprint,
        extras=shard.extras,
        fitted=holds_fitted_rows(shard.metadata),
    )


# ---------------------------------------------------------------- cache


class IndexCache:
    """LRU of loaded layers under a byte budget; thread-safe.

    Keys are tuples starting with (tenant, name, ...), typically (tenant, name, version, layer).
    Concurrent misses on one key load it once. An entry larger than the whole budget is
    returned but not kept. A load that overlaps an `invalidate` is returned but not kept either,
    so a deleted-then-recreated prefix never serves stale rows.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.nbytes = 0
        self._entries: OrderedDict[tuple, LoadedLayer] = OrderedDict()
        self._loading: dict[tuple, Future] = {}
        self._epoch = 0  # bumped by invalidate/clear: loads begun before are not kept
        self._lock = threading.Lock()

    def get(self, key: tuple, loader: Callable[[], LoadedLayer]) -> LoadedLayer:
        """The cached entry of `key`, else `loader()` (run outside the lock) cached."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            pending = self._loading.get(key)
            if pending is None:
                self.misses += 1
                pending = self._loading[key] = Future()
                epoch, owner = self._epoch, True
            else:
                self.hits += 1
                owner = False
        if not owner:
            return pending.result()
        return self._load(key, loader, pending, epoch)

    def _load(self, key: tuple, loader: Callable, pending: Future, epoch: int) -> LoadedLayer:
        try:
            entry = loader()
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._loading[key]
            if epoch == self._epoch and entry.nbytes <= self.max_bytes:
                self._insert(key, entry)
        pending.set_result(entry)
        return entry

    def _insert(self, key: Hashable, entry: LoadedLayer) -> None:
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            old_key, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes
            log.debug("index cache evicted %s (%d bytes)", old_key, old.nbytes)

    def invalidate(self, tenant: str, name: str) -> None:
        """Drop every entry of the prefix (tenant, name)."""
        self._drop(lambda key: key[0] == tenant and key[1] == name)

    def invalidate_tenant(self, tenant: str) -> None:
        """Drop every entry of every prefix of `tenant`."""
        self._drop(lambda key: key[0] == tenant)

    def _drop(self, match: Callable[[tuple], bool]) -> None:
        with self._lock:
            self._epoch += 1
            for key in [k for k in self._entries if match(k)]:
                self.nbytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        with self._lock:
            self._epoch += 1
            self._entries.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)


# ---------------------------------------------------------------- threads, GPU

_GPU_LOCK = threading.Lock()  # GPU indices are not safe to search from several threads
_gpu_res = None


def gpu_available() -> bool:
    """faiss was built with GPU support and a GPU is present."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _gpu_resources():
    global _gpu_res
    with _GPU_LOCK:
        if _gpu_res is None:
            _gpu_res = faiss.StandardGpuResources()
        return _gpu_res


def _is_gpu(index: faiss.Index) -> bool:
    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def set_threads(n: int = 0) -> int:
    """FAISS (OpenMP) threads per search of the calling thread (OpenMP keeps the setting per
    thread: a pool sets it in each of its threads); 0 = DEFAULT_THREADS (capped at the CPU
    count). Returns the count set."""
    n = n or min(DEFAULT_THREADS, os.cpu_count() or 1)
    if n < 1:
        raise InvalidArgument(f"FAISS threads must be at least 1, got {n}")
    faiss.omp_set_num_threads(n)
    return n
