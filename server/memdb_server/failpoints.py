"""Named failpoints of the write path, for crash and fault testing (bench.reliability,
bench.cluster_faults, tests/reliability).

Code marks a point with `failpoints.hit("after_shards_put")`. Nothing happens unless the
`MEMDB_FAILPOINTS` environment variable (read once, at import), the file named by
`MEMDB_FAILPOINTS_FILE` (re-read whenever it changes, so a running server's faults can be
switched from outside; an empty file disarms) or `armed(spec)` (in-process) names that point:

    MEMDB_FAILPOINTS="after_shards_put=crash,before_commit=crash@0.3,etcd_txn=lost_reply#2"

Each item is `NAME=ACTION[@PROBABILITY][#N]`:
    crash        SIGKILL this process at once (no cleanup, no flush: a power cut, as far as
                 the process can tell)
    sleep:SECS   block the calling thread for SECS seconds (widens a race window; a pause)
    fail         the request at this point is not sent: `hit` returns "fail" and the caller
                 (a backend client) answers as if the backend could not be reached
    lost_reply   the request is sent and applied, then its reply is dropped: `hit` returns
                 "lost_reply" and the caller (a backend client) raises the transport error
                 a lost reply gives, after sending
    @P           act only with probability P (0 < P <= 1) at each hit
    #N           act only at the Nth hit of that point (1-based), and never again
A point named in a spec but not marked anywhere in the code does nothing.
`MEMDB_FAILPOINTS_SEED` seeds the coin of `@P` (default: the process id). With
`MEMDB_FAILPOINTS_LOG`, every time a point acts one line `<unix time> <point> <action>` is
appended to that file (to count injected faults).

When nothing is armed, `hit` is one dictionary lookup. This module knows nothing of storage,
etcd, Redis or gRPC; it only knows the points by name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "MEMDB_FAILPOINTS"
SEED_ENV = "MEMDB_FAILPOINTS_SEED"
FILE_ENV = "MEMDB_FAILPOINTS_FILE"
LOG_ENV = "MEMDB_FAILPOINTS_LOG"
ACTIONS = ("crash", "sleep", "fail", "lost_reply")
RELOAD_S = 0.1  # how often the armed file is checked for a change

# Every point marked in the code, so a typo in MEMDB_FAILPOINTS is an error, not a no-op.
# The local store's write path (what bench.reliability.kills kills at) ...
LOCAL_POINTS = (
    "put_received",  # admin_service.PutPrefix: every chunk arrived, nothing decoded yet
    "put_indexed",  # admin_service.PutPrefix: shards decoded and indexed, before the store
    "before_write_txn",  # storage.write_version: validated, before the write transaction
    "after_shards_put",  # storage: shards and indices staged in the open transaction
    "before_commit",  # storage: the record is staged, the transaction about to commit
    "after_commit",  # storage.write_version: committed, before returning to the caller
    "delete_before_commit",  # storage.delete_prefix: records deleted in the open transaction
    "delete_after_commit",  # storage.delete_prefix: committed, before returning
)
# ... and the cluster backend (backends/): its etcd and Redis clients, the store between them
CLUSTER_POINTS = (
    "etcd_txn",  # EtcdClient.txn: a transaction (fail / lost_reply / sleep)
    "etcd_put",  # EtcdClient.put
    "etcd_delete",  # EtcdClient.delete
    "redis_stage",  # BlobStore.stage: an upload's blobs written to the masters
    "redis_delete",  # BlobStore.delete_keys
    "cluster_before_publish",  # ClusterStore: blobs staged, the publish txn not yet sent
)
POINTS = LOCAL_POINTS + CLUSTER_POINTS


@dataclass
class Failpoint:
    name: str
    action: str  # crash | sleep | fail | lost_reply
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
    if kind in ("crash", "fail", "lost_reply") and not arg:
        return kind, 0.0
    if kind == "sleep":
        try:
            seconds = float(arg)
        except ValueError:
            seconds = -1.0
        if 0 <= seconds <= 3600:
            return "sleep", seconds
    raise ValueError(
        f"{ENV}: '{item}': action must be 'crash', 'fail', 'lost_reply' or "
        "'sleep:SECONDS' (0..3600)"
    )


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
_FILE = os.environ.get(FILE_ENV) or None
_LOG = os.environ.get(LOG_ENV) or None
_file_state = {"checked": 0.0, "mtime": None}
if _POINTS:
    log.warning("failpoints armed: %s", os.environ.get(ENV))


def hit(name: str) -> str | None:
    """Mark the failpoint `name`: acts only if it is armed. Returns "fail" when the caller must
    not send its request, "lost_reply" when it must drop that request's reply, else None."""
    if _FILE is not None:
        _reload()
    point = _POINTS.get(name)
    if point is None:
        return None
    return _fire(point)


@contextlib.contextmanager
def armed(spec: str) -> Iterator[dict[str, Failpoint]]:
    """Arm the points of `spec` in this process for the block (tests), then restore."""
    global _POINTS
    points = parse(spec)
    with _LOCK:
        saved, _POINTS = _POINTS, points
    try:
        yield points
    finally:
        with _LOCK:
            _POINTS = saved


def _reload() -> None:
    """Re-arm from MEMDB_FAILPOINTS_FILE if it changed (checked at most every RELOAD_S)."""
    global _POINTS
    now = time.monotonic()
    if now - _file_state["checked"] < RELOAD_S:
        return
    _file_state["checked"] = now
    try:
        mtime = os.stat(_FILE).st_mtime_ns
    except FileNotFoundError:
        mtime = None
    if mtime == _file_state["mtime"]:
        return
    _file_state["mtime"] = mtime
    try:
        spec = Path(_FILE).read_text() if mtime is not None else ""
        points = parse(spec.replace("\n", ","))
    except (OSError, ValueError) as exc:
        log.error("failpoints file %s not applied: %s", _FILE, exc)
        return
    with _LOCK:
        _POINTS = points
    log.warning("failpoints re-armed from %s: %s", _FILE, ",".join(points) or "none")


def _fire(point: Failpoint) -> str | None:
    with _LOCK:
        point.hits += 1
        due = (not point.nth or point.hits == point.nth) and (
            point.probability >= 1 or _RNG.random() < point.probability
        )
    if not due:
        return None
    if _LOG is not None:
        with open(_LOG, "a") as f:
            f.write(f"{time.time():.6f} {point.name} {point.action}\n")
    if point.action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # SIGKILL is delivered before this returns
    if point.action in ("fail", "lost_reply"):
        return point.action
    time.sleep(point.seconds)
    return None
