"""An aiosmtpd SMTP server for tests, with recording and fault injection.

:class:`SMTPTestServer` runs aiosmtpd's ``SMTP`` protocol on its own event loop in a
background thread, listening on 127.0.0.1 (a free port chosen by the kernel at the first
start and kept for every restart). It records every accepted message and can be told,
from the test thread while it runs, to refuse or drop transactions.

Why not ``aiosmtpd.controller.Controller``: its start-up probe opens a connection (which
would count in ``connections``), a stopped controller cannot be started again (its loop
is closed), and its ``stop()`` leaves client connections open. Here ``stop()`` aborts
every open connection, so a client holding a warm connection sees the server go away,
and ``start()`` listens again on the same port.

Counters (all thread-safe, read them as attributes):

- ``connections``: TCP connections accepted;
- ``transactions``: ``MAIL FROM`` commands received (a mail transaction begins);
- ``failed``: replies from fault injection (any stage, ``fail_next`` or random);
- ``dropped``: connections aborted without a reply at the end of DATA;
- ``logins``: successful AUTH exchanges.

Fault order at the end of DATA: ``drop_next``, then ``fail_next("DATA", ...)``, then the
random faults (drop with ``drop_rate``, else fail with ``fail_rate``). A ``RCPT`` fault
applies to every ``RCPT TO`` of one transaction, so the client sees all recipients
refused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email
import email.policy
import random
import ssl
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Literal, cast

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from . import LocalServer

__all__ = ["Received", "SMTPTestServer", "Stage", "TLSMode"]

Stage = Literal["MAIL", "RCPT", "DATA"]
TLSMode = Literal["none", "ssl", "starttls"]

HOST = "127.0.0.1"
SERVER_HOSTNAME = "smtp.test"  # skips aiosmtpd's socket.getfqdn(), which may hit DNS
START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 10.0
_UNDECIDED = object()
_RCPT_FAULT_ATTR = "_test_rcpt_fault"


@dataclass(frozen=True)
class Received:
    """One message the server accepted (250 to the end of DATA).

    ``data`` holds the bytes as received (CRLF line ends, dot-stuffing removed);
    ``message`` is parsed from them with LF line ends and ``email.policy.default``.
    """

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    message: EmailMessage
    received_at: float


class _QuietSession(Session):
    """aiosmtpd's Session without the log warning that every successful AUTH triggers.

    ``SMTP.smtp_AUTH`` itself sets the deprecated ``login_data``, which logs
    "Session.login_data is deprecated" at WARNING level on each login.
    """

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _TestSMTP(SMTP):
    """aiosmtpd's SMTP that registers its open connections with the owning server."""

    def __init__(self, owner: SMTPTestServer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner

    def _create_session(self) -> Session:
        return _QuietSession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called a second time, on the TLS transport, after STARTTLS.
        super().connection_made(transport)
        self._owner._live.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._owner._live.discard(self)
        super().connection_lost(error)

    def abort(self) -> None:
        """Close the connection at once, without a reply (and without TLS close_notify)."""
        for transport in (self.transport, self._original_transport):
            if transport is not None:
                cast(asyncio.Transport, transport).abort()


class _RecordingHandler:
    """aiosmtpd handler: the hooks consult the owner's faults and record messages."""

    def __init__(self, owner: SMTPTestServer) -> None:
        self._owner = owner

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # With a 5-argument handle_EHLO aiosmtpd no longer records the client's name
        # itself; without this, MAIL answers "503 Error: send HELO first".
        session.host_name = hostname
        if self._owner.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        reply = self._owner._on_mail()
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = getattr(envelope, _RCPT_FAULT_ATTR, _UNDECIDED)
        if reply is _UNDECIDED:
            reply = self._owner._on_first_rcpt()
            setattr(envelope, _RCPT_FAULT_ATTR, reply)
        if reply is not None:
            return cast(str, reply)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        action, reply = self._owner._on_end_of_data()
        if action == "drop":
            cast(_TestSMTP, server).abort()
            # connection_lost() cancels this very task; nothing may be written back.
            never = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(never, STOP_TIMEOUT_S)
            return "421 4.4.2 connection dropped"
        if action == "fail":
            assert reply is not None
            return reply
        data = envelope.original_content or b""
        # Parsed with LF line ends, so that get_content() gives text as the sender wrote it.
        message = email.message_from_bytes(
            data.replace(b"\r\n", b"\n"), policy=email.policy.default
        )
        self._owner._record(
            Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                data=bytes(data),
                message=message,
                received_at=time.time(),
            )
        )
        return "250 2.0.0 OK queued"


