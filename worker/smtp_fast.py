"""Fewer round trips per message on a warm aiosmtplib connection.

aiosmtplib 5.1 sends MAIL, each RCPT, DATA and the message one at a time and waits for
each reply: ``3 + len(recipients)`` round trips a message. This module keeps
aiosmtplib's connection handling, TLS, AUTH and reply parser and adds one method,
:meth:`FastSMTP.transact`, which uses what the server advertises:

=============  ==========================================================  ===========
mode           what is written in one flight                                round trips
=============  ==========================================================  ===========
chunking       ``MAIL``, every ``RCPT``, ``BDAT <n> LAST`` + the message    1
               (RFC 3030 CHUNKING with RFC 2920 PIPELINING)
pipelining     ``MAIL``, every ``RCPT``, ``DATA``; after 354 the message     2
               (RFC 2920 PIPELINING)
sequential     aiosmtplib's own :meth:`aiosmtplib.SMTP.sendmail`            3 + rcpts
=============  ==========================================================  ===========

Replies are checked in the order aiosmtplib's ``sendmail`` checks them, and the same
exception types come out, so callers classify failures the same way whatever the mode:

- ``SMTPSenderRefused(code, message, sender)`` when MAIL is refused;
- ``SMTPRecipientsRefused([SMTPRecipientRefused, ...])`` when every RCPT is refused;
  refused recipients among accepted ones are returned in ``recipient_errors``;
- ``SMTPDataError(code, message)`` when DATA is not answered 354, or the end of data
  or ``BDAT ... LAST`` is not answered 250;
- ``SMTPServerDisconnected`` on a disconnect (also when RCPT is answered 421, as in
  aiosmtplib, which closes the connection on 421); ``SMTPReadTimeoutError`` when a reply
  does not come in time. Both close the connection.

After a refusal the replies still owed for the rest of the pipelined group are read and
discarded (a 354 to a pipelined DATA is answered with an empty message, ``.``), then
``RSET`` is sent and its failure ignored, like aiosmtplib (which lets a timeout of that
RSET replace the real error; here it is ignored too). Whenever the client could lose
track of which reply answers which command (timeout, disconnect, malformed reply,
cancellation) the connection is closed instead of being reused.

Where chunking cannot match aiosmtplib: the message leaves with the commands, before any
reply. So after a RCPT 421 the reply to BDAT decides: 250 means the server took the
message for the other recipients, and :meth:`FastSMTP.transact` returns the result (421
in ``recipient_errors``) and closes the connection rather than raise and cause a second
copy. As with DATA, a disconnect or timeout while waiting for the final reply leaves it
unknown whether the server kept the message.

Limits: the message is one ``BDAT ... LAST`` chunk, held in memory (fine for alerts);
no BINARYMIME; an 8-bit message goes out as is to a server without 8BITMIME, as with
aiosmtplib's ``sendmail``; SIZE is announced, not checked against the server's limit
(the server refuses MAIL with 552). ``timeout`` is per reply, like aiosmtplib's.

:class:`PipelineProtocol` is what makes this possible: aiosmtplib's protocol parses one
reply per ``data_received`` and drops bytes that arrive while no read is pending, so
replies to commands written together would be lost.

Connecting (:meth:`FastSMTP._create_connection`, aiosmtplib's with these changes) says
what went wrong in terms a person can act on, with typed exceptions (all
``SMTPConnectError``) that :func:`worker.mailer.classify` turns into one line:

- the host name is resolved first, within the connect timeout: :class:`SMTPHostNotFound`
  (``temporary`` when DNS did not answer rather than said "no such host");
- every address refused the connection: :class:`SMTPConnectionRefused`;
- a plain client (``starttls``/``none``) on an implicit-TLS port gets no greeting: after a
  second of complete silence a second connection sends a TLS ClientHello, and a TLS record
  in reply means :class:`SMTPWrongTLSMode` (``server_speaks="tls"``) at once, instead of a
  timeout. The client's own connection is never written to, so a slow plain server is
  unaffected (it only sees one stray connection);
- a TLS handshake that fails because the server greets in plain text (a second connection
  reads a ``220`` greeting): :class:`SMTPWrongTLSMode` (``server_speaks="plain"``).

Without a ``local_hostname`` the EHLO name is the address literal of the connection's
own end (``[192.0.2.10]``, RFC 5321 4.1.3), not ``socket.getfqdn()``, which is
``localhost`` on many hosts and refused by relays. :func:`default_helo_name` and
:func:`helo_name_problem` choose and check the ``SMTP_HELO_NAME`` setting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Any, Literal

import aiosmtplib
from aiosmtplib.email import quote_address as _quote_address
from aiosmtplib.errors import (
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPDataError,
    SMTPNotSupported,
    SMTPReadTimeoutError,
    SMTPRecipientRefused,
    SMTPRecipientsRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_RESPONSE_LENGTH,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import SMTPStatus

__all__ = [
    "EsmtpMode",
    "FastSMTP",
    "PipelineProtocol",
    "SMTPConnectionRefused",
    "SMTPHostNotFound",
    "SMTPWrongTLSMode",
    "TransactMode",
    "TransactResult",
    "default_helo_name",
    "helo_name_problem",
    "host_fqdn",
]

logger = logging.getLogger(__name__)

TransactMode = Literal["chunking", "pipelining", "sequential"]
# "auto" uses the fastest mode the server offers; the others are a ceiling (a server
# that does not offer the named mode gets the next slower one).
EsmtpMode = Literal["auto", "chunking", "pipelining", "sequential"]

_ACCEPTED_RCPT = (SMTPStatus.completed, SMTPStatus.will_forward)

TLS_PROBE_AFTER_S = 1.0  # silence on a plain connection before asking "is this TLS?"
_GREETING = re.compile(rb"[2-5][0-9][0-9][ -]")


# ------------------------------------------------------------------ connecting: what went wrong
class SMTPHostNotFound(SMTPConnectError):
    """The server's host name does not resolve (``temporary``: DNS did not answer)."""

    def __init__(self, hostname: str, port: int, *, temporary: bool, detail: str) -> None:
        super().__init__(f"cannot resolve {hostname}: {detail}")
        self.hostname, self.port, self.temporary, self.detail = hostname, port, temporary, detail


