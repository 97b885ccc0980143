"""The campaign's load: client processes that write, read and watch, and record their history.

`run_worker(spec)` (a process of its own) runs, until the stop file appears:
- one writer thread per (tenant, name) it owns, the only writer of that name: creates, updates
  with and without expected_version, upserts, deletes (and a few writes bound to be refused),
  one at a time through a random node; each write is followed by a read-back (GetPrefix, then a
  Fetch of every layer of that version, retried until the faults let an answer through), so
  the history tells what each write did;
- reader threads: Lookups and Fetches of random names through random nodes, each with its own
  Watch streams (one per tenant, re-opened through the next node when a node dies).
Every write carries a unique tag in its values and build_params (bench.reliability.memories).
Records (see bench.cluster_faults.checker) go to one JSON-lines file per worker. Knows nothing
of the faults or of how the history is judged.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
import threading
import time
from pathlib import Path

from bench.reliability.memories import FP, Shape, queries_of, tag_of, tag_of_blobs, tagged_memory
from memdb.errors import MemdbError, NotFound
from memdb_client import MemdbClient

log = logging.getLogger(__name__)

SHAPE = Shape(layers=2, groups=1, m=16, dk=8, h=1, d=4)
TAGS_PER_WORKER = 1_000_000  # tags stay below 2**24: exact in float32
READBACK_S = 120.0  # a read-back retries this long before it records what it could not read
STREAM_S = 20.0  # deadline of a Fetch or an upload (tiny memories: well under a second)
GUARD_S = 10.0  # past its deadline, a call that has not returned is abandoned as hung
UNREADABLE_TRIES = 6  # fetches of a version GetPrefix still names before it counts unreadable


def fingerprint(blobs: list[bytes]) -> str:
    h = hashlib.sha256()
    for b in blobs:
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()


class Recorder:
    """Appends history records to a JSON-lines file, from any thread."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", buffering=1)
        self._lock = threading.Lock()

    def __call__(self, **record) -> None:
        line = json.dumps(record)
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        self._file.close()


class Hung(Exception):
    """A call that outlived its deadline by GUARD_S: its client was replaced (see `call`)."""

    code_name = "HUNG"


def _error(exc: MemdbError | Hung) -> dict:
    code = exc.code_name if isinstance(exc, Hung) else exc.code.name
    return {"ok": False, "code": code, "message": str(exc)[:400]}


