"""Pipelined and chunked mail transactions (worker/smtp_fast.py).

Three layers:

- :class:`PipelineProtocol` alone, fed bytes by hand: every reply kept in order, the
  guards aiosmtplib has (malformed, too long, EOF, lost connection, timeout), stray
  replies and STARTTLS.
- :class:`FastSMTP` against aiosmtpd, whose ``handle_EHLO`` adds PIPELINING (and, with a
  small ``BDAT`` command added to its server class, CHUNKING). Each error scenario runs in
  the three modes and must end the same way as aiosmtplib's own ``sendmail``
  (``esmtp_mode="sequential"``): same exception, same code, same connection state.
- :class:`FastSMTP` against a private Postfix ``smtpd`` (worker/devtools/postfix.py),
  which offers PIPELINING and CHUNKING itself.

Round trips are counted on the wire by :class:`FlightCounter`, a TCP relay that counts
the client's flights: bursts of client bytes that follow bytes from the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING
from aiosmtpd.smtp import SMTP as AiosmtpdServer
from aiosmtplib import (
    SMTPDataError,
    SMTPNotSupported,
    SMTPReadTimeoutError,
    SMTPRecipientsRefused,
    SMTPResponse,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
)

from worker.devtools import free_port
from worker.devtools import postfix as pf
from worker.smtp_fast import FastSMTP, PipelineProtocol, TransactResult

SENDER = "alerts@example.com"
MODES = ("chunking", "pipelining", "sequential")


def make_message(subject: str, body: str = "hello\n", *, to: str = "ops@example.net") -> bytes:
    """A message flattened the way the worker does it (email.policy.SMTP: CRLF)."""
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = SENDER
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{abs(hash(subject))}@notifier.test>"
    msg["Date"] = "Tue, 25 Nov 2025 20:00:00 +0000"
    msg.set_content(body, cte="8bit")
    return msg.as_bytes()


# Lines starting with "." need dot-stuffing for DATA (and must not get it with BDAT).
DOTTED_CHINESE_BODY = (
    "止损触发：ma_cross 卖出 600519 @ 1688.00\n"
    ".a line starting with a dot\n"
    "..two dots\n"
    ".\n"
    "last line\n"
)


# --------------------------------------------------------------------------- protocol


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name, default=None):
        return default


def connected_protocol() -> tuple[PipelineProtocol, FakeTransport]:
    protocol = PipelineProtocol(loop=asyncio.get_running_loop())
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def greeted_protocol() -> tuple[PipelineProtocol, FakeTransport]:
    protocol, transport = connected_protocol()
    protocol.data_received(b"220 ready\r\n")
    assert await protocol.read_response(1) == SMTPResponse(220, "ready")
    return protocol, transport


async def test_protocol_keeps_replies_that_arrive_before_the_read() -> None:
    protocol, transport = await greeted_protocol()
    protocol.send_group(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n", replies=3)
    assert protocol.replies_owed == 3
    # All three replies (one of them multi-line) in one segment, before any read.
    protocol.data_received(b"250 2.1.0 ok\r\n250-first\r\n250 second\r\n354 go ahead\r\n")
    assert await protocol.read_response(1) == SMTPResponse(250, "2.1.0 ok")
    assert await protocol.read_response(1) == SMTPResponse(250, "first\nsecond")
    assert await protocol.read_response(1) == SMTPResponse(354, "go ahead")
    assert protocol.replies_owed == 0
    assert transport.written == [b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"]


async def test_protocol_replies_split_at_every_byte() -> None:
    protocol, _ = await greeted_protocol()
    protocol.send_group(b"X\r\nY\r\nZ\r\n", replies=3)
    wire = b"250 one\r\n451-4.3.0 multi\r\n451 4.3.0 line\r\n554 5.5.1 three\r\n"

    async def read_three():
        return [await protocol.read_response(1) for _ in range(3)]

    reader = asyncio.ensure_future(read_three())
    for byte in wire:
        protocol.data_received(bytes([byte]))
        await asyncio.sleep(0)
    assert await reader == [
        SMTPResponse(250, "one"),
        SMTPResponse(451, "4.3.0 multi\n4.3.0 line"),
        SMTPResponse(554, "5.5.1 three"),
    ]


async def test_protocol_pending_read_is_woken() -> None:
    protocol, _ = await greeted_protocol()
    protocol.write(b"NOOP\r\n")
    reader = asyncio.ensure_future(protocol.read_response(1))
    await asyncio.sleep(0.01)
    assert not reader.done()
    protocol.data_received(b"250 ")
    await asyncio.sleep(0.01)
    assert not reader.done()
    protocol.data_received(b"ok\r\n")
    assert await reader == SMTPResponse(250, "ok")


async def test_protocol_malformed_reply_raises() -> None:
    protocol, _ = await greeted_protocol()
    protocol.write(b"NOOP\r\n")
    protocol.data_received(b"garbage\r\n")
    with pytest.raises(SMTPResponseException) as info:
        await protocol.read_response(1)
    assert info.value.code == -1
    assert "Malformed" in info.value.message


async def test_protocol_response_too_long() -> None:
    protocol, _ = await greeted_protocol()
    protocol.write(b"EHLO x\r\n")
    for _ in range(400):  # endless continuation lines, never a last line
        protocol.data_received(b"250-" + b"x" * 100 + b"\r\n")
    with pytest.raises(SMTPResponseException, match="Response too long"):
        await protocol.read_response(1)


async def test_protocol_many_short_replies_are_not_too_long() -> None:
    """The length guard is per reply: 2,000 queued replies (60 kB) are fine."""
    protocol, _ = await greeted_protocol()
    protocol.send_group(b"RCPT TO:<x@y>\r\n" * 2000, replies=2000)
    protocol.data_received(b"250 2.1.5 Ok, recipient accepted here\r\n" * 2000)
    for _ in range(2000):
        assert (await protocol.read_response(1)).code == 250


async def test_protocol_connection_lost_after_replies() -> None:
    protocol, _ = await greeted_protocol()
    protocol.send_group(b"MAIL\r\nRCPT\r\nDATA\r\n", replies=3)
    protocol.data_received(b"250 ok\r\n")
    protocol.connection_lost(ConnectionResetError("reset"))
    assert await protocol.read_response(1) == SMTPResponse(250, "ok")
    with pytest.raises(SMTPServerDisconnected) as info:
        await protocol.read_response(1)
    assert isinstance(info.value.__cause__, ConnectionResetError)


async def test_protocol_connection_lost_wakes_pending_read() -> None:
    protocol, _ = await greeted_protocol()
    protocol.write(b"NOOP\r\n")
    reader = asyncio.ensure_future(protocol.read_response(1))
    await asyncio.sleep(0)
    protocol.connection_lost(None)
    with pytest.raises(SMTPServerDisconnected, match="Connection lost"):
        await reader


async def test_protocol_eof() -> None:
    protocol, _ = await greeted_protocol()
    protocol.write(b"NOOP\r\n")
    reader = asyncio.ensure_future(protocol.read_response(1))
    await asyncio.sleep(0)
    assert protocol.eof_received() is False
    with pytest.raises(SMTPServerDisconnected, match="Unexpected EOF"):
        await reader


async def test_protocol_quit_then_close_reads_as_221() -> None:
    protocol, _ = await greeted_protocol()
    protocol._quit_sent = True  # what aiosmtplib's execute_command does for QUIT
    protocol.write(b"QUIT\r\n")
    protocol.connection_lost(None)
    assert await protocol.read_response(1) == SMTPResponse(221, "")


async def test_protocol_read_timeout() -> None:
    protocol, _ = await greeted_protocol()
    protocol.write(b"NOOP\r\n")
    with pytest.raises(SMTPReadTimeoutError):
        await protocol.read_response(0.05)


async def test_protocol_stray_reply_is_discarded_at_the_next_write() -> None:
    protocol, _ = await greeted_protocol()
    protocol.data_received(b"421 4.4.2 idle too long\r\n250-partial")  # nothing was asked
    protocol.write(b"NOOP\r\n")
    protocol.data_received(b"250 2.0.0 Ok\r\n")
    assert await protocol.read_response(1) == SMTPResponse(250, "2.0.0 Ok")


async def test_protocol_discards_bytes_after_starttls_220() -> None:
    protocol, _ = await greeted_protocol()
    protocol.write(b"STARTTLS\r\n")
    protocol.data_received(b"220 go ahead\r\n250 injected before TLS\r\n")
    assert await protocol.read_response(1) == SMTPResponse(220, "go ahead")
    protocol.write(b"EHLO x\r\n")
    protocol.data_received(b"250 real\r\n")
    assert await protocol.read_response(1) == SMTPResponse(250, "real")


async def test_protocol_write_after_close_raises() -> None:
    protocol, transport = await greeted_protocol()
    transport.closing = True
    with pytest.raises(SMTPServerDisconnected):
        protocol.send_group(b"MAIL\r\n", replies=1)
    assert protocol.replies_owed == 0


# --------------------------------------------------------------------------- aiosmtpd


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]


@dataclass
class Recorder:
    """aiosmtpd handler: records accepted messages, injects replies and drops.

    ``mail``/``rcpt`` map an address, ``data`` a sender, to a reply (a refusal); ``drop``
    maps an address to the stage (``MAIL``, ``RCPT``, ``DATA``) where the server closes
    the connection without a reply; ``hangup`` lists the refused recipients after whose
    reply the server closes the connection; ``slow`` delays the final reply (seconds);
    ``lenient`` keeps refused senders and recipients in the envelope anyway, so that DATA
    is answered 354 (a server that is wrong, and that a pipelining client must survive).
    """

    pipelining: bool = True
    chunking: bool = False
    mail: dict[str, str] = field(default_factory=dict)
    rcpt: dict[str, str] = field(default_factory=dict)
    data: dict[str, str] = field(default_factory=dict)
    drop: dict[str, str] = field(default_factory=dict)
    hangup: set[str] = field(default_factory=set)
    lenient: bool = False
    slow: float = 0.0
    messages: list[Received] = field(default_factory=list)
    rsets: int = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        extra = ["250-PIPELINING"] if self.pipelining else []
        extra += ["250-CHUNKING"] if self.chunking else []
        return responses[:-1] + extra + responses[-1:]

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.drop.get(address) == "MAIL":
            server.transport.close()
        if address in self.mail and not self.lenient:
            return self.mail[address]
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return self.mail.get(address, "250 2.1.0 Ok")

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.drop.get(address) == "RCPT":
            server.transport.close()
        if address in self.rcpt:
            if address in self.hangup:  # reply, then close (what 421 announces)
                await server.push(self.rcpt[address])
                server.transport.close()
            if not self.lenient:
                return self.rcpt[address]
        envelope.rcpt_tos.append(address)
        return self.rcpt.get(address, "250 2.1.5 Ok")

    async def handle_DATA(self, server, session, envelope):
        if self.slow:
            await asyncio.sleep(self.slow)
        if any(self.drop.get(a) == "DATA" for a in [envelope.mail_from, *envelope.rcpt_tos]):
            server.transport.close()
            return "451 4.3.0 never sent"
        if server.transport is None or server.transport.is_closing():
            return "451 4.3.0 never sent"  # commands read before the close took effect
        if envelope.mail_from in self.data:
            return self.data[envelope.mail_from]
        self.messages.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                list(envelope.mail_options),
            )
        )
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"

    async def handle_RSET(self, server, session, envelope):
        self.rsets += 1
        return "250 2.0.0 Ok"


class ChunkingServer(AiosmtpdServer):
    """aiosmtpd plus ``BDAT <size> [LAST]`` (RFC 3030), for the error paths of chunking."""

    async def smtp_BDAT(self, arg: str | None) -> None:
        size_text, _, last = (arg or "").partition(" ")
        chunk = await self._reader.readexactly(int(size_text))  # always consume the chunk
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        chunks = self.envelope.__dict__.setdefault("bdat_chunks", [])
        chunks.append(chunk)
        if last.strip().upper() != "LAST":
            await self.push(f"250 2.0.0 {len(chunk)} octets received")
            return
        content = b"".join(chunks)
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)


class ChunkingController(Controller):
    def factory(self):
        return ChunkingServer(self.handler, **self.SMTP_kwargs)


class FlightCounter:
    """A TCP relay to ``127.0.0.1:upstream`` counting the client's flights."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.flights = 0
        self._last = "server"
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()  # ends the pumps: no task is cancelled
        await asyncio.wait_for(asyncio.gather(*self._tasks), 5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, client_r, client_w) -> None:
        self._tasks.add(asyncio.current_task())
        self._writers.append(client_w)
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        self._writers.append(up_w)

        async def pump(src, dst, side: str) -> None:
            try:
                while data := await src.read(65536):
                    if side == "client" and self._last != "client":
                        self.flights += 1
                    self._last = side
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(client_r, up_w, "client"), pump(up_r, client_w, "server"))
        for writer in (up_w, client_w):
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
def smtpd():
    """Factory: start an aiosmtpd server for a Recorder; returns its port."""
    controllers: list[Controller] = []

    def start(handler: Recorder, **kwargs) -> int:
        port = free_port()
        cls = ChunkingController if handler.chunking else Controller
        controller = cls(handler, hostname="127.0.0.1", port=port, **kwargs)
        controller.start()
        controllers.append(controller)
        return port

    yield start
    for controller in controllers:
        controller.stop()


