"""The system the fault campaign runs against, on 127.0.0.1: a 3-member etcd cluster and a
3-master + 3-replica Redis Cluster (memdb_server.cluster_process), one TCP proxy per (memdb
node, etcd member) (bench.cluster_faults.proxy), and memdb-server processes with the cluster
backend whose etcd endpoints are their own proxies, each with a failpoints file it re-reads
(MEMDB_FAILPOINTS_FILE) and a log of every failpoint that acted (MEMDB_FAILPOINTS_LOG).

`Testbed` starts, kills, pauses and restarts any of these processes (same data, same ports for
memdb nodes) and switches a node's proxies or failpoints. Knows nothing of faults' schedule or
of the history.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from bench.cluster_faults.proxy import Proxy, ProxyLoop
from memdb_server.cluster_process import (
    _redis_cli,
    free_ports,
    start_etcd_cluster,
    start_redis_cluster,
    wait_etcd,
)
from memdb_server.process import ChildProcess, ServerProcess, spawn, start_server

log = logging.getLogger(__name__)

ADMIN_KEY = "faults-root-key"


class Testbed:
    def __init__(
        self,
        root: Path,
        *,
        nodes: int = 3,
        lease_s: int = 2,
        gc_interval_s: float = 0.5,
        gc_grace_s: float = 1.0,
        retain_versions: int = 2,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.lease_s, self.gc_interval_s, self.gc_grace_s = lease_s, gc_interval_s, gc_grace_s
        self.etcd = start_etcd_cluster(self.root / "etcd")
        try:
            self.redis = start_redis_cluster(self.root / "redis")
        except BaseException:
            self.etcd.stop()
            raise
        self.etcd_root = f"/faults-{time.monotonic_ns()}/"
        self.proxies = ProxyLoop()
        self.node_proxies: list[list[Proxy]] = [
            [
                self.proxies.add(urlparse(u).port, f"node{i}->etcd{j}")
                for j, u in enumerate(self.etcd.client_urls)
            ]
            for i in range(nodes)
        ]
        self.ports = free_ports(nodes)
        self.flags = {
            "backend": "cluster",
            "redis": ",".join(self.redis.urls),
            "etcd_root": self.etcd_root,
            "node_lease_s": lease_s,
            "gc_interval_s": gc_interval_s,
            "gc_grace_s": gc_grace_s,
            "retain_versions": retain_versions,
            "log_level": "WARNING",
            "admin_key": ADMIN_KEY,
        }
        self.seed = seed
        self.nodes: list[ServerProcess | None] = [None] * nodes
        self.restarts = 0
        try:
            for i in range(nodes):
                self.start_node(i)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ memdb nodes
    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def node_dir(self, i: int) -> Path:
        return self.root / f"node{i}"

    def failpoints_file(self, i: int) -> Path:
        return self.node_dir(i) / "failpoints"

    def failpoints_log(self, i: int) -> Path:
        return self.node_dir(i) / "failpoints.log"

    def start_node(self, i: int) -> None:
        d = self.node_dir(i)
        d.mkdir(parents=True, exist_ok=True)
        self.failpoints_file(i).write_text("")
        env = {
            "MEMDB_FAILPOINTS_FILE": str(self.failpoints_file(i)),
            "MEMDB_FAILPOINTS_LOG": str(self.failpoints_log(i)),
            "MEMDB_FAILPOINTS_SEED": str(self.seed * 100 + i + self.restarts),
        }
        etcd = ",".join(p.url for p in self.node_proxies[i])
        for attempt in range(5):
            try:
                self.nodes[i] = start_server(
                    d, env=env, etcd=etcd, listen=self.addresses[i], **self.flags
                )
                return
            except (RuntimeError, TimeoutError) as exc:  # the port may still be held a moment
                log.warning("node %d did not start (attempt %d): %s", i, attempt + 1, exc)
                time.sleep(1.0)
        raise RuntimeError(f"memdb node {i} would not start")

    def kill_node(self, i: int) -> None:
        node = self.nodes[i]
        if node is not None:
            self.resume_node(i)
            node.kill()
        self.nodes[i] = None

    def restart_node(self, i: int) -> None:
        self.restarts += 1
        self.start_node(i)

    def pause_node(self, i: int) -> None:
        os.kill(self.nodes[i].proc.pid, signal.SIGSTOP)

    def resume_node(self, i: int) -> None:
        node = self.nodes[i]
        if node is not None and node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGCONT)

    def arm(self, i: int, spec: str) -> None:
        """Switch node i's failpoints (an empty spec disarms); it re-reads within 0.1 s."""
        tmp = self.failpoints_file(i).with_suffix(".tmp")
        tmp.write_text(spec)
        tmp.replace(self.failpoints_file(i))

    def failpoint_firings(self) -> list[tuple[int, str, str]]:
        """(node, point, action) of every failpoint that acted, from the nodes' logs."""
        out = []
        for i in range(len(self.nodes)):
            path = self.failpoints_log(i)
            if path.exists():
                for line in path.read_text().splitlines():
                    parts = line.split()
                    if len(parts) == 3:
                        out.append((i, parts[1], parts[2]))
        return out

    # ------------------------------------------------------------ etcd members
    def etcd_leader(self) -> int | None:
        """The index of the etcd member that leads, or None if none answers."""
        for j, url in enumerate(self.etcd.client_urls):
            if self.etcd.members[j].proc.poll() is not None:
                continue
            try:
                status = httpx.post(url + "/v3/maintenance/status", json={}, timeout=2).json()
            except (httpx.HTTPError, ValueError):
                continue
            leader = status.get("leader")
            for k, other in enumerate(self.etcd.client_urls):
                try:
                    s = httpx.post(other + "/v3/maintenance/status", json={}, timeout=2).json()
                except (httpx.HTTPError, ValueError):
                    continue
                if s.get("header", {}).get("member_id") == leader:
                    return k
        return None

    def kill_etcd(self, j: int) -> None:
        self.etcd.members[j].kill()

    def restart_etcd(self, j: int, timeout: float = 60.0) -> None:
        dead = self.etcd.members[j]
        if dead.proc.poll() is None:
            return
        self.etcd.members[j] = ChildProcess(spawn(dead.proc.args, dead.log_path), dead.log_path)
        wait_etcd(self.etcd, timeout)

    # ------------------------------------------------------------ Redis
    def redis_alive(self) -> list[int]:
        return [
            p
            for n, p in zip(self.redis.nodes, self.redis.ports, strict=True)
            if n.proc.poll() is None
        ]

    def redis_masters(self) -> list[int]:
        out = []
        for port in self.redis_alive():
            try:
                if self.redis.role(port) == "master":
                    out.append(port)
            except (subprocess.SubprocessError, OSError):
                pass
        return out

    def kill_redis(self, port: int) -> None:
        self.redis.nodes[self.redis.ports.index(port)].kill()

    def restart_redis(self, port: int) -> None:
        k = self.redis.ports.index(port)
        dead = self.redis.nodes[k]
        if dead.proc.poll() is None:
            return
        self.redis.nodes[k] = ChildProcess(spawn(dead.proc.args, dead.log_path), dead.log_path)

    def redis_healthy(self) -> bool:
        """Every node up, 3 masters each with an online replica, cluster state ok."""
        try:
            alive = self.redis_alive()
            if len(alive) != len(self.redis.ports):
                return False
            masters = self.redis_masters()
            if len(masters) != 3:
                return False
            for port in masters:
                info = _redis_cli(port, "INFO", "replication", timeout=5)
                if "connected_slaves:1" not in info or "state=online" not in info:
                    return False
            return all(
                "cluster_state:ok" in _redis_cli(p, "CLUSTER", "INFO", timeout=5) for p in alive
            )
        except (subprocess.SubprocessError, OSError):
            return False

    def wait(self, check, timeout: float, every: float = 0.2) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(every)
        return False

    # ------------------------------------------------------------ all of it
    def heal(self, timeout: float = 120.0) -> None:
        """Every proxy passes, no failpoint is armed, every process runs again."""
        for proxies in self.node_proxies:
            for p in proxies:
                p.lose_replies(0)
                p.heal()
        for j in range(len(self.etcd.members)):
            self.restart_etcd(j)
        for port in self.redis.ports:
            self.restart_redis(port)
        for i, node in enumerate(self.nodes):
            if node is None or node.proc.poll() is not None:
                self.nodes[i] = None
                self.restart_node(i)
            else:
                self.resume_node(i)
            self.arm(i, "")
        if not self.wait(self.redis_healthy, timeout, every=0.5):
            log.warning("the Redis Cluster is not back to 3 masters with replicas after healing")

    def close(self) -> None:
        for i, node in enumerate(self.nodes):
            if node is not None:
                self.resume_node(i)
                node.stop()
        self.proxies.close()
        self.redis.stop()
        self.etcd.stop()
