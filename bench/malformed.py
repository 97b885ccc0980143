"""RSS of a server process under requests that gRPC cannot deserialize.

`python -m bench.malformed [--n 20000] [--bare [--patched]]` starts a real memdb-server
process on 127.0.0.1 (or, with --bare, a plain sync grpcio health server in a child process),
sends `--n` malformed requests (bytes that are not a protobuf message of the method's request
type, no API key), and reads the server's RSS from /proc before and after. Prints the growth
per request and writes bench/results/malformed_<method>.json (or malformed_bare[_patched].json).

Why grpcio's sync server (1.85.1) leaks ~19 KB per such request: `_receive_message` aborts the
call with INTERNAL when deserialization fails (a status is sent); the pool thread waiting in
`_unary_request` then sees the client closed without a request and calls `_abort` a second
time. That second SendStatusFromServer batch is refused by the core (the call already has its
status), and cygrpc does not release the batch tag it INCREF'd for it, so the tag, the RPC state
and the core call (its arena) are never freed. `--bare --patched` skips `_abort` once a status
was sent and the leak is gone. memdb's asyncio server does not take that path (and answers
INVALID_ARGUMENT itself, see memdb_server.interceptors).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

import memdb
from memdb_server.process import server_process

RESULTS = Path(__file__).resolve().parent / "results"
METHOD = "/memdb.v1.MemoryService/Lookup"
HEALTH = "/grpc.health.v1.Health/Check"
BAD = b"\xff" * 64  # field 31, wire type 7: not a valid protobuf message

_BARE = """
import sys, time
from concurrent import futures
import grpc
from grpc import _server
from grpc_health.v1 import health, health_pb2_grpc
if sys.argv[1:] == ["patched"]:
    abort = _server._abort
    def _abort(state, call, code, details):
        if not state.statused:
            abort(state, call, code, details)
    _server._abort = _abort
s = grpc.server(futures.ThreadPoolExecutor(8))
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), s)
port = s.add_insecure_port("127.0.0.1:0")
s.start()
print(port, flush=True)
time.sleep(3600)
"""


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def send_malformed(address: str, method: str, n: int) -> dict[str, int]:
    """Send n malformed unary requests; count the status codes that come back."""
    codes: dict[str, int] = {}
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
        for _ in range(n):
            try:
                call(BAD, timeout=10)
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
            codes[code] = codes.get(code, 0) + 1
    return codes


def measure(address: str, pid: int, method: str, n: int, warmup: int) -> dict:
    send_malformed(address, method, warmup)
    time.sleep(0.5)
    before = rss_kb(pid)
    start = time.perf_counter()
    codes = send_malformed(address, method, n)
    seconds = time.perf_counter() - start
    time.sleep(0.5)
    after = rss_kb(pid)
    return {
        "requests": n,
        "warmup": warmup,
        "codes": codes,
        "rss_before_mb": round(before / 1024, 1),
        "rss_after_mb": round(after / 1024, 1),
        "growth_mb": round((after - before) / 1024, 1),
        "growth_kb_per_request": round((after - before) / n, 3),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20_000, help="malformed requests to send")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--bare", action="store_true", help="a bare grpcio health server instead")
    ap.add_argument("--patched", action="store_true", help="--bare without the double abort")
    ap.add_argument("--method", default=METHOD, help=f"memdb-server only; e.g. {HEALTH}")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    if args.bare:
        argv = [sys.executable, "-c", _BARE] + (["patched"] if args.patched else [])
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            port = int(proc.stdout.readline())
            result = measure(f"127.0.0.1:{port}", proc.pid, HEALTH, args.n, args.warmup)
        finally:
            proc.kill()
            proc.wait()
        result["server"] = "bare grpcio health server (sync)" + (
            ", _abort skipped once statused" if args.patched else ""
        )
    else:
        with tempfile.TemporaryDirectory() as tmp, server_process(Path(tmp)) as s:
            result = measure(s.address, s.proc.pid, args.method, args.n, args.warmup)
        result["server"] = f"memdb-server {memdb.__version__}"
    result["grpcio"] = grpc.__version__
    result["method"] = HEALTH if args.bare else args.method
    print(json.dumps(result, indent=1))
    if not args.no_write:
        name = result["method"].rsplit("/", 1)[-1].lower()
        if args.bare:
            name = "bare_patched" if args.patched else "bare"
        (RESULTS / f"malformed_{name}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
