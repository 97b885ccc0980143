"""A TCP proxy in front of one etcd member, switchable at run time: the network faults of the
fault campaign between one memdb node and etcd.

`Proxy(upstream_port)` listens on a free loopback port and forwards each connection to the
upstream. Its `mode` decides what the wire does, changed from any thread while traffic flows:

- `pass`: bytes go both ways as they come;
- `delay`: every chunk, either way, is held `delay_s` before it is forwarded (order kept);
- `blackhole`: a partition: nothing is forwarded either way, connections (new ones too) hang
  until `heal()`, which resets them (their held bytes are never delivered);
- `refuse`: new connections are reset at once and open ones are reset.

`lose_replies(n, paths)` arms a lost reply: the next `n` replies to HTTP requests whose path is
in `paths` (all paths when empty) are dropped after the request was forwarded, and both sides
of that connection are reset, so the client sees a transport error after sending while the
server applied the request. Each dropped reply is counted in `lost_replies`. The proxy sees the
request path because etcd's JSON gateway speaks HTTP/1.1 in the clear, one request at a time
per connection. `ProxyLoop` runs every proxy of a campaign in one asyncio loop on a thread.

Knows nothing of etcd beyond HTTP/1.1 request lines, and nothing of memdb.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
from collections.abc import Iterable

log = logging.getLogger(__name__)

MODES = ("pass", "delay", "blackhole", "refuse")
_METHODS = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ")


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): the peer sees 'connection reset', not a clean close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class _Conn:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client, self.upstream = client, upstream
        self.path = b""  # the path of the request last seen on this connection
        self.closed = False

    def reset(self) -> None:
        if not self.closed:
            self.closed = True
            _reset(self.client)
            _reset(self.upstream)


class Proxy:
    """One listening port forwarding to 127.0.0.1:`upstream_port` (see the module doc)."""

    def __init__(self, upstream_port: int, name: str = "") -> None:
        self.upstream_port = upstream_port
        self.name = name or f"proxy->{upstream_port}"
        self.port = 0
        self.mode = "pass"
        self.delay_s = 0.0
        self.lost_replies = 0
        self._lose: list = [0, ()]  # [replies still to drop, paths]
        self._conns: set[_Conn] = set()
        self._healed = asyncio.Event()
        self._healed.set()
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.reset()

    # ------------------------------------------------------------ switches (any thread)
    def set_mode(self, mode: str, delay_s: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"proxy mode must be one of {MODES}, got {mode!r}")
        self._call(self._set_mode, mode, delay_s)

    def heal(self) -> None:
        """Back to pass-through; connections held by a partition are reset."""
        self.set_mode("pass")

    def lose_replies(self, n: int, paths: Iterable[str] = ()) -> None:
        with self._lock:
            self._lose = [n, tuple(p.encode() for p in paths)]

    def replies_left_to_lose(self) -> int:
        with self._lock:
            return self._lose[0]

    def _call(self, fn, *args) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError(f"{self.name} is not started")
        done = threading.Event()

        def run() -> None:
            try:
                fn(*args)
            finally:
                done.set()

        loop.call_soon_threadsafe(run)
        done.wait(10)

    def _set_mode(self, mode: str, delay_s: float) -> None:
        was = self.mode
        self.mode, self.delay_s = mode, delay_s
        if mode in ("blackhole", "refuse"):
            self._healed.clear()
        if mode == "refuse" or (was in ("blackhole", "refuse") and mode != was):
            for conn in list(self._conns):  # held or refused connections: reset
                conn.reset()
        if mode not in ("blackhole", "refuse"):
            self._healed.set()

    # ------------------------------------------------------------ the wire
    def _take_lost_reply(self, conn: _Conn) -> bool:
        with self._lock:
            left, paths = self._lose
            if left <= 0 or not conn.path or (paths and conn.path not in paths):
                return False
            self._lose[0] -= 1
            self.lost_replies += 1
        log.info("%s: reply to %s dropped", self.name, conn.path.decode(errors="replace"))
        return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            _reset(writer)  # the member is down: the client sees a reset, as with no proxy
            return
        conn = _Conn(writer, up_writer)
        self._conns.add(conn)
        try:
            await asyncio.gather(
                self._pipe(conn, reader, up_writer, requests=True),
                self._pipe(conn, up_reader, writer, requests=False),
            )
        finally:
            self._conns.discard(conn)
            conn.reset()

    async def _pipe(
        self, conn: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, requests: bool
    ) -> None:
        try:
            while not conn.closed:
                data = await src.read(65536)
                if not data:
                    break
                if requests and data.startswith(_METHODS):
                    conn.path = data.split(b" ", 2)[1].split(b"?", 1)[0]
                while self.mode == "blackhole" and not conn.closed:
                    await self._healed.wait()  # a partition holds the bytes
                if conn.closed or self.mode == "refuse":
                    break
                if self.mode == "delay" and self.delay_s > 0:
                    await asyncio.sleep(self.delay_s)
                if not requests and self._take_lost_reply(conn):
                    break  # the request went through; its reply never arrives
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            conn.reset()


class ProxyLoop:
    """An asyncio loop on a daemon thread that runs proxies (start them with `add`)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxies", daemon=True)
        self._thread.start()
        self.proxies: list[Proxy] = []

    def add(self, upstream_port: int, name: str = "") -> Proxy:
        proxy = Proxy(upstream_port, name)
        asyncio.run_coroutine_threadsafe(proxy.start(), self._loop).result(10)
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        for proxy in self.proxies:
            asyncio.run_coroutine_threadsafe(proxy.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
