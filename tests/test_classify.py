"""Classification of SMTP failures (worker/mailer.py ``classify``), by type and reply code.

The table uses the providers' own reply texts. aiosmtplib exceptions are built directly, as
aiosmtplib raises them (``message`` without the code); a few cases then go through a real
:class:`~worker.mailer.Connection` against the test SMTP server, so that what aiosmtplib
actually raises is classified the same way.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import pytest
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPDataError,
    SMTPReadTimeoutError,
    SMTPRecipientRefused,
    SMTPRecipientsRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from tests.support.helpers import QQ_535, settings_from
from worker.errors import (
    ConfigurationError,
    PermanentError,
    SendError,
    ThrottledError,
    TransientError,
)
from worker.mailer import THROTTLE_RULES, Connection, classify, tls_context
from worker.settings import Settings

SENDER = "alerts@example.com"
RCPT = "trader@example.com"

QQ_HELP = "http://service.mail.qq.com/cgi-bin/help?subtype=1&&id=20022&&no=1000722"


def data_error(code: int, text: str) -> SMTPDataError:
    return SMTPDataError(code, text)


def sender_refused(code: int, text: str) -> SMTPSenderRefused:
    return SMTPSenderRefused(code, text, SENDER)


def rcpt_refused(code: int, text: str) -> SMTPRecipientsRefused:
    return SMTPRecipientsRefused([SMTPRecipientRefused(code, text, RCPT)])


def response(code: int, text: str) -> SMTPResponseException:
    return SMTPResponseException(code, text)


# (provider, code, reply text without the code), as the providers send them.
THROTTLED_REPLIES = [
    ("qq", 550, f"Connection frequency limited. {QQ_HELP}"),
    ("qq", 550, f"Ip frequency limited. {QQ_HELP}"),
    ("qq", 550, f"Sender frequency limited. {QQ_HELP}"),
    ("qq", 550, "Connection frequency limited"),
    ("netease", 451, "MI:SFQ 发信人在15分钟内的发信数量超过限制，请控制发信频率"),
    ("netease", 550, "MI:STC 发件人当天的连接数量超出了限定数量，当天不再接受该发件人的邮件"),
    ("netease", 554, "MI:STC"),
    ("netease", 421, "HL:ICC 该IP同时并发连接数过大，超过了网易的限制，被临时禁止连接"),
    ("netease", 451, "MI:DMC 当前连接发送的邮件数量超出限制。请减少每次连接中投递的邮件数量"),
    (
        "gmail",
        450,
        "4.2.1 The user you are trying to contact is receiving mail at a rate that prevents "
        "additional messages from being delivered. https://support.google.com/mail/?p=ReceivingRate",
    ),
    (
        "gmail",
        550,
        "5.4.5 Daily user sending limit exceeded. https://support.google.com/mail/?p=ReachingLimits",
    ),
]

# Each reply arrives at whichever stage the provider chooses to say it.
STAGES = {
    "MAIL": sender_refused,
    "RCPT": rcpt_refused,
    "DATA": data_error,
    "reply": response,
}


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize(
    ("provider", "code", "text"),
    THROTTLED_REPLIES,
    ids=[f"{p}-{c}-{t.split()[0]}" for p, c, t in THROTTLED_REPLIES],
)
def test_provider_throttle_replies_are_throttled(stage, provider, code, text):
    err = classify(STAGES[stage](code, text))
    assert isinstance(err, ThrottledError), (stage, code, text, err)
    assert err.category == "throttled"
    assert err.code == code
    # The hint names the rule that matched: the provider's own entry, not the generic one.
    rule = next(r for r in THROTTLE_RULES if r.meaning == err.hint)
    assert rule.provider == provider
    assert err.message == text  # the provider's reply is kept for the log and dead letter


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (421, "4.7.0 Try again later, closing connection."),
        (421, "Service not available, closing transmission channel"),
        (451, "4.3.0 Local error in processing"),
        (451, "Requested action aborted: local error in processing"),
        (452, "4.3.1 Insufficient system storage"),
        (450, "4.2.0 Mailbox busy"),
        (552, "5.3.4 Message size exceeds fixed maximum message size"),
        (552, "Requested mail action aborted: exceeded storage allocation"),
    ],
)
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_plain_4xx_and_552_are_transient(stage, code, text):
    err = classify(STAGES[stage](code, text))
    assert type(err) is TransientError, (stage, code, text, err)
    assert err.category == "transient"
    assert err.code == code


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (550, "Mailbox unavailable"),
        (550, "5.1.1 The email account that you tried to reach does not exist."),
        (550, "User not found: nobody@163.com"),
        (554, "DT:SPM 发送的邮件内容包含了未被许可的信息，或被系统识别为垃圾邮件"),
        (554, "5.7.1 Message rejected as spam by Content Filtering"),
        (553, "5.1.3 Invalid recipient address"),
        (551, "User not local; please try <forward@example.com>"),
    ],
)
@pytest.mark.parametrize("stage", ["RCPT", "DATA", "reply"])
def test_other_5xx_are_permanent(stage, code, text):
    err = classify(STAGES[stage](code, text))
    assert type(err) is PermanentError, (stage, code, text, err)
    assert err.category == "permanent"
    assert err.code == code
    assert text[:15] in str(err)


def test_throttle_marker_needs_its_code():
    # Classification is by code first: a marker under a code the rule does not list
    # (or text that merely mentions a provider marker) does not make a reply throttled.
    assert type(classify(data_error(552, "frequency limited"))) is TransientError
    assert type(classify(data_error(550, "Mailbox unavailable (not MI:STCX)"))) is PermanentError
    assert type(classify(data_error(554, "5.7.1 spam, see 4.2.1 in our policy"))) is PermanentError


def test_recipients_refused_mixed_codes_prefers_the_retryable():
    exc = SMTPRecipientsRefused(
        [
            SMTPRecipientRefused(550, "5.1.1 Mailbox unavailable", "a@example.com"),
            SMTPRecipientRefused(451, "4.3.0 try again later", "b@example.com"),
        ]
    )
    assert type(classify(exc)) is TransientError
    only_bad = SMTPRecipientsRefused(
        [SMTPRecipientRefused(550, "5.1.1 Mailbox unavailable", "a@example.com")]
    )
    err = classify(only_bad)
    assert type(err) is PermanentError
    assert "a@example.com" in str(err) and "Mailbox unavailable" in str(err)


NETEASE_535 = "Error: authentication failed"
GMAIL_534 = "5.7.9 Application-specific password required."


@pytest.mark.parametrize(
    ("provider", "code", "text"),
    [("qq", 535, QQ_535), ("163", 535, NETEASE_535), ("qq", 534, QQ_535), ("163", 534, "x")],
)
def test_auth_rejected_on_qq_and_163_is_configuration_with_the_authorization_code_hint(
    provider, code, text
):
    err = classify(SMTPAuthenticationError(code, text), provider)
    assert isinstance(err, ConfigurationError)
    assert err.category == "configuration"
    assert err.code == code
    assert err.hint is not None and "授权码" in err.hint
    assert "授权码" in str(err)  # the log line and `notifier check` print str(err)
    assert text[:20] in str(err)


@pytest.mark.parametrize("provider", [None, "gmail", "outlook"])
def test_auth_rejected_elsewhere_is_configuration_without_the_qq_hint(provider):
    err = classify(
        SMTPAuthenticationError(535, "5.7.8 Username and Password not accepted"), provider
    )
    assert isinstance(err, ConfigurationError)
    assert err.hint and "授权码" not in err.hint
    gmail = classify(SMTPAuthenticationError(534, GMAIL_534), "gmail")
    assert isinstance(gmail, ConfigurationError) and "app password" in str(gmail)


@pytest.mark.parametrize("code", [534, 535])
def test_auth_reply_codes_are_configuration_even_outside_login(code):
    # Some servers answer 535/534 to MAIL when the session is not authenticated.
    err = classify(sender_refused(code, "5.7.8 authentication failed"), "163")
    assert isinstance(err, ConfigurationError)
    assert "授权码" in str(err)


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:
        return exc


@pytest.mark.parametrize(
    "exc",
    [
        ssl.SSLCertVerificationError(
            1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
        ),
        ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
        _chained(
            SMTPConnectError("Error connecting to smtp.qq.com on port 465"),
            ssl.SSLCertVerificationError(1, "certificate verify failed: self signed certificate"),
        ),
        _chained(SMTPServerDisconnected("Connection lost"), ssl.SSLError(1, "handshake failure")),
    ],
    ids=["cert", "ssl", "connect-from-cert", "disconnect-from-ssl"],
)
def test_tls_and_certificate_failures_are_configuration(exc):
    err = classify(exc, "qq")
    assert isinstance(err, ConfigurationError), err
    assert "TLS" in str(err)
    assert err.hint and "NOTIFIER_SMTP_TLS" in err.hint


@pytest.mark.parametrize(
    "exc",
    [
        SMTPServerDisconnected("Server disconnected unexpectedly"),
        SMTPServerDisconnected(""),
        SMTPReadTimeoutError("Timed out waiting for server response"),
        SMTPConnectTimeoutError("Timed out connecting to smtp.qq.com on port 465"),
        SMTPTimeoutError("Timed out"),
        TimeoutError(),
        TimeoutError("slow"),
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        SMTPConnectError(
            "Error connecting to 127.0.0.1 on port 1: [Errno 111] Connect call failed"
        ),
        socket.gaierror(-3, "Temporary failure in name resolution"),
        OSError(101, "Network is unreachable"),
        SMTPConnectResponseError(421, "4.3.2 Service not available"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_disconnects_timeouts_and_network_errors_are_transient(exc):
    err = classify(exc)
    assert isinstance(err, TransientError) and not isinstance(err, ThrottledError), err
    assert err.category == "transient"
    assert str(err)  # never an empty reason in the log or the dead letter


def test_greeting_refusal_is_not_blamed_on_the_event():
    # 554 in the greeting ("no SMTP service here") says nothing about the message.
    err = classify(SMTPConnectResponseError(554, "5.7.1 Service unavailable; client blocked"))
    assert isinstance(err, ConfigurationError)
    throttled = classify(SMTPConnectResponseError(421, "HL:ICC too many connections"))
    assert isinstance(throttled, ThrottledError)


def test_classify_keeps_send_errors_and_never_raises():
    mine = TransientError("already classified")
    assert classify(mine) is mine
    for exc in [RuntimeError("boom"), ValueError("bad address"), KeyError("x"), Exception()]:
        err = classify(exc)
        assert isinstance(err, SendError)
        assert err.category in ("transient", "permanent", "configuration", "throttled")


def test_send_error_text_has_code_and_hint():
    err = ThrottledError("Connection frequency limited", code=550, hint="slow down")
    assert str(err) == "550 Connection frequency limited (slow down)"
    assert str(TransientError("timed out")) == "timed out"


def test_every_throttle_rule_is_well_formed():
    assert THROTTLE_RULES, "the throttle table must not be empty"
    providers = {rule.provider for rule in THROTTLE_RULES}
    assert {"qq", "netease", "gmail"} <= providers
    for rule in THROTTLE_RULES:
        assert rule.codes and all(400 <= c < 600 for c in rule.codes), rule
        assert rule.meaning
        assert not rule.marker.search(""), f"{rule.provider}: marker matches empty text"
        assert not rule.marker.search("Mailbox unavailable"), rule


# -- what aiosmtplib really raises, through a real Connection ----------------------------


def _settings(**values: Any) -> Settings:
    base: dict[str, Any] = {
        "smtp_tls": "none",
        "mail_from": SENDER,
        "mail_to": RCPT,
        "smtp_timeout_s": 3,
        "redis_url": "redis://127.0.0.1:1/0",  # never contacted
    }
    return settings_from(**(base | values))


def _message() -> bytes:
    return b"From: alerts@example.com\r\nTo: trader@example.com\r\nSubject: t\r\n\r\nbody\r\n"


async def _send(settings: Settings, ctx: ssl.SSLContext | None = None) -> SendError:
    conn = Connection(settings, ctx)
    try:
        await conn.send(SENDER, [RCPT], _message())
    except SendError as err:
        return err
    finally:
        await conn.close()
    raise AssertionError("the send did not fail")


async def test_real_untrusted_certificate_is_configuration(smtp_factory):
    server = smtp_factory(tls="ssl")
    # The system trust store does not know the test CA.
    settings = _settings(smtp_host="127.0.0.1", smtp_port=server.port, smtp_tls="ssl")
    err = await _send(settings, tls_context(settings))
    assert isinstance(err, ConfigurationError), err
    assert "certificate" in str(err).lower()


async def test_real_plain_client_against_tls_port_is_not_permanent(smtp_factory):
    server = smtp_factory(tls="ssl")
    settings = _settings(
        smtp_host="127.0.0.1", smtp_port=server.port, smtp_tls="none", smtp_timeout_s=1
    )
    err = await _send(settings)
    assert not isinstance(err, PermanentError), err


async def test_real_connection_refused_is_transient(smtp_server):
    port = smtp_server.port
    smtp_server.stop()
    err = await _send(_settings(smtp_host="127.0.0.1", smtp_port=port))
    assert type(err) is TransientError, err


async def test_real_dropped_connection_is_transient(smtp_server):
    smtp_server.drop_next()
    err = await _send(_settings(smtp_host="127.0.0.1", smtp_port=smtp_server.port))
    assert type(err) is TransientError, err


@pytest.mark.parametrize(
    ("stage", "code", "text", "kind"),
    [
        ("MAIL", 550, "Connection frequency limited", ThrottledError),
        ("RCPT", 550, "5.1.1 Mailbox unavailable", PermanentError),
        ("DATA", 451, "MI:SFQ 发信人在15分钟内的发信数量超过限制", ThrottledError),
        ("DATA", 554, "5.7.1 Message rejected as spam", PermanentError),
        ("DATA", 451, "4.3.0 try again later", TransientError),
        ("DATA", 552, "5.3.4 Message too big", TransientError),
        ("MAIL", 421, "4.7.0 Try again later, closing connection.", TransientError),
    ],
)
async def test_real_server_replies(smtp_server, stage, code, text, kind):
    smtp_server.fail_next(stage, code, text)
    err = await _send(_settings(smtp_host="127.0.0.1", smtp_port=smtp_server.port))
    assert type(err) is kind, err
    if kind is not TransientError or code != 421:  # aiosmtplib turns a 421 into a disconnect
        assert err.code == code


async def test_real_auth_failure_is_configuration_with_hint(smtp_factory):
    server = smtp_factory(auth={"12345@qq.com": "abcdefghijklmnop"})
    server.auth_fail(535, QQ_535)
    settings = _settings(
        smtp_host="127.0.0.1",
        smtp_port=server.port,
        smtp_provider="qq",
        smtp_username="12345@qq.com",
        smtp_password="abcdefghijklmnop",
    )
    err = await _send(settings)
    assert isinstance(err, ConfigurationError), err
    assert err.code == 535 and "授权码" in str(err)
