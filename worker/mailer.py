"""SMTP: warm, authenticated connections (one per lane) and the classification of failures.

Every lane owns one :class:`Connection`: opened once (connect, TLS, login), reused for every
message, reopened transparently when the server closed it while idle, recycled after
``SMTP_MAX_MESSAGES_PER_CONNECTION`` messages and closed after ``SMTP_IDLE_TIMEOUT_S``.
aiosmtplib serialises commands on one connection, so parallelism is several connections.

Once the server has answered 250 to the end of the message, the message is delivered:
errors from QUIT or any later command are ignored (QQ mail answers QUIT with garbage).

:func:`classify` turns any exception of a delivery attempt into one of the
:mod:`worker.errors` classes, by exception type and reply code; provider replies that mean
"too fast" or "quota" are recognised by code plus the provider's own marker (``THROTTLE_RULES``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage

import aiosmtplib
from aiosmtplib.email import flatten_message

from .compose import Mail
from .errors import (
    ConfigurationError,
    PermanentError,
    SendError,
    ThrottledError,
    TransientError,
)
from .settings import SmtpAccount
from .smtp_fast import (
    FastSMTP,
    SMTPConnectionRefused,
    SMTPHostNotFound,
    SMTPWrongTLSMode,
    TransactResult,
)

__all__ = [
    "THROTTLE_RULES",
    "Connection",
    "SendTiming",
    "SmtpPool",
    "ThrottleRule",
    "classify",
    "message_bytes",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ThrottleRule:
    """A provider reply meaning "slow down": codes it comes with and its marker text."""

    provider: str
    codes: frozenset[int]
    marker: re.Pattern[str]
    meaning: str


def _rule(provider: str, codes: Sequence[int], marker: str, meaning: str) -> ThrottleRule:
    return ThrottleRule(provider, frozenset(codes), re.compile(marker, re.IGNORECASE), meaning)


# One table, easy to extend: (provider, reply codes, marker in the reply, what it means). The
# code must match and the marker must appear in the reply.
_THROTTLES: tuple[tuple[str, tuple[int, ...], str, str], ...] = (
    (
        "qq",
        (550, 554, 451, 421),
        r"frequency limited",
        "QQ mail: connection/IP/sender frequency limited",
    ),
    ("netease", (451, 550, 554), r"\bMI:SFQ\b", "NetEase: sender sending too fast (MI:SFQ)"),
    ("netease", (550, 554, 451), r"\bMI:STC\b", "NetEase: sender over daily quota (MI:STC)"),
    ("netease", (421, 451), r"\bHL:ICC\b", "NetEase: too many connections from IP (HL:ICC)"),
    (
        "netease",
        (451, 421, 550),
        r"\bMI:DMC\b",
        "NetEase: too many messages on one connection (MI:DMC)",
    ),
    ("gmail", (450, 421), r"\b4\.2\.1\b", "Gmail: receiving or sending rate too high"),
    ("gmail", (550, 554), r"\b5\.4\.5\b", "Gmail: daily sending quota exceeded"),
    ("gmail", (421,), r"\b4\.7\.28\b", "Gmail: unusual rate of mail"),
    (
        "outlook",
        (554, 550),
        r"\b5\.2\.252\b|SendAsDenied.*exceeded|\b5\.7\.708\b",
        "Outlook: sending limit exceeded",
    ),
    (
        "generic",
        (421, 450, 451, 452, 550, 554),
        r"too many (messages|connections|mails)|rate limit|ratelimit|quota exceeded"
        r"|try again later, sending limit",
        "rate or quota limit",
    ),
)
THROTTLE_RULES: tuple[ThrottleRule, ...] = tuple(_rule(*row) for row in _THROTTLES)

AUTH_HINT = {
    "qq": "QQ mail: the password must be the 16-character authorization code (授权码), not the "
    "QQ password; enable POP3/SMTP in the mailbox settings (设置 → 账户)",
    "163": "163 mail: the password must be the authorization code (授权码); enable SMTP in "
    "the mailbox settings (设置 → POP3/SMTP/IMAP)",
    "126": "126 mail: the password must be the authorization code (授权码); enable SMTP in "
    "the mailbox settings",
    "gmail": "Gmail: use an app password (2-step verification required)",
}


def _throttle(code: int, text: str) -> ThrottleRule | None:
    for rule in THROTTLE_RULES:
        if code in rule.codes and rule.marker.search(text):
            return rule
    return None


def _classify_reply(code: int, text: str, provider: str | None) -> SendError:
    rule = _throttle(code, text)
    if rule is not None:
        return ThrottledError(text, code=code, hint=rule.meaning)
    if code in (534, 535, 530, 538):
        return ConfigurationError(
            text, code=code, hint=AUTH_HINT.get(provider or "", "check username and password")
        )
    if 400 <= code < 500 or code == 552:  # RFC 5321 4.5.3.1.10: treat 552 as temporary
        return TransientError(text, code=code)
    if 500 <= code < 600:
        return PermanentError(text, code=code)
    return TransientError(f"unexpected reply: {text}", code=code)


def _is_tls_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError | ssl.CertificateError):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _connect_error(exc: BaseException) -> SendError | None:
    """A connection setting that is wrong, in one line with the fix (see README "When a
    setting is wrong"). Nobody listening and DNS not answering may pass (a restart, an
    outage): transient, the account is down and retried; the rest is configuration."""
    if isinstance(exc, SMTPWrongTLSMode):
        if exc.server_speaks == "tls":
            return ConfigurationError(
                f"port {exc.port} speaks implicit TLS",
                hint="set NOTIFIER_SMTP_TLS=ssl, or NOTIFIER_SMTP_PORT=587 for starttls",
            )
        return ConfigurationError(
            f"port {exc.port} speaks plain SMTP/STARTTLS",
            hint="set NOTIFIER_SMTP_TLS=starttls, or NOTIFIER_SMTP_PORT=465 for ssl",
        )
    if isinstance(exc, SMTPConnectionRefused):
        return TransientError(
            f"connection refused on {exc.hostname}:{exc.port}",
            hint="is the SMTP server running / is NOTIFIER_SMTP_PORT right?",
        )
    if isinstance(exc, SMTPHostNotFound):
        message = f"cannot resolve NOTIFIER_SMTP_HOST={exc.hostname}: {exc.detail}"
        if exc.temporary:
            return TransientError(message, hint="check this host's network and DNS resolver")
        return ConfigurationError(message, hint="check the name, or use NOTIFIER_SMTP_PROVIDER")
    return None


def classify(exc: BaseException, provider: str | None = None) -> SendError:
    """Map any exception from a connect, login or send into a SendError subclass."""
    if isinstance(exc, SendError):
        return exc
    connecting = _connect_error(exc)
    if connecting is not None:
        return connecting
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        hint = AUTH_HINT.get(provider or "", "check username and password")
        return ConfigurationError(exc.message, code=exc.code, hint=hint)
    if _is_tls_failure(exc):
        return ConfigurationError(
            f"TLS failure: {exc}",
            hint="check NOTIFIER_SMTP_TLS/NOTIFIER_SMTP_PORT (465 = ssl, 587 = starttls) and the "
            "server certificate (NOTIFIER_SMTP_CA_FILE, NOTIFIER_SMTP_VALIDATE_CERTS)",
        )
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        errors = [_classify_reply(r.code, r.message, provider) for r in exc.recipients]
        for kind in (ThrottledError, TransientError, ConfigurationError):
            found = [e for e in errors if isinstance(e, kind)]
            if found:
                return found[0]
        first = exc.recipients[0]
        return PermanentError(
            f"recipient {first.recipient} refused: {first.message}", code=first.code
        )
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
        # The server refused us before any mail was sent: nothing to do with the event.
        err = _classify_reply(exc.code, exc.message, provider)
        if isinstance(err, PermanentError):
            return ConfigurationError(exc.message, code=exc.code, hint="the server refuses service")
        return err
    if isinstance(exc, aiosmtplib.SMTPSenderRefused | aiosmtplib.SMTPHeloError):
        # The server refuses *us* (sender address, HELO), whatever the event: a 5xx here
        # is our configuration, not the event's fault, and must not dead-letter events.
        err = _classify_reply(exc.code, exc.message, provider)
        if isinstance(err, PermanentError):
            if isinstance(exc, aiosmtplib.SMTPSenderRefused):
                hint = (
                    "NOTIFIER_MAIL_FROM must be the account's own address (QQ/163 refuse any "
                    "other sender)"
                )
            else:
                hint = "the server refuses our HELO/EHLO"
            return ConfigurationError(exc.message, code=exc.code, hint=hint)
        return err
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _classify_reply(exc.code, exc.message, provider)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return PermanentError(f"not supported by the server: {exc}")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPConnectError):
        return TransientError(str(exc) or type(exc).__name__)
    if isinstance(exc, TimeoutError):  # SMTPTimeoutError is a TimeoutError
        return TransientError(f"timed out: {exc}" if str(exc) else "timed out")
    if isinstance(exc, OSError):
        return TransientError(f"network error: {exc}")
    if isinstance(exc, aiosmtplib.SMTPException):
        # e.g. "SMTP AUTH extension not supported by server", STARTTLS unsupported
        return ConfigurationError(str(exc), hint="the server does not offer what the settings ask")
    if isinstance(exc, ValueError):
        return PermanentError(f"message cannot be sent: {exc}")
    return TransientError(f"{type(exc).__name__}: {exc}")


def message_bytes(message: EmailMessage | Mail) -> bytes:
    """The message as sent: CRLF line ends, 7-bit safe (compose encodes non-ASCII), no Bcc."""
    if isinstance(message, Mail):
        return message.data
    return flatten_message(message, utf8=False, cte_type="7bit")


@dataclass(slots=True)
class SendTiming:
    """Where one delivery's time went (seconds); ``connect`` includes TLS and login.

    ``reconnected``: the lane's warm connection had to be reopened for this send (the
    server closed it, or it was idle or used up); never counted as an attempt.
    """

    connect: float = 0.0
    transaction: float = 0.0
    reconnected: bool = False
    mode: str = ""
    round_trips: int = 0
    refused: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class ConnectTiming:
    tcp: float = 0.0
    tls: float = 0.0
    login: float = 0.0


def tls_context(settings: SmtpAccount) -> ssl.SSLContext:
    ctx = ssl.create_default_context(
        cafile=str(settings.smtp_ca_file) if settings.smtp_ca_file else None
    )
    if not settings.smtp_validate_certs:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Connection:
    """One lane's SMTP connection: opened on demand, kept warm, reused."""

    def __init__(
        self, settings: SmtpAccount, ssl_ctx: ssl.SSLContext | None, name: str = ""
    ) -> None:
        self.settings = settings
        self.name = name
        self._ssl = ssl_ctx
        self._smtp: FastSMTP | None = None
        self.messages = 0
        self.last_used = 0.0

    @property
    def is_open(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    def _client(self) -> FastSMTP:
        s = self.settings
        client = FastSMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            use_tls=s.smtp_tls == "ssl",
            start_tls=False,
            tls_context=self._ssl if s.smtp_tls != "none" else None,
            timeout=s.smtp_timeout_s,
            local_hostname=s.smtp_helo_name,
        )
        if s.smtp_esmtp_mode != "auto":
            client.esmtp_mode = s.smtp_esmtp_mode
        return client

    async def open(self) -> ConnectTiming:
        """Connect, TLS, login. Raises SendError (classified)."""
        await self.close()
        s = self.settings
        timing = ConnectTiming()
        client = self._client()
        t0 = time.perf_counter()
        try:
            await client.connect()
            t1 = time.perf_counter()
            timing.tls = t1 - t0 if s.smtp_tls == "ssl" else 0.0
            timing.tcp = 0.0 if s.smtp_tls == "ssl" else t1 - t0
            if s.smtp_tls == "starttls":
                await client.starttls(tls_context=self._ssl)
                timing.tls = time.perf_counter() - t1
            t2 = time.perf_counter()
            if s.smtp_username:
                password = s.smtp_password.get_secret_value() if s.smtp_password else ""
                await client.login(s.smtp_username, password)
            else:
                await client.ehlo()
            timing.login = time.perf_counter() - t2
        except asyncio.CancelledError:
            client.close()
            raise
        except Exception as exc:
            client.close()
            raise classify(exc, s.smtp_provider) from None
        self._smtp = client
        self.messages = 0
        self.last_used = time.monotonic()
        logger.debug("smtp %s: connected to %s:%s", self.name, s.smtp_host, s.smtp_port)
        return timing

    def idle(self, now: float) -> bool:
        """Unused for longer than the server keeps a connection (SMTP_IDLE_TIMEOUT_S)."""
        return now - self.last_used > self.settings.smtp_idle_timeout_s

    def _stale(self, now: float) -> bool:
        return (
            not self.is_open
            or self.idle(now)
            or self.messages >= self.settings.smtp_max_messages_per_connection
        )

    async def send(
        self, sender: str, recipients: Sequence[str], message: bytes
    ) -> tuple[TransactResult, SendTiming]:
        """One transaction; reopens a dead or idle connection first. Raises SendError."""
        timing = SendTiming()
        now = time.monotonic()
        fresh = False
        if self._stale(now):
            # A connection this lane held is gone (closed by the server, idle, used up).
            timing.reconnected = self._smtp is not None
            t0 = time.perf_counter()
            await self.open()
            timing.connect = time.perf_counter() - t0
            fresh = True
        t0 = time.perf_counter()
        try:
            result = await self._transact(sender, recipients, message)
        except asyncio.CancelledError:
            self._drop()  # a transaction cut in the middle leaves the session in no known state
            raise
        except Exception as exc:
            self._drop_if_broken(exc)
            if fresh or not isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError):
                raise classify(exc, self.settings.smtp_provider) from None
            # The server closed a connection we held warm: reopen once; not an attempt.
            logger.debug("smtp %s: warm connection was closed by the server, reopening", self.name)
            t1 = time.perf_counter()
            await self.open()
            timing.connect += time.perf_counter() - t1
            timing.reconnected = True
            t0 = time.perf_counter()
            try:
                result = await self._transact(sender, recipients, message)
            except asyncio.CancelledError:
                self._drop()
                raise
            except Exception as exc2:
                self._drop_if_broken(exc2)
                raise classify(exc2, self.settings.smtp_provider) from None
        timing.transaction = time.perf_counter() - t0
        timing.mode, timing.round_trips = result.mode, result.round_trips
        timing.refused = {a: f"{r.code} {r.message}" for a, r in result.recipient_errors.items()}
        self.messages += 1
        self.last_used = time.monotonic()
        return result, timing

    async def _transact(
        self, sender: str, recipients: Sequence[str], message: bytes
    ) -> TransactResult:
        assert self._smtp is not None
        return await self._smtp.transact(
            sender, recipients, message, timeout=self.settings.smtp_timeout_s
        )

    def _drop_if_broken(self, exc: BaseException) -> None:
        if isinstance(exc, OSError | TimeoutError | aiosmtplib.SMTPServerDisconnected):
            self._drop()

    def _drop(self) -> None:
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None

    async def close(self) -> None:
        """QUIT politely (bounded by a short timeout), then close; never raises."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        if smtp.is_connected:
            try:
                await asyncio.wait_for(smtp.quit(), timeout=1.0)
            except asyncio.CancelledError:
                smtp.close()
                raise
            except Exception:  # noqa: S110 - a failed QUIT changes nothing (QQ answers garbage)
                pass
        smtp.close()


class SmtpPool:
    """The lanes' warm connections to one SMTP account (no state of the account's own: that
    is the channel's :class:`~worker.channels.base.Health`)."""

    def __init__(self, settings: SmtpAccount, *, lanes: int) -> None:
        self.settings = settings
        ctx = tls_context(settings) if settings.smtp_tls != "none" else None
        self.connections = [Connection(settings, ctx, name=str(i)) for i in range(lanes)]

    def lane(self, index: int) -> Connection:
        return self.connections[index % len(self.connections)]

    @property
    def open_connections(self) -> int:
        return sum(1 for c in self.connections if c.is_open)

    async def warm_up(self) -> list[SendError]:
        """Open every lane's connection now, in parallel; returns the errors (if any)."""
        results = await asyncio.gather(
            *(c.open() for c in self.connections), return_exceptions=True
        )
        errors: list[SendError] = []
        for r in results:
            if isinstance(r, asyncio.CancelledError):
                raise r
            if isinstance(r, BaseException):
                errors.append(classify(r, self.settings.smtp_provider))
        return errors

    async def close_idle(self) -> None:
        """Close connections idle longer than SMTP_IDLE_TIMEOUT_S (providers drop them
        anyway; a closed one is reopened on demand)."""
        now = time.monotonic()
        for conn in self.connections:
            if conn.is_open and conn.idle(now):
                await conn.close()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.connections), return_exceptions=True)
