"""docker-compose's `cluster` profile is sound and its services start as processes: the very
commands of its etcd, Redis and memdb services run on 127.0.0.1 (each service's host:port
mapped to a free loopback port, its volumes to temp dirs), and a client balancing over the
three memdb nodes stores and looks up a memory through them."""

from __future__ import annotations

import re
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import yaml

from memdb_client import MemdbClient
from memdb_server.cluster_process import (
    EtcdCluster,
    RedisCluster,
    create_redis_cluster,
    free_ports,
    redis_ports,
    wait_etcd,
    wait_redis,
)
from memdb_server.config import load_config
from memdb_server.process import ChildProcess, spawn, wait_ready
from tests.test_server import FP, make_shards

ROOT = Path(__file__).resolve().parent.parent
KEY = "compose-root-key"


def cluster_services() -> dict:
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return {n: s for n, s in spec["services"].items() if "cluster" in s.get("profiles", [])}


def test_cluster_profile_has_three_etcd_six_redis_three_nodes_and_a_balancing_worker():
    services = cluster_services()
    assert sorted(services) == sorted(
        ["etcd1", "etcd2", "etcd3", "redis-init", "memdb1", "memdb2", "memdb3", "worker-cluster"]
        + [f"redis{i}" for i in range(1, 7)]
    )
    node = services["memdb1"]["command"]
    config = load_config(**_flags(node[1:]))  # the node's flags are valid memdb-server flags
    assert config.backend == "cluster"
    assert config.etcd_endpoints() == [f"http://etcd{i}:2379" for i in (1, 2, 3)]
    assert config.redis_endpoints() == [f"redis{i}:6379" for i in range(1, 7)]
    worker = services["worker-cluster"]
    assert worker["environment"]["MEMDB_SERVER"] == "memdb1:50051,memdb2:50051,memdb3:50051"
    assert all(
        worker["depends_on"][f"memdb{i}"]["condition"] == "service_healthy" for i in (1, 2, 3)
    )
    assert "--cluster-replicas 1" in services["redis-init"]["command"][-1]


def _flags(args: list[str]) -> dict:
    return {args[i][2:].replace("-", "_"): args[i + 1] for i in range(0, len(args), 2)}


def _localize(command: list[str], service: str, ports: dict, dirs: dict) -> list[str]:
    """The service's command with every `host:port` of a service (and its own 0.0.0.0:port)
    pointing at that service's loopback port, and its volume paths in temp dirs."""

    def sub(m: re.Match) -> str:
        where = (service if m.group(1) == "0.0.0.0" else m.group(1), int(m.group(2)))
        return f"127.0.0.1:{ports[where]}" if where in ports else m.group(0)

    out = [re.sub(r"([\w.-]+):(\d+)", sub, arg) for arg in command]
    if out[0] == "redis-server":
        out[out.index("--port") + 1] = str(ports[(service, 6379)])
        out += ["--bind", "127.0.0.1", "--save", ""]
    for path, local in dirs.items():
        out = [arg.replace(path, str(local)) for arg in out]
    return out


def test_the_cluster_profiles_services_start_as_processes_and_serve(tmp_path):
    services = cluster_services()
    etcd_names = [f"etcd{i}" for i in (1, 2, 3)]
    redis_names = [f"redis{i}" for i in range(1, 7)]
    node_names = [f"memdb{i}" for i in (1, 2, 3)]
    loopback = iter(free_ports(9))
    ports = {(n, p): next(loopback) for n in etcd_names for p in (2379, 2380)}
    ports |= dict(zip([(n, 6379) for n in redis_names], redis_ports(6), strict=True))
    ports |= {(n, 50051): 0 for n in node_names} | {(n, 9464): 0 for n in node_names}
    with ExitStack() as stack:

        def start(name: str, env: dict | None = None) -> ChildProcess:
            d = tmp_path / name
            d.mkdir()
            dirs = {"/var/lib/etcd": d / "etcd", "/data": d}
            args = _localize(services[name]["command"], name, ports, dirs)
            if args[0] == "memdb-server":
                args = [
                    sys.executable,
                    "-m",
                    "memdb_server",
                    *args[1:],
                    "--ready-file",
                    str(d / "ready"),
                ]
            child = ChildProcess(spawn(args, d / "log", env), d / "log")
            stack.callback(child.stop)
            return child

        urls = [f"http://127.0.0.1:{ports[(n, 2379)]}" for n in etcd_names]
        etcd = EtcdCluster([start(n) for n in etcd_names], urls)
        redis = RedisCluster(
            [start(n) for n in redis_names], [ports[(n, 6379)] for n in redis_names]
        )
        wait_etcd(etcd, 60)
        wait_redis(redis, redis.ports, 60)
        create_redis_cluster(redis, replicas=1)  # what redis-init does, with loopback IPs
        addresses = []
        for name in node_names:
            child = start(name, {"MEMDB_ADMIN_KEY": KEY})
            info = wait_ready(child.proc, tmp_path / name / "ready", child.log_path, name, 60)
            addresses.append(info["address"])
        with MemdbClient(",".join(addresses), KEY) as client:
            shards = make_shards(seed=7)
            assert client.put_prefix("compose", shards, model_fingerprint=FP).version == 1
            q = shards[0].keys[:, [3], :].transpose(1, 0, 2)
            for _ in range(3):  # round robin: every node answers from the shared cluster
                res = client.lookup("compose", 0, q, model_fingerprint=FP)
                np.testing.assert_array_equal(res.ids[0, :, 0], [3, 3])