@pytest.fixture
async def client():
    """Factory: a connected, EHLO'd FastSMTP, optionally through a FlightCounter."""
    opened: list[FastSMTP] = []
    relays: list[FlightCounter] = []

    async def connect(port: int, *, count: bool = False, **kwargs):
        relay = None
        if count:
            relay = FlightCounter(port)
            relays.append(relay)
            port = await relay.start()
        kwargs.setdefault("start_tls", False)
        smtp = FastSMTP(
            hostname="127.0.0.1", port=port, timeout=5, local_hostname="client.test", **kwargs
        )
        await smtp.connect()
        await smtp.ehlo()
        opened.append(smtp)
        return (smtp, relay) if count else smtp

    yield connect
    for smtp in opened:
        smtp.close()
    for relay in relays:
        await relay.close()


def recorder_for(mode: str, **kwargs) -> Recorder:
    return Recorder(pipelining=mode != "sequential", chunking=mode == "chunking", **kwargs)


async def send_counted(smtp: FastSMTP, relay: FlightCounter, *args, **kwargs):
    relay.flights = 0
    result = await smtp.transact(*args, **kwargs)
    return result, relay.flights


@pytest.mark.parametrize(("mode", "trips"), [("chunking", 1), ("pipelining", 2), ("sequential", 4)])
async def test_exact_bytes_and_round_trips(smtpd, client, mode, trips) -> None:
    handler = recorder_for(mode)
    smtp, relay = await client(smtpd(handler), count=True)
    message = make_message("止损触发 dots", DOTTED_CHINESE_BODY)
    assert not message.isascii()

    result, flights = await send_counted(smtp, relay, SENDER, ["ops@example.net"], message)

    assert result == TransactResult(
        recipient_errors={},
        response=SMTPResponse(250, "2.0.0 Ok: queued as Q1"),
        mode=mode,
        round_trips=trips,
    )
    assert flights == trips
    [received] = handler.messages
    assert received.content == message  # un-stuffed by the server: the exact bytes
    assert received.rcpt_tos == ["ops@example.net"]
    assert f"SIZE={len(message)}" in received.mail_options
    assert "BODY=8BITMIME" in received.mail_options


