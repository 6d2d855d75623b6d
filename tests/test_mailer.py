"""worker/mailer.py against aiosmtpd servers: TLS modes, AUTH, warm reuse, reconnects,
classification of failures, and "250 counts" whatever QUIT answers."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage

import aiosmtplib
import pytest

from tests.support.helpers import clean_env, settings_from
from worker.errors import (
    ConfigurationError,
    PermanentError,
    SendError,
    ThrottledError,
    TransientError,
)
from worker.mailer import Connection, SmtpPool, classify, message_bytes, tls_context
from worker.settings import Settings
from worker.smtp_fast import FastSMTP

USER, PASSWORD = "alerts@example.com", "abcdefghijklmnop"
SENDER, RCPT = "alerts@example.com", "trader@example.com"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    clean_env(monkeypatch, tmp_path)


def make_settings(server, *, ca_file=None, auth: bool | None = None, **kw) -> Settings:
    fields: dict[str, object] = {
        "smtp_host": server.host,
        "smtp_port": server.port,
        "smtp_tls": server.tls,
        "smtp_timeout_s": 5.0,
        "concurrency": 1,
    }
    if ca_file is not None:
        fields["smtp_ca_file"] = ca_file
    if auth if auth is not None else bool(server.auth):
        fields["smtp_username"] = USER
        fields["smtp_password"] = PASSWORD
    fields.update(kw)
    return settings_from(**fields)


def message(subject: str = "止损触发 600519") -> bytes:
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = RCPT
    msg["Subject"] = subject
    msg.set_content("价格 1700.5\n")
    return message_bytes(msg)


@pytest.fixture
async def conns() -> AsyncIterator[Callable[[Settings], Connection]]:
    made: list[Connection] = []

    def make(settings: Settings) -> Connection:
        ctx = tls_context(settings) if settings.smtp_tls != "none" else None
        conn = Connection(settings, ctx, name="t")
        made.append(conn)
        return conn

    yield make
    for conn in made:
        await conn.close()


async def send(conn: Connection, subject: str = "止损触发 600519"):
    return await conn.send(SENDER, [RCPT], message(subject))


# -- TLS modes and AUTH ---------------------------------------------------------------------


async def test_plain_no_auth(smtp_server, conns):
    conn = conns(make_settings(smtp_server))
    result, timing = await send(conn)
    assert result.response.code == 250
    assert timing.connect > 0 and not timing.reconnected
    (received,) = smtp_server.wait_for(1, 5)
    assert received.message["Subject"] == "止损触发 600519"
    assert received.mail_from == SENDER and received.rcpt_tos == [RCPT]


@pytest.mark.parametrize("mechanism", ["plain", "login"])
@pytest.mark.parametrize("tls", ["ssl", "starttls", "none"])
async def test_tls_and_auth_mechanisms(smtp_factory, tls_ca, conns, monkeypatch, tls, mechanism):
    used: list[str] = []
    for name in ("plain", "login"):
        original = getattr(FastSMTP, f"auth_{name}")

        async def spy(self, *args, _name=name, _original=original, **kwargs):
            used.append(_name)
            return await _original(self, *args, **kwargs)

        monkeypatch.setattr(FastSMTP, f"auth_{name}", spy)
    monkeypatch.setattr(FastSMTP, "AUTH_METHODS", (mechanism,))
    server = smtp_factory(tls=tls, auth={USER: PASSWORD})
    conn = conns(make_settings(server, ca_file=tls_ca.ca_file))
    timing = await conn.open()
    assert used == [mechanism]
    assert server.logins == 1
    if tls != "none":
        assert conn._smtp is not None
        assert conn._smtp.get_transport_info("sslcontext") is not None  # really encrypted
        assert timing.tls > 0
    result, _ = await send(conn)
    assert result.response.code == 250
    (received,) = server.wait_for(1, 5)
    assert received.message["Subject"] == "止损触发 600519"


async def test_login_required_by_the_server(smtp_factory, conns):
    server = smtp_factory(auth={USER: PASSWORD})
    conn = conns(make_settings(server, auth=False))
    with pytest.raises(ConfigurationError) as info:  # pauses delivery, keeps the events
        await send(conn)
    assert server.messages == []
    assert info.value.code == 530


@pytest.mark.parametrize("tls", ["ssl", "starttls"])
async def test_certificate_validation_is_on_by_default(smtp_factory, conns, tls):
    server = smtp_factory(tls=tls, auth={USER: PASSWORD})
    settings = make_settings(server)  # no CA file: the trustme CA is not trusted
    assert settings.smtp_validate_certs is True
    conn = conns(settings)
    with pytest.raises(ConfigurationError) as info:
        await conn.open()
    assert "TLS failure" in str(info.value)
    assert "NOTIFIER_SMTP_CA_FILE" in str(info.value)
    assert server.logins == 0
    assert not conn.is_open


async def test_certificate_for_another_host_is_refused(smtp_factory, tls_ca, conns):
    # a certificate from the trusted CA, but for another name than the one we connect to
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.ca.issue_cert("smtp.other.example").configure_cert(ctx)
    server = smtp_factory(tls="ssl", auth={USER: PASSWORD}, ssl_context=ctx)
    settings = make_settings(server, ca_file=tls_ca.ca_file)
    with pytest.raises(ConfigurationError, match="TLS failure"):
        await conns(settings).open()
    assert server.logins == 0


async def test_validation_can_be_turned_off(smtp_factory, conns):
    server = smtp_factory(tls="ssl", auth={USER: PASSWORD})
    conn = conns(make_settings(server, smtp_validate_certs=False))
    result, _ = await send(conn)
    assert result.response.code == 250


async def test_wrong_password_is_a_configuration_error_with_the_qq_hint(
    smtp_factory, tls_ca, conns
):
    server = smtp_factory(tls="ssl", auth={USER: "the-real-code"})
    settings = make_settings(server, ca_file=tls_ca.ca_file, smtp_provider="qq")
    assert (settings.smtp_host, settings.smtp_port) == ("127.0.0.1", server.port)  # explicit wins
    conn = conns(settings)
    with pytest.raises(ConfigurationError) as info:
        await send(conn)
    err = info.value
    assert err.code == 535
    assert err.category == "configuration"
    assert "授权码" in str(err) and "authorization code" in str(err)
    assert PASSWORD not in str(err)
    assert server.messages == []


async def test_wrong_password_hint_without_provider(smtp_factory, conns):
    server = smtp_factory(auth={USER: "other"})
    with pytest.raises(ConfigurationError, match="check username and password"):
        await conns(make_settings(server)).open()


# -- one warm connection ------------------------------------------------------------------------


async def test_one_connection_reused_for_many_messages(smtp_factory, tls_ca, conns):
    server = smtp_factory(tls="ssl", auth={USER: PASSWORD})
    conn = conns(make_settings(server, ca_file=tls_ca.ca_file))
    timings = []
    for i in range(10):
        result, timing = await send(conn, f"message {i}")
        assert result.response.code == 250
        timings.append(timing)
    received = server.wait_for(10, 5)
    assert [m.message["Subject"] for m in received] == [f"message {i}" for i in range(10)]
    assert server.connections == 1
    assert server.logins == 1
    assert timings[0].connect > 0
    assert all(t.connect == 0 and not t.reconnected for t in timings[1:])
    assert conn.messages == 10


async def test_connection_is_recycled_after_max_messages(smtp_server, conns):
    conn = conns(make_settings(smtp_server, smtp_max_messages_per_connection=3))
    for i in range(7):
        await send(conn, f"m{i}")
    assert smtp_server.connections == 3
    assert len(smtp_server.wait_for(7, 5)) == 7


async def test_mailer_lanes_each_own_a_connection(smtp_factory):
    server = smtp_factory(auth={USER: PASSWORD})
    mailer = SmtpPool(make_settings(server), lanes=3)
    try:
        assert await mailer.warm_up() == []
        assert mailer.open_connections == 3
        assert server.connections == 3 and server.logins == 3
        await asyncio.gather(
            *(
                c.send(SENDER, [RCPT], message(f"lane {i}"))
                for i, c in enumerate(mailer.connections)
            )
        )
        assert server.connections == 3
        assert len(server.wait_for(3, 5)) == 3
    finally:
        await mailer.close()
    assert mailer.open_connections == 0


async def test_mailer_warm_up_reports_configuration_errors(smtp_factory):
    server = smtp_factory(auth={USER: "other"})
    mailer = SmtpPool(make_settings(server), lanes=2)
    try:
        errors = await mailer.warm_up()
    finally:
        await mailer.close()
    assert len(errors) == 2
    assert all(isinstance(e, ConfigurationError) for e in errors)


# -- the server closes an idle warm connection -------------------------------------------------


@pytest.mark.parametrize("noticed", [True, False], ids=["close-seen", "close-unseen"])
@pytest.mark.parametrize("tls", ["none", "ssl"])
async def test_server_closing_an_idle_connection_is_transparent(
    smtp_factory, tls_ca, conns, tls, noticed
):
    server = smtp_factory(tls=tls, auth={USER: PASSWORD})
    conn = conns(make_settings(server, ca_file=tls_ca.ca_file))
    await send(conn, "before")
    assert server.connections == 1
    server.stop()  # aborts every open connection
    server.start()  # listening again, same port
    if noticed:
        await asyncio.sleep(0.1)  # our loop has seen the connection go
    result, timing = await send(conn, "after")  # must not raise
    assert result.response.code == 250
    assert timing.reconnected is True
    assert timing.connect > 0
    assert server.connections == 2
    subjects = [m.message["Subject"] for m in server.wait_for(2, 5)]
    assert subjects == ["before", "after"]
    # and the new connection is warm again
    _, timing = await send(conn, "third")
    assert not timing.reconnected and timing.connect == 0
    assert server.connections == 2


async def test_idle_timeout_reopens_before_sending(smtp_server, conns):
    conn = conns(make_settings(smtp_server, smtp_idle_timeout_s=0.05))
    await send(conn)
    await asyncio.sleep(0.1)
    _, timing = await send(conn)
    assert timing.reconnected and timing.connect > 0
    assert smtp_server.connections == 2


async def test_server_down_while_reconnecting_is_transient(smtp_server, conns):
    conn = conns(make_settings(smtp_server, smtp_timeout_s=1.0))
    await send(conn)
    smtp_server.stop()
    with pytest.raises(TransientError):
        await send(conn)
    assert not conn.is_open
    smtp_server.start()
    result, _ = await send(conn)
    assert result.response.code == 250


async def test_fresh_connection_dropped_at_end_of_data_is_transient_not_resent(smtp_server, conns):
    conn = conns(make_settings(smtp_server))
    smtp_server.drop_next(1)
    with pytest.raises(TransientError):
        await send(conn)
    assert smtp_server.messages == []
    assert smtp_server.transactions == 1  # a fresh connection is not silently retried
    assert not conn.is_open


# -- failure replies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "code", "text", "kind"),
    [
        ("DATA", 451, "4.3.0 try again later", TransientError),
        ("DATA", 550, "5.7.1 content rejected", PermanentError),
        ("DATA", 552, "5.3.4 message too big for now", TransientError),
        ("MAIL", 421, "4.7.0 too many connections", ThrottledError),
        ("RCPT", 550, "5.1.1 no such user", PermanentError),
        ("DATA", 550, "Mail content denied. frequency limited", ThrottledError),
    ],
)
async def test_failure_replies_are_classified_and_the_connection_kept(
    smtp_server, conns, stage, code, text, kind
):
    conn = conns(make_settings(smtp_server))
    await send(conn, "warm")
    smtp_server.fail_next(stage, code, text)
    with pytest.raises(kind) as info:
        await send(conn, "refused")
    assert type(info.value) is kind
    assert info.value.code == code
    result, _ = await send(conn, "next")
    assert result.response.code == 250
    assert [m.message["Subject"] for m in smtp_server.wait_for(2, 5)] == ["warm", "next"]


# -- 250 counts, whatever QUIT answers -------------------------------------------------------------


class ScriptedSMTP:
    """A minimal SMTP server whose reply to QUIT is chosen by the test."""

    def __init__(self, quit_reply: bytes | None) -> None:
        self.quit_reply = quit_reply
        self.received: list[bytes] = []
        self.commands: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 scripted ESMTP\r\n")
            while line := await reader.readline():
                verb = line.split()[0].upper() if line.split() else b""
                self.commands.append(verb)
                if verb == b"EHLO":
                    writer.write(b"250-scripted\r\n250 8BITMIME\r\n")
                elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    writer.write(b"250 OK\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    data = b""
                    while (chunk := await reader.readline()) != b".\r\n":
                        data += chunk
                    self.received.append(data)
                    writer.write(b"250 2.0.0 queued as 1\r\n")
                elif verb == b"QUIT":
                    if self.quit_reply is not None:
                        writer.write(self.quit_reply)
                        await writer.drain()
                        writer.close()
                        return
                    await asyncio.sleep(30)  # never answers
                else:
                    writer.write(b"502 no\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize(
    "quit_reply",
    [b"\x00\xffgarbage\r\n", b"500 what\r\n", b"", None],
    ids=["garbage", "500", "close", "silence"],
)
async def test_250_counts_whatever_quit_answers(quit_reply, monkeypatch):
    scripted = ScriptedSMTP(quit_reply)
    await scripted.start()
    try:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, smtp_host="127.0.0.1", smtp_port=scripted.port, smtp_tls="none",
            smtp_timeout_s=5.0,
        )  # fmt: skip
        conn = Connection(settings, None)
        result, _timing = await conn.send(SENDER, [RCPT], message())
        assert result.response.code == 250
        assert b"QUIT" not in scripted.commands  # nothing after the 250 in the send path
        assert len(scripted.received) == 1
        t0 = time.monotonic()
        await conn.close()  # QUIT fails one way or another: never raises
        assert time.monotonic() - t0 < 1.5  # bounded even when QUIT is never answered
        assert b"QUIT" in scripted.commands
        assert not conn.is_open
    finally:
        await scripted.stop()


# -- classify ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (aiosmtplib.SMTPResponseException(451, "4.3.0 busy"), TransientError),
        (aiosmtplib.SMTPResponseException(421, "4.4.2 closing"), TransientError),
        (aiosmtplib.SMTPResponseException(550, "5.1.1 unknown user"), PermanentError),
        (aiosmtplib.SMTPResponseException(554, "5.7.1 spam"), PermanentError),
        (aiosmtplib.SMTPResponseException(552, "5.3.4 too big"), TransientError),
        (aiosmtplib.SMTPResponseException(535, "5.7.8 bad credentials"), ConfigurationError),
        (aiosmtplib.SMTPAuthenticationError(535, "5.7.8 bad credentials"), ConfigurationError),
        (aiosmtplib.SMTPResponseException(550, "MI:SFQ sending too fast"), ThrottledError),
        (aiosmtplib.SMTPResponseException(450, "4.2.1 rate too high"), ThrottledError),
        (aiosmtplib.SMTPResponseException(554, "5.2.252 SendAsDenied"), ThrottledError),
        (aiosmtplib.SMTPConnectResponseError(554, "go away"), ConfigurationError),
        (aiosmtplib.SMTPConnectResponseError(421, "busy"), TransientError),
        (aiosmtplib.SMTPServerDisconnected("gone"), TransientError),
        (aiosmtplib.SMTPConnectError("refused"), TransientError),
        (aiosmtplib.SMTPReadTimeoutError("slow"), TransientError),
        (TimeoutError(), TransientError),
        (ConnectionResetError(104, "reset"), TransientError),
        (ssl.SSLCertVerificationError("certificate verify failed"), ConfigurationError),
        (aiosmtplib.SMTPException("SMTP AUTH extension not supported"), ConfigurationError),
        (aiosmtplib.SMTPNotSupported("SMTPUTF8"), PermanentError),
        (ValueError("bad address"), PermanentError),
        (RuntimeError("surprise"), TransientError),
    ],
)
def test_classify(exc, kind):
    err = classify(exc)
    assert type(err) is kind
    assert isinstance(err, SendError)
    assert str(err)


def test_classify_tls_failure_wrapped_in_another_exception():
    try:
        try:
            raise ssl.SSLError("handshake failure")
        except ssl.SSLError as inner:
            raise aiosmtplib.SMTPConnectError("connect failed") from inner
    except aiosmtplib.SMTPConnectError as outer:
        assert isinstance(classify(outer), ConfigurationError)


def test_classify_recipients_refused():
    refused = aiosmtplib.SMTPRecipientsRefused(
        [aiosmtplib.SMTPRecipientRefused(550, "5.1.1 no such user", "x@example.com")]
    )
    err = classify(refused)
    assert isinstance(err, PermanentError) and err.code == 550
    assert "x@example.com" in str(err)
    busy = aiosmtplib.SMTPRecipientsRefused(
        [
            aiosmtplib.SMTPRecipientRefused(550, "5.1.1 no such user", "x@example.com"),
            aiosmtplib.SMTPRecipientRefused(451, "4.3.0 greylisted", "y@example.com"),
        ]
    )
    assert isinstance(classify(busy), TransientError)  # one worth retrying: retry


@pytest.mark.parametrize(("provider", "words"), [("qq", "授权码"), ("163", "授权码"),
                                                 ("gmail", "app password"), (None, "username")])  # fmt: skip
def test_auth_hints(provider, words):
    err = classify(aiosmtplib.SMTPAuthenticationError(535, "denied"), provider)
    assert isinstance(err, ConfigurationError)
    assert words in str(err)


def test_send_error_passes_through():
    err = TransientError("x")
    assert classify(err) is err
