"""Fuzzing a real server: hypothesis over every request type, raw bytes, malformed shards.

Each case is one call to a server process on 127.0.0.1 (`backend` "local": one node on LMDB;
"cluster": one node on the cluster backend, over a real 3-member etcd cluster and a 3 + 3 Redis
Cluster), with one of several keys (root, a tenant's admin / writer / reader, none, garbage):
- message: a request of any method of memdb.v1 drawn from its descriptor (two thirds of them
  a valid request with some or one of its fields replaced, so they get past the first checks);
- put: a PutPrefix stream of a valid header (any index kind and metric) and malformed / odd
  shards (strategies.shard_blob: overflowing float8 keys, bad key scales, huge or empty shapes,
  unknown formats among them);
- raw: random or bit-flipped bytes sent as any method's payload through a generic channel
  method with identity serializers;
- bounds: with the root key, a one-layer PutPrefix of a shard aimed at the bounds
  (strategies.bounded_values or a hand-made header, mostly IVF builds), or a Lookup of the
  target with queries aimed at them (strategies.query_tensor): what issue 23's probe found.
Every answer must be a deliberate status: UNKNOWN and INTERNAL count as errors, a dead server
as a crash (it is restarted, and the case kept). The server's RSS is read after a warm-up and
at the end. Knows nothing of what each method does beyond its request type.
"""

from __future__ import annotations

import logging
import random
import re
import time
import warnings
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisWarning

from bench.reliability.measure import BAD_CODES, Report, rss_mb
from bench.reliability.memories import FP, Shape, queries_of, tagged_memory
from bench.reliability.strategies import (
    INDEX_KINDS,
    METRICS,
    Hints,
    bounded_values,
    crafted_header,
    message,
    one_field,
    query_tensor,
    shard_blob,
)
from bench.reliability.tenants import make_tenant
from memdb.errors import MemdbError
from memdb.v1 import memdb_pb2 as pb
from memdb_client import MemdbClient
from memdb_server.cluster_process import control_and_data_planes
from memdb_server.process import ServerProcess, start_server

log = logging.getLogger(__name__)

SHAPE = Shape(layers=2, groups=2, m=16, dk=8, h=2, d=4)
TARGET, DOOMED, TENANT = "fz-x", "fz-del", "fz-t"
HEALTH = "/grpc.health.v1.Health/Check"
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.*)$", re.M)


@dataclass(frozen=True)
class Method:
    path: str
    request: object  # the request's message descriptor
    client_streaming: bool
    server_streaming: bool


METHODS = [
    Method(f"/{s.full_name}/{m.name}", m.input_type, m.client_streaming, m.server_streaming)
    for s in pb.DESCRIPTOR.services_by_name.values()
    for m in s.methods
]


@dataclass
class Case:
    kind: str  # message | put | raw
    method: Method
    payload: object  # a message, a list of messages (put), or bytes / list of bytes (raw)
    key: str


@dataclass
class FuzzReport(Report):
    backend: str = "local"
    cases: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    internal_errors: int = 0
    internal_by_method: dict[str, int] = field(default_factory=dict)
    crashes: int = 0
    unresponsive: int = 0
    timeouts: int = 0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_growth_mb: float = 0.0
    rss_samples_mb: list[float] = field(default_factory=list)  # every 1000 cases
    examples: list[str] = field(default_factory=list)
    server_exceptions: dict[str, int] = field(default_factory=dict)  # from the server log
    seconds: float = 0.0


