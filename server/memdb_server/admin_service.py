"""The admin plane: uploading, inspecting and deleting prefixes; tenants, API keys, stats.

A PutPrefix is counted as its bytes arrive (refused as soon as they pass max_upload_bytes, the
tenant's quota or the declared total), received whole up to the client's commit message,
validated, indexed, and only then written as a new version in one transaction
(storage.Store.write_version) that aborts if the call has ended: an upload cut off before its
commit message, or invalid, leaves nothing. Knows nothing of how memories are built.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import time
from collections.abc import Iterator

import memdb
from memdb.errors import InvalidArgument, NotFound, ResourceExhausted, Unauthenticated
from memdb.shards import Shard, check_consistent, decode_shard
from memdb.v1 import memdb_pb2 as pb
from memdb.v1 import memdb_pb2_grpc as pb_grpc
from memdb.wire import prefix_info, timestamp
from memdb_server import auth, failpoints
from memdb_server.build_service import job_upload, job_writer
from memdb_server.events import Event
from memdb_server.index import build_layer_indices, resolve_kind
from memdb_server.records import check_metadata
from memdb_server.runtime import Runtime, check_name
from memdb_server.storage import KeyRecord, TenantRecord

log = logging.getLogger(__name__)

_MODES = {
    pb.PUT_MODE_UNSPECIFIED: "create",
    pb.PUT_MODE_CREATE: "create",
    pb.PUT_MODE_UPDATE: "update",
    pb.PUT_MODE_UPSERT: "upsert",
}
_ROLE_NAMES = {pb.ROLE_READER: "reader", pb.ROLE_WRITER: "writer", pb.ROLE_ADMIN: "admin",
               pb.ROLE_WORKER: "worker"}  # fmt: skip
_ROLE_VALUES = {v: k for k, v in _ROLE_NAMES.items()}
MAX_LAYERS = 4096


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    # ------------------------------------------------------------ prefixes
    def PutPrefix(self, request_iterator: Iterator[pb.PutPrefixRequest], context) -> pb.PrefixInfo:
        tenant = auth.current().tenant
        header = self._header(next(iter(request_iterator), None))
        job = job_upload(self.rt, header) if header.build_job else None  # a build job's
        tenant = job.tenant if job is not None else tenant
        budget = self._upload_budget(tenant, header)
        blobs = self._receive_shards(request_iterator, header, budget)
        failpoints.hit("put_received")
        shards = [decode_shard(b, where=f"layer {i}") for i, b in enumerate(blobs)]
        shape = check_consistent(shards)
        metric = header.metric or "cosine"
        kind = header.index_kind or self.rt.config.index_kind
        kind = resolve_kind(self.rt.index_params, shape.budget) if kind == "auto" else kind
        indices = [build_layer_indices(_float_keys(s), kind, metric, self.rt.index_params)
                   for s in shards]  # fmt: skip
        self.rt.metrics.index_builds.inc(sum(len(i) for i in indices))
        failpoints.hit("put_indexed")
        write = self.rt.store.write_version if job is None else job_writer(self.rt, job)
        rec = write(
            tenant,
            header.name,
            mode=_MODES[header.mode],
            expected_version=header.expected_version,
            model_fingerprint=header.model_fingerprint,
            token_count=header.token_count,
            build_params=dict(header.build_params),
            index_kind=kind,
            metric=metric,
            shards=blobs,
            indices=indices,
            decoded=shards,
            still_wanted=context.is_active,
        )
        self.rt.cache.invalidate(tenant, header.name)
        self.rt.bus.publish(Event("put", tenant, rec.name, rec.version, rec.model_fingerprint,
                                  rec.updated_at))  # fmt: skip
        return prefix_info(rec)  # the store logged the write

    def _header(self, first: pb.PutPrefixRequest | None) -> pb.PutPrefixHeader:
        if first is None or first.WhichOneof("kind") != "header":
            raise InvalidArgument("PutPrefix must start with a header message")
        h = first.header
        check_name(h.name)
        if not h.model_fingerprint:
            raise InvalidArgument("header.model_fingerprint is required")
        if not 1 <= h.num_layers <= MAX_LAYERS:
            raise InvalidArgument(f"header.num_layers must be 1..{MAX_LAYERS}, got {h.num_layers}")
        if h.mode not in _MODES:
            raise InvalidArgument(f"unknown put mode {h.mode}")
        if h.metric not in ("", "cosine", "ip"):
            raise InvalidArgument(f"metric {h.metric!r} is unknown; use 'cosine' or 'ip'")
        if h.index_kind not in ("", "auto", "flat", "ivf", "hnsw"):
            raise InvalidArgument(f"index_kind {h.index_kind!r} is unknown; use flat, ivf, hnsw")
        check_metadata(h.model_fingerprint, dict(h.build_params))  # before any chunk arrives
        return h

    def _upload_budget(self, tenant: str, header: pb.PutPrefixHeader) -> _Budget:
        """The most bytes this upload may send, checked against the declared total at once."""
        budget = _Budget(self.rt.config.max_upload_bytes, "the server's max_upload_bytes")
        allowance = self.rt.store.upload_allowance(tenant, header.name)
        if allowance is not None and allowance < budget.limit:
            budget = _Budget(allowance, f"what tenant '{tenant}' has left of its byte quota")
        if header.total_bytes:
            budget.check(header.total_bytes, declared=True)
        return budget

    def _receive_shards(
        self, requests: Iterator[pb.PutPrefixRequest], header: pb.PutPrefixHeader, budget: _Budget
    ) -> list[bytes]:
        """Every layer's bytes, up to the commit message (refused as soon as they pass the
        budget); InvalidArgument for chunks out of order or a stream without its commit."""
        layers, declared = header.num_layers, header.total_bytes
        done: list[bytes] = []
        buf = bytearray()
        total = 0
        for msg in requests:
            kind = msg.WhichOneof("kind")
            if kind == "commit" and len(done) == layers and not buf:
                _check_declared(total, declared, final=True)
                self.rt.metrics.upload_bytes.inc(total)
                return done
            if kind != "chunk":
                raise InvalidArgument(
                    f"PutPrefix got a {kind or 'empty'} message after {len(done)} of {layers} "
                    "layers; send one header, the chunks of every layer, then commit"
                )
            c = msg.chunk
            if c.layer != len(done) or len(done) >= layers:
                raise InvalidArgument(
                    f"got a chunk of layer {c.layer} while expecting layer {len(done)} of "
                    f"{layers}: send layers in order 0..{layers - 1}, each ending with last=true"
                )
            total += len(c.data)
            budget.check(total)
            _check_declared(total, declared)
            buf += c.data
            if c.last:
                done.append(bytes(buf))
                buf = bytearray()
        raise InvalidArgument(
            f"upload ended after {len(done)} of {layers} layers without its commit message; "
            "nothing was stored"
        )

    def GetPrefix(self, request: pb.GetPrefixRequest, context) -> pb.PrefixInfo:
        tenant = auth.current().tenant
        return prefix_info(self.rt.store.get_prefix(tenant, check_name(request.name)))

    def ListPrefixes(self, request: pb.ListPrefixesRequest, context) -> pb.ListPrefixesResponse:
        tenant = auth.current().tenant
        size = request.page_size or 100
        if size > 1000:
            raise InvalidArgument("page_size must be at most 1000")
        start = _decode_token(request.page_token)
        recs = self.rt.store.list_prefixes(
            tenant, start_after=start, name_prefix=request.name_prefix, limit=size + 1
        )
        more = len(recs) > size
        recs = recs[:size]
        token = _encode_token(recs[-1].name) if more else ""
        return pb.ListPrefixesResponse(
            prefixes=[prefix_info(r) for r in recs], next_page_token=token
        )

    def DeletePrefix(self, request: pb.DeletePrefixRequest, context) -> pb.DeletePrefixResponse:
        tenant = auth.current().tenant
        name = check_name(request.name)
        rec = self.rt.store.get_prefix(tenant, name)
        version = self.rt.store.delete_prefix(
            tenant, name, expected_version=request.expected_version
        )
        self.rt.cache.invalidate(tenant, name)
        self.rt.bus.publish(Event("delete", tenant, name, version, rec.model_fingerprint,
                                  time.time()))  # fmt: skip
        log.info("deleted %s/%s (version %d)", tenant, name, version)
        return pb.DeletePrefixResponse(deleted_version=version)

    # ------------------------------------------------------------ tenants
    def CreateTenant(self, request: pb.CreateTenantRequest, context) -> pb.Tenant:
        name = check_name(request.name, "tenant name")
        q = request.quotas
        rec = TenantRecord(name, q.max_bytes, q.max_prefixes, time.time())
        self.rt.store.put_tenant(rec)
        log.info("created tenant %s", name)
        return self._tenant(rec)

    def ListTenants(self, request: pb.ListTenantsRequest, context) -> pb.ListTenantsResponse:
        return pb.ListTenantsResponse(
            tenants=[self._tenant(t) for t in self.rt.store.list_tenants()]
        )

    def DeleteTenant(self, request: pb.DeleteTenantRequest, context) -> pb.DeleteTenantResponse:
        name = check_name(request.name, "tenant name")
        if name == auth.DEFAULT_TENANT:
            raise InvalidArgument("the 'default' tenant holds the root key and cannot be deleted")
        self.rt.store.delete_tenant(name, force=request.force)
        self.rt.bus.end(Unauthenticated(f"tenant '{name}' was deleted"), tenant=name)
        self.rt.cache.invalidate_tenant(name)
        log.info("deleted tenant %s", name)
        return pb.DeleteTenantResponse()

    def _tenant(self, rec: TenantRecord) -> pb.Tenant:
        n, size = self.rt.store.usage(rec.name)
        return pb.Tenant(
            name=rec.name,
            quotas=pb.Quotas(max_bytes=rec.max_bytes, max_prefixes=rec.max_prefixes),
            created_at=timestamp(rec.created_at),
            num_prefixes=n,
            bytes=size,
        )

    # ------------------------------------------------------------ API keys
    def CreateApiKey(self, request: pb.CreateApiKeyRequest, context) -> pb.CreateApiKeyResponse:
        p = auth.current()
        tenant = request.tenant or p.tenant
        p.require_tenant(tenant)
        self.rt.store.get_tenant(tenant)  # NotFound for an unknown tenant
        role = _ROLE_NAMES.get(request.role)
        if role is None:
            raise InvalidArgument(
                "role must be ROLE_READER, ROLE_WRITER, ROLE_ADMIN or ROLE_WORKER"
            )
        if role == "worker":  # a worker key builds the jobs of every tenant
            p.require(auth.ROOT, "creating a worker key")
        key_id, key, secret_hash = auth.new_key()
        rec = KeyRecord(key_id, tenant, role, secret_hash, request.description, time.time())
        self.rt.store.put_key(rec)
        log.info("created %s key %s for tenant %s", role, key_id, tenant)
        return pb.CreateApiKeyResponse(info=_key_info(rec), api_key=key)

    def ListApiKeys(self, request: pb.ListApiKeysRequest, context) -> pb.ListApiKeysResponse:
        p = auth.current()
        tenant = request.tenant or p.tenant
        p.require_tenant(tenant)
        return pb.ListApiKeysResponse(keys=[_key_info(k) for k in self.rt.store.list_keys(tenant)])

    def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context) -> pb.RevokeApiKeyResponse:
        p = auth.current()
        rec = self.rt.store.get_key(request.key_id)
        if rec is None or (not p.is_root and rec.tenant != p.tenant):
            raise NotFound(f"API key {request.key_id!r} not found")
        self.rt.store.delete_key(rec.key_id)
        # its Watch streams end before this call returns (end_revoked_watches is the backstop)
        self.rt.bus.end(
            Unauthenticated(f"API key {rec.key_id} was revoked; this Watch stream is closed"),
            key_id=rec.key_id,
        )
        log.info("revoked key %s of tenant %s", rec.key_id, rec.tenant)
        return pb.RevokeApiKeyResponse()

    # ------------------------------------------------------------ stats
    def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        p = auth.current()
        info = self.rt.store.info()
        tenants = [t.name for t in self.rt.store.list_tenants()] if p.is_root else [p.tenant]
        per = []
        for t in tenants:
            n, size = self.rt.store.usage(t)
            per.append(pb.TenantStats(tenant=t, num_prefixes=n, bytes=size))
        cache = self.rt.cache
        return pb.StatsResponse(
            server_version=memdb.__version__,
            store_bytes=info["used_bytes"],
            map_size=info["map_size"],
            num_tenants=info["num_tenants"] if p.is_root else 1,
            num_prefixes=info["num_prefixes"] if p.is_root else per[0].num_prefixes,
            tenants=per,
            index_cache_bytes=cache.nbytes,
            index_cache_hits=cache.hits,
            index_cache_misses=cache.misses,
            uptime_s=time.time() - self.rt.started_at,
            nodes=[
                pb.NodeInfo(node_id=n["node"], address=n["address"], started_at=n["started_at"])
                for n in (self.rt.store.list_nodes() if p.is_root else [])
            ],
        )


@dataclasses.dataclass
class _Budget:
    """The most bytes one upload may send, and what sets that limit."""

    limit: int
    what: str

    def check(self, nbytes: int, declared: bool = False) -> None:
        if nbytes > self.limit:
            verb = "declares" if declared else "sent"
            raise ResourceExhausted(
                f"the upload {verb} {nbytes} bytes, more than {self.limit} bytes ({self.what}); "
                "nothing was stored: upload a smaller memory, delete prefixes or raise the limit"
            )


def _check_declared(total: int, declared: int, final: bool = False) -> None:
    if declared and (total > declared or (final and total != declared)):
        raise InvalidArgument(
            f"the upload sent {total} bytes{'' if final else ' so far'}, its header declared "
            f"total_bytes={declared}; nothing was stored"
        )


def _float_keys(shard: Shard) -> Shard:
    """The shard with float32 keys (fp8 keys dequantized): what indices are built over."""
    return dataclasses.replace(shard, keys=shard.float_keys(), key_scale=None)


def _key_info(rec: KeyRecord) -> pb.ApiKeyInfo:
    return pb.ApiKeyInfo(
        key_id=rec.key_id,
        tenant=rec.tenant,
        role=_ROLE_VALUES[rec.role],
        description=rec.description,
        created_at=timestamp(rec.created_at),
    )


def _encode_token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def _decode_token(token: str) -> str:
    if not token:
        return ""
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token is malformed; pass next_page_token as given") from None
