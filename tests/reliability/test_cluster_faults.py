"""The cluster fault campaign (bench.cluster_faults): its TCP proxy's faults on a tiny echo
server, its history checker on hand-made histories, and a short campaign on real etcd, Redis
and memdb-server processes in which no acknowledged write is lost, every published version
reads back whole, and no client got a wrong answer."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from bench.cluster_faults import campaign, checker
from bench.cluster_faults.proxy import ProxyLoop

# ---------------------------------------------------------------- the proxy


@pytest.fixture
def echo_port():
    """A tiny HTTP-ish echo server: each chunk it reads is sent back; counts what it got."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    received: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn, received), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1], received
    srv.close()


def _echo(conn: socket.socket, received: list[bytes]) -> None:
    with conn:
        try:
            while data := conn.recv(65536):
                received.append(data)
                conn.sendall(data)
        except OSError:  # the proxy reset the connection
            pass


def _ask(port: int, data: bytes, timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return s.recv(65536)


@pytest.fixture
def proxies():
    loop = ProxyLoop()
    yield loop
    loop.close()


def test_a_lost_reply_reaches_the_server_and_resets_the_client(echo_port, proxies):
    port, received = echo_port
    proxy = proxies.add(port)
    assert _ask(proxy.port, b"POST /v3/kv/range HTTP/1.1\r\n\r\n").startswith(b"POST")
    proxy.lose_replies(1, ["/v3/kv/txn"])
    assert _ask(proxy.port, b"POST /v3/kv/range HTTP/1.1\r\n\r\n")  # another path passes
    with pytest.raises(ConnectionResetError):
        _ask(proxy.port, b"POST /v3/kv/txn HTTP/1.1\r\n\r\nbody")
    assert received[-1] == b"POST /v3/kv/txn HTTP/1.1\r\n\r\nbody"  # the request went through
    assert proxy.lost_replies == 1 and proxy.replies_left_to_lose() == 0
    assert _ask(proxy.port, b"POST /v3/kv/txn HTTP/1.1\r\n\r\n")  # only one was lost


def test_a_blackhole_holds_every_byte_until_healed_and_delay_delays(echo_port, proxies):
    port, received = echo_port
    proxy = proxies.add(port)
    proxy.set_mode("blackhole")
    n = len(received)
    with pytest.raises(TimeoutError):
        _ask(proxy.port, b"GET /x HTTP/1.1\r\n\r\n", timeout=0.5)
    assert len(received) == n  # nothing crossed the partition
    proxy.heal()
    proxy.set_mode("delay", 0.3)
    t = time.monotonic()
    assert _ask(proxy.port, b"GET /y HTTP/1.1\r\n\r\n")
    assert time.monotonic() - t >= 0.5  # held both ways
    proxy.set_mode("refuse")
    with pytest.raises((ConnectionResetError, ConnectionError)):
        _ask(proxy.port, b"GET /z HTTP/1.1\r\n\r\n")
    proxy.heal()
    assert _ask(proxy.port, b"GET /w HTTP/1.1\r\n\r\n")


# ---------------------------------------------------------------- the checker


def _write(seq, op, tag, ok=True, version=None, code=None, message="", expected=0):
    return {"kind": "write", "tenant": "t", "name": "n", "seq": seq, "op": op, "mode": op,
            "expected": expected, "tag": tag, "fp": None if tag is None else f"fp{tag}",
            "node": 0, "start": float(seq), "end": seq + 0.5, "ok": ok, "version": version,
            "code": code, "message": message}  # fmt: skip


def _back(seq, version=None, tag=None, readable=True):
    state = None if tag is None else {"version": version, "tag": tag,
                                      "fp": f"fp{tag}" if readable else None}  # fmt: skip
    return {"kind": "readback", "tenant": "t", "name": "n", "seq": seq, "state": state}


def _published(version, tag, readable=True, current=True):
    return {"kind": "published", "tenant": "t", "name": "n", "version": version,
            "current": current, "tag": tag, "fp": f"fp{tag}" if readable else None,
            "error": "" if readable else "NotFound: blob missing"}  # fmt: skip


GOOD = [
    _write(0, "create", 1, version=1), _back(0, 1, 1),
    _write(1, "update", 2, version=2, expected=1), _back(1, 2, 2),
    _write(2, "update", 3, ok=False, code="FAILED_PRECONDITION", expected=1), _back(2, 2, 2),
    _write(3, "update", 4, ok=False, code="UNAVAILABLE", message="etcd ... may have been applied"),
    _back(3, 3, 4),
    _write(4, "delete", None, version=3), _back(4),
    _published(0, 0, current=False)
]  # fmt: skip


def test_the_checker_accepts_a_history_where_every_answer_is_right():
    v = checker.check([r for r in GOOD if r["kind"] != "published"] + [{"kind": "end"}])
    assert (v.lost_acknowledged, v.wrong_answers, v.unreadable_versions, v.bad_reads) == (0,) * 4
    assert v.ambiguous == v.ambiguous_applied == 1 and v.writes == 5, v.problems


def test_the_checker_finds_a_lost_write_a_wrong_answer_and_an_unreadable_version():
    lost = [_write(0, "create", 1, version=1), _back(0)]  # OK, but the name is absent
    assert checker.check(lost).lost_acknowledged == 1
    wrong = [_write(0, "create", 1, ok=False, code="ALREADY_EXISTS"), _back(0, 1, 1)]
    assert checker.check(wrong).wrong_answers == 1  # an error for a write that happened
    false_refusal = [_write(0, "create", 1, ok=False, code="ALREADY_EXISTS"), _back(0)]
    assert checker.check(false_refusal).wrong_answers == 1  # it was absent
    not_found = [_write(0, "create", 1, version=1), _back(0, 1, 1),
                 _write(1, "delete", None, ok=False, code="NOT_FOUND"), _back(1)]  # fmt: skip
    assert checker.check(not_found).wrong_answers == 1  # a delete that happened
    unknown_wording = [_write(0, "create", 1, ok=False, code="UNAVAILABLE", message="retry"),
                       _back(0, 1, 1)]  # fmt: skip
    assert checker.check(unknown_wording).wrong_answers == 1
    twice = [_write(0, "upsert", 1, version=1), _back(0, 1, 1),
             _write(1, "update", 2, version=3), _back(1, 3, 2)]  # fmt: skip
    assert checker.check(twice).wrong_answers == 1  # its lost reply made it publish twice
    no_blobs = [_write(0, "create", 1, ok=False, code="ALREADY_EXISTS"),
                _back(0, 1, 1, readable=False), _published(1, 1, readable=False)]  # fmt: skip
    v = checker.check(no_blobs)
    assert v.unreadable_versions == 1 and v.unreadable_reads == 1 and v.wrong_answers == 1
    paused = [_write(0, "create", 1, version=1), _back(0, 1, 1, readable=False)]
    v = checker.check(paused)  # published OK after the collector took its blobs
    assert v.lost_acknowledged == 1 and v.unreadable_versions == 1
    stale = [_write(0, "create", 1, version=1), _back(0, 1, 1),
             _write(1, "update", 2, version=2), _back(1, 2, 2),
             {"kind": "event", "client": "c", "tenant": "t", "name": "n", "type": "put",
              "version": 2, "at": 1.6},
             {"kind": "read", "how": "lookup", "client": "c", "tenant": "t", "name": "n",
              "start": 1.7, "end": 1.8, "ok": True, "version": 1, "tag": 1,
              "fp": None}]  # fmt: skip
    assert checker.check(stale).stale_reads == 1


# ---------------------------------------------------------------- a short campaign


def test_a_short_fault_campaign_loses_no_acknowledged_write_and_gives_no_wrong_answer(tmp_path):
    result = campaign.run(tmp_path, seed=3, target_faults=18, max_seconds=50.0)
    assert result["faults"] >= 12 and len(result["fault_kinds"]) >= 5, result["fault_kinds"]
    assert result["acknowledged_writes"] > 12 and result["reads_checked"] > 30, result
    figures = {k: result[k] for k in ("lost_acknowledged", "unreadable_versions", "wrong_answers",
                                      "bad_reads", "stale_reads", "usage_mismatches",
                                      "final_mismatches")}  # fmt: skip
    assert not any(figures.values()), (figures, result["problems"])
