"""A small asyncio TCP fault proxy for tests (there is no toxiproxy on these machines).

    proxy = FaultProxy("127.0.0.1", redis.port)
    await proxy.start()
    client = Redis(port=proxy.port)
    proxy.drop_next_reply()       # the next request runs, its reply is lost
    proxy.delay(0.2)              # add latency both ways
    proxy.blackhole()             # accept, forward nothing
    proxy.reset()                 # abort every open connection (RST)
    proxy.heal()                  # back to pass-through
    await proxy.stop()

Protocol-agnostic (bytes in, bytes out): works for Redis RESP and HTTP.
Modes apply to open connections too. ``ThreadedFaultProxy`` runs one in a
background thread with its own event loop, for synchronous tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self, TypeVar

T = TypeVar("T")

_CHUNK = 65536


@dataclass(eq=False)
class _Conn:
    client_reader: asyncio.StreamReader
    client_writer: asyncio.StreamWriter
    upstream_reader: asyncio.StreamReader | None = None
    upstream_writer: asyncio.StreamWriter | None = None
    drop_pending: bool = False  # a request went up while drop_next_reply was armed
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self, rst: bool = True) -> None:
        for writer in (self.client_writer, self.upstream_writer):
            if writer is None:
                continue
            if rst:
                _set_rst(writer)
            writer.transport.abort()


def _set_rst(writer: asyncio.StreamWriter) -> None:
    """SO_LINGER 0: the close sends a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class FaultProxy:
    """Listens on ``listen_host:listen_port`` (a free port by default) and forwards
    each connection to ``target_host:target_port``, with switchable faults."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.port = listen_port
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        # faults
        self._delay = 0.0
        self._blackhole = False
        self._drop_armed = 0
        self._reset_new = False
        # counters
        self.connections_total = 0
        self.connections_refused = 0  # upstream could not be reached
        self.replies_dropped = 0
        self.bytes_up = 0  # client -> server, forwarded
        self.bytes_down = 0  # server -> client, forwarded
        self._dropped_event: asyncio.Event | None = None

    # ---- addresses
    @property
    def host(self) -> str:
        return self.listen_host

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen_host, self.port)

    def redis_url(self, db: int = 0) -> str:
        return f"redis://{self.listen_host}:{self.port}/{db}"

    def http_url(self, path: str = "") -> str:
        return f"http://{self.listen_host}:{self.port}{path}"

    @property
    def connections_active(self) -> int:
        return len(self._conns)

    @property
    def mode(self) -> str:
        if self._reset_new:
            return "reset"
        if self._blackhole:
            return "blackhole"
        if self._drop_armed:
            return "drop_next_reply"
        if self._delay:
            return "delay"
        return "pass"

    # ---- lifecycle
    async def start(self) -> Self:
        self._dropped_event = asyncio.Event()
        self._server = await asyncio.start_server(
            self._handle, self.listen_host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.abort(rst=False)
        tasks = [t for conn in conns for t in conn.tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        self._conns.clear()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ---- faults (call from the proxy's event loop)
    def delay(self, seconds: float) -> None:
        """Delay every forwarded chunk by ``seconds``, both directions."""
        self._delay = max(0.0, float(seconds))

    def blackhole(self) -> None:
        """Accept connections but forward nothing, either way (data is discarded)."""
        self._blackhole = True

    def drop_next_reply(self, count: int = 1) -> None:
        """The next ``count`` client requests are forwarded to the server; the first
        reply bytes that come back for each are discarded and that client connection
        is aborted: the command ran, the client never learns it."""
        self._drop_armed += count
        if self._dropped_event is not None:
            self._dropped_event.clear()

    def reset(self, *, persistent: bool = False) -> int:
        """Abort every open connection with an RST; with ``persistent`` new
        connections are reset too until ``heal()``. Returns how many were reset."""
        conns = list(self._conns)
        for conn in conns:
            conn.abort(rst=True)
        self._reset_new = persistent
        return len(conns)

    def heal(self) -> None:
        """Back to plain pass-through (open connections stay open)."""
        self._delay = 0.0
        self._blackhole = False
        self._drop_armed = 0
        self._reset_new = False

    async def wait_reply_dropped(self) -> None:
        """Wait until a reply has been dropped (wrap in asyncio.timeout)."""
        assert self._dropped_event is not None, "proxy not started"
        await self._dropped_event.wait()

    # ---- plumbing
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        conn = _Conn(reader, writer)
        if self._reset_new:
            conn.abort(rst=True)
            return
        self._conns.add(conn)
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port), 5.0
                )
            except (OSError, TimeoutError):
                self.connections_refused += 1
                conn.abort(rst=True)
                return
            conn.upstream_reader, conn.upstream_writer = up_reader, up_writer
            up = asyncio.create_task(self._pump(conn, upstream=True))
            down = asyncio.create_task(self._pump(conn, upstream=False))
            conn.tasks = [up, down]
            await asyncio.gather(up, down, return_exceptions=True)
        finally:
            self._conns.discard(conn)
            conn.abort(rst=False)

    async def _pump(self, conn: _Conn, *, upstream: bool) -> None:
        assert conn.upstream_reader is not None and conn.upstream_writer is not None
        src = conn.client_reader if upstream else conn.upstream_reader
        dst = conn.upstream_writer if upstream else conn.client_writer
        try:
            while True:
                data = await src.read(_CHUNK)
                if not data:
                    # EOF: pass the half-close on, then let the other direction finish
                    if dst.can_write_eof() and not dst.is_closing():
                        with contextlib.suppress(OSError):
                            dst.write_eof()
                    return
                if self._delay:
                    await asyncio.sleep(self._delay)
                if self._blackhole:
                    continue
                if upstream:
                    if self._drop_armed > 0 and not conn.drop_pending:
                        self._drop_armed -= 1
                        conn.drop_pending = True
                    self.bytes_up += len(data)
                else:
                    if conn.drop_pending:
                        # the server has answered, so the request ran: lose the reply
                        self.replies_dropped += 1
                        if self._dropped_event is not None:
                            self._dropped_event.set()
                        conn.abort(rst=False)
                        return
                    self.bytes_down += len(data)
                dst.write(data)
                await dst.drain()
        except OSError:
            # one side is gone for good: close both so the other pump ends too
            conn.abort(rst=False)


class ThreadedFaultProxy:
    """A FaultProxy on its own event loop in a daemon thread, driven synchronously."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.proxy = FaultProxy(
            target_host, target_port, listen_host=listen_host, listen_port=listen_port
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def host(self) -> str:
        return self.proxy.host

    def redis_url(self, db: int = 0) -> str:
        return self.proxy.redis_url(db)

    def http_url(self, path: str = "") -> str:
        return self.proxy.http_url(path)

    def __getattr__(self, name: str) -> object:
        # counters and read-only state (connections_total, replies_dropped, mode, ...)
        if name in {"proxy", "_loop", "_thread"}:
            raise AttributeError(name)
        return getattr(self.proxy, name)

    def start(self) -> Self:
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        ready.wait(5.0)
        asyncio.run_coroutine_threadsafe(self.proxy.start(), loop).result(5.0)
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.proxy.stop(), self._loop).result(5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        self._loop = None
        self._thread = None

    def _call(self, fn: Callable[[], T]) -> T:
        assert self._loop is not None, "proxy not started"

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(5.0)

    def delay(self, seconds: float) -> None:
        self._call(lambda: self.proxy.delay(seconds))

    def blackhole(self) -> None:
        self._call(self.proxy.blackhole)

    def drop_next_reply(self, count: int = 1) -> None:
        self._call(lambda: self.proxy.drop_next_reply(count))

    def reset(self, *, persistent: bool = False) -> int:
        return self._call(lambda: self.proxy.reset(persistent=persistent))

    def heal(self) -> None:
        self._call(self.proxy.heal)

    def wait_reply_dropped(self, timeout: float = 5.0) -> None:
        assert self._loop is not None, "proxy not started"
        asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(self.proxy.wait_reply_dropped(), timeout), self._loop
        ).result(timeout + 1.0)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
