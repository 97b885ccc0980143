"""Shard and index bytes of the cluster backend in a Redis Cluster, under content-addressed keys.

Every upload gets an id; each of its blobs is stored as parts of at most `part_bytes` under

    <namespace>:blob:<upload>:<sha256 of the whole blob>:<part>      (namespace: "memdb")

so a blob's key names its content (checked on every read) and the upload that staged it (the
garbage collector drops whole uploads that no retained version or live staging record names).
Keys carry no hash tag: the parts of a memory spread over every master. This module knows
nothing of etcd, versions or tenants.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlparse

import redis
from redis.cluster import ClusterNode, RedisCluster

from memdb.errors import NotFound, Unavailable
from memdb_server import failpoints

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "memdb"
PART_BYTES = 8 << 20  # Redis strings may hold 512 MiB; smaller parts spread load over masters


@dataclass(frozen=True)
class BlobRef:
    digest: str  # sha256 hex of the whole blob
    size: int

    def to_json(self) -> list:
        return [self.digest, self.size]

    @classmethod
    def from_json(cls, raw: list) -> BlobRef:
        return cls(str(raw[0]), int(raw[1]))


def parse_nodes(urls: Iterable[str]) -> list[ClusterNode]:
    """`redis://host:port` or `host:port` startup nodes."""
    nodes = []
    for url in urls:
        u = urlparse(url if "://" in url else f"redis://{url}")
        if not u.hostname or not u.port:
            raise ValueError(f"a Redis address must be host:port or redis://host:port, got {url!r}")
        nodes.append(ClusterNode(u.hostname, u.port))
    if not nodes:
        raise ValueError("the Redis Cluster needs at least one startup address")
    return nodes


class BlobStore:
    """Thread-safe (redis-py's cluster client is)."""

    def __init__(
        self,
        urls: list[str],
        *,
        namespace: str = DEFAULT_NAMESPACE,
        part_bytes: int = PART_BYTES,
        timeout: float = 5.0,
        min_replicas: int = 0,
    ) -> None:
        if not namespace or any(c in namespace for c in "{}*?[] "):
            raise ValueError(f"a Redis key namespace must be plain text, got {namespace!r}")
        self.prefix = f"{namespace}:blob:"
        self.part_bytes = part_bytes
        self.min_replicas = min_replicas
        self._wait_ms = int(timeout * 1000 / 2)  # WAIT answers before the socket times out
        self._rc = RedisCluster(
            startup_nodes=parse_nodes(urls),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )

    def close(self) -> None:
        self._rc.close()

    def key(self, upload: str, ref: BlobRef, part: int) -> str:
        return f"{self.prefix}{upload}:{ref.digest}:{part}"

    def _parts(self, ref: BlobRef) -> range:
        return range(max(1, -(-ref.size // self.part_bytes)))

    # ------------------------------------------------------------ write

    @staticmethod
    def refs(blobs: list[bytes]) -> list[BlobRef]:
        return [BlobRef(hashlib.sha256(b).hexdigest(), len(b)) for b in blobs]

    def stored_bytes(self, upload: str, refs: Iterable[BlobRef]) -> int:
        """Key + value bytes the blobs of `refs` take in Redis (a blob staged twice in one
        upload is stored once)."""
        return sum(
            ref.size + sum(len(self.key(upload, ref, p)) for p in self._parts(ref))
            for ref in set(refs)
        )

    def stage(
        self, upload: str, blobs: list[bytes], refs: list[BlobRef] | None = None
    ) -> list[BlobRef]:
        """Store every blob under the upload's keys; returns their refs, in order.

        With `min_replicas`, each master's writes are followed by WAIT on the same connection:
        the blobs are on that many replicas too before this returns (else Unavailable), so a
        master that dies after the version is published cannot take them with it.
        """
        refs = self.refs(blobs) if refs is None else refs
        fault = failpoints.hit("redis_stage")
        if fault == "fail":
            raise Unavailable("the upload's blobs were not sent to Redis (failpoint)")
        parts: dict[str, bytes] = {}
        for ref, blob in zip(refs, blobs, strict=True):
            view = memoryview(blob)
            for part in self._parts(ref):
                parts[self.key(upload, ref, part)] = view[
                    part * self.part_bytes : (part + 1) * self.part_bytes
                ]
        for attempt in range(2):
            try:
                self._put_per_master(parts)
                if fault == "lost_reply":
                    raise redis.ConnectionError("the reply was dropped (failpoint)")
                return refs
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
                if attempt:  # MOVED / a failover under way: re-read the slots once, then fail
                    raise Unavailable(
                        f"the Redis Cluster refused the upload's blobs: {exc}"
                    ) from exc
                fault = None  # SETs of content-named keys are idempotent: sending again is safe
                self._rc.nodes_manager.initialize()
        return refs

    def _put_per_master(self, parts: dict[str, bytes]) -> None:
        by_node: dict[str, list[str]] = defaultdict(list)
        nodes = {}
        for key in parts:
            node = self._rc.get_node_from_key(key)
            by_node[node.name].append(key)
            nodes[node.name] = node
        for name, keys in by_node.items():
            pipe = self._rc.get_redis_connection(nodes[name]).pipeline(transaction=False)
            for key in keys:
                pipe.set(key, bytes(parts[key]))
            if self.min_replicas:
                pipe.execute_command("WAIT", self.min_replicas, self._wait_ms)
            acked = pipe.execute()[-1]
            if self.min_replicas and int(acked) < self.min_replicas:
                raise Unavailable(
                    f"only {acked} of the {self.min_replicas} Redis replicas required "
                    f"(--redis-min-replicas) acknowledged the upload's blobs on {name}; "
                    "nothing was published"
                )

    def delete_upload(self, upload: str) -> int:
        """Delete every key of an upload; returns how many."""
        return self.delete_keys(list(self.scan(upload)))

    def delete_keys(self, keys: list[str]) -> int:
        fault = failpoints.hit("redis_delete")
        if fault == "fail":
            raise Unavailable("the delete was not sent to Redis (failpoint)")
        deleted = 0
        try:
            for start in range(0, len(keys), 500):
                deleted += int(self._rc.delete(*keys[start : start + 500]))
            if fault == "lost_reply":
                raise redis.ConnectionError("the reply was dropped (failpoint)")
        except redis.RedisError as exc:
            raise Unavailable(f"the Redis Cluster refused a delete: {exc}") from exc
        return deleted

    # ------------------------------------------------------------ read

    def read(self, upload: str, refs: list[BlobRef]) -> list[bytes]:
        """The blobs of `refs`, each checked against its digest."""
        keys = [self.key(upload, ref, p) for ref in refs for p in self._parts(ref)]
        try:
            parts = self._rc.mget_nonatomic(keys) if keys else []
        except redis.RedisError as exc:
            raise Unavailable(f"the Redis Cluster could not be read: {exc}") from exc
        out, at = [], 0
        for ref in refs:
            n = len(self._parts(ref))
            chunk = parts[at : at + n]
            at += n
            if any(p is None for p in chunk):
                raise NotFound(
                    f"blob {ref.digest[:12]} of upload {upload} is gone from the Redis Cluster "
                    "(the version was replaced or deleted while it was read); read it again"
                )
            blob = b"".join(chunk)
            if len(blob) != ref.size or hashlib.sha256(blob).hexdigest() != ref.digest:
                raise Unavailable(f"blob {ref.digest[:12]} of upload {upload} is corrupt")
            out.append(blob)
        return out

    # ------------------------------------------------------------ inventory

    def scan(self, upload: str = "") -> Iterable[str]:
        """Every key of this namespace (of one upload, if given), on every master."""
        match = f"{self.prefix}{upload}:*" if upload else f"{self.prefix}*"
        try:
            for key in self._rc.scan_iter(match=match, count=1000):
                yield key.decode() if isinstance(key, bytes) else key
        except redis.RedisError as exc:
            raise Unavailable(f"the Redis Cluster could not be scanned: {exc}") from exc

    def keys_by_upload(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = defaultdict(list)
        for key in self.scan():
            found[key[len(self.prefix) :].split(":", 1)[0]].append(key)
        return dict(found)

    def ping(self) -> bool:
        """The cluster answers and every slot is served (cluster_state:ok)."""
        try:
            info = self._rc.cluster_info(target_nodes=RedisCluster.RANDOM)
        except redis.RedisError:
            return False
        return info.get("cluster_state") == "ok"

    def used_bytes(self) -> int:
        """Memory used by the masters (Redis INFO used_memory, summed)."""
        try:
            info = self._rc.info("memory", target_nodes=RedisCluster.PRIMARIES)
        except redis.RedisError as exc:
            raise Unavailable(f"the Redis Cluster could not be asked for INFO: {exc}") from exc
        if "used_memory" in info:
            return int(info["used_memory"])
        return sum(int(v.get("used_memory", 0)) for v in info.values())
