"""kill -9 during uploads, updates and deletes; every acknowledged write checked after restart.

One data directory lives through every round. A round starts a server (armed with one
failpoint of memdb_server.failpoints, `NAME=crash#N`, or with none), first checks what the previous
round left, then runs one writer thread per prefix name (create / update / delete of small
tagged memories, each op sent only after the previous one was acknowledged) until the server
dies: at its failpoint, or by SIGKILL from here at a random moment. A writer's op that got no
answer is its one pending op.

After the restart, each name must be in its last acknowledged state or in the state its
pending op would make, byte for byte (every layer's safetensors via FetchMemory, and a Lookup
through the stored index agrees): anything else is a lost write (acknowledged, gone) or a
partial one (bytes of no single write, or an index that disagrees with its shards). At the
end, the LMDB file is scanned for records of versions that no prefix lists (left-overs of an
interrupted write). Knows nothing of how the server stores or indexes beyond that layout.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from bench.reliability.measure import Report
from bench.reliability.memories import FP, Shape, queries_of, tag_of, tag_of_blobs, tagged_memory
from memdb.errors import MemdbError, NotFound
from memdb_client import MemdbClient
from memdb_client.types import PrefixInfo
from memdb_server.failpoints import LOCAL_POINTS
from memdb_server.process import ServerProcess, start_server

log = logging.getLogger(__name__)

RANDOM = "random"
SHAPES = (
    Shape(layers=1, m=8, dk=8),
    Shape(layers=2, m=64, dk=16, h=2, d=8),
    Shape(layers=3, m=512, dk=16, h=2, d=8),  # ~100 KB a layer: kills land mid-transfer too
)


@dataclass
class Written:
    """A prefix as stored by one write: its version and every layer's bytes."""

    version: int
    tag: int
    blobs: list[bytes]


@dataclass
class Pending:
    kind: str  # put | delete
    state: Written | None  # what the name holds if the op applied (None: deleted)


@dataclass
class KillReport(Report):
    rounds: int = 0
    kills: int = 0
    random_kills: int = 0
    failpoint_kills: dict[str, int] = field(default_factory=dict)
    failpoints_not_reached: int = 0
    acked_writes: int = 0
    checks: int = 0
    lost_writes: int = 0
    partial_writes: int = 0
    unacked_applied: int = 0
    unacked_absent: int = 0
    orphan_records: int = 0
    writer_errors: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


class KillCampaign:
    def __init__(self, data_dir: Path, names: int, seed: int, max_delay_s: float) -> None:
        self.dir = Path(data_dir)
        self.names = [f"k{i}" for i in range(names)]
        self.rng = random.Random(seed)
        self.seed = seed
        self.max_delay_s = max_delay_s
        self.tags = itertools.count(1)
        self.model: dict[str, Written | None] = dict.fromkeys(self.names)
        self.pending: dict[str, Pending | None] = dict.fromkeys(self.names)
        self.report = KillReport()
        self._errors: Counter[str] = Counter()
        self._lock = threading.Lock()

    # ------------------------------------------------------------ one round
    def round(self, point: str, fp_timeout_s: float = 8.0) -> None:
        env = None
        if point != RANDOM:
            env = {
                "MEMDB_FAILPOINTS": f"{point}=crash#{self.rng.randint(1, 3)}",
                "MEMDB_FAILPOINTS_SEED": str(self.rng.randrange(1 << 30)),
            }
        server = start_server(self.dir, env=env, log_level="WARNING")
        try:
            with MemdbClient(server.address, server.admin_key, timeout=20) as client:
                self.verify(client)
            stop = threading.Event()
            seeds = [self.rng.randrange(1 << 30) for _ in self.names]
            threads = [
                threading.Thread(target=self._writer, args=(server, name, s, stop), daemon=True)
                for name, s in zip(self.names, seeds, strict=True)
            ]
            for t in threads:
                t.start()
            self._kill(server, point, fp_timeout_s)
            stop.set()
            for t in threads:
                t.join(60)
        finally:
            server.kill()
        self.report.rounds += 1

    def _kill(self, server: ServerProcess, point: str, fp_timeout_s: float) -> None:
        if point != RANDOM:
            try:
                code = server.proc.wait(fp_timeout_s)
            except Exception:  # not reached in time: kill it from here
                code = None
            if code == -signal.SIGKILL:
                self.report.kills += 1
                self.report.failpoint_kills[point] = self.report.failpoint_kills.get(point, 0) + 1
                return
            if code is not None:
                self.report.problems.append(f"server exited with {code} at failpoint {point}")
                return
            self.report.failpoints_not_reached += 1
        else:
            time.sleep(self.rng.uniform(0.01, self.max_delay_s))
        server.kill()
        self.report.kills += 1
        self.report.random_kills += 1

    def _writer(self, server: ServerProcess, name: str, seed: int, stop: threading.Event) -> None:
        rng = random.Random(seed)
        with MemdbClient(server.address, server.admin_key, timeout=20) as client:
            while not stop.is_set():
                current = self.model[name]
                if current is not None and rng.random() < 0.25:
                    self.pending[name] = Pending("delete", None)
                    call = lambda c=current: client.delete_prefix(name, expected_version=c.version)  # noqa: E731
                else:
                    tag = next(self.tags)
                    blobs = tagged_memory(tag, rng.choice(SHAPES))
                    version = current.version + 1 if current else 1
                    self.pending[name] = Pending("put", Written(version, tag, blobs))
                    mode = "update" if current else "create"
                    expected = current.version if current else 0
                    call = lambda b=blobs, m=mode, e=expected: client.put_prefix(  # noqa: E731
                        name, b, model_fingerprint=FP, mode=m, expected_version=e, index_kind="flat"
                    )
                try:
                    call()
                except MemdbError as exc:
                    with self._lock:
                        self._errors[exc.code.name] += 1
                    return  # the server is gone (or refused): this op stays pending
                self.model[name] = self.pending[name].state
                self.pending[name] = None
                with self._lock:
                    self.report.acked_writes += 1

    # ------------------------------------------------------------ checks
    def verify(self, client: MemdbClient) -> None:
        """Each name holds its acknowledged state or its pending op's, exactly."""
        for name in self.names:
            expected, pending = self.model[name], self.pending[name]
            self.report.checks += 1
            try:
                observed = _observe(client, name)
            except _Damaged as exc:
                self.report.partial_writes += 1
                self.report.problems.append(f"{name}: {exc}")
                observed = None
            if _same(observed, expected):
                self.report.unacked_absent += pending is not None
            elif pending is not None and _same(observed, pending.state):
                self.report.unacked_applied += 1
            elif observed is None:
                self.report.lost_writes += 1
                self.report.problems.append(
                    f"{name}: acknowledged version {expected.version} (tag {expected.tag}) lost"
                )
            else:
                self.report.partial_writes += 1
                self.report.problems.append(
                    f"{name}: holds version {observed.version} tag {observed.tag}, expected "
                    f"{_describe(expected)} or pending {_describe(pending and pending.state)}"
                )
            self.model[name], self.pending[name] = observed, None

    def finish(self) -> KillReport:
        server = start_server(self.dir, log_level="WARNING")
        try:
            with MemdbClient(server.address, server.admin_key, timeout=20) as client:
                self.verify(client)
        finally:
            server.stop()
        self.report.orphan_records = orphan_records(self.dir)
        self.report.writer_errors = dict(self._errors)
        return self.report