def _base_requests(hints: Hints) -> dict[str, object]:
    """A valid request per method, for the fuzzer to disturb."""
    q = pb.Tensor(
        dtype="float32", shape=[2, SHAPE.groups, SHAPE.dk], data=queries_of(SHAPE, 0, 2).tobytes()
    )
    return {
        "Lookup": pb.LookupRequest(
            name=TARGET,
            layer=1,
            model_fingerprint=FP,
            queries=q,
            k=2,
            include_states=True,
            extras=["k_bar"],
        ),
        "FetchMemory": pb.FetchMemoryRequest(name=TARGET, model_fingerprint=FP),
        "Watch": pb.WatchRequest(names=[TARGET], send_initial=True),
        "GetPrefix": pb.GetPrefixRequest(name=TARGET),
        "ListPrefixes": pb.ListPrefixesRequest(page_size=2),
        "DeletePrefix": pb.DeletePrefixRequest(name=DOOMED),
        "CreateTenant": pb.CreateTenantRequest(name="fz-new"),
        "DeleteTenant": pb.DeleteTenantRequest(name="fz-none"),
        "CreateApiKey": pb.CreateApiKeyRequest(tenant=TENANT, role=pb.ROLE_READER),
        "ListApiKeys": pb.ListApiKeysRequest(tenant=TENANT),
        "PutPrefix": pb.PutPrefixRequest(
            header=pb.PutPrefixHeader(
                name="fz-p", mode=pb.PUT_MODE_UPSERT, model_fingerprint=FP, num_layers=1
            )
        ),
    }


def _merged(base, extra):
    """`base` with every field that `extra` sets replaced by extra's value."""
    msg = type(base)()
    msg.CopyFrom(base)
    for f, _ in extra.ListFields():
        msg.ClearField(f.name)
    msg.MergeFrom(extra)
    return msg


def cases(hints: Hints, keys: list[str]) -> st.SearchStrategy[Case]:
    base = _base_requests(hints)
    key = st.sampled_from(keys)
    by_method = []
    for m in METHODS:
        msgs = message(m.request, hints)
        valid = base.get(m.path.rsplit("/", 1)[1])
        if valid is not None:
            msgs = st.one_of(
                msgs,
                st.builds(_merged, st.just(valid), msgs),
                st.builds(_merged, st.just(valid), one_field(m.request, hints)),
            )
        if m.client_streaming:
            msgs = st.lists(msgs, min_size=1, max_size=4)
        by_method.append(st.builds(Case, st.just("message"), st.just(m), msgs, key))
    put = st.builds(
        Case, st.just("put"), st.just(_method("PutPrefix")), _put_stream(hints, base), key
    )
    raw = st.builds(
        lambda m, payload, k: Case("raw", m, payload, k),
        st.sampled_from(METHODS),
        _raw_payload(base),
        key,
    )
    bounds = st.one_of(
        st.builds(Case, st.just("bounds"), st.just(_method("PutPrefix")), _bounds_put(base),
                  st.just(keys[0])),
        st.builds(Case, st.just("bounds"), st.just(_method("Lookup")), _bounds_lookup(base),
                  st.just(keys[0])),
    )  # fmt: skip
    return st.one_of(st.one_of(*by_method), st.one_of(*by_method), put, put, raw, bounds)


def _method(name: str) -> Method:
    return next(m for m in METHODS if m.path.endswith("/" + name))


@st.composite
def _put_stream(draw, hints: Hints, base: dict) -> list:
    blobs = draw(st.lists(shard_blob(hints), min_size=1, max_size=3))
    header = pb.PutPrefixHeader()
    header.CopyFrom(base["PutPrefix"].header)
    header.num_layers = draw(st.sampled_from([len(blobs), len(blobs), len(blobs) + 1, 0]))
    header.name = draw(st.sampled_from(["fz-p", "fz-q", TARGET]))
    header.index_kind = draw(st.sampled_from(INDEX_KINDS))
    header.metric = draw(st.sampled_from(METRICS))
    msgs = [pb.PutPrefixRequest(header=header)]
    for layer, blob in enumerate(blobs):
        cut = draw(st.integers(0, len(blob))) if draw(st.booleans()) else len(blob)
        for i, part in enumerate((blob[:cut], blob[cut:])):
            if part or i == 0:
                msgs.append(
                    pb.PutPrefixRequest(
                        chunk=pb.ShardChunk(layer=layer, data=part, last=i == 1 or cut == len(blob))
                    )
                )
    if hasattr(pb, "PutPrefixCommit") and draw(st.integers(0, 9)):  # mostly a committed upload
        msgs.append(pb.PutPrefixRequest(commit=pb.PutPrefixCommit()))
    return msgs


