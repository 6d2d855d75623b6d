"""Alert -> the bytes of a MIME mail: headers, a plain-text part and an HTML part.

What an alert says is decided once for every channel, in ``worker/content.py``
(:class:`~worker.content.Alert`, :class:`~worker.content.Digest`); this module renders it
as mail. :meth:`Composer.render_mail` / :meth:`Composer.render_digest` say what the mail
says, as a :class:`Draft` (subject, sender, recipients, the other headers, the two texts);
:func:`mime_bytes` then writes it. :meth:`Composer.compose` / :meth:`Composer.compose_digest`
do both steps from events. The MIME is written directly, not with
``email.message.EmailMessage``: that costs ~2 ms of CPU a mail, most of the worker's time at
high rates, where this costs ~0.1 ms. What the writer
guarantees (and ``tests/test_mail_differential.py`` checks against the standard library on
random input):

* every header reads back (``email.parser``, ``policy=email.policy.default``) exactly as
  given: inner white space, ideographic and no-break spaces, leading and trailing spaces,
  text that looks like an encoded word (``=?``);
* header lines are folded as RFC 5322 asks: at most 78 characters where a fold is possible,
  never more than 998. Printable ASCII text is folded at its spaces; any other text (not
  ASCII, ``=?``, leading or trailing space, a word too long to fold) is written as RFC 2047
  encoded words of its literal text (UTF-8, base64, at most 75 characters each, whole
  characters only). Address, Message-ID and Date headers are ASCII and folded at spaces;
* text parts are canonical: every CR, LF or CRLF is CRLF (UTF-8, base64, 76-character lines);
* only CRLF line ends on the wire; CR/LF in a header value is refused (``ValueError``).

Every mail carries ``Auto-Submitted: auto-generated`` (RFC 3834) and
``X-Auto-Response-Suppress: All`` (Exchange/Outlook), so vacation replies and read receipts
do not answer alerts. The Message-ID names the event id plus a hash of the event's content
(:func:`event_key`): a retry or duplicate copy of an event keeps it (receivers fold the
duplicate), a new event that reuses an id gets a new one.

:class:`Mail` parses itself back into an ``EmailMessage`` on demand (tests, tools). The
body parts come from Jinja2 templates (``mail.txt.j2``, ``mail.html.j2``, ``digest.*.j2``;
HTML autoescaped), which ``TEMPLATE_DIR`` can override file by file.
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from pathlib import Path
from typing import Any

import jinja2

from producer.event import Event

from .content import (
    SEVERITY_LABEL,
    Alert,
    Digest,
    Thread,
    build_alert,
    build_digest,
    delayed_prefix,
    event_key,
    format_delay,
    format_value,
    render_subject,
    repeated_note,
)

__all__ = [
    "AUTO_HEADERS",
    "SEVERITY_LABEL",
    "Composer",
    "Draft",
    "Mail",
    "delayed_prefix",
    "event_key",
    "format_delay",
    "message_id",
    "mime_bytes",
    "render_subject",
    "repeated_note",
]

_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
SEVERITY_COLOUR = {"info": "#2f6fbf", "warning": "#c77c00", "critical": "#c62828"}

# RFC 3834 and Exchange's equivalent: no vacation replies, receipts or other auto-answers.
AUTO_HEADERS = (("Auto-Submitted", "auto-generated"), ("X-Auto-Response-Suppress", "All"))


def _id_part(event_id: str, size: int = 32) -> str:
    """The id itself when it is a dot-atom (valid left of the @) that no reader could take
    for an encoded word (``=?``), else ``size`` hex digits of its hash."""
    if _ATEXT.fullmatch(event_id) and "=?" not in event_id:
        return event_id
    return hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).hexdigest()[:size]


def message_id(event_id: str, domain: str) -> str:
    """``<event-id@domain>``; ids that are not a valid dot-atom are hashed. (What
    ``X-Notifier-Event-Id`` shows for such ids; the Message-ID adds :func:`event_key`.)"""
    return f"<{_id_part(event_id)}@{domain}>"


class Mail:
    """A composed mail: the bytes as sent, plus what the worker logs about it. Reading it as
    a mapping or message (``mail["Subject"]``, ``mail.get_body(...)``) parses the bytes
    back into an ``EmailMessage`` first (not on the hot path)."""

    __slots__ = ("_parsed", "data", "draft", "message_id", "subject")

    def __init__(
        self, data: bytes, subject: str, message_id: str, draft: Draft | None = None
    ) -> None:
        self.data = data
        self.subject = subject
        self.message_id = message_id
        self.draft = draft  # what was written (the differential test compares with it)
        self._parsed: EmailMessage | None = None

    @classmethod
    def of(cls, draft: Draft) -> Mail:
        return cls(mime_bytes(draft), draft.subject, draft.message_id, draft)

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


@dataclass(frozen=True, slots=True)
class Draft:
    """What a mail says, before it is written as MIME (:func:`mime_bytes`).

    ``headers`` are the other header fields in order; those named in ``STRUCTURED``
    (Message-ID, In-Reply-To, References, Date) must be printable ASCII, the others are
    free text. ``sender`` is (display name, address).
    """

    subject: str
    sender: tuple[str, str]
    recipients: tuple[str, ...]
    message_id: str
    headers: tuple[tuple[str, str], ...]
    text: str
    html: str


# ---------------------------------------------------------------------- the MIME writer
FOLD_AT = 78  # RFC 5322 2.1.1: SHOULD be at most 78 characters a line...
MAX_LINE = 998  # ...MUST be at most 998
MAX_WORD = 75  # RFC 2047 2: an encoded word is at most 75 characters
STRUCTURED = frozenset({"message-id", "in-reply-to", "references", "date"})
_WORD_OVERHEAD = len("=?utf-8?b??=")
_PLAIN_TEXT = re.compile(r"[!-~](?:[ -~]*[!-~])?")  # printable ASCII, no edge spaces
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_ENCODED_WORD = re.compile(r"=\?[^?]*\?[^?]*\?[^?]*\?=")
_TOKENS = re.compile(r" *[^ ]+")  # a word with the spaces before it: where a fold may go


def _fold(head: str, tokens: Sequence[str], limit: int) -> str | None:
    """``head`` + tokens, a fold (CRLF) before a token that would pass ``limit``; each
    token but the first starts with white space. None when a token cannot fit."""
    lines: list[str] = []
    line = head
    for token in tokens:
        if len(line) + len(token) <= limit or line is head:
            line += token
        else:
            lines.append(line)
            line = token
        if len(line) > limit:
            return None
    lines.append(line)
    return "\r\n".join(lines)


def _words(head: str, text: str) -> str:
    """``head`` + ``text`` as base64 encoded words of whole UTF-8 characters, one a line,
    each line within 78 characters (the first one's room shrinks with the header name)."""
    raw = text.encode("utf-8")
    lines: list[str] = []
    room = max(FOLD_AT - len(head) - 1, 0)  # the first word follows "Name: "
    start = 0
    while start < len(raw):
        size = max((min(room, MAX_WORD) - _WORD_OVERHEAD) // 4 * 3, 4)
        end = min(start + size, len(raw))
        while end < len(raw) and 0x80 <= raw[end] < 0xC0:  # never split a character
            end -= 1
        if end <= start:  # a character longer than the room (only with huge names)
            end = start + 1
            while end < len(raw) and 0x80 <= raw[end] < 0xC0:
                end += 1
        lines.append(f"=?utf-8?b?{base64.b64encode(raw[start:end]).decode('ascii')}?=")
        start, room = end, FOLD_AT - 1
    return head + " " + "\r\n ".join(lines)


def _check(name: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise ValueError(f"header {name} would contain a line break")


def _text_header(name: str, value: str) -> str:
    """Unstructured text: folded at its spaces when it is plain ASCII that folds, else
    encoded words (the reader always gets the literal text back)."""
    if len(name) + len(value) <= FOLD_AT - 2 and _PLAIN_TEXT.fullmatch(value) and "=?" not in value:
        return f"{name}: {value}"  # the common case: one short line as is
    _check(name, value)
    head = f"{name}:"
    if not value:
        return head
    if _PLAIN_TEXT.fullmatch(value) and "=?" not in value:
        tokens = _TOKENS.findall(value)
        tokens[0] = " " + tokens[0]
        folded = _fold(head, tokens, FOLD_AT)
        if folded is not None:
            return folded
    return _words(head, value)


def _structured_header(name: str, value: str) -> str:
    """Addresses, ids, dates: printable ASCII folded at spaces, lines up to 998 at worst."""
    if len(name) + len(value) <= FOLD_AT - 2 and _PLAIN_TEXT.fullmatch(value):
        return f"{name}: {value}"  # the common case: one short line as is
    _check(name, value)
    if not value.isascii() or not value.isprintable():
        raise ValueError(f"header {name} must be printable ASCII")
    tokens = _TOKENS.findall(value)
    if not tokens:
        return f"{name}:"
    tokens[0] = " " + tokens[0].lstrip(" ")
    lines = _fold(f"{name}:", tokens, FOLD_AT)
    if lines is None:  # an unbreakable token over 78: allowed, up to the hard limit
        lines = _fold(f"{name}:", tokens, MAX_LINE)
        if lines is None:
            raise ValueError(f"header {name} has a word longer than {MAX_LINE} octets")
    return lines


@functools.lru_cache(maxsize=64)
def _address_header(name: str, display: str, address: str) -> str:
    """``From: Display Name <address>``: the name quoted when ASCII, else encoded words."""
    _check(name, display)
    _check(name, address)
    if not display:
        return _structured_header(name, address)
    # A quoted-string keeps "=?" and runs of spaces as they are (inside an encoded word,
    # parsers collapse the spaces), unless it holds a whole encoded word, which parsers
    # decode even there: then encoded words of the literal text.
    if _PLAIN_TEXT.fullmatch(display) and not _ENCODED_WORD.search(display):
        if _ATOMS.fullmatch(display) and "=?" not in display:
            phrase = display
        else:  # a quoted-string keeps specials and runs of spaces as they are
            phrase = '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"'
        folded = _fold(f"{name}:", [" " + phrase, f" <{address}>"], FOLD_AT)
        if folded is not None:
            return folded
    words = _words(f"{name}:", display)
    last = words.rsplit("\r\n", 1)[-1]
    sep = " " if len(last) + len(address) + 3 <= FOLD_AT else "\r\n "
    return f"{words}{sep}<{address}>"


def _text_part(subtype: str, text: str) -> bytes:
    if "\r" in text:  # CR, LF and CRLF all become CRLF (str.replace beats a regex here)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    body = text.replace("\n", "\r\n")
    if not body.endswith("\r\n"):
        body += "\r\n"
    b64 = base64.b64encode(body.encode("utf-8"))
    lines = [b64[i : i + 76] for i in range(0, len(b64), 76)]
    head = f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: base64'
    return b"%s\r\n\r\n%s\r\n" % (head.encode("ascii"), b"\r\n".join(lines))


_AUTO = "".join(f"{n}: {v}\r\n" for n, v in AUTO_HEADERS)
_CRLF = "\r\n"


def mime_bytes(draft: Draft, *, date: str | None = None) -> bytes:
    """The draft as the bytes of a multipart/alternative mail (CRLF, 7-bit)."""
    lines = [
        _text_header("Subject", draft.subject),
        _address_header("From", *draft.sender),
        _structured_header("To", ", ".join(draft.recipients)),
        _structured_header("Date", date or formatdate(time.time(), localtime=True)),
        _structured_header("Message-ID", draft.message_id),
    ]
    for name, value in draft.headers:
        if name.lower() in STRUCTURED:
            lines.append(_structured_header(name, value))
        else:
            lines.append(_text_header(name, value))
    boundary = f"=_notifier_{uuid.uuid4().hex}"
    lines.append(_AUTO + "MIME-Version: 1.0")
    lines.append(f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n\r\n')
    sep = f"--{boundary}\r\n".encode("ascii")
    parts = (sep, _text_part("plain", draft.text), b"\r\n", sep, _text_part("html", draft.html))
    end = f"\r\n--{boundary}--\r\n".encode("ascii")
    return b"".join((_CRLF.join(lines).encode("ascii"), *parts, end))


@functools.lru_cache(maxsize=64)
def _parse_sender(sender: str) -> tuple[str, str]:
    return parseaddr(sender)


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
        self.env.filters["num"] = format_value  # values are text already; kept for old templates
        self._txt = self.env.get_template("mail.txt.j2")
        self._html = self.env.get_template("mail.html.j2")

    def context(self, alert: Alert) -> dict[str, Any]:
        """What the mail templates see: the alert (``alert``) and, by the names the
        templates have always used, its fields (``data`` is its rows, values as text)."""
        return {
            "alert": alert,
            "event": alert.source,
            "id": alert.event_id,
            "subject": alert.subject,
            "severity": alert.severity,
            "severity_label": SEVERITY_LABEL[alert.severity],
            "colour": SEVERITY_COLOUR[alert.severity],
            "strategy": alert.strategy,
            "kind": alert.kind,
            "body": alert.text,
            "data": alert.rows,
            "produced": alert.produced,
            "notes": alert.notes,
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
        """One event's mail: :func:`~worker.content.build_alert`, then :meth:`render_mail`.
        ``subject`` replaces the rendered subject line as given; ``notes`` are shown above
        the body (e.g. "repeated 37× in 5 min"); ``sender`` replaces MAIL_FROM (a failover
        account's own address)."""
        alert = build_alert(event, event_id=event_id, subject=subject or None, notes=notes)
        return self.render_mail(
            alert, recipients=recipients, sender=sender, extra_headers=extra_headers
        )

    def render_mail(
        self,
        alert: Alert,
        *,
        recipients: Sequence[str],
        sender: str | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> Mail:
        """The mail of one alert: its subject as is, severity and strategy headers, the
        thread of its strategy and day (``THREAD_BY_DAY``), a Message-ID of its id and
        content key, and the two templates rendered from :meth:`context`."""
        left = _id_part(alert.event_id)
        headers = [
            (
                "X-Notifier-Event-Id",
                alert.event_id if left == alert.event_id else f"{left}@{self.domain}",
            ),
            ("X-Notifier-Severity", alert.severity),
        ]
        if alert.severity == "critical":
            headers += [("X-Priority", "1"), ("Importance", "high")]
        if alert.strategy:
            headers.append(("X-Notifier-Strategy", alert.strategy))
        if self.thread_by_day:
            headers += self._thread(alert.thread)
        if extra_headers:
            headers += extra_headers.items()
        ctx = self.context(alert)
        return self._mail(
            subject=alert.subject,
            texts=(self._txt.render(ctx), self._html.render(ctx)),
            sender=sender,
            recipients=recipients,
            message_id=f"<{alert.key}.{left}@{self.domain}>",
            headers=headers,
        )

    def compose_digest(
        self,
        events: Sequence[tuple[str, Event]],
        *,
        recipients: Sequence[str],
        sender: str | None = None,
        reason: str = "",
    ) -> Mail:
        """One mail for many events (oldest first), sent when the account's rate limit was
        reached: :func:`~worker.content.build_digest`, then :meth:`render_digest`."""
        digest = build_digest(events, reason=reason)
        return self.render_digest(digest, recipients=recipients, sender=sender)

    def render_digest(
        self, digest: Digest, *, recipients: Sequence[str], sender: str | None = None
    ) -> Mail:
        """The mail of a digest: a table of its events, the counts in the subject. Its
        Message-ID follows its events (ids and contents): a retry of the same digest keeps
        it, another set of events gets another."""
        rows = [
            {
                "id": row.event_id,
                "time": row.time,
                "strategy": row.strategy or "",
                "kind": row.kind,
                "severity": row.severity,
                "subject": row.subject,
                "body": row.text,
                "data": row.rows,
            }
            for row in digest.rows
        ]
        ctx = {
            "digest": digest,
            "subject": digest.subject,
            "rows": rows,
            "count": digest.count,
            "reason": digest.reason,
            "kinds": dict(digest.kinds),
            "strategies": dict(digest.strategies),
        }
        first = _id_part(digest.rows[0].event_id) if digest.rows else "empty"
        members = "".join(f"{_id_part(row.event_id)} {row.key}\n" for row in digest.rows)
        key = hashlib.blake2b(members.encode("ascii"), digest_size=6).hexdigest()
        headers = [("X-Notifier-Digest", str(digest.count))]
        if self.thread_by_day and digest.thread is not None:
            headers += self._thread(digest.thread)
        texts = (
            self.env.get_template("digest.txt.j2").render(ctx),
            self.env.get_template("digest.html.j2").render(ctx),
        )
        return self._mail(
            subject=digest.subject,
            texts=texts,
            sender=sender,
            recipients=recipients,
            message_id=f"<{key}.digest.{first}.{digest.count}@{self.domain}>",
            headers=headers,
        )

    def _mail(
        self,
        *,
        subject: str,
        texts: tuple[str, str],
        sender: str | None,
        recipients: Sequence[str],
        message_id: str,
        headers: Iterable[tuple[str, str]],
    ) -> Mail:
        text, html = texts
        return Mail.of(
            Draft(
                subject=subject,
                sender=self._sender(sender),
                recipients=tuple(recipients),
                message_id=message_id,
                headers=tuple(headers),
                text=text,
                html=html,
            )
        )

    def _sender(self, sender: str | None) -> tuple[str, str]:
        if not sender:
            return self.from_name, self.from_address
        name, address = _parse_sender(sender)
        return name or self.from_name, address

    def _thread(self, thread: Thread) -> list[tuple[str, str]]:
        """A strategy's alerts of one (local) day form one thread in mail clients: each
        refers to the same (virtual) root message."""
        root = f"<thread.{_id_part(thread.strategy, 16)}.{thread.day}@{self.domain}>"
        return [("In-Reply-To", root), ("References", root)]