class _Damaged(Exception):
    pass


def _observe(client: MemdbClient, name: str) -> Written | None:
    """The stored state of `name` (one snapshot via FetchMemory), cross-checked by a Lookup."""
    try:
        info, blobs = client.fetch_memory_raw(name, model_fingerprint=FP)
    except NotFound as exc:
        if "damaged" in str(exc):
            raise _Damaged(str(exc)) from None
        return None
    except MemdbError as exc:
        raise _Damaged(f"FetchMemory failed: {exc.code.name} {exc}") from None
    tag = tag_of_blobs(blobs)
    if tag is None:
        raise _Damaged(f"version {info.version} mixes the values of several writes")
    _check_index(client, name, info, tag)
    return Written(info.version, tag, blobs)


def _check_index(client: MemdbClient, name: str, info: PrefixInfo, tag: int) -> None:
    shape = Shape(
        info.num_layers,
        info.num_groups,
        info.budget,
        info.key_dim,
        info.heads_per_group,
        info.head_dim,
    )
    layer = info.num_layers - 1
    try:
        res = client.lookup(
            name,
            layer,
            queries_of(shape, layer, 2),
            model_fingerprint=FP,
            version=info.version,
            k=2,
        )
    except MemdbError as exc:
        raise _Damaged(f"Lookup of version {info.version} failed: {exc.code.name} {exc}") from None
    if res.version != info.version or tag_of(res.out, res.lse) != tag or (res.ids < 0).any():
        raise _Damaged(f"Lookup of version {info.version} disagrees with its shards")


def _same(a: Written | None, b: Written | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.version == b.version and a.blobs == b.blobs


def _describe(w: Written | None) -> str:
    return "absent" if w is None else f"version {w.version} tag {w.tag}"


def orphan_records(data_dir: Path) -> int:
    """Records in the versions / shards / indices sub-databases of versions that no current
    prefix lists among its retained versions (the server must be stopped)."""
    env = lmdb.open(str(data_dir), readonly=True, lock=False, max_dbs=8)
    try:
        dbs = {
            n: env.open_db(n.encode(), create=False)
            for n in ("prefixes", "versions", "shards", "indices")
        }
        with env.begin() as txn:
            live = set()
            for key, blob in txn.cursor(db=dbs["prefixes"]):
                for v in json.loads(blob)["retained_versions"]:
                    live.add(key + b"\0" + v.to_bytes(8, "big"))
            orphans = 0
            for db in ("versions", "shards", "indices"):
                for key in txn.cursor(db=dbs[db]).iternext(values=False):
                    tenant, name, rest = key.split(b"\0", 2)
                    orphans += tenant + b"\0" + name + b"\0" + rest[:8] not in live
        return orphans
    finally:
        env.close()


def run(
    data_dir: Path,
    *,
    kills: int,
    seed: int = 0,
    names: int = 3,
    max_seconds: float = 600.0,
    max_delay_s: float = 0.6,
) -> KillReport:
    """`kills` rounds, bounded by `max_seconds`: each failpoint once, then random-moment kills
    and failpoints in turn."""
    start = time.monotonic()
    campaign = KillCampaign(data_dir, names, seed, max_delay_s)
    # each failpoint once first, then random moments and failpoints in turn
    rest = [p for point in LOCAL_POINTS for p in (RANDOM, point)]
    schedule = list(LOCAL_POINTS) + rest * (kills // len(rest) + 1)
    for i in range(kills):
        if time.monotonic() - start > max_seconds:
            campaign.report.problems.append(f"stopped after {i} rounds: time bound reached")
            break
        campaign.round(schedule[i])
    report = campaign.finish()
    report.seconds = time.monotonic() - start
    return report