@st.composite
def _bounds_put(draw, base: dict) -> list:
    """One committed layer aimed at the bounds, mostly built into an IVF index."""
    blob = draw(st.one_of(bounded_values(), bounded_values(), crafted_header()))
    header = pb.PutPrefixHeader()
    header.CopyFrom(base["PutPrefix"].header)
    header.name = "fz-b"
    header.index_kind = draw(st.sampled_from(["ivf", "ivf", "flat", "hnsw", "auto"]))
    header.metric = draw(st.sampled_from(METRICS))
    return [
        pb.PutPrefixRequest(header=header),
        pb.PutPrefixRequest(chunk=pb.ShardChunk(layer=0, data=blob, last=True)),
        pb.PutPrefixRequest(commit=pb.PutPrefixCommit()),
    ]


@st.composite
def _bounds_lookup(draw, base: dict) -> pb.LookupRequest:
    req = pb.LookupRequest()
    req.CopyFrom(base["Lookup"])
    req.queries.CopyFrom(draw(query_tensor(SHAPE.groups, SHAPE.dk)))
    return req


@st.composite
def _raw_payload(draw, base: dict) -> bytes:
    valid = [m.SerializeToString() for m in base.values()]
    blob = bytearray(draw(st.one_of(st.binary(max_size=512), st.sampled_from(valid))))
    for _ in range(draw(st.integers(0, 6)) if blob else 0):
        blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
    return bytes(blob)