@pytest.mark.parametrize("mode", MODES)
async def test_line_endings_are_normalised(smtpd, client, mode) -> None:
    handler = recorder_for(mode)
    smtp = await client(smtpd(handler))
    await smtp.transact(SENDER, ["a@example.net"], b"Subject: x\n\n.lf\rcr\r\n.crlf")
    expected = b"Subject: x\r\n\r\n.lf\r\ncr\r\n.crlf\r\n"
    assert handler.messages[0].content == expected
    assert handler.messages[0].mail_options == [f"SIZE={len(expected)}"]  # 7-bit: no BODY=


async def test_esmtp_mode_caps_the_mode(smtpd, client) -> None:
    handler = recorder_for("chunking")
    smtp, relay = await client(smtpd(handler), count=True)
    message = make_message("capped")
    assert smtp.transact_mode() == "chunking"

    result, flights = await send_counted(
        smtp, relay, SENDER, ["a@example.net"], message, esmtp_mode="pipelining"
    )
    assert (result.mode, result.round_trips, flights) == ("pipelining", 2, 2)

    smtp.esmtp_mode = "sequential"
    result, flights = await send_counted(smtp, relay, SENDER, ["a@example.net"], message)
    assert (result.mode, result.round_trips, flights) == ("sequential", 4, 4)

    smtp.esmtp_mode = "auto"
    result, flights = await send_counted(smtp, relay, SENDER, ["a@example.net"], message)
    assert (result.mode, result.round_trips, flights) == ("chunking", 1, 1)
    assert [m.content for m in handler.messages] == [message] * 3


