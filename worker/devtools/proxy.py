"""A TCP latency proxy for benchmarks and tests: a slow link on the loopback.

:class:`LatencyProxy` listens on ``127.0.0.1:<free port>`` and forwards every connection to
one target, delaying each chunk by ``rtt_ms / 2`` in each direction. Each direction is a
FIFO: a chunk is written at its arrival time plus the delay, never before an earlier chunk,
so bytes keep their order. It only forwards bytes, so TLS (implicit or STARTTLS) passes
through untouched.

The TCP handshake happens in the kernel, which a user-space proxy cannot delay, so it is
emulated (``emulate_handshake=True``, the default): the connection to the target is opened
1.5 round trips after the client connected (SYN, SYN-ACK, ACK) and nothing the client wrote
reaches the target before then. A client therefore waits for the greeting of a server that
speaks first 2 round trips after its ``connect()``, as on a real link.

Round trips are counted, per connection and in total. A *turn* is a flight of data from the
server to the client that follows data from the client (opening the connection counts as
the client's): the client waited for the server once. ``round_trips`` is the turns plus one
per emulated handshake. A pipelined SMTP transaction (MAIL, RCPT, DATA written together; then
the message) is 2 turns; one with ``BDAT ... LAST`` is 1.

A side that half-closes (EOF) is closed entirely, after the delay; SMTP never half-closes.

Timer resolution: an event loop on epoll (asyncio's default) rounds every wait up to the next
millisecond, so each one-way delay is the asked delay plus 0 to ~1 ms. :func:`main` (and so
:class:`ProxyProcess`) runs its loop on ``select()``, which waits to the microsecond: the
delay is then exact to ~0.1 ms (timer slack and scheduling), never less than asked.

:class:`ProxyProcess` runs the proxy in its own process (``python -m worker.devtools.proxy``),
so that a benchmark's other threads cannot delay it through the GIL. It prints one JSON line
with its port, answers ``stats`` on stdin with a JSON line, and exits when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import selectors
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import IO

from . import LocalServer

__all__ = ["ConnectionStats", "LatencyProxy", "ProxyProcess", "ProxyStats"]

HOST = "127.0.0.1"
# Stop reading a side while this much of its data waits to be delivered (bounded memory).
HIGH_WATER = 4 * 1024 * 1024
LOW_WATER = 1024 * 1024
_CLOCK_RESOLUTION = time.get_clock_info("monotonic").resolution  # asyncio's loop.time()


@dataclass(slots=True)
class ConnectionStats:
    """What went through one proxied connection."""

    turns: int = 0
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client
    handshake: bool = False
    open: bool = True


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """Totals over every connection the proxy accepted so far."""

    connections: int
    open_connections: int
    turns: int
    round_trips: int
    bytes_up: int
    bytes_down: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Direction:
    """One direction of one connection: a FIFO of chunks, each due at arrival + delay."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, source: _Side) -> None:
        self._loop = loop
        self._delay = delay
        self._source = source  # whose reading is paused while too much is pending
        self._pending: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self.sink: asyncio.Transport | None = None  # None until connected
        self.not_before = 0.0  # nothing is delivered before this (handshake emulation)
        self.closed = False

    def push(self, data: bytes | None) -> None:
        """Queue ``data`` (None: close the sink) for delivery at now + delay."""
        if self.closed:
            return
        due = max(self._loop.time() + self._delay, self.not_before)
        self._pending.append((due, data))
        if data is not None:
            self._pending_bytes += len(data)
            if self._pending_bytes > HIGH_WATER:
                self._source.pause()
        if len(self._pending) == 1:
            self._schedule()

    def _schedule(self) -> None:
        if self._timer is None and self._pending and self.sink is not None:
            self._timer = self._loop.call_at(self._pending[0][0], self._flush)

    def attach(self, sink: asyncio.Transport) -> None:
        self.sink = sink
        self._schedule()

    def _flush(self) -> None:
        self._timer = None
        sink = self.sink
        if sink is None or self.closed:
            return
        # call_at() may run a callback up to one clock tick early.
        now = self._loop.time() + _CLOCK_RESOLUTION
        while self._pending and self._pending[0][0] <= now:
            _, data = self._pending.popleft()
            if data is None:
                self.close()
                sink.close()  # flushes what was written before
                return
            self._pending_bytes -= len(data)
            sink.write(data)
        if self._pending_bytes < LOW_WATER:
            self._source.resume()
        self._schedule()

    def close(self) -> None:
        self.closed = True
        self._pending.clear()
        self._pending_bytes = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Side(asyncio.Protocol):
    """The protocol of one end (the accepted client or the connection to the target)."""

    def __init__(self, link: _Link, name: str) -> None:
        self.link = link
        self.name = name  # "client" or "server"
        self.transport: asyncio.Transport | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.name == "client":
            self.link.start(transport)

    def data_received(self, data: bytes) -> None:
        self.link.received(self.name, data)

    def eof_received(self) -> bool:
        self.link.ended(self.name)
        return False  # close our end; the other end closes once the delay is over

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.link.ended(self.name)

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()