class Fuzzer:
    def __init__(self, data_dir: Path, report: FuzzReport, flags: dict) -> None:
        self.dir = data_dir
        self.report = report
        self.flags = flags  # the server's flags (the cluster backend's, if any), on every start
        self.codes: Counter[str] = Counter()
        self.server: ServerProcess = start_server(data_dir, log_level="WARNING", **flags)
        self.channel = grpc.insecure_channel(self.server.address)
        self.hints, self.keys = self._setup()

    def _setup(self) -> tuple[Hints, list[str]]:
        with MemdbClient(self.server.address, self.server.admin_key) as root:
            tenant = make_tenant(root, TENANT)
        keys = (
            [self.server.admin_key] * 4
            + [k for k, _ in tenant.values()]
            + ["", "garbage", "mdb_x_y"]
        )
        hints = Hints(
            strings=[TARGET, DOOMED, "fz-p", FP, TENANT],
            blobs=tagged_memory(1, SHAPE, extras=("k_bar",)),
        )
        self._ensure_targets()
        return hints, keys

    def _ensure_targets(self) -> None:
        with MemdbClient(self.server.address, self.server.admin_key) as root:
            for name in (TARGET, DOOMED):
                root.put_prefix(
                    name,
                    tagged_memory(1, SHAPE, extras=("k_bar",)),
                    model_fingerprint=FP,
                    mode="upsert",
                )

    def restart(self) -> None:
        self.channel.close()
        self.server.kill()
        self.server = start_server(self.dir, log_level="WARNING", **self.flags)
        self.channel = grpc.insecure_channel(self.server.address)

    def send(self, case: Case) -> None:
        r = self.report
        r.cases += 1
        r.by_kind[case.kind] = r.by_kind.get(case.kind, 0) + 1
        code, details = self._call(case)
        self.codes[code.name] += 1
        if code in BAD_CODES:
            r.internal_errors += 1
            key = f"{case.kind} {case.method.path.rsplit('/', 1)[1]}"
            r.internal_by_method[key] = r.internal_by_method.get(key, 0) + 1
            if len(r.examples) < 12:
                r.examples.append(f"{key} {code.name} '{details[:80]}': {_show(case.payload)}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and case.method.path.find("Watch") < 0:
            r.timeouts += 1
        if self.server.proc.poll() is not None:
            r.crashes += 1
            r.examples.append(
                f"crash ({self.server.proc.returncode}) after {_show(case.payload)}; the server "
                f"log ends: {self.server.log()[-1200:]}"
            )
            self.restart()
        elif r.cases % 250 == 0:
            self._checkpoint()

    def _checkpoint(self) -> None:
        try:
            with MemdbClient(self.server.address, self.server.admin_key, timeout=10) as c:
                c.health()
            self._ensure_targets()
        except MemdbError:
            self.report.unresponsive += 1
            self.restart()

    def _call(self, case: Case) -> tuple[grpc.StatusCode, str]:
        m, meta = case.method, (("authorization", f"Bearer {case.key}"),) if case.key else ()
        raw = case.kind == "raw"
        ser = (
            None
            if raw
            else type(case.payload[0] if m.client_streaming else case.payload).SerializeToString
        )
        timeout = 0.5 if m.path.endswith("/Watch") else 10
        try:
            if m.client_streaming:
                fn = self.channel.stream_unary(m.path, request_serializer=ser)
                payload = [case.payload] if raw else case.payload
                fn(iter(payload), timeout=timeout, metadata=meta)
            elif m.server_streaming:
                call = self.channel.unary_stream(m.path, request_serializer=ser)(
                    case.payload, timeout=timeout, metadata=meta
                )
                for i, _ in enumerate(call):
                    if i >= 64:
                        call.cancel()
                        break
            else:
                self.channel.unary_unary(m.path, request_serializer=ser)(
                    case.payload, timeout=timeout, metadata=meta
                )
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
        return grpc.StatusCode.OK, ""

    def close(self) -> None:
        self.channel.close()
        self.server.stop()
        found = EXCEPTION_LINE.findall(self.server.log())
        self.report.server_exceptions = dict(Counter(f"{t}: {m[:70]}" for t, m in found))


def _show(payload: object) -> str:
    text = repr(payload)
    return text if len(text) < 200 else text[:200] + "..."


def run(
    data_dir: Path,
    *,
    cases_n: int,
    seed_: int = 0,
    max_seconds: float = 900.0,
    warmup: int = 200,
    backend: str = "local",
    planes=None,
) -> FuzzReport:
    """`cases_n` cases (bounded by `max_seconds`) against one server process on `backend`
    ("local" or "cluster"; the cluster's etcd and Redis are `planes`, an (EtcdCluster,
    RedisCluster) pair, or started here in `data_dir` and stopped at the end)."""
    if backend not in ("local", "cluster"):
        raise ValueError(f"backend must be local or cluster, not {backend!r}")
    with ExitStack() as stack:
        flags = {}
        if backend == "cluster":
            if planes is None:
                planes = stack.enter_context(control_and_data_planes(Path(data_dir) / "planes"))
            etcd, redis = planes
            flags = {
                "backend": "cluster",
                "etcd": ",".join(etcd.client_urls),
                "redis": ",".join(redis.urls),
                "etcd_root": f"/fuzz-{time.time_ns()}/",
            }
        return _run(Path(data_dir) / "node", cases_n, seed_, max_seconds, warmup, backend, flags)


def _run(
    data_dir: Path,
    cases_n: int,
    seed_: int,
    max_seconds: float,
    warmup: int,
    backend: str,
    flags: dict,
) -> FuzzReport:
    report = FuzzReport(backend=backend)
    t0 = time.monotonic()
    fuzzer = Fuzzer(data_dir, report, flags)
    strategy = cases(fuzzer.hints, fuzzer.keys)
    rng = random.Random(seed_)

    @seed(rng.randrange(1 << 30))
    @settings(
        max_examples=cases_n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def one(case: Case) -> None:
        if time.monotonic() - t0 > max_seconds:
            return
        if report.cases == min(warmup, cases_n // 10):
            report.rss_start_mb = rss_mb(fuzzer.server.proc.pid)
        fuzzer.send(case)
        if report.cases % 1000 == 0:
            report.rss_samples_mb.append(round(rss_mb(fuzzer.server.proc.pid), 1))

    try:
        with warnings.catch_warnings():  # hypothesis warns of long reprs of large cases
            warnings.simplefilter("ignore", HypothesisWarning)
            one()
        report.rss_end_mb = rss_mb(fuzzer.server.proc.pid)
        report.rss_growth_mb = (
            report.rss_end_mb - report.rss_start_mb if report.crashes == 0 else float("nan")
        )
        report.codes = dict(fuzzer.codes)
    finally:
        fuzzer.close()
    report.seconds = time.monotonic() - t0
    return report
