"""Measurements the campaign's parts share: server RSS, latency percentiles, call outcomes.

Knows nothing of what is being measured.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import grpc
import numpy as np
import psutil

from memdb.errors import MemdbError

BAD_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (psutil; 0.0 if it is gone)."""
    try:
        return psutil.Process(pid).memory_info().rss / 1e6
    except psutil.NoSuchProcess:
        return 0.0


def p99_ms(seconds: list[float]) -> float:
    return float(np.percentile(np.asarray(seconds) * 1e3, 99)) if seconds else float("nan")


def timed_call(fn: Callable[[], object], timeout_s: float) -> tuple[float, str]:
    """(seconds, status name) of one call; a failed call counts its time too, and a timed-out
    one counts `timeout_s`."""
    start = time.perf_counter()
    try:
        fn()
        code = "OK"
    except MemdbError as exc:
        code = exc.code.name
    except grpc.RpcError as err:
        code = err.code().name
    took = time.perf_counter() - start
    return (max(took, timeout_s) if code == "DEADLINE_EXCEEDED" else took), code


class Report:
    """Base of the parts' report dataclasses: `as_dict` for the JSON, long lists cut to 20."""

    def as_dict(self) -> dict:
        d = asdict(self)
        for key in ("problems", "examples"):
            if key in d:
                d[key] = d[key][:20]
        return d


def write_results(path: Path, results: dict, command: str, argv: list[str] | None) -> dict:
    """`results` with the command that made them, the machine and the date, written to `path`
    as JSON; returns what was written."""
    from bench.server import machine

    args = argv if argv is not None else sys.argv[1:]
    out = {
        **results,
        "command": f"{command} {' '.join(args)}".strip(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out
