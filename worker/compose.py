"""Event -> the bytes of a MIME mail: headers, a plain-text part and an HTML part.

The mail is written directly (CRLF line ends; headers that are not plain ASCII, or that
contain ``=?``, are RFC 2047 encoded words of their literal text; both parts UTF-8 base64),
not built with ``email.message.EmailMessage``: that costs ~2 ms of CPU a mail, most of the
worker's time at high rates, where this costs ~0.1 ms. :class:`Mail` parses itself back into
an ``EmailMessage`` on demand (tests, tools). The body parts come from Jinja2 templates
(``mail.txt.j2``, ``mail.html.j2``, ``digest.*.j2``; HTML autoescaped), which
``TEMPLATE_DIR`` can override file by file.
"""

from __future__ import annotations

import base64
import email
import email.policy
import functools
import hashlib
import re
import socket
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from email.message import EmailMessage
from email.utils import formataddr, formatdate, parseaddr
from pathlib import Path
from typing import Any

import jinja2

from producer.event import Event

__all__ = [
    "Composer",
    "Mail",
    "delayed_prefix",
    "format_delay",
    "render_subject",
    "repeated_note",
]

_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_SPACES = re.compile(r"\s+")
SEVERITY_LABEL = {"info": "INFO", "warning": "WARNING", "critical": "CRITICAL"}
SEVERITY_COLOUR = {"info": "#2f6fbf", "warning": "#c77c00", "critical": "#c62828"}


def _line(value: Any) -> str:
    """Any value as one line of text (headers never get CR/LF from data)."""
    return _SPACES.sub(" ", str(value)).strip()


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.6g}"
    return _line(value)


def render_subject(event: Event) -> str:
    """The subject line: the event's own, or one rendered from it; ``[CRITICAL]`` prefixed."""
    if event.subject:
        subject = event.subject
    else:
        data = event.data or {}
        side, symbol = data.get("side"), data.get("symbol")
        if side is not None and symbol is not None:
            subject = f"[{_line(side).upper()}] {_line(symbol)}"
            if data.get("qty") is not None:
                subject += f" {_number(data['qty'])}"
            if data.get("price") is not None:
                subject += f" @ {_number(data['price'])}"
        else:
            first = (event.body or "").strip().splitlines()
            text = (
                _line(first[0])
                if first
                else ", ".join(f"{_line(k)}={_line(v)}" for k, v in list(data.items())[:4])
            )
            subject = f"[{event.kind.upper()}] {text}" if text else f"[{event.kind.upper()}]"
        if event.strategy:
            subject += f" · {event.strategy}"
    subject = _line(subject)[:250]
    if event.severity == "critical" and not subject.upper().startswith("[CRITICAL]"):
        subject = f"[CRITICAL] {subject}"
    return subject


def message_id(event_id: str, domain: str) -> str:
    """``<event-id@domain>``; ids that are not a valid dot-atom are hashed."""
    left = (
        event_id
        if _ATEXT.fullmatch(event_id)
        else hashlib.sha256(event_id.encode()).hexdigest()[:32]
    )
    return f"<{left}@{domain}>"


class Mail:
    """A composed mail: the bytes as sent, plus what the worker logs about it. Reading it as
    a mapping or message (``mail["Subject"]``, ``mail.get_body(...)``) parses the bytes
    back into an ``EmailMessage`` first (not on the hot path)."""

    __slots__ = ("_parsed", "data", "message_id", "subject")

    def __init__(self, data: bytes, subject: str, message_id: str) -> None:
        self.data = data
        self.subject = subject
        self.message_id = message_id
        self._parsed: EmailMessage | None = None

    def message(self) -> EmailMessage:
        if self._parsed is None:
            parsed = email.message_from_bytes(self.data, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            self._parsed = parsed
        return self._parsed

    def __getitem__(self, name: str) -> Any:
        return self.message()[name]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message(), name)

    def __bytes__(self) -> bytes:
        return self.data


_MAX_HEADER_LINE = 900  # RFC 5322 allows 998 octets a line


@functools.lru_cache(maxsize=64)
def _parse_sender(sender: str) -> tuple[str, str]:
    return parseaddr(sender)


def _encoded_words(value: str) -> str:
    """RFC 2047 base64 encoded words of ``value`` (UTF-8), at most 75 characters each,
    never splitting a character, folded with CRLF + space."""
    words: list[str] = []
    chunk: list[str] = []
    size = 0
    for ch in value:
        n = len(ch.encode("utf-8"))
        if size + n > 45:  # 45 bytes -> 60 base64 characters + 12 of framing
            words.append("".join(chunk))
            chunk, size = [], 0
        chunk.append(ch)
        size += n
    words.append("".join(chunk))
    return "\r\n ".join(
        f"=?utf-8?b?{base64.b64encode(w.encode('utf-8')).decode('ascii')}?=" for w in words
    )