async def test_fallback_when_nothing_is_advertised(smtpd, client) -> None:
    handler = Recorder(pipelining=False, chunking=False)
    smtp, relay = await client(smtpd(handler), count=True)
    assert not smtp.supports_extension("pipelining")
    result, flights = await send_counted(
        smtp, relay, SENDER, ["a@example.net", "b@example.net"], make_message("plain")
    )
    assert (result.mode, result.round_trips, flights) == ("sequential", 5, 5)
    assert handler.messages[0].rcpt_tos == ["a@example.net", "b@example.net"]


async def test_chunking_without_pipelining_falls_back(smtpd, client) -> None:
    handler = Recorder(pipelining=False, chunking=True)
    smtp = await client(smtpd(handler))
    result = await smtp.transact(SENDER, ["a@example.net"], make_message("x"))
    assert result.mode == "sequential"


@pytest.mark.parametrize("mode", MODES)
async def test_smtputf8_address(smtpd, client, mode) -> None:
    handler = recorder_for(mode)
    smtp = await client(smtpd(handler))
    await smtp.transact(SENDER, ["交易员@example.net"], make_message("utf8 rcpt"))
    [received] = handler.messages
    assert received.rcpt_tos == ["交易员@example.net"]
    assert "SMTPUTF8" in received.mail_options


