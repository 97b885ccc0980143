"""One fault campaign: a `Testbed`, tenants, the load processes, the fault slots side by side
until enough faults were injected (or the time bound), then heal, stop the load, read back
everything published, and judge the history (bench.cluster_faults.checker).

`run(root, ...)` returns the result dict that `python -m bench.cluster_faults` writes. Knows
how the parts fit, not how each one works.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import random
import threading
import time
from collections import Counter
from pathlib import Path

from bench.cluster_faults import checker, faults, load
from bench.cluster_faults.published import audit
from bench.cluster_faults.testbed import ADMIN_KEY, Testbed
from bench.reliability.tenants import make_tenant
from memdb_client import MemdbClient

log = logging.getLogger(__name__)


class Injector:
    """Runs the fault slots on threads and counts what they injected."""

    def __init__(self, bed: Testbed, seed: int, timing: faults.Timing, gap_s: tuple) -> None:
        self.bed, self.timing, self.gap_s = bed, timing, gap_s
        self.seed = seed
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def count(self, kind: str, n: int) -> None:
        with self._lock:
            self.counts[kind] += n

    def totals(self) -> Counter:
        """Injected faults by kind, failpoint firings from the nodes' logs included."""
        with self._lock:
            out = Counter(self.counts)
        for _, point, action in self.bed.failpoint_firings():
            kind = faults.FAILPOINT_KINDS.get((point, action))
            if kind:
                out[kind] += 1
        return out

    def start(self, slots: dict[str, dict[str, float]]) -> None:
        for k, (slot, kinds) in enumerate(sorted(slots.items())):
            rng = random.Random(self.seed * 1000 + k)
            t = threading.Thread(target=self._slot, args=(slot, kinds, rng), name=f"faults-{slot}")
            t.start()
            self._threads.append(t)

    def _slot(self, slot: str, kinds: dict[str, float], rng: random.Random) -> None:
        names, weights = list(kinds), list(kinds.values())
        while not self.stop.wait(rng.uniform(*self.gap_s)):
            kind = rng.choices(names, weights)[0]
            try:
                faults.FAULTS[kind](self.bed, rng, self.timing, self.count)
            except Exception as exc:  # a fault that could not be injected or healed
                log.warning("fault %s failed: %r", kind, exc)
                with self._lock:
                    self.errors[f"{kind}: {type(exc).__name__}"] += 1

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(300)


def run(
    root: Path,
    *,
    seed: int,
    target_faults: int,
    max_seconds: float,
    tenants: int = 2,
    names_per_tenant: int = 4,
    workers: int = 2,
    readers: int = 1,
    lease_s: int = 2,
    gc_interval_s: float = 0.5,
    gc_grace_s: float = 1.0,
    gap_s: tuple[float, float] = (0.2, 1.5),
    slots: dict | None = None,
) -> dict:
    root = Path(root)
    t0 = time.monotonic()
    bed = Testbed(
        root / "bed", lease_s=lease_s, gc_interval_s=gc_interval_s, gc_grace_s=gc_grace_s, seed=seed
    )
    timing = faults.Timing(past_lease_s=lease_s + gc_grace_s + 2 * gc_interval_s)
    injector = Injector(bed, seed, timing, gap_s)
    stop_file = root / "stop"
    procs = []
    try:
        tenant_names = [f"t{k}" for k in range(tenants)]
        with MemdbClient(bed.addresses[0], ADMIN_KEY, timeout=30) as admin:
            keys = {t: make_tenant(admin, t, roles=("writer",))["writer"][0] for t in tenant_names}
        names = {t: [f"n{j}" for j in range(names_per_tenant)] for t in tenant_names}
        specs = []
        for w in range(workers):
            own = {t: [n for j, n in enumerate(ns) if j % workers == w] for t, ns in names.items()}
            specs.append(
                {
                    "index": w,
                    "addresses": bed.addresses,
                    "keys": keys,
                    "write_names": own,
                    "read_names": names,
                    "readers": readers,
                    "seed": seed * 100 + w,
                    "stop_file": str(stop_file),
                    "out": str(root / f"history-{w}.jsonl"),
                }
            )
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=load.run_worker, args=(s,)) for s in specs]
        for p in procs:
            p.start()
        time.sleep(2.0)  # the load runs before the first fault
        injector.start(slots or faults.SLOTS)
        load_started = time.monotonic()
        while time.monotonic() - load_started < max_seconds:
            if sum(injector.totals().values()) >= target_faults:
                break
            if not all(p.is_alive() for p in procs):
                log.error("a load process died")
                break
            time.sleep(1.0)
        fault_seconds = time.monotonic() - load_started
        injector.join()
        log.info("faults stopped after %.0f s: %s", fault_seconds, dict(injector.totals()))
        t = time.monotonic()
        bed.heal()
        log.info("healed in %.0f s", time.monotonic() - t)
        time.sleep(2.0)  # the load runs on the healed cluster a little
        stop_file.write_text("stop")
        deadline = time.monotonic() + load.READBACK_S + 60  # a read-back's retries at most
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("a load process did not stop: killed")
                p.kill()
        log.info("load stopped")
        time.sleep(gc_grace_s + 3 * gc_interval_s)  # collectors run on the healed cluster
        published, usage = audit(
            bed.etcd.client_urls, bed.redis.urls, bed.etcd_root, tenant_names, root / "audit-cache"
        )
        kinds = injector.totals()
    finally:
        stop_file.write_text("stop")
        for p in procs:
            if p.is_alive():
                p.kill()
        injector.join()
        bed.close()
    history = []
    for s in specs:
        with open(s["out"]) as f:
            history += [json.loads(line) for line in f if line.strip()]
    history += published + [{"kind": "end"}]
    with open(root / "published.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in published)
    verdict = checker.check(history)
    ops = sum(r["kind"] in ("write", "read") for r in history)
    return {
        "faults": sum(kinds.values()),
        "fault_kinds": dict(sorted(kinds.items())),
        "lost_acknowledged": verdict.lost_acknowledged,
        "unreadable_versions": verdict.unreadable_versions,
        "wrong_answers": verdict.wrong_answers,
        "ops": ops,
        "reads_checked": verdict.reads_checked,
        "writes": verdict.writes,
        "acknowledged_writes": verdict.acknowledged,
        "ambiguous": verdict.ambiguous,
        "ambiguous_applied": verdict.ambiguous_applied,
        "late_applied": verdict.late_applied,
        "unreadable_reads": verdict.unreadable_reads,
        "published_versions": verdict.published_versions,
        "final_mismatches": verdict.final_mismatches,
        "bad_reads": verdict.bad_reads,
        "stale_reads": verdict.stale_reads,
        "usage_mismatches": len(usage),
        "write_errors": dict(verdict.write_errors),
        "read_errors": dict(verdict.read_errors),
        "fault_errors": dict(injector.errors),
        "problems": (usage + verdict.problems)[:60],
        "seconds": round(time.monotonic() - t0, 1),
        "fault_seconds": round(fault_seconds, 1),
        "settings": {
            "seed": seed,
            "target_faults": target_faults,
            "max_seconds": max_seconds,
            "tenants": tenants,
            "names_per_tenant": names_per_tenant,
            "workers": workers,
            "readers": readers,
            "lease_s": lease_s,
            "gc_interval_s": gc_interval_s,
            "gc_grace_s": gc_grace_s,
        },
    }
