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

__all__ = ["Composer", "render_subject"]

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
    ) -> None:
        self.mail_from = mail_from
        name, address = parseaddr(mail_from)
        self.from_name = name or "notifier"
        self.from_address = address
        self.domain = address.rpartition("@")[2] or hostname or socket.getfqdn()
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
        }

    def compose(
        self,
        event: Event,
        *,
        event_id: str,
        recipients: Sequence[str],
        subject: str | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> EmailMessage:
        subject = subject or render_subject(event)
        ctx = self.context(event, event_id, subject)
        msg = EmailMessage(policy=policy.SMTP)
        msg["Subject"] = subject
        msg["From"] = formataddr((self.from_name, self.from_address))
        msg["To"] = ", ".join(recipients)
        msg["Date"] = format_datetime(datetime.fromtimestamp(time.time()).astimezone())
        msg["Message-ID"] = message_id(event_id, self.domain)
        msg["X-Notifier-Event-Id"] = (
            event_id if _ATEXT.fullmatch(event_id) else message_id(event_id, self.domain)[1:-1]
        )
        msg["X-Notifier-Severity"] = event.severity
        if event.severity == "critical":
            msg["X-Priority"] = "1"
            msg["Importance"] = "high"
        if event.strategy:
            msg["X-Notifier-Strategy"] = _line(event.strategy)
        for name, value in (extra_headers or {}).items():
            msg[name] = value
        msg.set_content(self._txt.render(ctx), subtype="plain", charset="utf-8", cte="base64")
        msg.add_alternative(self._html.render(ctx), subtype="html", charset="utf-8", cte="base64")
        return msg