@pytest.mark.parametrize("mode", MODES)
async def test_one_of_two_recipients_refused(smtpd, client, mode) -> None:
    handler = recorder_for(mode, rcpt={"gone@example.net": "550 5.1.1 No such user"})
    smtp = await client(smtpd(handler))
    message = make_message("partial")

    result = await smtp.transact(SENDER, ["gone@example.net", "ok@example.net"], message)

    assert result.recipient_errors == {"gone@example.net": SMTPResponse(550, "5.1.1 No such user")}
    assert result.response.code == 250
    assert [(m.rcpt_tos, m.content) for m in handler.messages] == [(["ok@example.net"], message)]


@pytest.mark.parametrize("mode", MODES)
async def test_all_recipients_refused_then_the_connection_still_works(smtpd, client, mode) -> None:
    handler = recorder_for(
        mode,
        rcpt={"gone@example.net": "550 5.1.1 No such user", "full@example.net": "452 4.2.2 Full"},
    )
    smtp = await client(smtpd(handler))

    with pytest.raises(SMTPRecipientsRefused) as info:
        await smtp.transact(SENDER, ["gone@example.net", "full@example.net"], make_message("x"))

    refused = [(r.recipient, r.code, r.message) for r in info.value.recipients]
    assert refused == [
        ("gone@example.net", 550, "5.1.1 No such user"),
        ("full@example.net", 452, "4.2.2 Full"),
    ]
    assert handler.rsets == 1
    assert smtp.is_connected
    after = await smtp.transact(SENDER, ["ok@example.net"], make_message("after"))
    assert after.response.code == 250
    assert [m.rcpt_tos for m in handler.messages] == [["ok@example.net"]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hangup", [True, False], ids=["then-close", "stays-open"])
async def test_recipient_421(smtpd, client, mode, hangup) -> None:
    """A 421 to RCPT ends the connection, as in aiosmtplib (SMTPServerDisconnected).

    With chunking the message went out in the same flight: if the server still
    answers BDAT with 250, the message was taken for the other recipients, and the
    result must say so (an exception would make the caller send it again).
    """
    bye = "bye@example.net"
    handler = recorder_for(mode, rcpt={bye: "421 4.3.2 Closing"}, hangup={bye} if hangup else set())
    smtp = await client(smtpd(handler))
    message = make_message("x")

    if mode == "chunking" and not hangup:
        result = await smtp.transact(SENDER, [bye, "ok@example.net"], message)
        assert result.recipient_errors == {bye: SMTPResponse(421, "4.3.2 Closing")}
        assert [m.rcpt_tos for m in handler.messages] == [["ok@example.net"]]
    else:
        with pytest.raises(SMTPServerDisconnected):
            await smtp.transact(SENDER, [bye, "ok@example.net"], message)
        assert handler.messages == []
    assert not smtp.is_connected


@pytest.mark.parametrize("refused", ["MAIL", "RCPT"])
async def test_data_354_after_a_refusal_gets_an_empty_message(smtpd, client, refused) -> None:
    """RFC 2920: a 354 to a pipelined DATA after the envelope failed is ended with '.'."""
    handler = recorder_for(
        "pipelining",
        lenient=True,
        mail={SENDER: "550 5.7.1 No"} if refused == "MAIL" else {},
        rcpt={"a@example.net": "550 5.1.1 No"} if refused == "RCPT" else {},
    )
    smtp, relay = await client(smtpd(handler), count=True)

    relay.flights = 0
    expected = SMTPSenderRefused if refused == "MAIL" else SMTPRecipientsRefused
    with pytest.raises(expected):
        await smtp.transact(SENDER, ["a@example.net"], make_message("never"))
    assert relay.flights == 3  # the group, the '.', the RSET
    assert [m.content for m in handler.messages] == [b""]
    assert handler.rsets == 1

    handler.mail.clear()
    handler.rcpt.clear()
    message = make_message("after")
    assert (await smtp.transact(SENDER, ["a@example.net"], message)).response.code == 250
    assert handler.messages[-1].content == message


@pytest.mark.parametrize("mode", MODES)
async def test_smtputf8_needed_but_not_offered(smtpd, client, mode) -> None:
    handler = recorder_for(mode)
    smtp = await client(smtpd(handler, enable_SMTPUTF8=False))
    with pytest.raises(SMTPNotSupported):
        await smtp.transact(SENDER, ["交易员@example.net"], make_message("x"))
    assert smtp.is_connected


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "reply", ["421 4.3.2 Shutting down", "451 4.3.0 Try later", "550 5.7.1 No"]
)
async def test_sender_refused(smtpd, client, mode, reply) -> None:
    sender = "refused@example.com"
    handler = recorder_for(mode, mail={sender: reply})
    smtp = await client(smtpd(handler))

    with pytest.raises(SMTPSenderRefused) as info:
        await smtp.transact(sender, ["a@example.net", "b@example.net"], make_message("x"))

    code = int(reply[:3])
    assert (info.value.code, info.value.message, info.value.sender) == (code, reply[4:], sender)
    if code == 421:  # aiosmtplib closes the connection on 421
        assert not smtp.is_connected
        return
    assert handler.rsets == 1
    assert (await smtp.transact(SENDER, ["a@example.net"], make_message("y"))).response.code == 250


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "reply",
    [
        "421 4.3.2 Going down",
        "451 4.3.0 Local error",
        "552 5.3.4 Message too big",
        "554 5.7.1 Rejected as spam",
    ],
)
async def test_final_reply_refused(smtpd, client, mode, reply) -> None:
    sender = "spammer@example.com"
    handler = recorder_for(mode, data={sender: reply})
    smtp = await client(smtpd(handler))

    with pytest.raises(SMTPDataError) as info:
        await smtp.transact(sender, ["a@example.net"], make_message("x"))

    assert (info.value.code, info.value.message) == (int(reply[:3]), reply[4:])
    assert handler.rsets == 1
    assert smtp.is_connected
    assert (await smtp.transact(SENDER, ["a@example.net"], make_message("y"))).response.code == 250


