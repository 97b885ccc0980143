"""Noisy neighbour: one tenant's reader loads the server as hard as it can; another tenant's
Lookup and health latency are measured quiet and noisy.

A control separates what the server can isolate from what the machine cannot: a second,
idle server process (the bystander, no tenant of the noisy one) answers health checks in the
same loop. Its p99 rising under the noise is the machine's floor (the noisy tenant's client
and server work take CPU from every process), not a failure of the loaded server's isolation.

The noisy tenant runs in a separate process (so its client work does not slow this one's
measurements): it opens up to `streams` Watch streams and keeps them open, and `threads`
threads send heavy Lookups (many queries, large k, states included) back to back. The victim,
a reader of another tenant, alternates small Lookups and health checks, each with a
deadline (a call that times out counts as the deadline). Result: the p99 of each quiet and
noisy, and their ratios. Knows nothing of how the server schedules calls.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.reliability.measure import Report, p99_ms, timed_call
from bench.reliability.memories import FP, Shape, queries_of, tagged_memory
from bench.reliability.tenants import make_tenant
from memdb.v1 import memdb_pb2 as pb
from memdb_client import MemdbClient
from memdb_server.config import ServerConfig
from memdb_server.process import start_server

# the server settings that bound one tenant's load on the others (recorded with the result)
ISOLATION_SETTINGS = ("tenant_cpu_share", "tenant_share_burst_s", "share_window_s",
                      "max_tenant_jobs", "max_lookup_answer_bytes", "faiss_threads")  # fmt: skip

VICTIM = Shape(layers=1, groups=1, m=1024, dk=32, h=2, d=16)
NOISY = Shape(layers=1, groups=1, m=4096, dk=32, h=2, d=16)


@dataclass
class NeighbourReport(Report):
    quiet_lookup_p99_ms: float = 0.0
    noisy_lookup_p99_ms: float = 0.0
    quiet_health_p99_ms: float = 0.0
    noisy_health_p99_ms: float = 0.0
    lookup_ratio: float = 0.0
    health_ratio: float = 0.0
    neighbour_p99_ratio: float = 0.0
    bystander_quiet_health_p99_ms: float = 0.0  # the idle second server (the control)
    bystander_noisy_health_p99_ms: float = 0.0
    machine_floor_ratio: float = 0.0  # the bystander's noisy / quiet health p99
    victim_calls: int = 0
    victim_failures: dict[str, int] = field(default_factory=dict)
    noisy: dict = field(default_factory=dict)
    server_settings: dict = field(default_factory=dict)  # the isolation settings it ran with
    seconds: float = 0.0


def measure_victim(
    client: MemdbClient,
    seconds: float,
    deadline_s: float,
    max_calls: int,
    failures: Counter,
    bystander: MemdbClient | None = None,
) -> tuple[list[float], list[float], list[float]]:
    """(Lookup seconds, health seconds, the bystander's health seconds) of alternating calls
    for `seconds`."""
    q = queries_of(VICTIM, 0, 4)
    lookups, healths, control = [], [], []
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(lookups) < max_calls:
        took, code = timed_call(
            lambda: client.lookup("victim", 0, q, model_fingerprint=FP, k=4, timeout=deadline_s),
            deadline_s,
        )
        lookups.append(took)
        failures.update([f"lookup {code}"] if code != "OK" else [])
        took, code = timed_call(lambda: client.health(timeout=deadline_s), deadline_s)
        healths.append(took)
        failures.update([f"health {code}"] if code != "OK" else [])
        if bystander is not None:
            took, code = timed_call(lambda: bystander.health(timeout=deadline_s), deadline_s)
            control.append(took)
            failures.update([f"bystander health {code}"] if code != "OK" else [])
        time.sleep(0.005)
    return lookups, healths, control


def noisy(
    address: str,
    key: str,
    streams: int,
    threads: int,
    seconds: float,
    heavy_q: int,
    heavy_k: int,
    out: multiprocessing.Queue,
) -> None:
    """The noisy tenant (a child process): Watch streams plus back-to-back heavy Lookups."""
    import threading

    codes: Counter[str] = Counter()
    lock = threading.Lock()
    with MemdbClient(address, key, timeout=30) as client:
        calls = [
            client._memory.Watch(pb.WatchRequest(), metadata=client._metadata, timeout=seconds + 30)
            for _ in range(streams)
        ]
        q = queries_of(NOISY, 0, heavy_q)
        end = time.monotonic() + seconds

        def heavy() -> None:
            while time.monotonic() < end:
                _, code = timed_call(
                    lambda: client.lookup(
                        "noisy", 0, q, model_fingerprint=FP, k=heavy_k, timeout=10
                    ),
                    10,
                )
                with lock:
                    codes[code] += 1

        workers = [threading.Thread(target=heavy) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(seconds + 60)
        open_streams = sum(c.running() or not c.done() for c in calls)
        for c in calls:
            c.cancel()
    out.put(
        {
            "streams_requested": streams,
            "streams_open_at_end": open_streams,  # the server may refuse some
            "heavy_lookups": dict(codes),
        }
    )


def run(
    data_dir: Path,
    *,
    phase_s: float,
    streams: int = 200,
    threads: int = 4,
    heavy_q: int = 2048,
    heavy_k: int = 64,
    deadline_s: float = 2.0,
    max_calls: int = 2000,
    server_flags: dict | None = None,
) -> NeighbourReport:
    report = NeighbourReport()
    t0 = time.monotonic()
    failures: Counter[str] = Counter()
    flags = dict(server_flags or {})
    defaults = ServerConfig()
    report.server_settings = {
        name: flags.get(name, getattr(defaults, name)) for name in ISOLATION_SETTINGS
    }
    server = start_server(Path(data_dir) / "server", log_level="WARNING", **flags)
    idle = start_server(Path(data_dir) / "bystander", log_level="WARNING", **flags)
    try:
        with MemdbClient(server.address, server.admin_key) as root:
            victim_key = make_tenant(root, "nb-victim", roles=("writer", "reader"))
            noisy_key = make_tenant(root, "nb-noisy", roles=("writer", "reader"))
        with MemdbClient(server.address, victim_key["writer"][0]) as w:
            w.put_prefix("victim", tagged_memory(1, VICTIM), model_fingerprint=FP)
        with MemdbClient(server.address, noisy_key["writer"][0]) as w:
            w.put_prefix("noisy", tagged_memory(2, NOISY), model_fingerprint=FP)
        with (
            MemdbClient(server.address, victim_key["reader"][0]) as victim,
            MemdbClient(idle.address, idle.admin_key) as bystander,
        ):
            measure_victim(victim, 1.0, deadline_s, max_calls, Counter(), bystander)  # warm-up
            quiet = measure_victim(victim, phase_s, deadline_s, max_calls, Counter(), bystander)
            ctx = multiprocessing.get_context("spawn")
            out = ctx.Queue()
            child = ctx.Process(
                target=noisy,
                args=(
                    server.address,
                    noisy_key["reader"][0],
                    streams,
                    threads,
                    phase_s + 4.0,
                    heavy_q,
                    heavy_k,
                    out,
                ),
            )
            child.start()
            time.sleep(3.0)  # the child imports, opens its streams, starts its Lookups
            loud = measure_victim(victim, phase_s, deadline_s, max_calls, failures, bystander)
            try:
                report.noisy = out.get(timeout=phase_s + 120)
            except Exception:
                report.noisy = {"error": "the noisy process sent no report"}
            child.join(30)
            if child.is_alive():
                child.kill()
    finally:
        server.stop()
        idle.stop()
    report.quiet_lookup_p99_ms, report.quiet_health_p99_ms = p99_ms(quiet[0]), p99_ms(quiet[1])
    report.noisy_lookup_p99_ms, report.noisy_health_p99_ms = p99_ms(loud[0]), p99_ms(loud[1])
    report.lookup_ratio = report.noisy_lookup_p99_ms / report.quiet_lookup_p99_ms
    report.health_ratio = report.noisy_health_p99_ms / report.quiet_health_p99_ms
    report.neighbour_p99_ratio = max(report.lookup_ratio, report.health_ratio)
    report.bystander_quiet_health_p99_ms = p99_ms(quiet[2])
    report.bystander_noisy_health_p99_ms = p99_ms(loud[2])
    report.machine_floor_ratio = (
        report.bystander_noisy_health_p99_ms / report.bystander_quiet_health_p99_ms
    )
    report.victim_calls = len(quiet[0]) + len(loud[0])
    report.victim_failures = dict(failures)
    report.seconds = time.monotonic() - t0
    return report
