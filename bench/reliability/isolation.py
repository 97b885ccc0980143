"""Tenant isolation over random interleavings of every tenant-scoped call.

Three tenants, each with admin / writer / reader keys, share a small pool of prefix names,
so the same name often exists in several tenants. A seeded sequence of ops (put, delete,
get, lookup, fetch, list, stats, watch with the initial listing, key management aimed at
another tenant) runs against a model of what each tenant holds. A leak is any call with
tenant A's key that sees, alters or learns of B's prefixes or keys: a name A does not hold
answers NOT_FOUND whether or not B holds it (never PERMISSION_DENIED), listings, stats and
watch events hold exactly A's names, a tagged value is always A's own, and a call aimed at
another tenant answers as it does for a tenant that does not exist.

`revoked_watch` checks that revoking a key ends its open Watch stream (no event after the
revocation returned). Knows nothing of the server beyond its API.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.reliability.measure import Report
from bench.reliability.memories import FP, Shape, queries_of, tag_of, tag_of_blobs, tagged_memory
from bench.reliability.tenants import make_tenant
from memdb.errors import MemdbError, NotFound
from memdb.v1 import memdb_pb2 as pb
from memdb_client import MemdbClient
from memdb_server.process import start_server

SHAPE = Shape(layers=2, groups=1, m=16, dk=8, h=1, d=4)
TENANTS = ("iso-a", "iso-b", "iso-c")
NAMES = ("p0", "p1", "p2", "p3")
OPS = ("put", "put", "delete", "get", "lookup", "fetch", "list", "stats", "watch", "keys")


@dataclass
class IsolationReport(Report):
    ops: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    foreign_name_probes: int = 0
    cross_tenant_leaks: int = 0
    revoked_key_events_before: int = 0  # events of the watched key before its revocation
    revoked_key_events: int = 0  # ... and after it
    revoked_stream_open: bool = False
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Tenants:
    def __init__(self, address: str, root: MemdbClient, report: IsolationReport) -> None:
        self.report = report
        self.keys = {t: make_tenant(root, t) for t in TENANTS}
        self.clients = {
            t: {role: MemdbClient(address, key) for role, (key, _) in roles.items()}
            for t, roles in self.keys.items()
        }
        self.held: dict[str, dict[str, tuple[int, int]]] = {t: {} for t in TENANTS}  # tag, ver
        self.tags = itertools.count(1)

    def close(self) -> None:
        for roles in self.clients.values():
            for c in roles.values():
                c.close()

    def leak(self, what: str) -> None:
        self.report.cross_tenant_leaks += 1
        self.report.problems.append(what)

    def foreign(self, t: str, name: str) -> bool:
        """Whether another tenant holds `name` (so a wrong answer would leak it)."""
        hit = any(name in self.held[u] for u in TENANTS if u != t)
        self.report.foreign_name_probes += hit
        return hit

    # ------------------------------------------------------------ one op
    def step(self, op: str, t: str, u: str, name: str) -> None:
        c, held = self.clients[t], self.held[t]
        if op == "put":
            tag = next(self.tags)
            info = c["writer"].put_prefix(
                name, tagged_memory(tag, SHAPE), model_fingerprint=FP, mode="upsert"
            )
            before = held.get(name, (0, 0))[1]
            if info.tenant != t or info.version != before + 1:
                self.leak(
                    f"{t} put {name}: got tenant {info.tenant} version {info.version}, "
                    f"expected version {before + 1}"
                )
            held[name] = (tag, info.version)
        elif op == "delete":
            self._expect(t, name, "delete", lambda: c["writer"].delete_prefix(name))
            held.pop(name, None)
        elif op in ("get", "lookup", "fetch"):
            self._expect(t, name, op, lambda: self._read_tag(c["reader"], op, name))
        elif op == "list":
            got = c["reader"].list_prefixes(page_size=2)
            if sorted((p.name, p.tenant) for p in got) != sorted((n, t) for n in held):
                self.leak(f"{t} list: {[(p.tenant, p.name) for p in got]}, holds {sorted(held)}")
        elif op == "stats":
            s = c["reader"].stats()
            if set(s.tenants) != {t} or s.num_prefixes != len(held) or s.num_tenants != 1:
                self.leak(
                    f"{t} stats: tenants {sorted(s.tenants)}, {s.num_prefixes} prefixes, "
                    f"{s.num_tenants} tenants; holds {len(held)}"
                )
        elif op == "watch":
            names = _initial_events(c["reader"])  # those that came within the deadline
            if not set(names) <= set(held):
                self.leak(f"{t} watch initial: {sorted(names)}, holds {sorted(held)}")
        elif op == "keys":
            self._foreign_keys(t, u)

    def _read_tag(self, c: MemdbClient, op: str, name: str) -> tuple[str, int, int | None]:
        if op == "get":
            info = c.get_prefix(name)
            return info.tenant, info.version, None
        if op == "lookup":
            res = c.lookup(name, 1, queries_of(SHAPE, 1, 3), model_fingerprint=FP, k=2)
            return "", res.version, tag_of(res.out, res.lse)
        info, blobs = c.fetch_memory_raw(name, model_fingerprint=FP)
        return info.tenant, info.version, tag_of_blobs(blobs)

    def _expect(self, t: str, name: str, op: str, call) -> None:
        """`call` on `name` as tenant t: its own state, or NOT_FOUND if t does not hold it."""
        mine = self.held[t].get(name)
        foreign = self.foreign(t, name) if mine is None else False
        try:
            got = call()
        except NotFound:
            if mine is not None:
                self.leak(f"{t} {op} {name}: NOT_FOUND but it holds version {mine[1]}")
            return
        except MemdbError as exc:
            self.leak(
                f"{t} {op} {name} ({'held by another tenant' if foreign else 'absent'}): "
                f"{exc.code.name} instead of NOT_FOUND"
            )
            return
        if mine is None:
            self.leak(
                f"{t} {op} {name}: answered {got!r} for a name it does not hold "
                f"(another tenant holds it: {foreign})"
            )
        elif op == "delete" and got != mine[1]:
            self.leak(f"{t} delete {name}: deleted version {got}, held {mine[1]}")
        elif op in ("get", "lookup", "fetch"):
            tenant, version, tag = got
            if version != mine[1] or tenant not in ("", t) or tag not in (None, mine[0]):
                self.leak(
                    f"{t} {op} {name}: tenant {tenant!r} version {version} tag {tag}, "
                    f"holds version {mine[1]} tag {mine[0]}"
                )

    def _foreign_keys(self, t: str, u: str) -> None:
        """Key calls aimed at tenant u answer as for a tenant that does not exist."""
        admin = self.clients[t]["admin"]
        victim_id = self.keys[u]["reader"][1]
        for what, aimed, nowhere in (
            (
                "list keys",
                lambda: admin.list_api_keys(tenant=u),
                lambda: admin.list_api_keys(tenant="iso-nobody"),
            ),
            (
                "create key",
                lambda: admin.create_api_key("reader", tenant=u),
                lambda: admin.create_api_key("reader", tenant="iso-nobody"),
            ),
            (
                "revoke key",
                lambda: admin.revoke_api_key(victim_id),
                lambda: admin.revoke_api_key("0123456789ab"),
            ),
        ):
            a, b = _code(aimed), _code(nowhere)
            if a != b or a == "OK":
                self.leak(f"{t} {what} aimed at {u}: {a}, for no tenant: {b}")
        try:
            self.clients[u]["reader"].list_prefixes()
        except MemdbError as exc:
            self.leak(f"{t}'s key calls broke {u}'s reader key: {exc.code.name}")

    def sweep(self) -> None:
        """Every tenant still holds exactly what the model says."""
        for t in TENANTS:
            for name in NAMES:
                self._expect(
                    t,
                    name,
                    "fetch",
                    lambda c=self.clients[t]["reader"], n=name: self._read_tag(c, "fetch", n),
                )


def _code(call) -> str:
    try:
        call()
    except MemdbError as exc:
        return exc.code.name
    return "OK"


def _initial_events(c: MemdbClient) -> list[str]:
    stream = c._memory.Watch(pb.WatchRequest(send_initial=True), metadata=c._metadata, timeout=0.3)
    names = []
    try:
        for ev in stream:
            names.append(ev.name)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    return names


def revoked_watch(address: str, root: MemdbClient, report: IsolationReport) -> None:
    """Revoke a key whose Watch stream is open: no event may reach it afterwards."""
    keys = make_tenant(root, "iso-rev", roles=("admin", "writer", "reader"))
    (admin_key, _), (writer_key, _), (reader_key, reader_id) = (
        keys["admin"],
        keys["writer"],
        keys["reader"],
    )
    events: list[tuple[float, str]] = []
    with (
        MemdbClient(address, reader_key) as reader,
        MemdbClient(address, writer_key) as writer,
        MemdbClient(address, admin_key) as admin,
    ):
        stream = reader._memory.Watch(pb.WatchRequest(), metadata=reader._metadata, timeout=15)
        done = threading.Event()

        def consume() -> None:
            try:
                for ev in stream:
                    events.append((time.monotonic(), ev.name))
            except grpc.RpcError:
                pass
            done.set()

        threading.Thread(target=consume, daemon=True).start()
        time.sleep(0.5)
        writer.put_prefix("before", tagged_memory(1, SHAPE), model_fingerprint=FP)
        deadline = time.monotonic() + 5
        while not events and time.monotonic() < deadline:
            time.sleep(0.05)
        admin.revoke_api_key(reader_id)
        revoked_at = time.monotonic()
        writer.put_prefix("after", tagged_memory(2, SHAPE), model_fingerprint=FP)
        done.wait(5)
        report.revoked_stream_open = not done.is_set()
        stream.cancel()
    report.revoked_key_events = sum(at > revoked_at for at, _ in events)
    report.revoked_key_events_before = len(events) - report.revoked_key_events
    if report.revoked_key_events or report.revoked_stream_open:
        report.problems.append(
            f"revoked key: {report.revoked_key_events} event(s) after the "
            f"revocation, stream still open 5 s later: "
            f"{report.revoked_stream_open}"
        )


def run(data_dir: Path, *, ops: int, seed: int = 0, max_seconds: float = 600.0) -> IsolationReport:
    report = IsolationReport()
    t0 = time.monotonic()
    rng = random.Random(seed)
    server = start_server(Path(data_dir), log_level="WARNING")
    try:
        with MemdbClient(server.address, server.admin_key) as root:
            tenants = Tenants(server.address, root, report)
            try:
                for _ in range(ops):
                    if time.monotonic() - t0 > max_seconds:
                        break
                    op = rng.choice(OPS)
                    t, u = rng.sample(TENANTS, 2)
                    tenants.step(op, t, u, rng.choice(NAMES))
                    report.ops += 1
                    report.by_op[op] = report.by_op.get(op, 0) + 1
                tenants.sweep()
            finally:
                tenants.close()
            revoked_watch(server.address, root, report)
    finally:
        server.stop()
    report.seconds = time.monotonic() - t0
    return report