@pytest.mark.parametrize("mode", MODES)
async def test_data_command_refused(smtpd, client, mode) -> None:
    """A refusal of DATA or BDAT itself (not of the end of data) is an SMTPDataError."""
    # The hook accepts RCPT without recording it, so the server answers DATA/BDAT 503.
    handler = recorder_for(mode, rcpt={"ghost@example.net": "250 2.1.5 Ok (not recorded)"})
    smtp = await client(smtpd(handler))
    with pytest.raises(SMTPDataError) as info:
        await smtp.transact(SENDER, ["ghost@example.net"], make_message("x"))
    assert info.value.code == 503
    assert handler.rsets == 1
    assert smtp.is_connected


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA"])
async def test_server_drops_the_connection(smtpd, client, mode, stage) -> None:
    dropper = SENDER if stage == "MAIL" else "dropper@example.net"
    handler = recorder_for(mode, drop={dropper: stage})
    smtp = await client(smtpd(handler))

    with pytest.raises(SMTPServerDisconnected):
        await smtp.transact(SENDER, ["a@example.net", "dropper@example.net"], make_message("x"))

    assert not smtp.is_connected
    assert handler.messages == []


@pytest.mark.parametrize("mode", MODES)
async def test_read_timeout_closes(smtpd, client, mode) -> None:
    handler = recorder_for(mode, slow=1.0)
    smtp = await client(smtpd(handler))
    with pytest.raises(SMTPReadTimeoutError):
        await smtp.transact(SENDER, ["a@example.net"], make_message("x"), timeout=0.2)
    assert not smtp.is_connected


