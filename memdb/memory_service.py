"""The data plane: Lookup, FetchMemory and Watch, for inference workers.

Every answer is read from one version: a Lookup pins the version first and searches the
`LoadedLayer` of exactly that version; FetchMemory streams one read snapshot. Knows nothing of
how memories are built or used.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator

import numpy as np

from memdb import auth
from memdb.errors import InvalidArgument, ResourceExhausted
from memdb.events import Event
from memdb.index import LoadedLayer, load_layer
from memdb.records import VersionSnapshot
from memdb.runtime import Runtime, check_fingerprint, check_name
from memdb.v1 import memdb_pb2 as pb
from memdb.v1 import memdb_pb2_grpc as pb_grpc
from memdb.wire import decode_tensor, encode_tensor, prefix_info, timestamp

log = logging.getLogger(__name__)

_EVENT_TYPES = {"put": pb.EVENT_TYPE_PUT, "delete": pb.EVENT_TYPE_DELETE}


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    # ------------------------------------------------------------ Lookup
    def Lookup(self, request: pb.LookupRequest, context) -> pb.LookupResponse:
        tenant = auth.current().tenant
        name = check_name(request.name)
        rec, layer = self.rt.store.read_current_layer(  # version and layer: one transaction
            tenant, name, request.layer, request.version,
            open_layer=lambda rec, read: self.rt.cache.get(
                (tenant, name, rec.version, request.layer), lambda: self._load_layer(read())),
        )  # fmt: skip
        version = rec.version
        check_fingerprint(layer.model_fingerprint, request.model_fingerprint, name)
        extras = _extra_names(request, rec.extra_tensors, name)
        queries = self._queries(request)
        k = request.k or 1
        if k > self.rt.config.max_k:
            raise InvalidArgument(f"k={k} exceeds the server's max_k={self.rt.config.max_k}")
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
        """The request's queries as float32, checked for dtype, count and finite values (their
        shape is checked by the layer they search)."""
        q = decode_tensor(request.queries, name="queries")  # [Q, I, Dk] or [Q, Dk]
        if q.dtype.kind != "f":
            raise InvalidArgument(f"queries must be float32 or float16, got {q.dtype}")
        if q.ndim and not 1 <= q.shape[0] <= self.rt.config.max_lookup_queries:
            raise InvalidArgument(
                f"a Lookup takes 1..{self.rt.config.max_lookup_queries} queries, got {q.shape[0]}"
            )
        if not np.isfinite(q).all():
            raise InvalidArgument("queries hold NaN or infinite values")
        return np.ascontiguousarray(q, dtype=np.float32)

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
        tenant = auth.current().tenant
        name = check_name(request.name)
        chunk = request.chunk_bytes or self.rt.config.fetch_chunk_bytes
        chunk = min(chunk, self.rt.config.max_message_bytes - 1024)
        snap = self.rt.store.read_version(tenant, name, request.version)
        check_fingerprint(snap.record.model_fingerprint, request.model_fingerprint, name)
        yield pb.FetchMemoryResponse(info=prefix_info(snap.record))
        for layer in range(snap.record.num_layers):
            blob = memoryview(snap.shard(layer))
            for start in range(0, len(blob), chunk):
                data = blob[start : start + chunk]
                last = start + chunk >= len(blob)
                self.rt.metrics.fetch_bytes.inc(len(data))
                yield pb.FetchMemoryResponse(
                    chunk=pb.ShardChunk(layer=layer, data=bytes(data), last=last)
                )

    # ------------------------------------------------------------ Watch
    def Watch(self, request: pb.WatchRequest, context) -> Iterator[pb.WatchEvent]:
        tenant = auth.current().tenant
        names = [check_name(n) for n in request.names]
        bus = self.rt.bus
        sub = bus.subscribe(tenant, names)  # before the initial listing: nothing is missed
        try:
            if request.send_initial:
                yield from self._initial_events(tenant, names)
            while context.is_active() and not bus.closed.is_set():
                try:
                    event = sub.queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                yield _watch_event(event)
                if sub.overflowed:
                    raise ResourceExhausted("watch stream fell behind; reconnect and re-sync")
        finally:
            bus.unsubscribe(sub)

    def _initial_events(self, tenant: str, names: list[str]) -> Iterator[pb.WatchEvent]:
        start = ""
        while True:
            page = self.rt.store.list_prefixes(tenant, start_after=start, limit=500)
            for rec in page:
                if not names or rec.name in names:
                    ev = Event("put", tenant, rec.name, rec.version, rec.model_fingerprint,
                               rec.updated_at)  # fmt: skip
                    yield _watch_event(ev)
            if len(page) < 500:
                return
            start = page[-1].name


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


def _watch_event(event: Event) -> pb.WatchEvent:
    return pb.WatchEvent(
        type=_EVENT_TYPES[event.kind],
        name=event.name,
        version=event.version,
        model_fingerprint=event.model_fingerprint,
        at=timestamp(event.at),
    )
