"""Event -> ``email.message.EmailMessage``: headers, a plain-text part and an HTML part.

Headers use ``email.policy.SMTP`` (non-ASCII encoded per RFC 2047, CRLF line ends); the body
parts come from Jinja2 templates (``mail.txt.j2``, ``mail.html.j2``; HTML autoescaped), which
``TEMPLATE_DIR`` can override file by file.
"""

from __future__ import annotations

import hashlib
import re
import socket
import time
from collections.abc import Sequence
from datetime import datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, parseaddr
from pathlib import Path
from typing import Any

import jinja2

from producer.event import Event

__all__ = ["Composer", "delayed_prefix", "format_delay", "render_subject", "repeated_note"]

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
    ) -> EmailMessage:
        """One event's mail. ``notes`` are shown above the body (e.g. "repeated 37× in
        5 min"); ``sender`` replaces MAIL_FROM (a failover account's own address)."""
        subject = subject or render_subject(event)
        ctx = self.context(event, event_id, subject)
        ctx["notes"] = list(notes)
        msg = self._headers(subject, recipients, message_id(event_id, self.domain), sender)
        msg["X-Notifier-Event-Id"] = (
            event_id if _ATEXT.fullmatch(event_id) else message_id(event_id, self.domain)[1:-1]
        )
        msg["X-Notifier-Severity"] = event.severity
        if event.severity == "critical":
            msg["X-Priority"] = "1"
            msg["Importance"] = "high"
        if event.strategy:
            msg["X-Notifier-Strategy"] = _line(event.strategy)
        if self.thread_by_day:
            self._thread(msg, event.strategy, event.ts)
        for name, value in (extra_headers or {}).items():
            msg[name] = value
        msg.set_content(self._txt.render(ctx), subtype="plain", charset="utf-8", cte="base64")
        msg.add_alternative(self._html.render(ctx), subtype="html", charset="utf-8", cte="base64")
        return msg

    def compose_digest(
        self,
        events: Sequence[tuple[str, Event]],
        *,
        recipients: Sequence[str],
        sender: str | None = None,
        reason: str = "",
    ) -> EmailMessage:
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
        msg = self._headers(
            subject, recipients, message_id(f"digest.{first}.{len(ordered)}", self.domain), sender
        )
        msg["X-Notifier-Digest"] = str(len(ordered))
        if self.thread_by_day and len(strategies) == 1:
            self._thread(msg, next(iter(strategies)), ordered[0][1].ts)
        msg.set_content(self.env.get_template("digest.txt.j2").render(ctx), subtype="plain",
                        charset="utf-8", cte="base64")  # fmt: skip
        msg.add_alternative(self.env.get_template("digest.html.j2").render(ctx), subtype="html",
                            charset="utf-8", cte="base64")  # fmt: skip
        return msg

    def _headers(
        self, subject: str, recipients: Sequence[str], msg_id: str, sender: str | None
    ) -> EmailMessage:
        name, address = parseaddr(sender) if sender else (self.from_name, self.from_address)
        msg = EmailMessage(policy=policy.SMTP)
        msg["Subject"] = subject
        msg["From"] = formataddr((name or self.from_name, address))
        msg["To"] = ", ".join(recipients)
        msg["Date"] = format_datetime(datetime.fromtimestamp(time.time()).astimezone())
        msg["Message-ID"] = msg_id
        return msg

    def _thread(self, msg: EmailMessage, strategy: str | None, ts: float | None) -> None:
        """A strategy's alerts of one (local) day form one thread in mail clients: each
        refers to the same (virtual) root message."""
        day = datetime.fromtimestamp(ts or time.time()).astimezone().strftime("%Y%m%d")
        who = strategy or "notifier"
        key = who if _ATEXT.fullmatch(who) else hashlib.sha256(who.encode()).hexdigest()[:16]
        root = f"<thread.{key}.{day}@{self.domain}>"
        msg["In-Reply-To"] = root
        msg["References"] = root


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
