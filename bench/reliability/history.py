"""A history checker for concurrent Lookup / FetchMemory against updates and deletes.

One writer thread per prefix name updates it (a new tagged memory each time), sometimes
deletes and re-creates it, and logs each op's [start, end] and the state it made. Reader
threads call Lookup and FetchMemory on random names and log [start, end] and what each answer
identifies (the tag every returned value holds, or NOT_FOUND). Offline, per name, the writer's
log is a sequence of states; state i can have been current at any moment between the start
of the op that made it and the end of the op that replaced it. An answer is valid only if:

- every value it returns holds one tag and its version is the one that write got (no mix);
- that state can have been current during the call (made before the call ended, replaced
  after it started): otherwise it is stale, or, if a delete replaced it, served after a delete
  returned;
- a NOT_FOUND comes while the name can have been absent (otherwise a spurious NOT_FOUND).

Knows nothing of the server beyond its API.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.reliability.measure import Report
from bench.reliability.memories import FP, Shape, queries_of, tag_of, tag_of_blobs, tagged_memory
from memdb.errors import MemdbError, NotFound
from memdb_client import MemdbClient
from memdb_server.process import start_server

SHAPE = Shape(layers=3, groups=2, m=64, dk=16, h=2, d=8)


@dataclass
class State:
    tag: int | None  # None: absent
    version: int
    made_at: float  # start of the op that made it
    made_end: float = 0.0  # end of that op
    replaced_at: float = float("inf")  # end of the op that replaced it
    replaced_by_delete: bool = False


@dataclass
class Answer:
    kind: str  # lookup | fetch
    name: str
    start: float
    end: float
    tag: int | None  # None: NOT_FOUND
    version: int
    mixed: bool = False


@dataclass
class HistoryReport(Report):
    updates: int = 0
    deletes: int = 0
    lookups: int = 0
    fetches: int = 0
    not_found_answers: int = 0
    mixed: int = 0
    stale: int = 0
    served_after_delete: int = 0
    spurious_not_found: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def violations(self) -> int:
        return self.mixed + self.stale + self.served_after_delete + self.spurious_not_found

    def as_dict(self) -> dict:
        return {**super().as_dict(), "violations": self.violations}


class History:
    def __init__(self, names: list[str], seed: int) -> None:
        self.names = names
        self.seed = seed
        self.tags = itertools.count(1)
        self.states: dict[str, list[State]] = {n: [] for n in names}
        self.answers: list[Answer] = []
        self.errors: Counter[str] = Counter()
        self.lock = threading.Lock()

    # ------------------------------------------------------------ writer
    def write(self, client: MemdbClient, name: str, rng: random.Random, until: float) -> None:
        states = self.states[name]
        while time.monotonic() < until:
            current = states[-1] if states else None
            start = time.monotonic()
            try:
                if current is not None and current.tag is not None and rng.random() < 0.15:
                    client.delete_prefix(name)
                    new = State(None, 0, start)
                else:
                    tag = next(self.tags)
                    mode = "update" if current is not None and current.tag is not None else "create"
                    info = client.put_prefix(
                        name, tagged_memory(tag, SHAPE), model_fingerprint=FP, mode=mode
                    )
                    new = State(tag, info.version, start)
            except MemdbError as exc:
                with self.lock:
                    self.errors[f"write {exc.code.name}"] += 1
                continue
            end = time.monotonic()
            if current is not None:
                current.replaced_at = end
                current.replaced_by_delete = new.tag is None
            new.made_end = end
            states.append(new)
            time.sleep(rng.uniform(0, 0.01))

    # ------------------------------------------------------------ readers
    def read(self, client: MemdbClient, rng: random.Random, until: float) -> None:
        while time.monotonic() < until:
            name = rng.choice(self.names)
            kind = "fetch" if rng.random() < 0.25 else "lookup"
            start = time.monotonic()
            try:
                answer = (
                    self._fetch(client, name)
                    if kind == "fetch"
                    else self._lookup(client, name, rng)
                )
            except NotFound:
                answer = Answer(kind, name, 0, 0, None, 0)
            except MemdbError as exc:
                with self.lock:
                    self.errors[f"{kind} {exc.code.name}"] += 1
                continue
            answer.start, answer.end = start, time.monotonic()
            with self.lock:
                self.answers.append(answer)

    def _lookup(self, client: MemdbClient, name: str, rng: random.Random) -> Answer:
        layer = rng.randrange(SHAPE.layers)
        q = queries_of(SHAPE, layer, rng.randint(1, 8))
        res = client.lookup(name, layer, q, model_fingerprint=FP, k=rng.randint(1, 4))
        tag = tag_of(res.out, res.lse)
        return Answer("lookup", name, 0, 0, tag, res.version, mixed=tag is None)

    def _fetch(self, client: MemdbClient, name: str) -> Answer:
        info, blobs = client.fetch_memory_raw(name, model_fingerprint=FP)
        tag = tag_of_blobs(blobs)
        return Answer("fetch", name, 0, 0, tag, info.version, mixed=tag is None)

    # ------------------------------------------------------------ check
    def check(self, report: HistoryReport) -> None:
        for a in self.answers:
            states = self.states[a.name]
            if a.kind == "lookup":
                report.lookups += 1
            else:
                report.fetches += 1
            if a.mixed:
                report.mixed += 1
                report.problems.append(f"{a.kind} {a.name} v{a.version}: values of several writes")
                continue
            if a.tag is None:
                report.not_found_answers += 1
                # before the first write the name is absent too
                absent = [s for s in states if s.tag is None] + [State(None, 0, float("-inf"))]
                absent[-1].replaced_at = states[0].made_end if states else float("inf")
                if not any(s.made_at < a.end and s.replaced_at > a.start for s in absent):
                    report.spurious_not_found += 1
                    report.problems.append(
                        f"{a.kind} {a.name}: NOT_FOUND while it existed "
                        f"throughout [{a.start:.4f}, {a.end:.4f}]"
                    )
                continue
            match = [s for s in states if s.tag == a.tag]
            if not match or match[0].version != a.version:
                report.mixed += 1
                report.problems.append(
                    f"{a.kind} {a.name}: tag {a.tag} with version {a.version}"
                    " was never written as such"
                )
                continue
            s = match[0]
            if s.made_at < a.end and s.replaced_at > a.start:
                continue
            if s.replaced_by_delete and s.replaced_at <= a.start:
                report.served_after_delete += 1
            else:
                report.stale += 1
            report.problems.append(
                f"{a.kind} {a.name}: tag {a.tag} was not current during "
                f"[{a.start:.4f}, {a.end:.4f}]"
            )


def run(
    data_dir: Path,
    *,
    seconds: float,
    seed: int = 0,
    names: int = 2,
    readers: int = 3,
    retain_versions: int = 1,
) -> HistoryReport:
    """Writers and readers for `seconds` against one server (`--retain-versions 1` by default:
    an update reclaims the version it replaces at once, the hardest case for readers)."""
    report = HistoryReport()
    t0 = time.monotonic()
    history = History([f"h{i}" for i in range(names)], seed)
    rng = random.Random(seed)
    server = start_server(Path(data_dir), log_level="WARNING", retain_versions=retain_versions)
    try:
        until = time.monotonic() + seconds
        clients = [
            MemdbClient(server.address, server.admin_key, timeout=30)
            for _ in range(names + readers)
        ]
        threads = [
            threading.Thread(
                target=history.write, args=(clients[i], n, random.Random(rng.random()), until)
            )
            for i, n in enumerate(history.names)
        ] + [
            threading.Thread(
                target=history.read, args=(clients[names + i], random.Random(rng.random()), until)
            )
            for i in range(readers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 120)
        for c in clients:
            c.close()
    finally:
        server.stop()
    for states in history.states.values():
        report.updates += sum(s.tag is not None for s in states)
        report.deletes += sum(s.tag is None for s in states)
    history.check(report)
    report.errors = dict(history.errors)
    report.seconds = time.monotonic() - t0
    return report