class SMTPConnectionRefused(SMTPConnectError):
    """Every address of the server refused the TCP connection (nothing listens there)."""

    def __init__(self, hostname: str, port: int) -> None:
        super().__init__(f"connection refused on {hostname}:{port}")
        self.hostname, self.port = hostname, port


class SMTPWrongTLSMode(SMTPConnectError):
    """The port speaks implicit TLS (``server_speaks="tls"``) to a plain client, or plain
    SMTP (``"plain"``, STARTTLS or none) to an implicit-TLS client."""

    def __init__(self, hostname: str, port: int, server_speaks: Literal["tls", "plain"]) -> None:
        what = "implicit TLS" if server_speaks == "tls" else "plain SMTP/STARTTLS"
        super().__init__(f"port {port} of {hostname} speaks {what}")
        self.hostname, self.port, self.server_speaks = hostname, port, server_speaks


# ------------------------------------------------------------------ the EHLO name
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+")
_LOCAL_LABELS = frozenset({"localhost", "localdomain", "local"})


def helo_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an EHLO name (None when it can): a fully qualified domain
    name or an address literal (RFC 5321 4.1.1.1, 4.1.3), and no local name relays refuse."""
    if name.startswith("[") and name.endswith("]"):
        literal = name[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            return (
                f"{name!r} is not an address literal; use e.g. [203.0.113.7] or [IPv6:2001:db8::7]"
            )
        return None
    if _LOCAL_LABELS & set(name.lower().split(".")):
        return (
            f"{name!r} is a local name that relays refuse; use this host's DNS name or your "
            "mail domain, e.g. mail.example.com"
        )
    if not _DOMAIN.fullmatch(name) or name.rsplit(".", 1)[-1].isdigit():
        return (
            f"{name!r} is not a fully qualified domain name; use one such as host.example.com "
            "(an IP address goes in brackets: [203.0.113.7])"
        )
    return None


@functools.cache
def host_fqdn() -> str:
    """``socket.getfqdn()``, looked up once (it may ask DNS)."""
    return socket.getfqdn()


def default_helo_name(mail_from: str | None) -> str | None:
    """This host's fully qualified name when it has a usable one, else the domain of
    ``mail_from``; None when neither is usable (the connection's address literal then)."""
    fqdn = host_fqdn()
    if fqdn and helo_name_problem(fqdn) is None:
        return fqdn
    domain = parseaddr(mail_from or "")[1].rpartition("@")[2]
    if domain and helo_name_problem(domain) is None:
        return domain
    return None


def _address_literal(sockname: Any) -> str | None:
    try:
        ip = ipaddress.ip_address(sockname[0])
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


async def _speaks_tls(peer: tuple[Any, ...], timeout: float | None) -> bool:
    """Does the server at ``peer`` answer a TLS ClientHello with a TLS record (a handshake
    or an alert)? Asked on a connection of its own; False on any failure."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(peer[0], peer[1])
            try:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                hello = ssl.MemoryBIO()
                tls = ctx.wrap_bio(ssl.MemoryBIO(), hello)
                with contextlib.suppress(ssl.SSLWantReadError):
                    tls.do_handshake()
                writer.write(hello.read())
                head = await reader.readexactly(2)
            finally:
                writer.close()
    except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
        return False
    return head[0] in (0x15, 0x16) and head[1] == 0x03


async def _greets_in_plain(peer: tuple[Any, ...], timeout: float | None) -> bool:
    """Does the server at ``peer`` greet in plain text (``220 ...``)? False on any failure."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(peer[0], peer[1])
            try:
                head = await reader.readexactly(4)
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    return _GREETING.fullmatch(head) is not None


class PipelineProtocol(SMTPProtocol):
    """aiosmtplib's protocol, keeping every reply in order.

    Each complete reply is parsed (with aiosmtplib's own parser) as soon as it arrives
    and queued, whether or not a read is pending; :meth:`read_response` returns the
    oldest queued reply and waits only when none is queued. So N commands written in
    one flight (:meth:`send_group`) are followed by N ``read_response()`` calls.

    aiosmtplib's guards are kept: a reply longer than ``MAX_RESPONSE_LENGTH`` or a
    malformed line is queued as ``SMTPResponseException(-1, ...)`` (and the buffer is
    dropped, the stream being out of step); EOF or a lost connection make every read
    past the queued replies raise ``SMTPServerDisconnected`` (after QUIT, an awaited
    reply that never came reads as ``221``).

    Stray replies: the protocol counts the replies owed for the commands written (the
    greeting counts as one). A reply that arrives while none is owed, e.g. a server's
    ``421 idle timeout``, is kept until the next write and discarded then (logged at
    debug), as aiosmtplib discards unsolicited data, so it can never be taken for the
    answer to the next command. After STARTTLS is answered 220, anything already
    received is discarded too (RFC 3207 section 4.2; aiosmtplib clears its buffer then).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        connection_lost_callback: Callable[[SMTPProtocol], None] | None = None,
    ) -> None:
        super().__init__(loop=loop, connection_lost_callback=connection_lost_callback)
        self._replies: collections.deque[SMTPResponse | SMTPResponseException] = collections.deque()
        self._owed = 0
        self._reply_waiter: asyncio.Future[None] | None = None
        self._closed_reason: str | None = None
        self._closed_cause: BaseException | None = None
        self._starttls_sent = False
        self.bytes_received = 0

    @property
    def replies_owed(self) -> int:
        """Replies owed for the commands written that have not been read yet."""
        return self._owed

    @property
    def command_lock(self) -> asyncio.Lock | None:
        """The lock aiosmtplib holds around each command; None once disconnected."""
        return self._command_lock

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # The base class's single-reply future is not used here.
        self._response_waiter = None
        self._replies.clear()
        self._owed = 1  # the greeting
        self._closed_reason = None
        self._closed_cause = None
        self._starttls_sent = False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed_reason is None:
            if self._quit_sent and self._owed > len(self._replies):
                self._replies.append(SMTPResponse(SMTPStatus.closing.value, ""))
            self._closed_reason = "Connection lost"
            self._closed_cause = exc
        self._wake()
        # Sets transport to None, wakes paused writers and tells the SMTP client.
        super().connection_lost(exc)

    def eof_received(self) -> bool:
        if self._closed_reason is None:
            self._closed_reason = "Unexpected EOF received"
        self._wake()
        # Returning false closes the transport
        return False

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self._closed_reason is not None:
            return
        self.bytes_received += len(data)
        self._buffer.extend(data)
        if b"\n" in data:
            while True:
                try:
                    response = self._read_response_from_buffer()
                except SMTPResponseException as exc:  # too long or malformed
                    del self._buffer[:]
                    self._replies.append(exc)
                    break
                if response is None:
                    break
                self._replies.append(response)
        # Only an incomplete reply is left in the buffer now.
        if len(self._buffer) > MAX_RESPONSE_LENGTH:
            del self._buffer[:]
            self._replies.append(
                SMTPResponseException(SMTPStatus.invalid_response.value, "Response too long")
            )
        if self._replies:
            self._wake()

    def _wake(self) -> None:
        if self._reply_waiter is not None and not self._reply_waiter.done():
            self._reply_waiter.set_result(None)

    def _disconnected(self) -> SMTPServerDisconnected:
        exc = SMTPServerDisconnected(self._closed_reason or "Connection lost")
        exc.__cause__ = self._closed_cause
        return exc

    # The name and meaning of ``timeout`` (per reply) are aiosmtplib's.
    async def read_response(self, timeout: float | None = None) -> SMTPResponse:
        """The oldest reply not yet read, waiting up to ``timeout`` seconds for it.

        :raises SMTPReadTimeoutError: no reply within ``timeout``
        :raises SMTPServerDisconnected: the connection ended before the reply came
        :raises SMTPResponseException: the reply was malformed or too long
        """
        try:
            async with asyncio.timeout(timeout):
                while not self._replies:
                    if self._closed_reason is not None or self.transport is None:
                        raise self._disconnected()
                    if self._reply_waiter is not None:
                        # Callers hold the command lock; replies have one reader.
                        raise RuntimeError("read_response() is already being awaited")
                    self._reply_waiter = self._loop.create_future()
                    try:
                        await self._reply_waiter
                    finally:
                        self._reply_waiter = None
        except TimeoutError as exc:
            raise SMTPReadTimeoutError("Timed out waiting for server response") from exc

        item = self._replies.popleft()
        self._owed = max(0, self._owed - 1)
        if isinstance(item, SMTPResponseException):
            raise item
        if self._starttls_sent:
            self._starttls_sent = False
            if item.code == SMTPStatus.ready:
                self._discard_unread("received before the TLS handshake")
        return item

    def write(self, data: bytes) -> None:
        """Write one command (aiosmtplib's commands each expect one reply)."""
        self.send_group(data, replies=1)
        if data == b"STARTTLS\r\n":
            self._starttls_sent = True

    def send_group(self, data: bytes, *, replies: int) -> None:
        """Write ``data`` holding commands that will be answered by ``replies`` replies.

        :raises SMTPServerDisconnected: the connection is closed or closing
        """
        if self._owed == 0:
            self._discard_unread("received while no command was waiting for a reply")
        super().write(data)
        self._owed += replies

    def _discard_unread(self, why: str) -> None:
        if self._replies or self._buffer:
            logger.debug(
                "discarding %d unread SMTP replies and %d bytes %s",
                len(self._replies),
                len(self._buffer),
                why,
            )
            self._replies.clear()
            del self._buffer[:]


@dataclass(frozen=True, slots=True)
class TransactResult:
    """The outcome of one accepted mail transaction."""

    recipient_errors: dict[str, SMTPResponse]
    """Refused recipients (the others got the message), as aiosmtplib's sendmail."""
    response: SMTPResponse
    """The server's 250 to the end of data (or to ``BDAT ... LAST``)."""
    mode: TransactMode
    round_trips: int
    """Times the client waited for the server in this transaction."""


@functools.lru_cache(maxsize=1024)
def quote_address(address: str) -> str:
    """aiosmtplib's ``quote_address`` (parse, validate, quote), cached: the same few sender
    and recipient addresses come back for every message."""
    return _quote_address(address)


def _command(*args: bytes) -> bytes:
    for arg in args:
        if COMMAND_INJECTION_REGEX.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(args) + b"\r\n"


class FastSMTP(aiosmtplib.SMTP):
    """``aiosmtplib.SMTP`` with pipelined and chunked mail transactions (:meth:`transact`).

    Connect, STARTTLS, login, QUIT and every other command are aiosmtplib's. Set
    ``esmtp_mode`` (on the instance or per call) to ``"pipelining"`` or
    ``"sequential"`` to use at most that mode, e.g. for benchmarks and tests.
    """

    esmtp_mode: EsmtpMode = "auto"
    """The fastest mode :meth:`transact` may use; assign on an instance to override."""

    _helo_from_socket = False

    async def _get_default_local_hostname(self) -> str:
        # aiosmtplib asks socket.getfqdn() ("localhost" on many hosts, refused by relays):
        # use the address literal of this connection's end instead, set once connected.
        self._helo_from_socket = True
        return "[127.0.0.1]"

    # Adapted from aiosmtplib 5.1.3 SMTP._create_connection: our protocol class, the host
    # resolved first, and errors that say what is wrong (see the module docstring). Copying
    # a private method is why pyproject.toml pins aiosmtplib's minor version (>=5.1.3,<5.2):
    # recheck this before widening the pin.
    async def _create_connection(self, timeout: float | None) -> SMTPResponse:
        if self.loop is None:
            raise RuntimeError("No event loop set")
        protocol = PipelineProtocol(
            loop=self.loop, connection_lost_callback=self._on_connection_lost
        )
        tls_context: ssl.SSLContext | None = None
        if self.use_tls:
            tls_context = await self._get_tls_context()
        hostname = self.hostname or "localhost"
        port = self.port or self._get_default_port()

        if self.sock is not None or self.socket_path is not None:
            transport = await self._connect_socket(protocol, tls_context, timeout)
        else:
            transport = await self._connect_host(protocol, hostname, port, tls_context, timeout)
        self.protocol = protocol
        self.transport = transport
        if self._helo_from_socket:
            self.local_hostname = (
                _address_literal(transport.get_extra_info("sockname")) or self.local_hostname
            )

        try:
            response = await self._read_greeting(protocol, hostname, port, timeout)
        except SMTPServerDisconnected as exc:
            raise SMTPConnectError(f"Error connecting to {hostname} on port {port}: {exc}") from exc
        except SMTPTimeoutError as exc:
            raise SMTPConnectTimeoutError("Timed out waiting for server ready message") from exc

        if response.code != SMTPStatus.ready:
            raise SMTPConnectResponseError(response.code, response.message)

        return response

    async def _connect_socket(
        self, protocol: PipelineProtocol, tls_context: ssl.SSLContext | None, timeout: float | None
    ) -> asyncio.BaseTransport:
        """aiosmtplib's connection over a given socket or Unix socket path."""
        assert self.loop is not None
        tls_kwargs: dict[str, Any] = {}
        if tls_context is not None:
            tls_kwargs = {
                "ssl": tls_context,
                "server_hostname": self.hostname,
                "ssl_handshake_timeout": timeout,
            }
        if self.sock is not None:
            coro = self.loop.create_connection(lambda: protocol, sock=self.sock, **tls_kwargs)
        else:
            coro = self.loop.create_unix_connection(
                lambda: protocol,
                path=self.socket_path,  # type: ignore[arg-type]
                **tls_kwargs,
            )
        try:
            transport, _ = await asyncio.wait_for(coro, timeout=timeout)
        except TimeoutError as exc:
            raise SMTPConnectTimeoutError("Timed out connecting to the socket") from exc
        except OSError as exc:
            raise SMTPConnectError(f"Error connecting to the socket: {exc}") from exc
        return transport

    async def _connect_host(
        self,
        protocol: PipelineProtocol,
        hostname: str,
        port: int,
        tls_context: ssl.SSLContext | None,
        timeout: float | None,
    ) -> asyncio.BaseTransport:
        """Resolve, then connect to each address in turn (and do the TLS handshake of
        implicit TLS), all within ``timeout``."""
        assert self.loop is not None
        resolving = True
        try:
            async with asyncio.timeout(timeout):
                try:
                    infos = await self.loop.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
                except socket.gaierror as exc:
                    temporary = exc.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", 0))
                    raise SMTPHostNotFound(
                        hostname,
                        port,
                        temporary=temporary,
                        detail=f"DNS failure ({exc.strerror})" if temporary else "no such host",
                    ) from exc
                resolving = False
                errors: list[OSError] = []
                for family, address in dict.fromkeys((i[0], str(i[4][0])) for i in infos):
                    peer = (address, port)
                    try:
                        transport, _ = await self.loop.create_connection(
                            lambda: protocol,
                            host=address,
                            port=port,
                            family=family,
                            ssl=tls_context,
                            local_addr=self.source_address,
                            server_hostname=hostname if tls_context else None,
                            ssl_handshake_timeout=timeout if tls_context else None,
                        )
                        return transport
                    except ssl.SSLError as exc:
                        if not isinstance(exc, ssl.SSLCertVerificationError) and (
                            await _greets_in_plain(peer, min(2.0, timeout or 2.0))
                        ):
                            raise SMTPWrongTLSMode(hostname, port, "plain") from exc
                        raise SMTPConnectError(
                            f"Error connecting to {hostname} on port {port}: {exc}"
                        ) from exc
                    except OSError as exc:
                        errors.append(exc)
        except TimeoutError as exc:
            if resolving:
                raise SMTPHostNotFound(
                    hostname,
                    port,
                    temporary=True,
                    detail=f"DNS gave no answer within {timeout:g} s",
                ) from exc
            raise SMTPConnectTimeoutError(
                f"Timed out connecting to {hostname} on port {port}"
            ) from exc
        if errors and all(isinstance(e, ConnectionRefusedError) for e in errors):
            raise SMTPConnectionRefused(hostname, port) from errors[0]
        first = errors[0] if errors else OSError("no address")
        raise SMTPConnectError(f"Error connecting to {hostname} on port {port}: {first}") from first

    async def _read_greeting(
        self, protocol: PipelineProtocol, hostname: str, port: int, timeout: float | None
    ) -> SMTPResponse:
        """The server's greeting, within ``timeout``. A plain connection that stays
        completely silent for ``TLS_PROBE_AFTER_S`` asks, on a connection of its own,
        whether the port speaks TLS; it raises :class:`SMTPWrongTLSMode` if it does."""
        greeting = asyncio.ensure_future(protocol.read_response(timeout=timeout))
        peer = self.transport.get_extra_info("peername") if self.transport else None
        try:
            if self.use_tls or not isinstance(peer, tuple):
                return await greeting
            loop = asyncio.get_running_loop()
            started = loop.time()
            quiet = TLS_PROBE_AFTER_S if timeout is None else min(TLS_PROBE_AFTER_S, timeout / 2)
            await asyncio.wait({greeting}, timeout=quiet)
            if greeting.done() or protocol.bytes_received:
                return await greeting
            left = None if timeout is None else timeout - (loop.time() - started)
            probe = asyncio.ensure_future(_speaks_tls(peer, left))
            try:
                await asyncio.wait({greeting, probe}, return_when=asyncio.FIRST_COMPLETED)
                if not greeting.done() and probe.result():
                    raise SMTPWrongTLSMode(hostname, port, "tls")
            finally:
                probe.cancel()
            return await greeting
        finally:
            if not greeting.done():
                greeting.cancel()
                with contextlib.suppress(asyncio.CancelledError, SMTPTimeoutError):
                    await greeting

    def transact_mode(self, esmtp_mode: EsmtpMode | None = None) -> TransactMode:
        """The mode :meth:`transact` will use on this connection (after EHLO)."""
        wanted = self.esmtp_mode if esmtp_mode is None else esmtp_mode
        if (
            wanted == "sequential"
            or not self.supports_extension("pipelining")
            or not isinstance(self.protocol, PipelineProtocol)
        ):
            return "sequential"
        if wanted in ("auto", "chunking") and self.supports_extension("chunking"):
            return "chunking"
        return "pipelining"

    async def transact(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        timeout: float | None = None,
        esmtp_mode: EsmtpMode | None = None,
    ) -> TransactResult:
        """Perform one whole mail transaction on the current connection.

        ``message`` is the flattened message (``email.policy.SMTP``); lone CR or LF
        become CRLF. ``timeout`` bounds the wait for each reply (``None``: the
        connection's ``timeout``). MAIL carries ``SIZE=`` when SIZE is advertised,
        ``BODY=8BITMIME`` when the message has 8-bit bytes and 8BITMIME is advertised,
        and ``SMTPUTF8`` when an address is not ASCII (``SMTPNotSupported`` if the
        server lacks it).

        :raises ValueError: an address that cannot be put on a command line
        :raises SMTPSenderRefused: MAIL refused
        :raises SMTPRecipientsRefused: every recipient refused
        :raises SMTPDataError: DATA, the end of data or BDAT refused
        :raises SMTPServerDisconnected: the connection was or got lost
        :raises SMTPReadTimeoutError: a reply did not come in time
        """
        if isinstance(recipients, str):
            recipients = [recipients]
        recipients = list(recipients)
        reply_timeout = self.timeout if timeout is None else timeout

        await self._ehlo_or_helo_if_needed()

        utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        if utf8 and not self.supports_extension("smtputf8"):
            raise SMTPNotSupported(
                "An address containing non-ASCII characters was provided, but "
                "SMTPUTF8 is not supported by this server"
            )
        options: list[str] = []
        if not message.isascii() and self.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if utf8:
            options.append("SMTPUTF8")

        # Built (and so checked) before anything is sent, whatever the mode.
        encoding = "utf-8" if utf8 else "ascii"
        mail_args = [b"MAIL", b"FROM:" + quote_address(sender).encode(encoding)]
        rcpt_lines = [
            _command(b"RCPT", b"TO:" + quote_address(r).encode(encoding)) for r in recipients
        ]
        body = normalize_message_line_endings(message)
        if self.supports_extension("size"):
            mail_args.append(f"SIZE={len(body)}".encode("ascii"))
        mail_args.extend(option.encode("ascii") for option in options)
        mail_line = _command(*mail_args)

        mode = self.transact_mode(esmtp_mode)
        if mode == "sequential" or not recipients:
            # aiosmtplib's own path (and its answer to an empty recipient list).
            errors, text = await self.sendmail(
                sender, recipients, message, mail_options=options, timeout=reply_timeout
            )
            return TransactResult(
                recipient_errors=errors,
                response=SMTPResponse(SMTPStatus.completed.value, text),
                mode="sequential",
                round_trips=len(recipients) + 3,
            )

        if self._sendmail_lock is None:
            self._sendmail_lock = asyncio.Lock()
        async with self._sendmail_lock:
            try:
                return await self._pipelined(
                    mode, sender, recipients, mail_line, rcpt_lines, body, reply_timeout
                )
            except (SMTPResponseException, SMTPRecipientsRefused):
                if self.is_connected:
                    # Reset the envelope for the next attempt, like aiosmtplib; a
                    # failure here would only hide the real error.
                    with contextlib.suppress(
                        ConnectionError, SMTPResponseException, SMTPTimeoutError
                    ):
                        await self.rset(timeout=reply_timeout)
                raise

    async def _pipelined(
        self,
        mode: TransactMode,
        sender: str,
        recipients: list[str],
        mail_line: bytes,
        rcpt_lines: list[bytes],
        body: bytes,
        reply_timeout: float | None,
    ) -> TransactResult:
        protocol = self.protocol
        if not isinstance(protocol, PipelineProtocol) or protocol.command_lock is None:
            raise SMTPServerDisconnected("Server not connected")

        chunking = mode == "chunking"
        if chunking:
            last = _command(b"BDAT", str(len(body)).encode("ascii"), b"LAST") + body
        else:
            last = b"DATA\r\n"

        async with protocol.command_lock:
            try:
                protocol.send_group(
                    mail_line + b"".join(rcpt_lines) + last, replies=len(recipients) + 2
                )
                round_trips = 1

                reply = await protocol.read_response(reply_timeout)
                if reply.code != SMTPStatus.completed:
                    refused = SMTPSenderRefused(reply.code, reply.message, sender)
                    await self._abandon(protocol, chunking, reply.code, reply_timeout)
                    raise refused

                refusals: list[SMTPRecipientRefused] = []
                closing: SMTPRecipientRefused | None = None  # a RCPT answered 421
                for recipient in recipients:
                    reply = await self._read_reply(protocol, closing, reply_timeout)
                    if reply.code in _ACCEPTED_RCPT:
                        continue
                    refusals.append(SMTPRecipientRefused(reply.code, reply.message, recipient))
                    if reply.code == SMTPStatus.domain_unavailable and closing is None:
                        closing = refusals[-1]
                        if not chunking:
                            # aiosmtplib closes on 421 and its next command then
                            # fails: SMTPServerDisconnected, the message unsent.
                            raise self._server_closing(closing)
                if len(refusals) == len(recipients) and closing is None:
                    all_refused = SMTPRecipientsRefused(refusals)
                    await self._abandon(protocol, chunking, refusals[-1].code, reply_timeout)
                    raise all_refused
                errors = {r.recipient: SMTPResponse(r.code, r.message) for r in refusals}

                reply = await self._read_reply(protocol, closing, reply_timeout)
                if closing is not None:
                    # The message went out with BDAT before the 421 came back: the
                    # reply to BDAT says whether the server took it for the others.
                    # Reporting a failure after a 250 would send it twice.
                    if reply.code != SMTPStatus.completed or len(refusals) == len(recipients):
                        raise self._server_closing(closing)
                    self.close()
                elif not chunking:
                    if reply.code != SMTPStatus.start_input:
                        raise SMTPDataError(reply.code, reply.message)
                    protocol.send_group(PERIOD_REGEX.sub(b"..", body) + b".\r\n", replies=1)
                    round_trips += 1
                    reply = await protocol.read_response(reply_timeout)
                if reply.code != SMTPStatus.completed:
                    raise SMTPDataError(reply.code, reply.message)
                return TransactResult(
                    recipient_errors=errors, response=reply, mode=mode, round_trips=round_trips
                )
            except (SMTPServerDisconnected, SMTPTimeoutError):
                self.close()
                raise
            finally:
                # Replies still owed (timeout, disconnect, malformed reply, a
                # cancelled task) would answer the next command: close instead.
                if protocol.replies_owed:
                    self.close()

    async def _read_reply(
        self,
        protocol: PipelineProtocol,
        closing: SMTPRecipientRefused | None,
        reply_timeout: float | None,
    ) -> SMTPResponse:
        """The next reply; once the server said 421, failing to get one is that 421."""
        try:
            return await protocol.read_response(reply_timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError, SMTPResponseException) as exc:
            if closing is None:
                raise
            raise self._server_closing(closing) from exc

    def _server_closing(self, refusal: SMTPRecipientRefused) -> SMTPServerDisconnected:
        self.close()
        exc = SMTPServerDisconnected(
            f"Server closed the connection: {refusal.code} {refusal.message}"
        )
        exc.__cause__ = refusal
        return exc

    async def _abandon(
        self,
        protocol: PipelineProtocol,
        chunking: bool,
        refusal_code: int,
        reply_timeout: float | None,
    ) -> None:
        """Read and discard the replies still owed after a refusal.

        A 421 refusal closes the connection instead (the server is going away; aiosmtplib
        closes on 421 too). Any failure to read closes it as well: the caller raises the
        refusal either way, as aiosmtplib would have stopped at it.
        """
        if refusal_code == SMTPStatus.domain_unavailable:
            self.close()
            return
        try:
            while protocol.replies_owed > 1:
                await protocol.read_response(reply_timeout)
            reply = await protocol.read_response(reply_timeout)  # to DATA or BDAT
            if not chunking and reply.code == SMTPStatus.start_input:
                # A server that said 354 anyway gets an empty message, which it must
                # refuse for want of a valid envelope.
                protocol.send_group(b".\r\n", replies=1)
                await protocol.read_response(reply_timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError, SMTPResponseException):
            self.close()