def _header(name: str, value: str) -> bytes:
    """``Name: value`` + CRLF. Plain ASCII is written as is; anything else, and any text
    containing ``=?`` (which a reader would decode as an encoded word), is RFC 2047 encoded,
    so a reader always gets the literal text back. CR/LF never reach the wire."""
    if "\r" in value or "\n" in value:
        raise ValueError(f"header {name} would contain a line break")
    if (
        value.isascii()
        and "=?" not in value
        and len(value) < _MAX_HEADER_LINE
        and (value.isprintable())
    ):
        return f"{name}: {value}\r\n".encode("ascii")
    return f"{name}: {_encoded_words(value)}\r\n".encode("ascii")


def _address_header(field: str, display: str, address: str) -> bytes:
    """``From: Display Name <address>`` with the display name encoded when it needs to be."""
    if "\r" in display or "\n" in display or "\r" in address or "\n" in address:
        raise ValueError(f"header {field} would contain a line break")
    if display.isascii() and display.isprintable() and "=?" not in display:
        value = formataddr((display, address))
    else:
        value = f"{_encoded_words(display)} <{address}>"
    return f"{field}: {value}\r\n".encode("ascii")


def _base64_part(content_type: str, text: str) -> bytes:
    body = text.replace("\r\n", "\n").replace("\n", "\r\n")
    if not body.endswith("\r\n"):
        body += "\r\n"
    encoded = base64.encodebytes(body.encode("utf-8")).replace(b"\n", b"\r\n")
    return (
        f'Content-Type: {content_type}; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode("ascii") + encoded


def _alternative(headers: bytes, plain: str, html: str) -> bytes:
    boundary = f"=_notifier_{uuid.uuid4().hex}"
    sep = f"--{boundary}\r\n".encode("ascii")
    return b"".join((
        headers,
        b"MIME-Version: 1.0\r\n",
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'.encode("ascii"),
        sep, _base64_part("text/plain", plain), b"\r\n",
        sep, _base64_part("text/html", html), b"\r\n",
        f"--{boundary}--\r\n".encode("ascii"),
    ))  # fmt: skip


class Composer:
    def __init__(
        self,
        *,
        mail_from: str,
        template_dir: Path | None = None,
        hostname: str | None = None,
        thread_by_day: bool = True,
    ) -> None:
        self.thread_by_day = thread_by_day
        self.mail_from = mail_from
        name, address = parseaddr(mail_from)
        self.from_name = name or "notifier"
        self.from_address = address
        domain = address.rpartition("@")[2] if "@" in address else ""
        self.domain = domain or hostname or socket.getfqdn()
        loaders: list[jinja2.BaseLoader] = []
        if template_dir is not None:
            loaders.append(jinja2.FileSystemLoader(str(template_dir)))
        loaders.append(jinja2.PackageLoader("worker", "templates"))
        self.env = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            autoescape=jinja2.select_autoescape(
                enabled_extensions=("html", "html.j2"), default_for_string=True
            ),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["num"] = _number
        self._txt = self.env.get_template("mail.txt.j2")
        self._html = self.env.get_template("mail.html.j2")

    def context(self, event: Event, event_id: str, subject: str) -> dict[str, Any]:
        produced = datetime.fromtimestamp(event.ts).astimezone() if event.ts else None
        return {
            "event": event,
            "id": event_id,
            "subject": subject,
            "severity": event.severity,
            "severity_label": SEVERITY_LABEL[event.severity],
            "colour": SEVERITY_COLOUR[event.severity],
            "strategy": event.strategy,
            "kind": event.kind,
            "body": event.body,
            "data": list((event.data or {}).items()),
            "produced": produced.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + produced.strftime(" %z")
            if produced
            else None,
            "notes": [],
        }

    def compose(
        self,
        event: Event,
        *,
        event_id: str,
        recipients: Sequence[str],
        subject: str | None = None,
        extra_headers: dict[str, str] | None = None,
        notes: Sequence[str] = (),
        sender: str | None = None,
    ) -> Mail:
        """One event's mail. ``notes`` are shown above the body (e.g. "repeated 37× in
        5 min"); ``sender`` replaces MAIL_FROM (a failover account's own address)."""
        subject = subject or render_subject(event)
        ctx = self.context(event, event_id, subject)
        ctx["notes"] = list(notes)
        msg_id = message_id(event_id, self.domain)
        headers = [self._headers(subject, recipients, msg_id, sender)]
        hdr = headers.append
        hdr(_header("X-Notifier-Event-Id",
                    event_id if _ATEXT.fullmatch(event_id) else msg_id[1:-1]))  # fmt: skip
        hdr(_header("X-Notifier-Severity", event.severity))
        if event.severity == "critical":
            hdr(b"X-Priority: 1\r\nImportance: high\r\n")
        if event.strategy:
            hdr(_header("X-Notifier-Strategy", _line(event.strategy)))
        if self.thread_by_day:
            hdr(self._thread(event.strategy, event.ts))
        for name, value in (extra_headers or {}).items():
            hdr(_header(name, value))
        data = _alternative(b"".join(headers), self._txt.render(ctx), self._html.render(ctx))
        return Mail(data, subject, msg_id)

    def compose_digest(
        self,
        events: Sequence[tuple[str, Event]],
        *,
        recipients: Sequence[str],
        sender: str | None = None,
        reason: str = "",
    ) -> Mail:
        """One mail for many events (oldest first), sent when the account's rate limit was
        reached: a table of all of them, the counts in the subject."""
        ordered = sorted(events, key=lambda ie: ie[1].ts or 0.0)
        kinds: dict[str, int] = {}
        strategies: dict[str, int] = {}
        for _, ev in ordered:
            kinds[ev.kind] = kinds.get(ev.kind, 0) + 1
            if ev.strategy:
                strategies[ev.strategy] = strategies.get(ev.strategy, 0) + 1
        counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
        who = ", ".join(list(strategies)[:3]) + (" …" if len(strategies) > 3 else "")
        subject = _line(f"[DIGEST] {len(ordered)} alerts: {counts}" + (f" · {who}" if who else ""))
        rows = []
        for event_id, ev in ordered:
            when = datetime.fromtimestamp(ev.ts).astimezone() if ev.ts else None
            rows.append({
                "id": event_id, "time": when.strftime("%H:%M:%S") if when else "",
                "strategy": ev.strategy or "", "kind": ev.kind, "severity": ev.severity,
                "subject": render_subject(ev), "body": ev.body or "",
                "data": list((ev.data or {}).items()),
            })  # fmt: skip
        ctx = {"subject": subject, "rows": rows, "count": len(rows), "reason": reason,
               "kinds": kinds, "strategies": strategies}  # fmt: skip
        first = ordered[0][0] if ordered else "empty"
        msg_id = message_id(f"digest.{first}.{len(ordered)}", self.domain)
        headers = [self._headers(subject, recipients, msg_id, sender)]
        headers.append(_header("X-Notifier-Digest", str(len(ordered))))
        if self.thread_by_day and len(strategies) == 1:
            headers.append(self._thread(next(iter(strategies)), ordered[0][1].ts))
        data = _alternative(
            b"".join(headers),
            self.env.get_template("digest.txt.j2").render(ctx),
            self.env.get_template("digest.html.j2").render(ctx),
        )
        return Mail(data, subject, msg_id)

    def _headers(
        self, subject: str, recipients: Sequence[str], msg_id: str, sender: str | None
    ) -> bytes:
        name, address = _parse_sender(sender) if sender else (self.from_name, self.from_address)
        return b"".join((
            _header("Subject", subject),
            _address_header("From", name or self.from_name, address),
            _header("To", ", ".join(recipients)),
            _header("Date", formatdate(time.time(), localtime=True)),
            _header("Message-ID", msg_id),
        ))  # fmt: skip

    def _thread(self, strategy: str | None, ts: float | None) -> bytes:
        """A strategy's alerts of one (local) day form one thread in mail clients: each
        refers to the same (virtual) root message."""
        day = datetime.fromtimestamp(ts or time.time()).astimezone().strftime("%Y%m%d")
        who = strategy or "notifier"
        key = who if _ATEXT.fullmatch(who) else hashlib.sha256(who.encode()).hexdigest()[:16]
        root = f"<thread.{key}.{day}@{self.domain}>"
        return _header("In-Reply-To", root) + _header("References", root)


def format_delay(seconds: float, locale: str = "en") -> str:
    """``3m12s`` / ``3分12秒``; hours and days for long outages."""
    s = int(seconds)
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if locale == "zh":
        parts = [(d, "天"), (h, "小时"), (m, "分"), (sec, "秒")]
        return "".join(f"{v}{u}" for v, u in parts if v) or "0秒"
    parts = [(d, "d"), (h, "h"), (m, "m"), (sec, "s")]
    return "".join(f"{v}{u}" for v, u in parts if v) or "0s"


def delayed_prefix(seconds: float, locale: str = "en") -> str:
    return (
        f"[延迟 {format_delay(seconds, 'zh')}]"
        if locale == "zh"
        else (f"[DELAYED {format_delay(seconds)}]")
    )


def _span(seconds: float, locale: str) -> str:
    s = max(1, round(seconds))
    if locale == "zh":
        return (
            f"{s} 秒" if s < 60 else f"{round(s / 60)} 分钟" if s < 3600 else f"{s / 3600:.1f} 小时"
        )
    return f"{s} s" if s < 60 else f"{round(s / 60)} min" if s < 3600 else f"{s / 3600:.1f} h"


def repeated_note(count: int, since: float, now: float, locale: str = "en") -> str:
    """``repeated 37× in 5 min``: the suppressed repeats of the previous window."""
    span = _span(now - since, locale)
    if locale == "zh":
        return f"此前 {span}内重复 {count} 次（已合并）"
    return f"repeated {count}× in {span}"
