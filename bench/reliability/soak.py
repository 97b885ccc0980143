"""A bounded soak: steady mixed traffic on loopback, p99 and server memory per time window.

Readers send Lookups back to back, a writer updates the memories, a fetcher streams them,
a lister lists and gets them, and two Watch streams follow every change; all stop by
themselves after `seconds`. The Lookup latencies are cut into windows of `window_s` and each
window's p99 is reported, with the server's RSS at each window's end (growth: the last window
against the first). Knows nothing of the server beyond its API.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.reliability.measure import Report, p99_ms, rss_mb
from bench.reliability.memories import FP, Shape, queries_of, tagged_memory
from memdb.errors import MemdbError
from memdb_client import MemdbClient
from memdb_server.process import start_server

SHAPE = Shape(layers=2, groups=2, m=256, dk=32, h=2, d=8)
NAMES = ("s0", "s1", "s2")


@dataclass
class SoakReport(Report):
    soak_p99_ms: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    rss_growth_mb: float = 0.0
    p99_last_over_first: float = 0.0
    lookups: int = 0
    updates: int = 0
    fetches: int = 0
    watch_events: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class Soak:
    def __init__(self, address: str, key: str, until: float, seed: int) -> None:
        self.address, self.key, self.until = address, key, until
        self.rng = random.Random(seed)
        self.latencies: list[tuple[float, float]] = []  # (end time, seconds)
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def _loop(self, what: str, pause_s: float, fn) -> None:
        rng = random.Random(self.rng.random())
        with MemdbClient(self.address, self.key, timeout=30) as c:
            while time.monotonic() < self.until:
                try:
                    fn(c, rng)
                    self.counts[what] += 1
                except MemdbError as exc:
                    with self.lock:
                        self.counts[f"error {what} {exc.code.name}"] += 1
                time.sleep(pause_s)

    def lookup(self, c: MemdbClient, rng: random.Random) -> None:
        layer = rng.randrange(SHAPE.layers)
        q = queries_of(SHAPE, layer, 8)
        start = time.perf_counter()
        c.lookup(rng.choice(NAMES), layer, q, model_fingerprint=FP, k=4)
        with self.lock:
            self.latencies.append((time.monotonic(), time.perf_counter() - start))

    def update(self, c: MemdbClient, rng: random.Random) -> None:
        c.put_prefix(
            rng.choice(NAMES),
            tagged_memory(rng.randint(1, 1000), SHAPE),
            model_fingerprint=FP,
            mode="upsert",
        )

    def fetch(self, c: MemdbClient, rng: random.Random) -> None:
        c.fetch_memory_raw(rng.choice(NAMES), model_fingerprint=FP)

    def browse(self, c: MemdbClient, rng: random.Random) -> None:
        c.list_prefixes()
        c.get_prefix(rng.choice(NAMES))
        c.stats()

    def watch(self) -> None:
        with MemdbClient(self.address, self.key) as c:
            stream = c.watch()
            timer = threading.Timer(max(0.0, self.until - time.monotonic()), stream.cancel)
            timer.start()
            try:
                for _ in stream:
                    self.counts["watch event"] += 1
            except MemdbError as exc:
                self.counts[f"error watch {exc.code.name}"] += 1
            timer.cancel()


def run(
    data_dir: Path, *, seconds: float, window_s: float, seed: int = 0, readers: int = 2
) -> SoakReport:
    report = SoakReport()
    t0 = time.monotonic()
    server = start_server(Path(data_dir), log_level="WARNING")
    try:
        with MemdbClient(server.address, server.admin_key) as root:
            for name in NAMES:
                root.put_prefix(name, tagged_memory(1, SHAPE), model_fingerprint=FP)
        start = time.monotonic()
        soak = Soak(server.address, server.admin_key, start + seconds, seed)
        loops = [("lookup", 0.0, soak.lookup)] * readers + [
            ("update", 0.5, soak.update),
            ("fetch", 0.5, soak.fetch),
            ("browse", 1.0, soak.browse),
        ]
        threads = [threading.Thread(target=soak._loop, args=loop) for loop in loops]
        threads += [threading.Thread(target=soak.watch) for _ in range(2)]
        for t in threads:
            t.start()
        windows = max(1, int(seconds // window_s))
        for i in range(windows):
            time.sleep(max(0.0, start + (i + 1) * window_s - time.monotonic()))
            report.rss_mb.append(rss_mb(server.proc.pid))
        for t in threads:
            t.join(seconds + 120)
    finally:
        server.stop()
    for i in range(windows):
        lo, hi = start + i * window_s, start + (i + 1) * window_s
        report.soak_p99_ms.append(p99_ms([s for end, s in soak.latencies if lo <= end < hi]))
    report.rss_growth_mb = report.rss_mb[-1] - report.rss_mb[0]
    report.p99_last_over_first = report.soak_p99_ms[-1] / report.soak_p99_ms[0]
    c = soak.counts
    report.lookups, report.updates, report.fetches = c["lookup"], c["update"], c["fetch"]
    report.watch_events = c["watch event"]
    report.errors = {k: v for k, v in c.items() if k.startswith("error")}
    report.seconds = time.monotonic() - t0
    return report
