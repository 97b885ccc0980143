"""The data plane: Lookup, FetchMemory and Watch, for inference workers.

Every answer is read from one version: a Lookup pins the version first and searches the
`LoadedLayer` of exactly that version, after checking what its answer and search will cost;
FetchMemory streams the shards of one version chunk by chunk from LMDB (NOT_FOUND mid-stream if
that version is removed meanwhile). Lookup and FetchMemory block (run in the executor); Watch
runs on the event loop. Knows nothing of how memories are built or used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

import numpy as np

from memdb.bounds import check_norms
from memdb.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
)
from memdb.v1 import memdb_pb2 as pb
from memdb.v1 import memdb_pb2_grpc as pb_grpc
from memdb.wire import decode_tensor, encode_tensor, prefix_info, timestamp
from memdb_server import auth
from memdb_server.build_service import job_tenant
from memdb_server.config import ServerConfig
from memdb_server.events import Event
from memdb_server.index import LoadedLayer, load_layer
from memdb_server.records import PrefixRecord, VersionSnapshot
from memdb_server.runtime import Runtime, check_fingerprint, check_name

log = logging.getLogger(__name__)

_EVENT_TYPES = {"put": pb.EVENT_TYPE_PUT, "delete": pb.EVENT_TYPE_DELETE}


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    # ------------------------------------------------------------ Lookup
    def Lookup(self, request: pb.LookupRequest, context) -> pb.LookupResponse:
        tenant = auth.current().tenant
        name = check_name(request.name)
        k = request.k or 1
        if k > self.rt.config.max_k:
            raise InvalidArgument(f"k={k} exceeds the server's max_k={self.rt.config.max_k}")
        rec, layer = self.rt.store.read_current_layer(  # version and layer: one transaction
            tenant, name, request.layer, request.version,
            open_layer=lambda rec, read: self.rt.cache.get(
                layer_cache_key(rec, request.layer), lambda: self._load_layer(read())),
        )  # fmt: skip
        version = rec.version
        check_fingerprint(layer.model_fingerprint, request.model_fingerprint, name)
        if layer.fitted:
            raise FailedPrecondition(
                f"memory '{name}' holds fitted rows (entry_state 'fitted'), which are attended "
                "as a whole, not looked up: fetch it with FetchMemory (a worker's cache mode)"
            )
        extras = _extra_names(request, rec.extra_tensors, name)
        queries = self._queries(request)
        self._check_cost(layer, queries.shape[0], k, request.include_states, extras)
        # LoadedLayer.search checks the queries' shape against the layer
        ids, scores, out, lse = layer.search(queries, k, rec.metric, request.include_states)
        self.rt.metrics.lookup_vectors.inc(ids.shape[0] * ids.shape[1])
        resp = pb.LookupResponse(
            version=version, ids=encode_tensor(ids), scores=encode_tensor(scores)
        )
        if request.include_states:
            resp.out.CopyFrom(encode_tensor(out))
            resp.lse.CopyFrom(encode_tensor(lse))
        for extra, rows in layer.gather_extras(ids, extras).items():
            resp.extras[extra].CopyFrom(encode_tensor(rows))
        return resp

    def _queries(self, request: pb.LookupRequest) -> np.ndarray:
        """The request's queries as float32, checked for dtype, count, shape bounds, finite
        values and norms (`memdb.bounds`); their shape against the layer they search is
        checked by that layer."""
        q = decode_tensor(request.queries, name="queries")  # [Q, I, Dk] or [Q, Dk]
        if q.dtype.kind != "f":
            raise InvalidArgument(f"queries must be float32 or float16, got {q.dtype}")
        if q.ndim not in (2, 3) or not 1 <= q.shape[0] <= self.rt.config.max_lookup_queries:
            raise InvalidArgument(
                f"a Lookup takes queries [Q, I, Dk] or [Q, Dk] with Q in "
                f"1..{self.rt.config.max_lookup_queries}, got shape {list(q.shape)}"
            )
        if not np.isfinite(q).all():
            raise InvalidArgument("queries hold NaN or infinite values")
        q = np.ascontiguousarray(q, dtype=np.float32)
        check_norms(
            "queries [query, group]" if q.ndim == 3 else "queries [query]",
            q,
            "scale the queries down (a cosine score depends only on their direction)",
        )
        return q

    def _check_cost(
        self, layer: LoadedLayer, q: int, k: int, states: bool, extras: list[str]
    ) -> None:
        """Refuse, before any search, a Lookup whose answer would not fit the answer limit (and
        so the max message size) or whose search work is over max_lookup_work."""
        c = self.rt.config
        limit = answer_limit(c.max_lookup_answer_bytes, c.max_message_bytes)
        per_query = layer.answer_bytes(1, k, states, extras)
        if q * per_query > limit:
            fit = limit // per_query
            split = f"send at most {fit} queries per Lookup (split the batch), or" if fit else ""
            split += " lower k" + (" or leave out states and extras" if states or extras else "")
            raise ResourceExhausted(
                f"this Lookup's answer would be {q * per_query} bytes ({q} queries x "
                f"{per_query} bytes each: {len(layer.indices)} groups x k={k}"
                f"{' with states' if states else ''}{' and extras' if extras else ''}), over the "
                f"server's {limit}-byte limit (max_lookup_answer_bytes, kept under "
                f"max_message_bytes); {split.strip()}"
            )
        work = q * layer.work_per_query()
        if work > c.max_lookup_work:
            fit = c.max_lookup_work // layer.work_per_query()
            raise ResourceExhausted(
                f"this Lookup would scan {work} key dimensions ({q} queries x "
                f"{layer.work_per_query()} each), over the server's max_lookup_work "
                f"({c.max_lookup_work}); send at most {fit} queries per Lookup"
            )

    def _load_layer(self, snap: VersionSnapshot) -> LoadedLayer:
        (layer,) = snap.shards
        self.rt.metrics.index_loads.inc()
        return load_layer(
            snap.record.version,
            snap.shard(layer),
            snap.indices[layer],
            self.rt.index_params,
            model_fingerprint=snap.record.model_fingerprint,
        )

    # ------------------------------------------------------------ FetchMemory
    def FetchMemory(self, request: pb.FetchMemoryRequest, context) -> Iterator:
        """The record, then every layer's shard in chunks, each read from LMDB when it is sent
        (one short read transaction per chunk): a stream holds one chunk, whatever the size
        of the memory, and nothing once it ends or is cancelled."""
        tenant = job_tenant(self.rt, request) if request.build_job else auth.current().tenant
        name = check_name(request.name)
        chunk = fetch_chunk_bytes(request.chunk_bytes, self.rt.config)
        rec = self.rt.store.get_prefix(tenant, name, request.version)
        check_fingerprint(rec.model_fingerprint, request.model_fingerprint, name)
        yield pb.FetchMemoryResponse(info=prefix_info(rec))
        for layer in range(rec.num_layers):
            start, last = 0, False
            while not last:
                data, size = self.rt.store.read_shard_chunk(
                    tenant, name, rec.version, layer, start, chunk
                )
                start += len(data)
                last = start >= size
                self.rt.metrics.fetch_bytes.inc(len(data))
                yield pb.FetchMemoryResponse(chunk=pb.ShardChunk(layer=layer, data=data, last=last))

    # ------------------------------------------------------------ Watch
    async def Watch(self, request: pb.WatchRequest, context) -> AsyncIterator[pb.WatchEvent]:
        """Served on the event loop: a waiting stream holds no thread. Limited per key, per
        tenant and in all (EventBus); ended when its key is revoked (`end_revoked_watches`)."""
        p = auth.current()
        names = [check_name(n) for n in request.names]
        bus = self.rt.bus
        sub = bus.subscribe(p.tenant, p.key_id, names)  # before the listing: nothing is missed
        try:
            if request.send_initial:
                start = ""
                while start is not None:
                    page = await self.rt.blocking(self._listing, p.tenant, start)
                    for rec in page:
                        if not names or rec.name in names:
                            yield _put_event(rec)
                    start = page[-1].name if len(page) == _PAGE else None
            while True:
                try:
                    event = await sub.next()
                except StopAsyncIteration:
                    return
                yield _watch_event(event)
                if sub.overflowed:
                    raise ResourceExhausted("watch stream fell behind; reconnect and re-sync")
        finally:
            bus.unsubscribe(sub)

    def _listing(self, tenant: str, start: str) -> list:
        return self.rt.store.list_prefixes(tenant, start_after=start, limit=_PAGE)


_PAGE = 500
FETCH_MIN_CHUNK = 64 * 1024
MESSAGE_OVERHEAD = 64 * 1024  # room for everything of a message but its tensor bytes
WATCH_KEY_CHECK_S = 1.0


def fetch_chunk_bytes(asked: int, c: ServerConfig) -> int:
    """FetchMemory's chunk size: as asked (or the default), clamped to FETCH_MIN_CHUNK..(the
    max message size less room for the message's other fields)."""
    chunk = asked or c.fetch_chunk_bytes
    return max(FETCH_MIN_CHUNK, min(chunk, c.max_message_bytes - MESSAGE_OVERHEAD))


