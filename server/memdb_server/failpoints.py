"""Named failpoints of the write path, for crash testing (bench.reliability, tests/reliability).

Code marks a point with `failpoints.hit("after_shards_put")`. Nothing happens unless the
`MEMDB_FAILPOINTS` environment variable (read once, at import) names that point:

    MEMDB_FAILPOINTS="after_shards_put=crash,before_commit=crash@0.3,put_indexed=sleep:0.2#2"

Each item is `NAME=ACTION[@PROBABILITY][#N]`:
    crash        SIGKILL this process at once (no cleanup, no flush: a power cut, as far as
                 the process can tell)
    sleep:SECS   block the calling thread for SECS seconds (widens a race window)
    @P           act only with probability P (0 < P <= 1) at each hit
    #N           act only at the Nth hit of that point (1-based), and never again
A point named in the variable but not marked anywhere in the code does nothing.
`MEMDB_FAILPOINTS_SEED` seeds the coin of `@P` (default: the process id).

When the variable is unset, `hit` is one dictionary lookup. This module knows nothing of
storage or gRPC; it only knows the points by name.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV = "MEMDB_FAILPOINTS"
SEED_ENV = "MEMDB_FAILPOINTS_SEED"
ACTIONS = ("crash", "sleep")

# Every point marked in the code, so a typo in MEMDB_FAILPOINTS is an error, not a no-op.
POINTS = (
    "put_received",  # admin_service.PutPrefix: every chunk arrived, nothing decoded yet
    "put_indexed",  # admin_service.PutPrefix: shards decoded and indexed, before the store
    "before_write_txn",  # storage.write_version: validated, before the write transaction
    "after_shards_put",  # storage: shards and indices staged in the open transaction
    "before_commit",  # storage: the record is staged, the transaction about to commit
    "after_commit",  # storage.write_version: committed, before returning to the caller
    "delete_before_commit",  # storage.delete_prefix: records deleted in the open transaction
    "delete_after_commit",  # storage.delete_prefix: committed, before returning
)


@dataclass
class Failpoint:
    name: str
    action: str  # crash | sleep
    seconds: float = 0.0  # sleep only
    probability: float = 1.0
    nth: int = 0  # 0: every hit (subject to probability)
    hits: int = 0


def parse(spec: str) -> dict[str, Failpoint]:
    """The failpoints of a MEMDB_FAILPOINTS value; ValueError says what is wrong."""
    points: dict[str, Failpoint] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, sep, rest = item.partition("=")
        name = name.strip()
        if not sep or not rest:
            raise ValueError(f"{ENV}: '{item}' is not NAME=ACTION[@P][#N]")
        if name not in POINTS:
            raise ValueError(f"{ENV}: unknown failpoint '{name}'; known: {', '.join(POINTS)}")
        if name in points:
            raise ValueError(f"{ENV}: failpoint '{name}' is given twice")
        rest, _, nth = rest.partition("#")
        action, _, probability = rest.partition("@")
        kind, seconds = _action(action.strip(), item)
        points[name] = Failpoint(
            name, kind, seconds, _probability(probability, item), _nth(nth, item)
        )
    return points


def _action(text: str, item: str) -> tuple[str, float]:
    kind, _, arg = text.partition(":")
    if kind == "crash" and not arg:
        return "crash", 0.0
    if kind == "sleep":
        try:
            seconds = float(arg)
        except ValueError:
            seconds = -1.0
        if 0 <= seconds <= 3600:
            return "sleep", seconds
    raise ValueError(f"{ENV}: '{item}': action must be 'crash' or 'sleep:SECONDS' (0..3600)")


def _probability(text: str, item: str) -> float:
    if not text:
        return 1.0
    try:
        p = float(text)
    except ValueError:
        p = -1.0
    if not 0 < p <= 1:
        raise ValueError(f"{ENV}: '{item}': probability after '@' must be in (0, 1]")
    return p


def _nth(text: str, item: str) -> int:
    if not text:
        return 0
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{ENV}: '{item}': the hit after '#' must be a whole number >= 1")
    return int(text)


_POINTS: dict[str, Failpoint] = parse(os.environ.get(ENV, ""))
_LOCK = threading.Lock()
_RNG = random.Random(int(os.environ.get(SEED_ENV) or os.getpid()))
if _POINTS:
    log.warning("failpoints armed: %s", os.environ.get(ENV))


def hit(name: str) -> None:
    """Mark the failpoint `name`: acts only if MEMDB_FAILPOINTS armed it."""
    point = _POINTS.get(name)
    if point is not None:
        _fire(point)


def _fire(point: Failpoint) -> None:
    with _LOCK:
        point.hits += 1
        due = (not point.nth or point.hits == point.nth) and (
            point.probability >= 1 or _RNG.random() < point.probability
        )
    if not due:
        return
    if point.action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # SIGKILL is delivered before this returns
    time.sleep(point.seconds)
