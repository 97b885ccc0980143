"""MemdbClient: the typed Python client of the memdb server.

numpy arrays in and out, a deadline on every call (streams included, Watch excepted), and
every gRPC error raised as the matching `memdb.errors` class. The worker and the admin CLI
talk to the server only through this. Knows nothing of models.

Reads are monotonic per client: a client remembers the highest version of each prefix it has
seen (in any response or Watch event), and a read of the current version that a lagging node
answers with an older one (a cluster node's metadata copy trails the newest write by the watch's
delay) is asked again for the version it saw, which such a node reads from etcd.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memdb.errors import (
    Aborted,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unavailable,
    from_rpc_error,
)
from memdb.shards import Shard, decode_shard, encode_shard
from memdb.v1 import memdb_pb2 as pb
from memdb.v1 import memdb_pb2_grpc as pb_grpc
from memdb.wire import decode_tensor, encode_tensor
from memdb_client.build_jobs import STATE_VALUES, BuildJob, BuildSpec
from memdb_client.targets import channel_options, channel_target
from memdb_client.types import (
    ROLES,
    ApiKeyInfo,
    LookupResult,
    MemoryShards,
    PrefixInfo,
    Stats,
    TenantInfo,
    WatchEvent,
)

DEFAULT_ADDRESS = "127.0.0.1:50051"
FETCH_ATTEMPTS = 3  # a fetch of the current version restarts when it is replaced meanwhile
# a fetch that fails UNAVAILABLE is tried again, as gRPC retries the unary reads (targets.py:
# not gRPC's retries for streams), within the fetch's one deadline
FETCH_UNAVAILABLE_ATTEMPTS = 4
FETCH_BACKOFF_S = (0.05, 1.0)  # the first wait, doubled up to the second
MiB = 1 << 20
_MODES = {"create": pb.PUT_MODE_CREATE, "update": pb.PUT_MODE_UPDATE, "upsert": pb.PUT_MODE_UPSERT}
R = TypeVar("R")


class MemdbClient:
    """A connection to one memdb server or several (`a:1,b:2`: round_robin, idempotent calls
    retried on UNAVAILABLE), as one API key (hence one tenant)."""

    def __init__(
        self,
        address: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        stream_timeout: float = 600.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        max_message_bytes: int = 64 * MiB,
        chunk_bytes: int = 4 * MiB,
    ) -> None:
        self.address = address or os.environ.get("MEMDB_SERVER", DEFAULT_ADDRESS)
        self._key = api_key if api_key is not None else os.environ.get("MEMDB_API_KEY", "")
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.chunk_bytes = chunk_bytes
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *channel_options(self.address),  # several addresses: round_robin + retries
        ]
        target = channel_target(self.address)
        if tls:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._memory = pb_grpc.MemoryServiceStub(self._channel)
        self._admin = pb_grpc.AdminServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._build = pb_grpc.BuildServiceStub(self._channel)
        self._seen: dict[str, int] = {}  # prefix name -> the highest version seen
        self._seen_lock = threading.Lock()

    # ------------------------------------------------------------ plumbing
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MemdbClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._key}"),) if self._key else ()

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    # ------------------------------------------------------------ monotonic reads
    def seen_version(self, name: str) -> int:
        """The highest version of `name` this client has seen (0: none since its deletion)."""
        with self._seen_lock:
            return self._seen.get(name, 0)

    def _saw(self, name: str, version: int) -> None:
        with self._seen_lock:
            if version > self._seen.get(name, 0):
                self._seen[name] = version

    def _forget(self, name: str) -> None:
        """`name` was deleted: its versions start over at 1."""
        with self._seen_lock:
            self._seen.pop(name, None)

    def _monotonic(
        self,
        name: str,
        version: int,
        read: Callable[[int], R],
        version_of: Callable[[R], int],
        *,
        cached: bool = False,
    ) -> R:
        """`read(version)`; a read of the current version (0) answered older than the version
        this client saw is asked again for that one. If it is gone (replaced twice since) and
        the read is one a cluster node answers from its metadata copy (`cached`: Lookup), the
        current version is read once more: the node read etcd for the version asked and holds
        its copy back, so its current one now is at least as new (server/memdb_server/backends/
        metadata_cache.py). Older still, or the prefix deleted by someone else: the older
        answer stands and `name` starts over."""
        got = read(version)
        seen = self.seen_version(name)
        if not version and version_of(got) < seen:
            try:
                got = read(seen)
            except NotFound:
                try:
                    again = read(0) if cached else got
                except NotFound:
                    again = got
                if version_of(again) >= seen:
                    got = again
                else:
                    self._forget(name)
        self._saw(name, version_of(got))
        return got

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's health status name ("SERVING", "NOT_SERVING", ...)."""
        req = health_pb2.HealthCheckRequest(service=service)
        resp = self._call(self._health.Check, req, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel connects (Unavailable after `timeout`)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            from memdb.errors import Unavailable

            raise Unavailable(f"memdb server at {self.address} not reachable") from None

    # ------------------------------------------------------------ data plane
    def lookup(
        self,
        name: str,
        layer: int,
        queries: np.ndarray,
        *,
        model_fingerprint: str,
        k: int = 1,
        include_states: bool = True,
        version: int = 0,
        timeout: float | None = None,
        extras: Sequence[str] = (),
    ) -> LookupResult:
        """Top-k entries of one layer for queries [Q, I, Dk] (or [Q, Dk] for every group).

        `extras`: names of extra tensors of the memory (`PrefixInfo.extra_tensors`, e.g.
        "q_mean", "k_bar") whose rows of the hits to return too, as `LookupResult.extras`
        (name -> [Q, I, k, ...]); an unknown name is InvalidArgument. Version 0 (current)
        answers a version no older than this client has seen (see the module).
        """
        q = np.asarray(queries)
        if q.dtype not in (np.float32, np.float16):
            q = q.astype(np.float32)
        req = pb.LookupRequest(
            name=name,
            layer=layer,
            model_fingerprint=model_fingerprint,
            queries=encode_tensor(q),
            k=k,
            include_states=include_states,
            extras=list(extras),
        )

        def read(v: int) -> pb.LookupResponse:
            req.version = v
            return self._call(self._memory.Lookup, req, timeout)

        resp = self._monotonic(name, version, read, lambda r: r.version, cached=True)
        return LookupResult(
            version=resp.version,
            ids=decode_tensor(resp.ids, name="ids"),
            scores=decode_tensor(resp.scores, name="scores"),
            out=decode_tensor(resp.out, name="out") if include_states else None,
            lse=decode_tensor(resp.lse, name="lse") if include_states else None,
            extras=_lookup_extras(resp, extras),
        )

    def fetch_memory_raw(
        self,
        name: str,
        *,
        model_fingerprint: str,
        version: int = 0,
        timeout: float | None = None,
        on_bytes: Callable[[int], None] | None = None,
        max_layers: int | None = None,
        build_job: tuple[str, str] | None = None,
    ) -> tuple[PrefixInfo, list[bytes]]:
        """A whole version as its info and every layer's safetensors bytes.

        `on_bytes(n)` is called as each chunk arrives; an interruption cancels the stream.
        `max_layers` stops (and cancels the stream) after that many layers, e.g. 1 to read a
        memory's metadata without its tensors. The server streams each chunk from the store as
        it sends it; when the version is replaced and dropped meanwhile (ABORTED) a fetch of
        the current version (`version=0`) starts again, up to FETCH_ATTEMPTS times in all (a
        deleted prefix then answers NOT_FOUND); one that fails UNAVAILABLE (its server died or
        restarts) starts again up to FETCH_UNAVAILABLE_ATTEMPTS times in all, through the next
        server. Every attempt shares one deadline, `timeout` (default `stream_timeout`) from
        now: DEADLINE_EXCEEDED once it passes. `on_bytes` counts the bytes of every attempt.
        `build_job` = (job id, worker id): a worker reading the memory its append job extends."""
        deadline = time.monotonic() + (timeout or self.stream_timeout)

        def read(v: int) -> tuple[PrefixInfo, list[bytes]]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"FetchMemory of '{name}': deadline passed")
            return self._fetch_once(name, model_fingerprint, v, left, on_bytes, max_layers,
                                    build_job)  # fmt: skip

        aborted = unavailable = 0
        backoff = FETCH_BACKOFF_S[0]
        while True:
            try:
                return self._monotonic(name, version, read, lambda got: got[0].version)
            except Aborted:
                aborted += 1
                if version or aborted == FETCH_ATTEMPTS:
                    raise
            except Unavailable:
                unavailable += 1
                if unavailable == FETCH_UNAVAILABLE_ATTEMPTS:
                    raise
                if time.monotonic() + backoff >= deadline:
                    raise
                time.sleep(backoff)
                backoff = min(2 * backoff, FETCH_BACKOFF_S[1])

    def _fetch_once(
        self,
        name: str,
        model_fingerprint: str,
        version: int,
        timeout: float | None,
        on_bytes: Callable[[int], None] | None,
        max_layers: int | None,
        build_job: tuple[str, str] | None = None,
    ) -> tuple[PrefixInfo, list[bytes]]:
        req = pb.FetchMemoryRequest(name=name, model_fingerprint=model_fingerprint, version=version)
        if build_job is not None:
            req.build_job, req.build_worker = build_job
        info: PrefixInfo | None = None
        blobs: list[bytes] = []
        buf = bytearray()
        stream = self._memory.FetchMemory(
            req, timeout=timeout or self.stream_timeout, metadata=self._metadata
        )
        try:
            for msg in stream:
                if msg.WhichOneof("kind") == "info":
                    info = PrefixInfo.from_pb(msg.info)
                    continue
                buf += msg.chunk.data
                if on_bytes is not None:
                    on_bytes(len(msg.chunk.data))
                if msg.chunk.last:
                    blobs.append(bytes(buf))
                    buf = bytearray()
                    if max_layers is not None and len(blobs) >= max_layers:
                        stream.cancel()
                        break
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        except BaseException:
            stream.cancel()
            raise
        want = (
            info.num_layers
            if info is None or max_layers is None
            else min(max_layers, info.num_layers)
        )
        if info is None or len(blobs) != want:
            raise InvalidArgument(f"FetchMemory of '{name}' ended early; try again")
        return info, blobs

    def fetch_memory(
        self,
        name: str,
        *,
        model_fingerprint: str,
        version: int = 0,
        timeout: float | None = None,
        on_bytes: Callable[[int], None] | None = None,
        build_job: tuple[str, str] | None = None,
    ) -> MemoryShards:
        """A whole version, decoded into shards."""
        info, blobs = self.fetch_memory_raw(
            name,
            model_fingerprint=model_fingerprint,
            version=version,
            timeout=timeout,
            on_bytes=on_bytes,
            build_job=build_job,
        )
        shards = [decode_shard(b, where=f"layer {i}") for i, b in enumerate(blobs)]
        return MemoryShards(info, shards)

    def watch(self, names: Sequence[str] = (), *, send_initial: bool = False) -> Watch:
        """A stream of version changes; iterate it, `cancel()` it to stop."""
        req = pb.WatchRequest(names=list(names), send_initial=send_initial)
        return Watch(self._memory.Watch(req, metadata=self._metadata), self._heard)

    def _heard(self, event: WatchEvent) -> None:
        if event.type == "delete":
            self._forget(event.name)
        else:
            self._saw(event.name, event.version)

    # ------------------------------------------------------------ prefixes
    def put_prefix(
        self,
        name: str,
        shards: Sequence[Shard | bytes],
        *,
        model_fingerprint: str,
        token_count: int = 0,
        build_params: dict[str, str] | None = None,
        mode: str = "create",
        expected_version: int = 0,
        index_kind: str = "",
        metric: str = "",
        timeout: float | None = None,
        on_bytes: Callable[[int], None] | None = None,
        build_job: tuple[str, str] | None = None,
    ) -> PrefixInfo:
        """Upload a memory (one shard per layer) as a new version, atomically.

        The stream is a header (declaring the total bytes), every layer's chunks, then a commit
        message; the server stores a complete, valid upload only once the commit message
        arrived, and aborts its write if the call ended before the write commits. What an
        interruption (e.g. KeyboardInterrupt) means, exactly:
          - before the commit message was handed to gRPC: nothing is stored (the stream is
            cancelled and the commit message is never sent);
          - once this method has returned: the version is durable (the server committed it,
            fsynced unless it runs with sync off);
          - after the commit message was handed to gRPC but before this returned: the version
            may or may not be stored. A retry with `mode="update"` and `expected_version`
            set to the version you last saw tells which (FailedPrecondition: it was stored).
        `on_bytes(n)` is called (from gRPC's sending thread) as each chunk is sent. The server
        refuses (ResourceExhausted) as soon as the bytes pass its max upload size or the
        tenant's quota, without waiting for the rest. `build_job` = (job id, worker id): a
        worker's upload of the build job it claimed (name, mode and version are the job's).
        """
        if mode not in _MODES:
            raise InvalidArgument(f"mode must be one of {', '.join(_MODES)}")
        blobs = [s if isinstance(s, bytes) else encode_shard(s) for s in shards]
        header = pb.PutPrefixHeader(
            name=name,
            mode=_MODES[mode],
            expected_version=expected_version,
            model_fingerprint=model_fingerprint,
            num_layers=len(shards),
            token_count=token_count,
            build_params=build_params or {},
            index_kind=index_kind,
            metric=metric,
            total_bytes=sum(len(b) for b in blobs),
            build_job=build_job[0] if build_job else "",
            build_worker=build_job[1] if build_job else "",
        )
        stop = threading.Event()
        stream = self._upload_stream(header, blobs, on_bytes, stop)
        future = None
        try:
            future = self._admin.PutPrefix.future(
                stream, timeout=timeout or self.stream_timeout, metadata=self._metadata
            )
            resp = future.result()
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        except BaseException:  # KeyboardInterrupt, SystemExit: never leave the upload running
            stop.set()  # the sending thread stops too, even if the call object was not made yet
            if future is not None:
                future.cancel()
            raise
        info = PrefixInfo.from_pb(resp)
        self._saw(name, info.version)
        return info

    def _upload_stream(
        self,
        header: pb.PutPrefixHeader,
        shards: Iterable[Shard | bytes],
        on_bytes: Callable[[int], None] | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[pb.PutPrefixRequest]:
        yield pb.PutPrefixRequest(header=header)
        step = self.chunk_bytes
        for layer, shard in enumerate(shards):
            if stop is not None and stop.is_set():
                return  # an incomplete upload: the server stores nothing
            blob = memoryview(shard if isinstance(shard, bytes) else encode_shard(shard))
            for start in range(0, max(len(blob), 1), step):
                chunk = pb.ShardChunk(
                    layer=layer, data=bytes(blob[start : start + step]),
                    last=start + step >= len(blob),
                )  # fmt: skip
                if stop is not None and stop.is_set():
                    return
                yield pb.PutPrefixRequest(chunk=chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk.data))
        if stop is not None and stop.is_set():
            return  # interrupted before the commit message: the server stores nothing
        yield pb.PutPrefixRequest(commit=pb.PutPrefixCommit())

    def get_prefix(self, name: str, timeout: float | None = None) -> PrefixInfo:
        info = PrefixInfo.from_pb(
            self._call(self._admin.GetPrefix, pb.GetPrefixRequest(name=name), timeout)
        )
        self._saw(name, info.version)
        return info

    def list_prefixes_page(
        self, *, name_prefix: str = "", page_size: int = 100, page_token: str = ""
    ) -> tuple[list[PrefixInfo], str]:
        req = pb.ListPrefixesRequest(
            page_size=page_size, page_token=page_token, name_prefix=name_prefix
        )
        resp = self._call(self._admin.ListPrefixes, req)
        infos = [PrefixInfo.from_pb(p) for p in resp.prefixes]
        for info in infos:
            self._saw(info.name, info.version)
        return infos, resp.next_page_token

    def list_prefixes(self, *, name_prefix: str = "", page_size: int = 100) -> list[PrefixInfo]:
        """Every prefix of the caller's tenant (follows the pages)."""
        out, token = [], ""
        while True:
            page, token = self.list_prefixes_page(
                name_prefix=name_prefix, page_size=page_size, page_token=token
            )
            out += page
            if not token:
                return out

    def delete_prefix(self, name: str, *, expected_version: int = 0) -> int:
        req = pb.DeletePrefixRequest(name=name, expected_version=expected_version)
        deleted = self._call(self._admin.DeletePrefix, req).deleted_version
        self._forget(name)
        return deleted

    # ------------------------------------------------------------ build jobs
    def submit_build(self, spec: BuildSpec) -> BuildJob:
        """Queue a build of `spec` on a worker of its model (refusals come before any build)."""
        req = pb.SubmitBuildRequest(spec=spec.to_pb())
        return BuildJob.from_pb(self._call(self._build.SubmitBuild, req))

    def get_build(self, job_id: str) -> BuildJob:
        return BuildJob.from_pb(self._call(self._build.GetBuild, pb.GetBuildRequest(job_id=job_id)))

    def list_builds(self, *, include_finished: bool = False, limit: int = 100) -> list[BuildJob]:
        req = pb.ListBuildsRequest(limit=limit, include_finished=include_finished)
        return [BuildJob.from_pb(j) for j in self._call(self._build.ListBuilds, req).jobs]

    def cancel_build(self, job_id: str) -> BuildJob:
        req = pb.CancelBuildRequest(job_id=job_id)
        return BuildJob.from_pb(self._call(self._build.CancelBuild, req))

    def watch_build(self, job_id: str, timeout: float | None = None) -> Iterator[BuildJob]:
        """The job now and at each change, until it is final (deadline: `stream_timeout`)."""
        req = pb.WatchBuildRequest(job_id=job_id)
        call = self._build.WatchBuild(
            req, timeout=timeout or self.stream_timeout, metadata=self._metadata
        )
        try:
            for msg in call:
                yield BuildJob.from_pb(msg)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    def claim_build(self, worker_id: str, model_fingerprint: str) -> tuple[BuildJob | None, float]:
        """(the oldest queued job of this model, now this worker's, or None; the lease's s)."""
        req = pb.ClaimBuildRequest(worker_id=worker_id, model_fingerprint=model_fingerprint)
        resp = self._call(self._build.ClaimBuild, req)
        return (BuildJob.from_pb(resp.job) if resp.HasField("job") else None), resp.lease_s

    def report_build(self, job_id: str, worker_id: str, state: str, **fields) -> BuildJob:
        """Progress (state "running": also the lease's heartbeat), "done" or "failed"."""
        req = pb.ReportBuildRequest(
            job_id=job_id, worker_id=worker_id, state=STATE_VALUES[state], **fields
        )
        return BuildJob.from_pb(self._call(self._build.ReportBuild, req).job)

    # ------------------------------------------------------------ tenants, keys, stats
    def create_tenant(self, name: str, *, max_bytes: int = 0, max_prefixes: int = 0) -> TenantInfo:
        quotas = pb.Quotas(max_bytes=max_bytes, max_prefixes=max_prefixes)
        req = pb.CreateTenantRequest(name=name, quotas=quotas)
        return TenantInfo.from_pb(self._call(self._admin.CreateTenant, req))

    def list_tenants(self) -> list[TenantInfo]:
        resp = self._call(self._admin.ListTenants, pb.ListTenantsRequest())
        return [TenantInfo.from_pb(t) for t in resp.tenants]

    def delete_tenant(self, name: str, *, force: bool = False) -> None:
        self._call(self._admin.DeleteTenant, pb.DeleteTenantRequest(name=name, force=force))

    def create_api_key(
        self, role: str, *, tenant: str = "", description: str = ""
    ) -> tuple[str, ApiKeyInfo]:
        """A new key: (the key itself, shown only now; its info)."""
        if role not in ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(ROLES)}")
        req = pb.CreateApiKeyRequest(tenant=tenant, role=ROLES[role], description=description)
        resp = self._call(self._admin.CreateApiKey, req)
        return resp.api_key, ApiKeyInfo.from_pb(resp.info)

    def list_api_keys(self, *, tenant: str = "") -> list[ApiKeyInfo]:
        resp = self._call(self._admin.ListApiKeys, pb.ListApiKeysRequest(tenant=tenant))
        return [ApiKeyInfo.from_pb(k) for k in resp.keys]

    def revoke_api_key(self, key_id: str) -> None:
        self._call(self._admin.RevokeApiKey, pb.RevokeApiKeyRequest(key_id=key_id))

    def stats(self) -> Stats:
        return Stats.from_pb(self._call(self._admin.Stats, pb.StatsRequest()))


def _lookup_extras(resp: pb.LookupResponse, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The requested extras of a Lookup response, in request order."""
    missing = [n for n in names if n not in resp.extras]
    if missing:  # a server that predates Lookup extras ignores the request field
        raise InvalidArgument(f"the server returned no extra tensor {missing}; upgrade it")
    return {n: decode_tensor(resp.extras[n], name=n) for n in dict.fromkeys(names)}


class Watch:
    """An open Watch stream: iterate for WatchEvents; `cancel()` ends it. `heard(event)` is
    told of each event before it is yielded (the client's seen versions)."""

    def __init__(self, call, heard: Callable[[WatchEvent], None] = lambda event: None) -> None:
        self._call = call
        self._heard = heard

    def __iter__(self) -> Iterator[WatchEvent]:
        try:
            for msg in self._call:
                event = WatchEvent.from_pb(msg)
                self._heard(event)
                yield event
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED:
                return
            raise from_rpc_error(err) from None

    def cancel(self) -> None:
        self._call.cancel()