def answer_limit(max_answer: int, max_message: int) -> int:
    """Tensor bytes a Lookup answer may hold: max_lookup_answer_bytes, under the message limit."""
    return min(max_answer, max_message - MESSAGE_OVERHEAD)


async def end_revoked_watches(rt: Runtime, period: float = WATCH_KEY_CHECK_S) -> None:
    """Every `period` seconds, end the Watch streams whose API key was revoked or whose tenant
    was deleted (UNAUTHENTICATED); runs on the server's event loop until cancelled."""
    while True:
        await asyncio.sleep(period)
        for tenant, key_id in rt.bus.holders():
            if key_id == auth.ROOT_KEY_ID:
                continue
            try:
                gone = await rt.blocking(_key_gone, rt.store, tenant, key_id)
            except Exception:  # e.g. the store is closing: try again next round
                log.debug("could not check key %s", key_id, exc_info=True)
                continue
            if gone:
                n = rt.bus.end(Unauthenticated(
                    f"API key {key_id} was revoked or its tenant deleted; this Watch stream "
                    "is closed"), key_id=key_id)  # fmt: skip
                log.info("ended %d Watch stream(s) of revoked key %s (tenant %s)", n, key_id,
                         tenant)  # fmt: skip


def layer_cache_key(rec: PrefixRecord, layer: int) -> tuple:
    """The IndexCache key of a loaded layer. It holds the version's commit time too: a prefix
    deleted and created again (through any node of a cluster, which invalidates only its own
    cache) starts over at version 1 with another memory."""
    return (rec.tenant, rec.name, rec.version, layer, rec.updated_at)


