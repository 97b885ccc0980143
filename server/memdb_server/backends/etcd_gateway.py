"""A small synchronous client of etcd's v3 JSON gRPC gateway (etcd >= 3.4), over httpx.

etcd serves its v3 API as JSON over HTTP on the client port (`POST /v3/kv/range`, `/v3/kv/txn`,
`/v3/watch`, `/v3/lease/grant`, ...; keys and values base64). This module owns that encoding,
failover across the cluster's endpoints, and the watch stream. It knows nothing of what memdb
keeps in etcd.

Reads fail over to the next endpoint on any transport error. Writes (put, delete, txn) fail over
only when the request cannot have reached etcd (the connection was refused); once it was sent,
a lost reply, a timeout or a 5xx may hide an applied write, so the write raises
`OutcomeUnknown` and the caller settles it by reading back (sending it again could apply it
twice). The failpoints `etcd_txn`, `etcd_put`, `etcd_delete` inject those faults.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx

from memdb.errors import OutcomeUnknown, Unavailable
from memdb_server import failpoints

log = logging.getLogger(__name__)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def range_end(prefix: bytes) -> bytes:
    """The end of the key range of every key that starts with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


SETTLE_S = 10.0  # how long a write whose reply was lost is read back before OutcomeUnknown
WATCH_IDLE_S = 2.0  # a watch stream with no event for this long is re-opened (and `stop` read)


@dataclass(frozen=True)
class KV:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "put" | "delete"
    kv: KV
    prev: KV | None


@dataclass(frozen=True)
class WatchProgress:
    """Where a watch stands: every event up to `revision` has been delivered. `live`: the
    stream is open (False: it broke and is reconnecting); `lost`: etcd compacted away events
    after `revision`, which the watch will never deliver."""

    revision: int
    live: bool
    lost: bool = False


def _kv(raw: dict | None) -> KV | None:
    if not raw:
        return None
    return KV(
        unb64(raw["key"]),
        unb64(raw.get("value", "")),
        int(raw.get("mod_revision", 0)),
        int(raw.get("create_revision", 0)),
    )


# ---------------------------------------------------------------- transaction parts


def cmp_mod(key: bytes, revision: int, *, result: str = "EQUAL", end: bytes | None = None) -> dict:
    """Compare the mod revision of `key` (or of every key in [key, end)); absent keys have 0."""
    c = {"key": b64(key), "target": "MOD", "result": result, "mod_revision": str(revision)}
    if end is not None:
        c["range_end"] = b64(end)
    return c