class _Link:
    """One proxied connection: two sides, two delayed directions, the turn counter."""

    def __init__(self, proxy: LatencyProxy) -> None:
        self.proxy = proxy
        loop = proxy.loop
        self.stats = ConnectionStats(handshake=proxy.emulate_handshake)
        self.client = _Side(self, "client")
        self.server = _Side(self, "server")
        self.up = _Direction(loop, proxy.delay, self.client)
        self.down = _Direction(loop, proxy.delay, self.server)
        self.client_spoke = True  # opening the connection is the client's move
        self._ended: set[str] = set()
        self._connector: asyncio.Task[None] | None = None

    def start(self, client_transport: asyncio.Transport) -> None:
        self.down.attach(client_transport)
        if self.proxy.emulate_handshake:
            self.up.not_before = self.proxy.loop.time() + 3 * self.proxy.delay
        self._connector = self.proxy.loop.create_task(self._connect())

    async def _connect(self) -> None:
        loop = self.proxy.loop
        wait = self.up.not_before - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            transport, _ = await loop.create_connection(
                lambda: self.server, self.proxy.target_host, self.proxy.target_port
            )
        except OSError:
            self.ended("server")
            return
        if "client" in self._ended and self.up.closed:
            transport.close()
            return
        self.up.attach(transport)

    def received(self, name: str, data: bytes) -> None:
        if name == "client":
            self.client_spoke = True
            self.stats.bytes_up += len(data)
            self.up.push(data)
        else:
            if self.client_spoke:
                self.client_spoke = False
                self.stats.turns += 1
                self.proxy._turns += 1
            self.stats.bytes_down += len(data)
            self.down.push(data)

    def ended(self, name: str) -> None:
        if name in self._ended:
            return
        self._ended.add(name)
        # The other side closes once what was sent before the close has arrived.
        (self.up if name == "client" else self.down).push(None)
        if len(self._ended) == 2:
            self.stats.open = False
            self.proxy._links.discard(self)

    def abort(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
        for direction in (self.up, self.down):
            direction.close()
        for side in (self.client, self.server):
            if side.transport is not None:
                side.transport.abort()
        self.stats.open = False


class LatencyProxy:
    """An asyncio TCP proxy adding ``rtt_ms / 2`` each way; see the module docstring."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        rtt_ms: float,
        port: int = 0,
        emulate_handshake: bool = True,
    ) -> None:
        if rtt_ms < 0:
            raise ValueError("rtt_ms must be >= 0")
        self.target_host = target_host
        self.target_port = target_port
        self.rtt_ms = rtt_ms
        self.delay = rtt_ms / 2000.0
        self.emulate_handshake = emulate_handshake
        self._port = port
        self._server: asyncio.AbstractServer | None = None
        self._links: set[_Link] = set()
        self._all: list[ConnectionStats] = []
        self._turns = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("LatencyProxy has no loop before start()")
        return self._loop

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LatencyProxy has no port before start()")
        return self._port

    @property
    def connections(self) -> list[ConnectionStats]:
        """Per-connection figures, in the order the connections were accepted."""
        return list(self._all)

    @property
    def turns(self) -> int:
        return self._turns

    def stats(self) -> ProxyStats:
        conns = self._all
        return ProxyStats(
            connections=len(conns),
            open_connections=sum(1 for c in conns if c.open),
            turns=self._turns,
            round_trips=self._turns + sum(1 for c in conns if c.handshake),
            bytes_up=sum(c.bytes_up for c in conns),
            bytes_down=sum(c.bytes_down for c in conns),
        )

    async def start(self) -> LatencyProxy:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(self._accept, HOST, self._port)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    def _accept(self) -> asyncio.Protocol:
        link = _Link(self)
        self._links.add(link)
        self._all.append(link.stats)
        return link.client

    async def close(self) -> None:
        """Stop listening and abort every proxied connection."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        self._links.clear()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> LatencyProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# ---------------------------------------------------------------------- in its own process
class ProxyProcess(LocalServer):
    """:class:`LatencyProxy` in a subprocess (no GIL shared with the caller's threads)."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        rtt_ms: float,
        emulate_handshake: bool = True,
    ) -> None:
        self.target = (target_host, target_port)
        self.rtt_ms = rtt_ms
        self.emulate_handshake = emulate_handshake
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> ProxyProcess:
        target = f"{self.target[0]}:{self.target[1]}"
        argv = [sys.executable, "-m", "worker.devtools.proxy", "--target", target]
        argv += ["--rtt-ms", str(self.rtt_ms)]
        if not self.emulate_handshake:
            argv.append("--no-handshake")
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        line = self._readline()
        self.port = int(json.loads(line)["port"])
        return self

    def _readline(self) -> str:
        assert self._proc is not None
        out: IO[str] | None = self._proc.stdout
        assert out is not None
        line = out.readline()
        if not line:
            code = self._proc.wait(timeout=5)
            raise RuntimeError(f"latency proxy exited ({code}) without answering")
        return line

    def stats(self) -> ProxyStats:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write("stats\n")
        self._proc.stdin.flush()
        return ProxyStats(**json.loads(self._readline()))

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def _serve(args: argparse.Namespace) -> None:
    host, _, port = args.target.rpartition(":")
    proxy = LatencyProxy(
        host, int(port), rtt_ms=args.rtt_ms, emulate_handshake=not args.no_handshake
    )
    await proxy.start()
    print(json.dumps({"port": proxy.port}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            if line.strip() == b"stats":
                print(json.dumps(proxy.stats().as_dict()), flush=True)
    finally:
        await proxy.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="TCP latency proxy on 127.0.0.1 (see module doc)")
    p.add_argument("--target", required=True, metavar="HOST:PORT")
    p.add_argument("--rtt-ms", type=float, required=True)
    p.add_argument("--no-handshake", action="store_true", help="do not emulate the handshake")
    args = p.parse_args(argv)
    # select() takes its timeout in microseconds; epoll (the default) in milliseconds.
    with asyncio.Runner(
        loop_factory=lambda: asyncio.SelectorEventLoop(selectors.SelectSelector())
    ) as runner:
        runner.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
