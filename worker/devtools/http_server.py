"""A local HTTP(S) server that plays an IM service (WeCom, DingTalk, Feishu, Telegram, a
webhook) for the tests, the demo and the bench.

Each service's emulator subclasses :class:`HttpEmulator` and overrides :meth:`answer`: it
checks the request as the real service does (format, signature, keyword) and answers with the
service's own reply. Faults are queued per test and taken in order by the next requests:

* ``fail_next(status, body)``: answer that instead (e.g. 429 with ``Retry-After``, a 5xx, or a
  200 carrying the service's error code);
* ``drop_next()``: close the connection without a reply;
* ``stall_next(seconds)``: wait that long before answering (a client timeout).

Every request is recorded (``requests``), with the time it was received. The server speaks
HTTP/1.1 with keep-alive (``connections`` counts the TCP connections), over TLS when given an
SSL context.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import LocalServer

__all__ = ["EmulatedRequest", "HttpEmulator", "Reply"]


@dataclass(frozen=True, slots=True)
class EmulatedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    received_at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True, slots=True)
class Reply:
    status: int = 200
    body: Any = field(default_factory=dict)  # JSON-encoded unless bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    def encoded(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body, ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class _Fault:
    kind: str  # reply | drop | stall
    reply: Reply | None = None
    seconds: float = 0.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: HttpEmulator


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as real servers set it: the reply is written as headers, then body; with
    # Nagle the body would wait for the client's delayed ACK (~40 ms on Linux).
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def setup(self) -> None:
        super().setup()
        with self.server.owner._lock:
            self.server.owner.connections += 1

    def _handle(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        req = EmulatedRequest(
            method=self.command,
            path=parts.path,
            query={k: v[-1] for k, v in parse_qs(parts.query).items()},
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            received_at=time.time(),
        )
        fault = owner._take_fault()
        with owner._lock:
            owner.requests.append(req)
        if fault is not None and fault.kind == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.kind == "stall":
            time.sleep(fault.seconds)
        reply = fault.reply if fault is not None and fault.reply else owner.answer(req)
        data = reply.encoded()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_POST = _handle
    do_GET = _handle

    def do_HEAD(self) -> None:
        """What a channel's warm-up sends to open its connection: 200, no body, not recorded
        and not a fault's turn (as a web server answers HEAD /)."""
        with self.server.owner._lock:  # (counted before the client can read the reply)
            self.server.owner.warmups += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


class HttpEmulator(LocalServer):
    """A service emulator on 127.0.0.1 (a free port), over TLS with ``ssl_context``."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.requests: list[EmulatedRequest] = []
        self.connections = 0
        self.warmups = 0  # HEAD requests (a channel opening its connection at start)
        self._faults: deque[_Fault] = deque()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ what a service does
    def answer(self, req: EmulatedRequest) -> Reply:
        """The service's reply to a request (override); here: 200 and ``{}``."""
        return Reply()

    # ------------------------------------------------------------------ faults
    def fail_next(
        self,
        status: int,
        body: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        count: int = 1,
    ) -> None:
        reply = Reply(status, {} if body is None else body, dict(headers or {}))
        with self._lock:
            self._faults.extend(_Fault("reply", reply) for _ in range(count))

    def drop_next(self, count: int = 1) -> None:
        with self._lock:
            self._faults.extend(_Fault("drop") for _ in range(count))

    def stall_next(self, seconds: float, count: int = 1) -> None:
        with self._lock:
            self._faults.extend(_Fault("stall", seconds=seconds) for _ in range(count))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("HttpEmulator has no port before start()")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> HttpEmulator:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
        server.owner = self
        if self.ssl_context is not None:
            server.socket = self.ssl_context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