def op_put(key: bytes, value: bytes, lease: int = 0) -> dict:
    req = {"key": b64(key), "value": b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def op_delete(key: bytes, end: bytes | None = None) -> dict:
    req = {"key": b64(key)}
    if end is not None:
        req["range_end"] = b64(end)
    return {"request_delete_range": req}


# ---------------------------------------------------------------- the client


class WatchStop(threading.Event):
    """Ends a `watch` when set, at once: it also shuts the socket the watch is blocked reading
    (closing a socket does not wake a thread blocked in recv on it; shutting it down does)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def attach(self, resp: httpx.Response) -> None:
        """The stream the watch reads now."""
        stream = resp.extensions.get("network_stream")
        with self._lock:
            self._sock = stream.get_extra_info("socket") if stream is not None else None
        if self.is_set():
            self._wake()

    def set(self) -> None:
        super().set()
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass


class EtcdClient:
    """Thread-safe; fails over to the next endpoint when one cannot be reached."""

    def __init__(self, endpoints: list[str], *, timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint URL")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._timeout = timeout
        self._http = httpx.Client(timeout=timeout)
        self._first = 0
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # requests sent, by path (not the watch)
        self._write_observers: list[Callable[[int], None]] = []
        self._read_revision = 0  # the highest store revision a read of this client saw

    def close(self) -> None:
        self._http.close()

    def on_write(self, fn: Callable[[int], None]) -> None:
        """Call `fn(revision)` after each write this client made that changed etcd (a txn
        that succeeded, a put, a delete that deleted), with the revision it made, before the
        write returns."""
        self._write_observers.append(fn)

    def _wrote(self, path: str, resp: dict) -> None:
        changed = path == "/v3/kv/put" or (
            resp.get("succeeded") if path == "/v3/kv/txn" else int(resp.get("deleted", 0))
        )
        if changed:
            self._notify(int(resp["header"]["revision"]))

    def _notify(self, revision: int) -> None:
        for fn in self._write_observers:
            fn(revision)

    def _post(
        self, path: str, body: dict, *, write: bool = False, fault: str | None = None
    ) -> dict:
        """POST to the first endpoint that answers. A `write` goes to another endpoint only
        if it was not sent; else OutcomeUnknown. `fault`: what a failpoint injects."""
        if fault == "fail":
            raise Unavailable(f"etcd {path} was not sent (failpoint)")
        with self._lock:
            first = self._first
            self.requests[path] += 1
        n = len(self.endpoints)
        errors = []
        for i in range(n):
            at = (first + i) % n
            url = self.endpoints[at] + path
            try:
                resp = self._http.post(url, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                errors.append(f"{self.endpoints[at]}: {exc}")  # never sent: safe to fail over
                continue
            except httpx.TransportError as exc:
                if write:
                    raise _unknown(path, url, exc) from exc
                errors.append(f"{self.endpoints[at]}: {exc}")
                continue
            if fault == "lost_reply":  # sent and applied; the reply is dropped
                raise _unknown(path, url, "reply dropped by failpoint")
            if resp.status_code >= 500:
                if write:  # etcd's "request timed out" may still apply the request
                    raise _unknown(path, url, f"HTTP {resp.status_code} {resp.text[:200]}")
                if i + 1 < n:
                    errors.append(
                        f"{self.endpoints[at]}: HTTP {resp.status_code} {resp.text[:200]}"
                    )
                    continue
            if resp.status_code != 200:
                raise Unavailable(f"etcd {path} failed: HTTP {resp.status_code} {resp.text[:300]}")
            if at != first:
                with self._lock:
                    self._first = at
            answer = resp.json()
            if write:
                self._wrote(path, answer)
            return answer
        raise Unavailable(f"etcd is unreachable: {'; '.join(errors)}")

    # ------------------------------------------------------------ kv

    def get(self, key: bytes) -> KV | None:
        kvs, _ = self.range(key)
        return kvs[0] if kvs else None

    def range(
        self, key: bytes, end: bytes | None = None, *, limit: int = 0, revision: int = 0
    ) -> tuple[list[KV], int]:
        """The keys in [key, end) (just `key` without end), sorted; and the store revision."""
        body: dict = {"key": b64(key)}
        if end is not None:
            body["range_end"] = b64(end)
        if limit:
            body["limit"] = str(limit)
        if revision:
            body["revision"] = str(revision)
        resp = self._post("/v3/kv/range", body)
        revision = int(resp["header"]["revision"])
        with self._lock:
            self._read_revision = max(self._read_revision, revision)
        return [_kv(raw) for raw in resp.get("kvs", [])], revision

    def count(self, prefix: bytes) -> int:
        """How many keys start with `prefix` (etcd counts; no values travel)."""
        body = {"key": b64(prefix), "range_end": b64(range_end(prefix)), "count_only": True}
        return int(self._post("/v3/kv/range", body).get("count", 0))

    def scan(self, prefix: bytes, *, start_after: bytes = b"", page: int = 1000) -> Iterator[KV]:
        """Every key that starts with `prefix` (after `start_after`), in pages, in key order;
        each page is one consistent read."""
        end = range_end(prefix)
        start = start_after + b"\0" if start_after else prefix
        while True:
            kvs, _ = self.range(start, end, limit=page)
            yield from kvs
            if len(kvs) < page:
                return
            start = kvs[-1].key + b"\0"

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        body = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        fault = failpoints.hit("etcd_put")
        return int(self._post("/v3/kv/put", body, write=True, fault=fault)["header"]["revision"])

    def delete(self, key: bytes, end: bytes | None = None) -> int:
        body = {"key": b64(key)}
        if end is not None:
            body["range_end"] = b64(end)
        fault = failpoints.hit("etcd_delete")
        return int(
            self._post("/v3/kv/deleterange", body, write=True, fault=fault).get("deleted", 0)
        )

    def txn(
        self,
        compare: list[dict],
        success: list[dict],
        failure: list[dict] = (),
        *,
        applied: Callable[[], bool] | None = None,
    ) -> bool:
        """Run `success` if every compare holds, else `failure`; True if it succeeded.

        When its reply is lost (OutcomeUnknown), `applied()`, a read of what the txn writes,
        settles it: True, it was applied; False, it was not, and `txn` returns False so the
        caller's loop reads again and retries (sending it blind again could apply it twice).
        Reading back is retried for SETTLE_S while etcd is unreachable, then OutcomeUnknown.
        A txn settled as applied is told to `on_write` observers with the revision its
        read-back saw (at or after the txn's own), as an answered one is.
        """
        try:
            return self.txn_revision(compare, success, failure)[0]
        except OutcomeUnknown as lost:
            if applied is None:
                raise
            if not _settle(applied, lost):
                return False
            with self._lock:
                revision = self._read_revision
            self._notify(revision)
            return True

    def txn_revision(
        self, compare: list[dict], success: list[dict], failure: list[dict] = ()
    ) -> tuple[bool, int]:
        """As `txn`, and the store revision the transaction ran at (its own, if it wrote)."""
        body = {"compare": compare, "success": success, "failure": list(failure)}
        fault = failpoints.hit("etcd_txn")
        resp = self._post("/v3/kv/txn", body, write=True, fault=fault)
        return bool(resp.get("succeeded", False)), int(resp["header"]["revision"])

    # ------------------------------------------------------------ leases

    def grant(self, ttl: int) -> int:
        return int(self._post("/v3/lease/grant", {"TTL": str(ttl)})["ID"])

    def keepalive(self, lease: int) -> int:
        """Refresh a lease once; returns its remaining TTL (0 or less: it has expired)."""
        resp = self._post("/v3/lease/keepalive", {"ID": str(lease)})
        return int(resp.get("result", {}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self._post("/v3/lease/revoke", {"ID": str(lease)})

    def status(self) -> dict:
        return self._post("/v3/maintenance/status", {})

    # ------------------------------------------------------------ watch

    def watch(
        self,
        prefix: bytes,
        on_event: Callable[[WatchEvent], None],
        stop: threading.Event,
        *,
        start_revision: int = 0,
        on_progress: Callable[[WatchProgress], None] | None = None,
    ) -> None:
        """Call `on_event` for every change under `prefix` from `start_revision` (0: from now)
        until `stop` is set; reconnects (to the next endpoint) and resumes after the last
        revision seen, so no event is missed or repeated. `on_progress` hears when the stream
        opens, after each response's events (etcd never splits one revision's events across
        responses), and when the stream breaks or events were compacted away."""
        pos = {"next": start_revision}
        attempt = 0
        progress = on_progress or (lambda p: None)
        while not stop.is_set():
            url = self.endpoints[attempt % len(self.endpoints)] + "/v3/watch"
            try:
                self._watch_once(url, prefix, on_event, stop, pos, progress)
            except httpx.ReadTimeout:
                continue  # idle: re-open on the same endpoint, resuming at pos["next"]
            except (httpx.TransportError, httpx.StreamError, ValueError, KeyError) as exc:
                if stop.is_set():
                    return
                log.warning("etcd watch on %s broke (%s); reconnecting", url, exc)
                progress(WatchProgress(pos["next"] - 1, live=False))
                attempt += 1
                stop.wait(0.2)

    def _watch_once(
        self,
        url: str,
        prefix: bytes,
        on_event: Callable,
        stop: threading.Event,
        pos: dict,
        progress: Callable[[WatchProgress], None],
    ) -> None:
        req = {"key": b64(prefix), "range_end": b64(range_end(prefix)), "prev_kv": True}
        if pos["next"]:
            req["start_revision"] = str(pos["next"])
        timeout = httpx.Timeout(self._timeout, read=WATCH_IDLE_S)
        with httpx.Client(timeout=timeout) as http:
            with http.stream("POST", url, json={"create_request": req}) as resp:
                if isinstance(stop, WatchStop):
                    stop.attach(resp)
                for line in resp.iter_lines():
                    if stop.is_set():
                        return
                    result = json.loads(line).get("result", {}) if line.strip() else {}
                    if result.get("created") and not pos["next"]:  # "now" is this revision
                        pos["next"] = int(result["header"]["revision"]) + 1
                    if result.get("compact_revision"):
                        log.error("etcd compacted past revision %d: events were lost", pos["next"])
                        pos["next"] = int(result["compact_revision"])
                        progress(WatchProgress(pos["next"] - 1, live=False, lost=True))
                        return
                    events = result.get("events", [])
                    for raw in events:
                        kv = _kv(raw["kv"])
                        kind = raw.get("type", "PUT").lower()
                        on_event(WatchEvent(kind, kv, _kv(raw.get("prev_kv"))))
                        pos["next"] = kv.mod_revision + 1
                    if events or result.get("created"):
                        progress(WatchProgress(pos["next"] - 1, live=True))
                raise httpx.StreamError("the watch stream ended")


def _settle(applied: Callable[[], bool], lost: OutcomeUnknown) -> bool:
    deadline = time.monotonic() + SETTLE_S
    while True:
        try:
            return applied()
        except OutcomeUnknown:
            raise
        except Unavailable as exc:
            if time.monotonic() > deadline:
                raise OutcomeUnknown(f"{lost}; reading it back failed too: {exc}") from exc
            time.sleep(0.2)


def _unknown(path: str, url: str, why: object) -> OutcomeUnknown:
    return OutcomeUnknown(
        f"etcd {path} was sent to {url} but no reply came ({why}); it may have been applied"
    )