async def test_not_connected(client, smtpd) -> None:
    smtp = await client(smtpd(recorder_for("pipelining")))
    smtp.close()
    with pytest.raises(SMTPServerDisconnected):
        await smtp.transact(SENDER, ["a@example.net"], make_message("x"))


async def test_cancelled_transaction_closes_the_connection(smtpd, client) -> None:
    handler = recorder_for("pipelining", slow=1.0)
    smtp = await client(smtpd(handler))
    task = asyncio.ensure_future(smtp.transact(SENDER, ["a@example.net"], make_message("x")))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not smtp.is_connected  # replies were owed: never reuse the connection


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", ["a b@example.net", "x@y\x00z"])
async def test_bad_address_is_refused_before_anything_is_sent(smtpd, client, mode, bad) -> None:
    handler = recorder_for(mode)
    smtp, relay = await client(smtpd(handler), count=True)
    relay.flights = 0
    with pytest.raises(ValueError):
        await smtp.transact(SENDER, ["a@example.net", bad], make_message("x"))
    assert relay.flights == 0
    assert smtp.is_connected


@pytest.mark.parametrize("mode", MODES)
async def test_twenty_in_a_row_on_one_connection(smtpd, client, mode) -> None:
    handler = recorder_for(mode)
    smtp = await client(smtpd(handler))
    messages = [make_message(f"n{i}", f"message {i}\n.{i}\n") for i in range(20)]
    results = [await smtp.transact(SENDER, ["a@example.net"], m) for m in messages]
    assert [r.response.message for r in results] == [
        f"2.0.0 Ok: queued as Q{i + 1}" for i in range(20)
    ]
    assert [m.content for m in handler.messages] == messages
    assert {r.mode for r in results} == {mode}


async def test_pipelining_after_starttls(smtpd, client) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    handler = recorder_for("chunking")
    port = smtpd(handler, tls_context=server_ctx, require_starttls=True)

    smtp, relay = await client(port, count=True, start_tls=True, tls_context=client_ctx)
    assert smtp.get_transport_info("sslcontext") is not None
    result, flights = await send_counted(smtp, relay, SENDER, ["a@example.net"], b"x\r\n.y\r\n")
    assert (result.mode, result.round_trips, flights) == ("chunking", 1, 1)
    assert handler.messages[0].content == b"x\r\n.y\r\n"


# --------------------------------------------------------------------------- Postfix

needs_postfix = pytest.mark.skipif(
    pf.postfix_unavailable() is not None, reason=pf.postfix_unavailable() or ""
)


@pytest.fixture(scope="module")
def postfix():
    reason = pf.postfix_unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = pf.PostfixServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def maildir_form(message: bytes) -> bytes:
    """How the virtual agent stores a message: LF line ends."""
    return message.replace(b"\r\n", b"\n")


@needs_postfix
@pytest.mark.parametrize(("mode", "trips"), [("chunking", 1), ("pipelining", 2)])
async def test_postfix_exact_bytes_and_round_trips(postfix, client, mode, trips) -> None:
    smtp, relay = await client(postfix.port, count=True)
    assert smtp.supports_extension("pipelining")
    assert smtp.supports_extension("chunking")
    marker = f"postfix-{mode}-dots"
    message = make_message(marker, DOTTED_CHINESE_BODY)

    result, flights = await send_counted(
        smtp, relay, SENDER, ["ops@example.net", "交易员@example.net"], message, esmtp_mode=mode
    )

    assert (result.mode, result.round_trips, flights) == (mode, trips, trips)
    assert result.response.code == 250
    assert "queued as" in result.response.message
    if mode == "chunking":
        assert f"{len(message)} bytes" in result.response.message
    delivered = postfix.wait_for(marker.encode(), 2)
    assert len(delivered) == 2
    for raw in delivered:
        assert raw.endswith(maildir_form(message))


