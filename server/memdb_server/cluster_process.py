"""Real etcd and Redis Cluster child processes on 127.0.0.1, for tests, benchmarks and the demo.

`etcd_cluster(dir, members=3)` starts an etcd cluster of real `etcd` processes (Debian's
etcd-server) on free loopback ports; `redis_cluster(dir, masters=3, replicas=1)` starts real
`redis-server` processes in cluster mode and joins them with `redis-cli --cluster create`. Both
wait until the cluster serves and stop every process on exit (`kill()` on a member simulates a
crash). `memdb_cluster(dir, etcd, redis, nodes=3)` starts memdb-server processes with the cluster
backend on them. Knows nothing of memdb's data.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from memdb_server.process import ChildProcess, ServerProcess, spawn, start_server


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (free when asked; the OS may reuse them later)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def redis_ports(n: int) -> list[int]:
    """`n` free ports for redis-server in cluster mode: each <= 55535 with port + 10000 (its
    cluster bus) free too."""
    rng = random.Random()
    chosen: list[int] = []
    while len(chosen) < n:
        port = rng.randrange(20000, 30000)
        if port not in chosen and _free(port) and _free(port + 10000):
            chosen.append(port)
    return chosen


def _free(port: int) -> bool:
    with closing(socket.socket()) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def require_binaries(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not found: install the Debian packages etcd-server and "
            "redis-server (scripts/setup.sh does)"
        )


# ---------------------------------------------------------------- etcd


@dataclass
class EtcdCluster:
    members: list[ChildProcess]
    client_urls: list[str]
    names: list[str] = field(default_factory=list)

    def stop(self) -> None:
        for m in self.members:
            m.stop()


def start_etcd_cluster(root: Path, members: int = 3, timeout: float = 60.0) -> EtcdCluster:
    require_binaries("etcd")
    ports = free_ports(2 * members)
    clients = [f"http://127.0.0.1:{p}" for p in ports[:members]]
    peers = [f"http://127.0.0.1:{p}" for p in ports[members:]]
    names = [f"etcd{i}" for i in range(members)]
    initial = ",".join(f"{n}={p}" for n, p in zip(names, peers, strict=True))
    procs = []
    for name, client, peer in zip(names, clients, peers, strict=True):
        d = Path(root) / name
        d.mkdir(parents=True, exist_ok=True)
        args = ["etcd", "--name", name, "--data-dir", str(d / "data"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"memdb-{ports[0]}", "--logger", "zap",
                "--log-level", "warn", "--quota-backend-bytes", str(1 << 30)]  # fmt: skip
        procs.append(ChildProcess(spawn(args, d / "etcd.log"), d / "etcd.log"))
    cluster = EtcdCluster(procs, clients, names)
    try:
        wait_etcd(cluster, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_etcd(cluster: EtcdCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(cluster.client_urls)
    while pending:
        for m in cluster.members:
            if m.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {m.proc.returncode}:\n{m.log()}")
        url = pending[0]
        try:
            health = httpx.get(url + "/health", timeout=2).json()
            if health.get("health") == "true":
                pending.pop(0)
                continue
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"etcd at {url} not healthy after {timeout}s")
        time.sleep(0.1)


@contextmanager
def etcd_cluster(root: Path, members: int = 3) -> Iterator[EtcdCluster]:
    cluster = start_etcd_cluster(root, members)
    try:
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------- Redis Cluster


@dataclass
class RedisCluster:
    nodes: list[ChildProcess]
    ports: list[int]

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{p}" for p in self.ports]

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def role(self, port: int) -> str:
        return _redis_cli(port, "ROLE").splitlines()[0]


def _redis_cli(port: int, *args: str, timeout: float = 10.0) -> str:
    out = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return out.stdout


def start_redis_cluster(
    root: Path, masters: int = 3, replicas: int = 1, timeout: float = 60.0
) -> RedisCluster:
    require_binaries("redis-server", "redis-cli")
    ports = redis_ports(masters * (1 + replicas))
    nodes = []
    for port in ports:
        d = Path(root) / f"redis{port}"
        d.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", "2000", "--dir", str(d), "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec",
                "--daemonize", "no", "--loglevel", "warning"]  # fmt: skip
        nodes.append(ChildProcess(spawn(args, d / "redis.log"), d / "redis.log"))
    cluster = RedisCluster(nodes, ports)
    try:
        wait_redis(cluster, ports, timeout)
        create_redis_cluster(cluster, replicas, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def create_redis_cluster(cluster: RedisCluster, replicas: int, timeout: float = 60.0) -> None:
    """Join started cluster-mode nodes into one cluster and wait until it serves every slot."""
    subprocess.run(
        ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in cluster.ports],
         "--cluster-replicas", str(replicas), "--cluster-yes"],
        capture_output=True, text=True, timeout=timeout, check=True,
    )  # fmt: skip
    wait_redis(cluster, cluster.ports, timeout, state="cluster_state:ok")
    masters = [p for p in cluster.ports if cluster.role(p) == "master"]
    wanted = f"connected_slaves:{replicas}"
    deadline = time.monotonic() + timeout
    for port in masters:  # every replica has synced (else WAIT for replicas cannot succeed)
        while True:
            info = _redis_cli(port, "INFO", "replication")
            if wanted in info and info.count("state=online") == replicas:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"replicas of redis {port} not in sync after {timeout}s")
            time.sleep(0.1)


def wait_redis(
    cluster: RedisCluster, ports: list[int], timeout: float, state: str | None = None
) -> None:
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            for n in cluster.nodes:
                if n.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {n.proc.returncode}:\n{n.log()}")
            if state is None and _port_open(port):
                break
            if state is not None and state in _redis_cli(port, "CLUSTER", "INFO"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis on port {port} not ready ({state}) after {timeout}s")
            time.sleep(0.1)


def _port_open(port: int) -> bool:
    with closing(socket.socket()) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def redis_cluster(root: Path, masters: int = 3, replicas: int = 1) -> Iterator[RedisCluster]:
    cluster = start_redis_cluster(root, masters, replicas)
    try:
        yield cluster
    finally:
        cluster.stop()


@contextmanager
def control_and_data_planes(root: Path) -> Iterator[tuple[EtcdCluster, RedisCluster]]:
    """A 3-member etcd cluster and a 3-master + 3-replica Redis Cluster."""
    with ExitStack() as stack:
        etcd = stack.enter_context(etcd_cluster(Path(root) / "etcd"))
        redis = stack.enter_context(redis_cluster(Path(root) / "redis"))
        yield etcd, redis


# ---------------------------------------------------------------- memdb nodes


@contextmanager
def memdb_cluster(
    root: Path, etcd: EtcdCluster, redis: RedisCluster, nodes: int = 3, **flags
) -> Iterator[list[ServerProcess]]:
    """`nodes` memdb-server processes with the cluster backend on one etcd + Redis Cluster
    (their own etcd root, so several memdb clusters can share the planes)."""
    flags = {"backend": "cluster", "etcd": ",".join(etcd.client_urls),
             "redis": ",".join(redis.urls), "etcd_root": f"/memdb-{time.monotonic_ns()}/",
             **flags}  # fmt: skip
    with ExitStack() as stack:
        servers = []
        for i in range(nodes):
            servers.append(start_server(Path(root) / f"node{i}", **flags))
            stack.callback(servers[-1].stop)
        yield servers