def _key_gone(store, tenant: str, key_id: str) -> bool:
    rec = store.get_key(key_id)
    return rec is None or rec.tenant != tenant


def _extra_names(request: pb.LookupRequest, stored: list[str], name: str) -> list[str]:
    """The extra tensors a Lookup asks for (each once, in request order), all stored ones."""
    wanted = list(dict.fromkeys(request.extras))
    unknown = [extra for extra in wanted if extra not in stored]
    if unknown:
        have = ", ".join(f"'{s}'" for s in stored) if stored else "none"
        raise InvalidArgument(
            f"memory '{name}' stores no extra tensor {', '.join(repr(u) for u in unknown)}; "
            f"its extra tensors: {have} (see PrefixInfo.extra_tensors)"
        )
    return wanted


def _put_event(rec) -> pb.WatchEvent:
    """The event a Watch with send_initial starts with for a stored prefix record."""
    ev = Event("put", rec.tenant, rec.name, rec.version, rec.model_fingerprint, rec.updated_at)
    return _watch_event(ev)


def _watch_event(event: Event) -> pb.WatchEvent:
    return pb.WatchEvent(
        type=_EVENT_TYPES[event.kind],
        name=event.name,
        version=event.version,
        model_fingerprint=event.model_fingerprint,
        at=timestamp(event.at),
    )