class Worker:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.addresses: list[str] = spec["addresses"]
        self.stop_file = Path(spec["stop_file"])
        self.record = Recorder(Path(spec["out"]))
        self.tags = itertools.count(spec["index"] * TAGS_PER_WORKER + 1)
        self.timeout = spec.get("timeout_s", 30)
        self.keys = spec["keys"]
        self.clients = {t: [self._client(t, a) for a in self.addresses] for t in self.keys}
        self.hung = 0

    def _client(self, tenant: str, address: str) -> MemdbClient:
        return MemdbClient(
            address, self.keys[tenant], timeout=self.timeout, stream_timeout=STREAM_S
        )

    def call(self, tenant: str, node: int, method: str, *args, **kwargs):
        """`client.method(*args, **kwargs)` for the client of (tenant, node), on a thread. gRPC
        streams were seen to outlive their deadline for good after a node's restart; such a
        call is abandoned after its deadline + GUARD_S (Hung), and the client replaced."""
        box: dict = {}

        def run() -> None:
            try:
                box["value"] = getattr(self.clients[tenant][node], method)(*args, **kwargs)
            except BaseException as exc:  # handed to the caller
                box["error"] = exc

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(max(self.timeout, STREAM_S) + GUARD_S)
        if t.is_alive():
            old = self.clients[tenant][node]
            self.clients[tenant][node] = self._client(tenant, self.addresses[node])
            threading.Thread(target=old.close, daemon=True).start()
            self.hung += 1
            raise Hung(f"no answer from node {node} past the call's deadline")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def stopped(self) -> bool:
        return self.stop_file.exists()

    # ------------------------------------------------------------ writers
    def write_loop(self, tenant: str, name: str, seed: int) -> None:
        rng = random.Random(seed)
        state: dict | None = None
        for seq in itertools.count():
            if self.stopped():
                return
            op, mode, expected = _choose(rng, state)
            tag = next(self.tags) if op != "delete" else None
            blobs = tagged_memory(tag, SHAPE) if tag is not None else []
            node = rng.randrange(len(self.addresses))
            rec = {
                "kind": "write",
                "tenant": tenant,
                "name": name,
                "seq": seq,
                "op": op,
                "mode": mode,
                "expected": expected,
                "tag": tag,
                "fp": fingerprint(blobs) if blobs else None,
                "node": node,
                "start": time.monotonic(),
            }
            try:
                if op == "delete":
                    version = self.call(
                        tenant, node, "delete_prefix", name, expected_version=expected
                    )
                else:
                    version = self.call(
                        tenant,
                        node,
                        "put_prefix",
                        name,
                        blobs,
                        model_fingerprint=FP,
                        mode=mode,
                        expected_version=expected,
                        build_params={"tag": str(tag)},
                    ).version
                rec.update(ok=True, version=version, code=None, message="")
            except (MemdbError, Hung) as exc:
                rec.update(version=None, **_error(exc))
            rec["end"] = time.monotonic()
            self.record(**rec)
            state = self.read_back(tenant, name, rng)
            self.record(
                kind="readback", tenant=tenant, name=name, seq=seq, state=state, at=time.monotonic()
            )
            time.sleep(rng.uniform(0, 0.05))

    def read_back(self, tenant: str, name: str, rng: random.Random) -> dict | None:
        """The name's state now: None (absent) or {version, tag, fp} (fp None: unreadable)."""
        deadline = time.monotonic() + READBACK_S
        failures: dict[int, list[str]] = {}
        while True:
            node = rng.randrange(len(self.addresses))
            try:
                info = self.call(tenant, node, "get_prefix", name)
            except NotFound:
                return None
            except (MemdbError, Hung):
                if time.monotonic() > deadline:
                    return {"version": -1, "tag": None, "fp": None, "error": "no GetPrefix"}
                time.sleep(0.2)
                continue
            tag = int(info.build_params.get("tag", "0"))
            try:
                _, blobs = self.call(
                    tenant,
                    node,
                    "fetch_memory_raw",
                    name,
                    model_fingerprint=FP,
                    version=info.version,
                )
                return {"version": info.version, "tag": tag, "fp": fingerprint(blobs)}
            except (MemdbError, Hung) as exc:
                errors = failures.setdefault(info.version, [])
                errors.append(f"{_error(exc)['code']}: {str(exc)[:160]}")
                definite = sum(
                    not e.startswith(("UNAVAILABLE", "HUNG", "DEADLINE")) for e in errors
                )
                if definite >= UNREADABLE_TRIES or time.monotonic() > deadline:
                    return {"version": info.version, "tag": tag, "fp": None, "error": errors[-1]}
                time.sleep(0.5)

    # ------------------------------------------------------------ readers
    def read_loop(self, reader: int, seed: int) -> None:
        rng = random.Random(seed)
        client_id = f"w{self.spec['index']}r{reader}"
        watches = [
            threading.Thread(target=self.watch_loop, args=(client_id, t, i), daemon=True)
            for i, t in enumerate(self.clients)
        ]
        for t in watches:
            t.start()
        names = [(t, n) for t, ns in self.spec["read_names"].items() for n in ns]
        while not self.stopped():
            tenant, name = rng.choice(names)
            node = rng.randrange(len(self.addresses))
            how = "fetch" if rng.random() < 0.4 else "lookup"
            rec = {
                "kind": "read",
                "how": how,
                "client": client_id,
                "tenant": tenant,
                "name": name,
                "start": time.monotonic(),
            }
            try:
                if how == "fetch":
                    info, blobs = self.call(
                        tenant, node, "fetch_memory_raw", name, model_fingerprint=FP
                    )
                    rec.update(
                        ok=True,
                        version=info.version,
                        tag=tag_of_blobs(blobs),
                        fp=fingerprint(blobs),
                    )
                else:
                    layer = rng.randrange(SHAPE.layers)
                    q = queries_of(SHAPE, layer, 2)
                    res = self.call(
                        tenant, node, "lookup", name, layer, q, model_fingerprint=FP, k=2
                    )
                    rec.update(ok=True, version=res.version, tag=tag_of(res.out, res.lse), fp=None)
            except (MemdbError, Hung) as exc:
                rec.update(**_error(exc))
            rec["end"] = time.monotonic()
            self.record(**rec)
            time.sleep(rng.uniform(0, 0.03))
        for t in watches:
            t.join(10)

    def watch_loop(self, client_id: str, tenant: str, start_node: int) -> None:
        names = self.spec["read_names"][tenant]
        node = start_node
        while not self.stopped():
            stream = self.clients[tenant][node % len(self.addresses)].watch(names)
            stopper = threading.Thread(target=self._cancel_at_stop, args=(stream,), daemon=True)
            stopper.start()
            try:
                for ev in stream:
                    self.record(
                        kind="event",
                        client=client_id,
                        tenant=tenant,
                        name=ev.name,
                        type=ev.type,
                        version=ev.version,
                        at=time.monotonic(),
                    )
            except MemdbError as exc:
                log.info("watch through node %d ended: %s", node, exc.code.name)
            node += 1
            time.sleep(0.2)

    def _cancel_at_stop(self, stream) -> None:
        while not self.stopped():
            time.sleep(0.2)
        stream.cancel()

    def close(self) -> None:
        for clients in self.clients.values():
            for c in clients:
                c.close()
        self.record.close()


def _choose(rng: random.Random, state: dict | None) -> tuple[str, str, int]:
    """(op, mode, expected_version) for the next write, given the last state read back; a few
    are bound to be refused (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION)."""
    if state is None:
        ops = [
            (80, "create", "create", 0),
            (13, "upsert", "upsert", 0),
            (4, "update", "update", 0),
            (3, "delete", "", 0),
        ]
    else:
        v = max(state["version"], 0)
        ops = [
            (35, "update", "update", v),
            (20, "update", "update", 0),
            (10, "upsert", "upsert", 0),
            (5, "create", "create", 0),
            (5, "update", "update", max(v - 1, 1)),
            (13, "delete", "", v),
            (12, "delete", "", 0),
        ]
    return rng.choices(ops, [w for w, *_ in ops])[0][1:]


def run_worker(spec: dict) -> None:
    """The body of one load process (see the module doc)."""
    logging.basicConfig(level=logging.WARNING)
    worker = Worker(spec)
    rng = random.Random(spec["seed"])
    threads = [
        threading.Thread(target=worker.write_loop, args=(t, n, rng.randrange(1 << 30)))
        for t, ns in spec["write_names"].items()
        for n in ns
    ] + [
        threading.Thread(target=worker.read_loop, args=(i, rng.randrange(1 << 30)))
        for i in range(spec.get("readers", 1))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    worker.close()