@needs_postfix
@pytest.mark.parametrize("mode", MODES)
async def test_postfix_fifty_on_one_connection(postfix, client, mode) -> None:
    smtp, relay = await client(postfix.port, count=True)
    relay.flights = 0
    marker = f"fifty-{mode}-"
    results = []
    for i in range(50):
        message = make_message(f"{marker}{i:02d}", f"n{i}\n.{i}\n")
        results.append(await smtp.transact(SENDER, ["ops@example.net"], message, esmtp_mode=mode))

    per_message = {"chunking": 1, "pipelining": 2, "sequential": 4}[mode]
    assert relay.flights == 50 * per_message
    assert {(r.mode, r.round_trips) for r in results} == {(mode, per_message)}
    queue_ids = {r.response.message.rsplit(" ", 1)[-1] for r in results}
    assert len(queue_ids) == 50
    await smtp.quit()
    # Postfix's own count of the session's commands, logged when the client leaves.
    verb = "bdat" if mode == "chunking" else "data"
    stats = postfix.wait_for_log(f" mail=50 rcpt=50 {verb}=50 quit=1 commands=")
    assert stats is not None, postfix.log()
    delivered = postfix.wait_for(marker.encode(), 50)
    subjects = sorted(
        line for raw in delivered for line in raw.splitlines() if line.startswith(b"Subject:")
    )
    assert subjects == [f"Subject: {marker}{i:02d}".encode() for i in range(50)]


@needs_postfix
@pytest.mark.parametrize("mode", MODES)
async def test_postfix_replies_per_recipient(postfix, client, mode) -> None:
    smtp = await client(postfix.port)
    marker = f"partial-{mode}"
    result = await smtp.transact(
        SENDER, [pf.REFUSED_RECIPIENT, "ops@example.net"], make_message(marker), esmtp_mode=mode
    )
    assert list(result.recipient_errors) == [pf.REFUSED_RECIPIENT]
    assert result.recipient_errors[pf.REFUSED_RECIPIENT].code == 550
    assert result.response.code == 250
    assert len(postfix.wait_for(marker.encode(), 1)) == 1

    with pytest.raises(SMTPRecipientsRefused) as info:
        await smtp.transact(
            SENDER, [pf.REFUSED_RECIPIENT], make_message("refused-all"), esmtp_mode=mode
        )
    assert [(r.recipient, r.code) for r in info.value.recipients] == [(pf.REFUSED_RECIPIENT, 550)]
    assert smtp.is_connected
    marker = f"after-refusal-{mode}"
    await smtp.transact(SENDER, ["ops@example.net"], make_message(marker), esmtp_mode=mode)
    assert len(postfix.wait_for(marker.encode(), 1)) == 1


@needs_postfix
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("sender", "size", "exc_type", "code"),
    [
        (pf.BLOCKED_SENDER, 100, SMTPSenderRefused, 550),
        (pf.BUSY_SENDER, 100, SMTPSenderRefused, 451),
        (SENDER, pf.MESSAGE_SIZE_LIMIT + 1000, SMTPSenderRefused, 552),
        (pf.CONTENT_REJECTED_SENDER, 100, SMTPDataError, 554),
    ],
    ids=["mail-550", "mail-451", "size-552", "content-554"],
)
async def test_postfix_refusals(postfix, client, mode, sender, size, exc_type, code) -> None:
    smtp = await client(postfix.port)
    with pytest.raises(exc_type) as info:
        await smtp.transact(
            sender, ["ops@example.net"], make_message("refused", "x" * size), esmtp_mode=mode
        )
    assert info.value.code == code
    assert smtp.is_connected
    marker = f"after-{code}-{mode}"
    result = await smtp.transact(SENDER, ["ops@example.net"], make_message(marker), esmtp_mode=mode)
    assert result.response.code == 250
    assert len(postfix.wait_for(marker.encode(), 1)) == 1
