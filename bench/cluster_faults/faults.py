"""The faults of the campaign, each injected and healed by one call on a `Testbed`.

Every fault function takes (testbed, rng, timing, count) and returns once it has healed what it
did; `count(kind, n)` records n injected faults of a kind. Kinds:

- `node_kill`: SIGKILL a memdb node, restart it (same data dir and port);
- `node_pause`: arm `cluster_before_publish=sleep` so an upload sits between staging and its
  publish, then SIGSTOP the node past its lease plus the collector's grace, then SIGCONT;
- `node_etcd_partition`: the node's proxies blackhole etcd past its lease, then heal;
- `etcd_lost_reply`: the node's proxies drop the replies of the next write requests (txn, put,
  delete) after forwarding them (one count per reply dropped);
- `etcd_delay`: the node's proxies hold every chunk 20-400 ms for a while;
- `redis_lost_reply`: the node's failpoints `redis_stage` / `redis_delete` drop replies after
  the write (counted from the node's failpoints log, one per firing);
- `etcd_member_kill` / `etcd_leader_kill`: SIGKILL an etcd follower / the leader, restart it;
- `redis_master_kill`: SIGKILL a Redis master, wait for its replica's promotion, restart it
  (it rejoins as a replica) and wait until every master has a replica again.

`SLOTS` groups the kinds that run one at a time (a node slot, a network slot, an etcd slot, a
Redis slot); the campaign runs the slots side by side. Knows nothing of the load or the checks.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.cluster_faults.testbed import Testbed

log = logging.getLogger(__name__)

Count = Callable[[str, int], None]


@dataclass(frozen=True)
class Timing:
    """How long faults last; past_lease is a node's lease plus the collector's grace."""

    past_lease_s: float
    extra_s: tuple[float, float] = (0.5, 2.0)  # added to past_lease_s for pauses, partitions
    down_s: tuple[float, float] = (0.2, 2.0)  # how long a killed process stays down
    window_s: tuple[float, float] = (1.0, 4.0)  # how long lost replies / delays stay armed


def _node(bed: Testbed, rng: random.Random) -> int:
    return rng.randrange(len(bed.nodes))


def node_kill(bed: Testbed, rng: random.Random, t: Timing, count: Count) -> None:
    i = _node(bed, rng)
    bed.kill_node(i)
    count("node_kill", 1)
    time.sleep(rng.uniform(*t.down_s))
    bed.restart_node(i)


def node_pause(bed: Testbed, rng: random.Random, t: Timing, count: Count) -> None:
    i = _node(bed, rng)
    before = _firings(bed, i, "cluster_before_publish")
    bed.arm(i, "cluster_before_publish=sleep:1.0#1")
    bed.wait(lambda: _firings(bed, i, "cluster_before_publish") > before, 2.0, every=0.05)
    bed.arm(i, "")
    bed.pause_node(i)
    count("node_pause", 1)
    time.sleep(t.past_lease_s + rng.uniform(*t.extra_s))
    bed.resume_node(i)


def node_etcd_partition(bed: Testbed, rng: random.Random, t: Timing, count: Count) -> None:
    i = _node(bed, rng)
    for p in bed.node_proxies[i]:
        p.set_mode("blackhole")
    count("node_etcd_partition", 1)
    time.sleep(t.past_lease_s + rng.uniform(*t.extra_s))
    for p in bed.node_proxies[i]:
        p.heal()


def etcd_lost_reply(bed: Testbed, rng: random.Random, t: Timing, count: Count) -> None:
    i = _node(bed, rng)
    paths = (
        ["/v3/kv/txn"] if rng.random() < 0.7 else ["/v3/kv/txn", "/v3/kv/put", "/v3/kv/deleterange"]
    )
    n = rng.randint(1, 2)
    proxies = bed.node_proxies[i]
    before = sum(p.lost_replies for p in proxies)
    for p in proxies:
        p.lose_replies(n, paths)
    bed.wait(lambda: sum(p.lost_replies for p in proxies) - before >= n, rng.uniform(*t.window_s))
    for p in proxies:
        p.lose_replies(0)
    count("etcd_lost_reply", sum(p.lost_replies for p in proxies) - before)


def etcd_delay(bed: Testbed, rng: random.Random, t: Timing, count: Count) -> None:
    i = _node(bed, rng)
    delay = rng.uniform(0.02, 0.4)
    for p in bed.node_proxies[i]:
        p.set_mode("delay", delay)
    count("etcd_delay", 1)
    time.sleep(rng.uniform(*t.window_s))
    for p in bed.node_proxies[i]:
        p.heal()


def redis_lost_reply(bed: Testbed, rng: random.Random, t: Timing, count: Count) -> None:
    """Counted by the campaign from the failpoints logs (each firing is one fault)."""
    i = _node(bed, rng)
    point = "redis_stage" if rng.random() < 0.8 else "redis_delete"
    before = _firings(bed, i, point)
    bed.arm(i, f"{point}=lost_reply#1")
    bed.wait(lambda: _firings(bed, i, point) > before, rng.uniform(*t.window_s), every=0.05)
    bed.arm(i, "")


def _etcd_kill(bed: Testbed, rng: random.Random, t: Timing, count: Count, leader: bool) -> None:
    lead = bed.etcd_leader()
    if lead is None:
        return
    others = [j for j in range(len(bed.etcd.members)) if j != lead]
    j = lead if leader else rng.choice(others)
    bed.kill_etcd(j)
    count("etcd_leader_kill" if leader else "etcd_member_kill", 1)
    time.sleep(rng.uniform(*t.down_s))
    bed.restart_etcd(j)


def etcd_member_kill(bed: Testbed, rng: random.Random, t: Timing, count: Count) -> None:
    _etcd_kill(bed, rng, t, count, leader=False)


def etcd_leader_kill(bed: Testbed, rng: random.Random, t: Timing, count: Count) -> None:
    _etcd_kill(bed, rng, t, count, leader=True)


def redis_master_kill(bed: Testbed, rng: random.Random, t: Timing, count: Count) -> None:
    if not bed.redis_healthy():
        bed.wait(bed.redis_healthy, 60, every=0.5)
        return
    port = rng.choice(bed.redis_masters())
    bed.kill_redis(port)
    count("redis_master_kill", 1)
    bed.wait(lambda: len(bed.redis_masters()) == 3, 30, every=0.25)  # a replica took over
    time.sleep(rng.uniform(*t.down_s))
    bed.restart_redis(port)
    if not bed.wait(bed.redis_healthy, 60, every=0.5):
        log.warning("Redis not healthy 60 s after restarting %d", port)


def _firings(bed: Testbed, i: int, point: str) -> int:
    return sum(1 for node, p, _ in bed.failpoint_firings() if node == i and p == point)


FAULTS = {
    f.__name__: f
    for f in (
        node_kill,
        node_pause,
        node_etcd_partition,
        etcd_lost_reply,
        etcd_delay,
        redis_lost_reply,
        etcd_member_kill,
        etcd_leader_kill,
        redis_master_kill,
    )
}
SLOTS = {
    "node": {"node_kill": 3, "node_pause": 3, "node_etcd_partition": 2},
    "network": {"etcd_lost_reply": 5, "redis_lost_reply": 3, "etcd_delay": 2},
    "etcd": {"etcd_member_kill": 1, "etcd_leader_kill": 1},
    "redis": {"redis_master_kill": 1},
}
FAILPOINT_KINDS = {  # (point, action) in a failpoints log -> the fault kind it counts as
    ("redis_stage", "lost_reply"): "redis_lost_reply",
    ("redis_delete", "lost_reply"): "redis_lost_reply",
}