class SMTPTestServer(LocalServer):
    """An SMTP server on 127.0.0.1 in a background thread; see the module docstring."""

    def __init__(
        self,
        *,
        tls: TLSMode = "none",
        ssl_context: ssl.SSLContext | None = None,
        auth: dict[str, str] | None = None,
        pipelining: bool = False,
        port: int | None = None,
        timeout: float = 60.0,
    ) -> None:
        if tls not in ("none", "ssl", "starttls"):
            raise ValueError(f"tls must be 'none', 'ssl' or 'starttls', not {tls!r}")
        if tls != "none" and ssl_context is None:
            raise ValueError(f"tls={tls!r} needs a server ssl_context")
        self.tls: TLSMode = tls
        self.ssl_context = ssl_context
        self.auth: dict[str, str] | None = dict(auth) if auth is not None else None
        self.pipelining = pipelining
        self.idle_timeout = timeout
        self._port = port

        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._messages: list[Received] = []
        self._faults: dict[Stage, collections.deque[str]] = {
            "MAIL": collections.deque(),
            "RCPT": collections.deque(),
            "DATA": collections.deque(),
        }
        self._drops = 0
        self._random_fail_rate = 0.0
        self._random_drop_rate = 0.0
        self._random_reply = "451 4.3.0 try again later"
        self._rng = random.Random()
        self._auth_reject: str | None = None

        self.connections = 0
        self.transactions = 0
        self.failed = 0
        self.dropped = 0
        self.logins = 0

        self._handler = _RecordingHandler(self)
        self._live: set[_TestSMTP] = set()  # touched only on the server's loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- properties -------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("SMTPTestServer has no port before start()")
        return self._port

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def messages(self) -> list[Received]:
        """A snapshot of the accepted messages, oldest first."""
        with self._lock:
            return list(self._messages)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<SMTPTestServer {HOST}:{self._port} tls={self.tls} {state}>"

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> SMTPTestServer:
        """Listen (again) on the same port; returns once connections are accepted."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        outcome: dict[str, Any] = {}
        thread = threading.Thread(
            target=self._serve,
            args=(loop, ready, outcome),
            name=f"smtp-test-server-{self._port or 'new'}",
            daemon=True,
        )
        thread.start()
        if not ready.wait(START_TIMEOUT_S):
            loop.call_soon_threadsafe(loop.stop)
            thread.join(STOP_TIMEOUT_S)
            raise RuntimeError(f"SMTP test server did not start within {START_TIMEOUT_S} s")
        if "error" in outcome:
            thread.join(STOP_TIMEOUT_S)
            raise RuntimeError(f"SMTP test server could not listen: {outcome['error']!r}")
        self._loop, self._thread = loop, thread
        return self

    def stop(self) -> None:
        """Stop listening and abort every open connection (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError("SMTP test server thread did not stop")
        self._loop = self._thread = None

    close = stop

    def _serve(
        self, loop: asyncio.AbstractEventLoop, ready: threading.Event, outcome: dict[str, Any]
    ) -> None:
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(
                loop.create_server(
                    self._make_protocol,
                    host=HOST,
                    port=self._port or 0,
                    ssl=self.ssl_context if self.tls == "ssl" else None,
                    reuse_address=True,
                )
            )
        except Exception as exc:
            outcome["error"] = exc
            loop.close()
            ready.set()
            return
        self._port = server.sockets[0].getsockname()[1]
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._shutdown(server))
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()

    async def _shutdown(self, server: asyncio.AbstractServer) -> None:
        server.close()
        for protocol in list(self._live):
            protocol.abort()
        for _ in range(3):  # let connection_lost() callbacks run
            await asyncio.sleep(0)
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        self._live.clear()

    def _make_protocol(self) -> SMTP:
        with self._lock:
            self.connections += 1
        authenticated = self.auth is not None
        smtp = _TestSMTP(
            self,
            self._handler,
            loop=asyncio.get_running_loop(),
            hostname=SERVER_HOSTNAME,
            enable_SMTPUTF8=True,
            timeout=self.idle_timeout,
            tls_context=self.ssl_context if self.tls == "starttls" else None,
            require_starttls=self.tls == "starttls",
            # aiosmtpd counts only STARTTLS as TLS: with implicit TLS (and for plain test
            # servers) AUTH must be allowed without it or it is never offered. Servers
            # without ``auth`` offer no AUTH (until STARTTLS, where logins then fail).
            auth_require_tls=self.tls == "starttls" or not authenticated,
            authenticator=self._authenticate,
        )
        if authenticated:
            # Set here rather than passed: auth_required=True with auth_require_tls=False
            # makes aiosmtpd call warnings.warn(), an error under filterwarnings=error
            # (and warnings.catch_warnings() is not thread-safe).
            smtp._auth_required = True
        return smtp

    # -- hooks called on the server's loop --------------------------------------------

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if self.auth is None or not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        with self._lock:
            if self._auth_reject is not None:
                return AuthResult(success=False, handled=False, message=self._auth_reject)
            username = data.login.decode("utf-8", "replace")
            password = data.password.decode("utf-8", "replace")
            if self.auth.get(username) != password:
                return AuthResult(success=False, handled=False)
            self.logins += 1
        return AuthResult(success=True, auth_data=username)

    def _on_mail(self) -> str | None:
        with self._lock:
            self.transactions += 1
            return self._take_fault("MAIL")

    def _on_first_rcpt(self) -> str | None:
        with self._lock:
            return self._take_fault("RCPT")

    def _on_end_of_data(self) -> tuple[Literal["accept", "fail", "drop"], str | None]:
        with self._lock:
            if self._drops > 0:
                self._drops -= 1
                self.dropped += 1
                return "drop", None
            reply = self._take_fault("DATA")
            if reply is not None:
                return "fail", reply
            if self._random_drop_rate or self._random_fail_rate:
                draw = self._rng.random()
                if draw < self._random_drop_rate:
                    self.dropped += 1
                    return "drop", None
                if draw < self._random_drop_rate + self._random_fail_rate:
                    self.failed += 1
                    return "fail", self._random_reply
            return "accept", None

    def _take_fault(self, stage: Stage) -> str | None:
        queue = self._faults[stage]
        if not queue:
            return None
        self.failed += 1
        return queue.popleft()

    def _record(self, received: Received) -> None:
        with self._arrived:
            self._messages.append(received)
            self._arrived.notify_all()

    # -- fault injection (any thread, while running or not) ---------------------------

    def fail_next(self, stage: Stage, code: int, text: str, count: int = 1) -> None:
        """The next ``count`` transactions get ``code text`` at ``stage``.

        ``DATA`` is the reply to the end of data, after the content was received.
        """
        if stage not in self._faults:
            raise ValueError(f"stage must be MAIL, RCPT or DATA, not {stage!r}")
        with self._lock:
            self._faults[stage].extend([f"{code} {text}"] * count)

    def drop_next(self, count: int = 1) -> None:
        """Abort the connection, without a reply, at the end of the next DATA(s)."""
        with self._lock:
            self._drops += count

    def set_random_faults(
        self,
        fail_rate: float,
        code: int = 451,
        text: str = "4.3.0 try again later",
        drop_rate: float = 0.0,
        seed: int | None = None,
    ) -> None:
        """At each end of DATA: drop with ``drop_rate``, else fail with ``fail_rate``."""
        if not (0.0 <= fail_rate <= 1.0 and 0.0 <= drop_rate <= 1.0):
            raise ValueError("fail_rate and drop_rate must be within [0, 1]")
        with self._lock:
            self._random_fail_rate = fail_rate
            self._random_drop_rate = drop_rate
            self._random_reply = f"{code} {text}"
            self._rng = random.Random(seed)

    def auth_fail(
        self, code: int | None = 535, text: str = "5.7.8 Error: authentication failed"
    ) -> None:
        """Reject every login with ``code text``; ``auth_fail(None)`` accepts them again."""
        with self._lock:
            self._auth_reject = None if code is None else f"{code} {text}"

    def clear_faults(self) -> None:
        """Forget every pending and random fault and any ``auth_fail``."""
        with self._lock:
            for queue in self._faults.values():
                queue.clear()
            self._drops = 0
            self._random_fail_rate = self._random_drop_rate = 0.0
            self._auth_reject = None

    # -- waiting for messages ---------------------------------------------------------

    def clear(self) -> None:
        """Forget the recorded messages (counters and faults stay)."""
        with self._lock:
            self._messages.clear()

    def _shortfall(self, n: int, timeout: float) -> AssertionError:
        return AssertionError(
            f"expected at least {n} message(s) within {timeout} s, {len(self._messages)} "
            f"arrived (connections={self.connections}, transactions={self.transactions}, "
            f"failed={self.failed}, dropped={self.dropped})"
        )

    def wait_for(self, n: int, timeout: float) -> list[Received]:
        """Block until at least ``n`` messages arrived; all of them, oldest first.

        This blocks the calling thread: from a coroutine whose own loop must keep
        sending, use :meth:`wait_for_async`.
        """
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self._messages) >= n, timeout):
                raise self._shortfall(n, timeout)
            return list(self._messages)

    async def wait_for_async(self, n: int, timeout: float) -> list[Received]:
        """:meth:`wait_for` for coroutines: polls without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self._messages) >= n:
                    return list(self._messages)
                if time.monotonic() >= deadline:
                    raise self._shortfall(n, timeout)
            await asyncio.sleep(0.005)
